"""The Generate and Evaluate tabs: sdlora generate with a run's LoRA, sdlora eval with a link to its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.serve import studio
from sdlora.serve.launch import report_url
from sdlora.serve.page import guarded
from sdlora.serve.workspace import Workspace


def generate_tab(ws: Workspace) -> dict[str, Any]:
    with gr.Row():
        lora = gr.Dropdown(label="run or LoRA file", choices=studio.lora_choices(ws), value=None, elem_id="gen-lora")
        base = gr.Dropdown(
            label="base model (empty: the run's)", choices=ws.base_models(), value=None, allow_custom_value=True
        )
    prompt = gr.Textbox(label="prompt ({trigger} is the person)", value="a photo of {trigger}", elem_id="prompt")
    with gr.Row():
        seed = gr.Number(label="first seed (image i uses seed + i)", value=42, precision=0)
        count = gr.Number(label="images", value=4, precision=0, elem_id="gen-n")
        # Empty: the base's own (Z-Image-Turbo renders 8 steps without CFG; a CFG of 7 ruins a distilled model).
        steps = gr.Number(label="steps (empty: the base's own)", value=None, precision=0, elem_id="gen-steps")
        cfg = gr.Number(label="guidance (empty: the base's own)", value=None, elem_id="gen-cfg")
        compare = gr.Checkbox(label="base vs LoRA comparison", value=True, elem_id="compare")
    keep_face = gr.Image(label="keep the face of this photo (optional)", type="filepath", height=200)
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    status = gr.Textbox(label="status", interactive=False, elem_id="gen-status")
    gallery = gr.Gallery(label="images (parameters under each)", columns=4, height="auto", elem_id="gen-gallery")
    comparison = gr.Image(
        label="base model vs LoRA at the same seeds (compare.png)", interactive=False, elem_id="compare-image"
    )
    files = gr.File(label="downloads", file_count="multiple", interactive=False)

    @guarded(4)
    def on_generate(lora_choice, base_model, text, first, n, n_steps, guidance, both, face, progress=gr.Progress()):  # noqa: B008
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
            compare=bool(both),
            keep_face=Path(face) if face else None,
            progress=lambda fraction, desc: progress(fraction, desc=desc),
        )
        pictures = [(str(path), words) for path, words in result.images]
        extra = [p for p in (result.grid, result.compare) if p is not None]
        downloads = [str(p) for p, _ in result.images] + [str(p) for p in extra]
        message = f"wrote {len(pictures)} image(s) to {result.folder}"
        return message, pictures, str(result.compare) if result.compare else None, downloads

    go.click(
        on_generate,
        [lora, base, prompt, seed, count, steps, cfg, compare, keep_face],
        [status, gallery, comparison, files],
    )
    return {"lora": lora}


def eval_tab(ws: Workspace) -> dict[str, Any]:
    gr.Markdown("Score a run's LoRA: does the person come out recognisably? (`sdlora eval`, standard prompt set)")
    with gr.Row():
        run = gr.Dropdown(label="run (finished)", choices=[], value=None, elem_id="eval-run")
        reference = gr.Dropdown(label="reference dataset", choices=[], value=None, elem_id="eval-reference")
        count = gr.Number(label="images per prompt", value=1, precision=0)
    go = gr.Button("Evaluate", variant="primary", elem_id="evaluate")
    status = gr.Textbox(label="status", interactive=False, elem_id="eval-status")
    link = gr.HTML(elem_id="eval-link")
    summary = gr.JSON(label="summary", elem_id="eval-summary")

    @guarded(3)
    def on_eval(name, ref, n, progress=gr.Progress()):  # noqa: B008
        if not name or not ref:
            raise SdloraError("choose a finished run and its reference dataset")
        result = studio.evaluate(ws, name, ref, n=int(n), progress=lambda fraction, desc: progress(fraction, desc=desc))
        url = report_url(result.report)
        html = f'<a href="{url}" target="_blank" id="report-link">Open the HTML report ({result.report})</a>'
        notes = "; ".join(result.notes)
        return (
            f"scored {result.summary.get('images', 0)} images" + (f" ({notes})" if notes else ""),
            html,
            {**result.summary},
        )

    go.click(on_eval, [run, reference, count], [status, link, summary])
    return {"run": run, "reference": reference}
