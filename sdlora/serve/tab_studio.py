"""The Generate and Evaluate tabs: sdlora generate with a run's LoRA, sdlora eval with a link to its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.serve import studio
from sdlora.serve.jobs import Jobs
from sdlora.serve.launch import report_url
from sdlora.serve.page import guarded
from sdlora.serve.workspace import Workspace

BESIDE = (
    "Generate and Evaluate run at once, beside a training run if one is running (not queued behind it): on one GPU "
    "both slow down, and a large base may not fit twice; Stop or wait for the run on the Runs tab if memory is short."
)


def samplers() -> list[str]:
    """generate.scheduler's choices, from the config (empty: the base's own)."""
    import typing

    from sdlora.config import Config

    section = Config.model_fields["generate"].annotation
    return ["", *typing.get_args(section.model_fields["scheduler"].annotation)]  # type: ignore[union-attr]


def generate_tab(ws: Workspace, jobs: Jobs) -> dict[str, Any]:
    gr.Markdown(f"**4. Generate** with a run's LoRA. {BESIDE}")
    with gr.Row():
        lora = gr.Dropdown(
            label="LoRA: a run's final or best checkpoint",
            choices=studio.lora_labels(ws),
            value=None,
            elem_id="gen-lora",
        )
        weight = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA weight", elem_id="gen-weight")
        base = gr.Dropdown(
            label="base model (empty: the run's)", choices=ws.base_models(), value=None, allow_custom_value=True
        )
    prompt = gr.Textbox(label="prompt ({trigger} is the person)", value="a photo of {trigger}", elem_id="prompt")
    negative = gr.Textbox(label="negative prompt (optional)", value="", elem_id="gen-negative")
    with gr.Row():
        seed = gr.Number(label="first seed (image i uses seed + i)", value=42, precision=0)
        count = gr.Number(label="images", value=4, precision=0, elem_id="gen-n")
        # Empty: the base's own (Z-Image-Turbo renders 8 steps without CFG; a CFG of 7 ruins a distilled model).
        steps = gr.Number(label="steps (empty: the base's own)", value=None, precision=0, elem_id="gen-steps")
        cfg = gr.Number(label="guidance (empty: the base's own)", value=None, elem_id="gen-cfg")
        size = gr.Textbox(label="size WIDTHxHEIGHT (empty: the run's)", value="", elem_id="gen-size")
        sampler = gr.Dropdown(label="sampler (empty: the base's own)", choices=samplers(), value="", elem_id="sampler")
        compare = gr.Checkbox(label="base / LoRA comparison", value=True, elem_id="compare")
    keep_face = gr.Image(label="keep the face of this photo (optional)", type="filepath", height=200)
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    status = gr.Textbox(label="status", interactive=False, elem_id="gen-status")
    gallery = gr.Gallery(
        label="images (parameters under each)", columns=4, height="auto", object_fit="contain", elem_id="gen-gallery"
    )
    comparison = gr.Image(
        label="compare.png: base model (left) / LoRA (right), one row per seed",
        interactive=False,
        elem_id="compare-image",
    )
    files = gr.File(label="downloads", file_count="multiple", interactive=False)

    @guarded(4)
    def on_generate(
        lora_choice,
        strength,
        base_model,
        text,
        no,
        first,
        n,
        n_steps,
        guidance,
        wh,
        how,
        both,
        face,
        progress=gr.Progress(),
    ):  # noqa: B008
        if not lora_choice:
            raise SdloraError("choose a run or LoRA file (train one first)")
        result = studio.generate(
            ws,
            lora_choice,
            text,
            base=base_model or None,
            seed=int(first),
            n=int(n),
            steps=None if n_steps is None else int(n_steps),
            cfg=None if guidance is None else float(guidance),
            size=wh or None,
            weight=float(strength),
            negative=no or "",
            sampler=how or None,
            compare=bool(both),
            keep_face=Path(face) if face else None,
            progress=lambda fraction, desc: progress(fraction, desc=desc),
        )
        pictures = [(str(path), words) for path, words in result.images]
        extra = [p for p in (result.grid, result.compare) if p is not None]
        downloads = [str(p) for p, _ in result.images] + [str(p) for p in extra]
        message = f"wrote {len(pictures)} image(s) to {result.folder}" + beside(jobs)
        return message, pictures, str(result.compare) if result.compare else None, downloads

    go.click(
        on_generate,
        [lora, weight, base, prompt, negative, seed, count, steps, cfg, size, sampler, compare, keep_face],
        [status, gallery, comparison, files],
    )
    return {"lora": lora}


def beside(jobs: Jobs) -> str:
    """' (beside the running training run NAME)' while one runs, else ''."""
    running = [job for job in jobs.all() if jobs.state(job) == "running"]
    return f" (ran beside the training run {running[-1].run})" if running else ""


def eval_tab(ws: Workspace, jobs: Jobs) -> dict[str, Any]:
    gr.Markdown(
        "**5. Evaluate** a run's LoRA: does the person come out recognisably? (`sdlora eval`, standard prompt set, "
        f"the run's own eval settings unless changed here). {BESIDE}"
    )
    with gr.Row():
        run = gr.Dropdown(label="run (finished)", choices=[], value=None, elem_id="eval-run")
        reference = gr.Dropdown(label="reference dataset", choices=[], value=None, elem_id="eval-reference")
        count = gr.Number(label="images per prompt (empty: the run's)", value=None, precision=0, elem_id="eval-n")
        face_model = gr.Dropdown(
            label="face model (empty: the run's)",
            choices=["", "dlib", "insightface", "toy"],
            value="",
            elem_id="eval-face",
        )
    go = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
    status = gr.Textbox(label="status", interactive=False, elem_id="eval-status")
    link = gr.HTML(elem_id="eval-link")
    summary = gr.Dataframe(
        headers=["metric", "value", "what it means", "good"], interactive=False, wrap=True, elem_id="eval-summary"
    )

    @guarded(3)
    def on_eval(name, ref, n, face, progress=gr.Progress()):  # noqa: B008
        if not name or not ref:
            raise SdloraError("choose a finished run and its reference dataset")
        result = studio.evaluate(
            ws,
            name,
            ref,
            n=int(n) if n else None,
            face_model=face or None,
            progress=lambda fraction, desc: progress(fraction, desc=desc),
        )
        url = report_url(result.report)
        html = f'<a href="{url}" target="_blank" id="report-link">Open the HTML report ({result.report})</a>'
        notes = "; ".join(result.notes)
        return (
            f"scored {result.summary.get('images', 0)} images" + (f" ({notes})" if notes else "") + beside(jobs),
            html,
            result.explained(),
        )

    go.click(on_eval, [run, reference, count, face_model], [status, link, summary])
    return {"run": run, "reference": reference}
