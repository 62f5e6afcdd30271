"""The Gradio page: five tabs (Photos, Train, Runs, Generate, Evaluate) wired to the serve package's functions.

Every handler's first output is a one-line status; errors land there as `error: ...`, never as a traceback
(unexpected ones are logged to .sdlora-serve/server.log). Only this module and `launch` import gradio.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import Request  # module level: FastAPI resolves the route's annotations here

from sdlora import __version__, layout
from sdlora.errors import SdloraError
from sdlora.serve import datasets, form, plots, runs, studio, training
from sdlora.serve.jobs import Jobs
from sdlora.serve.workspace import CAPTION_SUFFIXES, MAX_UPLOAD_BYTES, PHOTO_SUFFIXES, Workspace

LOG = logging.getLogger("sdlora.serve")
POLL_SECONDS = 2.0


def guarded(outputs: int):
    """Turn any exception of a handler into 'error: <one line>' in its status output (the first of `outputs`)."""

    def wrap(handler):
        @functools.wraps(handler)
        def inner(*args: Any, **kwargs: Any):
            try:
                return handler(*args, **kwargs)
            except SdloraError as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - the page shows one line; the log keeps the traceback
                LOG.exception("handler %s failed", handler.__name__)
                message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
            return (f"error: {message}", *[gr.update() for _ in range(outputs - 1)])

        return inner

    return wrap


def _choices(values: list[str], current: str | None = None) -> Any:
    return gr.update(choices=values, value=current if current in values else (values[0] if values else None))


def build(ws: Workspace, jobs: Jobs) -> gr.Blocks:
    with gr.Blocks(title="sdlora", analytics_enabled=False) as demo:
        gr.Markdown(f"## sdlora {__version__} · workspace `{ws.root}`")
        with gr.Tabs():
            with gr.Tab("Photos", id="photos") as photos_tab:
                photos = _photos_tab(ws)
            with gr.Tab("Train", id="train") as train_tab:
                train = _train_tab(ws, jobs)
            with gr.Tab("Runs", id="runs") as runs_tab:
                run_list = _runs_tab(ws, jobs)
            with gr.Tab("Generate", id="generate") as generate_tab:
                gen = _generate_tab(ws)
            with gr.Tab("Evaluate", id="evaluate") as eval_tab:
                ev = _eval_tab(ws)
        dataset_boxes = [photos["dataset"], train["dataset"], run_list["resume_dataset"], ev["reference"]]

        def refresh() -> tuple:
            names = ws.subfolders("datasets")
            finished = [n for n in ws.subfolders("runs") if (ws.root / "runs" / n / runs.DIFFUSERS_FILE).is_file()]
            return (
                *[gr.update(choices=names) for _ in dataset_boxes],
                gr.update(choices=ws.subfolders("photos")),
                gr.update(choices=ws.base_models()),
                gr.update(choices=runs.run_names(ws, jobs)),
                gr.update(choices=studio.lora_choices(ws)),
                gr.update(choices=finished),
            )

        refreshed = [*dataset_boxes, photos["photo_set"], train["base"], run_list["run"], gen["lora"], ev["run"]]
        demo.load(refresh, None, refreshed)
        for button in (photos["prepare"], photos["save"], train["start"], run_list["refresh"]):
            button.click(refresh, None, refreshed)
        for tab in (photos_tab, train_tab, runs_tab, generate_tab, eval_tab):  # new runs, datasets, LoRAs
            tab.select(refresh, None, refreshed)
    return demo


# ----------------------------------------------------------------------------------------------------- Photos


def _photos_tab(ws: Workspace) -> dict[str, Any]:
    gr.Markdown("Upload photos of one person (or pick a folder under `photos/`), then **Prepare**.")
    with gr.Row():
        upload = gr.File(
            label="photos (JPEG, PNG, WebP, HEIC, ...; .txt captions beside them are read)",
            file_count="multiple",
            file_types=sorted(PHOTO_SUFFIXES | CAPTION_SUFFIXES),
            elem_id="upload",
        )
        with gr.Column():
            photo_set = gr.Dropdown(label="or a folder under photos/", choices=[], value=None, elem_id="photo-set")
            name = gr.Textbox(label="name of the new photo set and dataset", value="me", elem_id="dataset-name")
            with gr.Row():
                token = gr.Textbox(label="token", value="sks")
                class_word = gr.Textbox(label="class word", value="person")
                resolution = gr.Number(label="resolution", value=512, precision=0, elem_id="prep-resolution")
            prepare = gr.Button("Prepare", variant="primary", elem_id="prepare")
    status = gr.Textbox(label="status", interactive=False, elem_id="photos-status")
    dataset = gr.Dropdown(label="dataset shown", choices=[], value=None, elem_id="dataset-shown")
    kept = gr.Gallery(label="kept crops (caption under each)", columns=6, height="auto", elem_id="kept")
    dropped = gr.Gallery(label="dropped photos and why", columns=6, height="auto", elem_id="dropped")
    reasons = gr.Dataframe(headers=["photo", "reason", "details"], interactive=False, wrap=True, elem_id="reasons")
    with gr.Accordion("Edit: exclude crops, change captions (saved as a new dataset; photos are never changed)"):
        edits = gr.Dataframe(
            headers=["image", "caption", "exclude"],
            datatype=["str", "str", "bool"],
            interactive=True,
            elem_id="edits",
        )
        with gr.Row():
            new_name = gr.Textbox(label="new dataset name", value="me-edited", elem_id="edited-name")
            save = gr.Button("Save as new dataset", elem_id="save-dataset")

    def shown(view: datasets.DatasetView) -> tuple:
        return (
            [(str(path), caption) for path, caption, _ in view.kept],
            [(str(photo), f"{file}: {reason}") for photo, file, reason, _ in view.dropped if photo is not None],
            [[file, reason, message] for _, file, reason, message in view.dropped] or [["", "", ""]],
            [[image, caption, False] for _, caption, image in view.kept],
            gr.update(choices=ws.subfolders("datasets"), value=view.name),
        )

    @guarded(6)
    def on_prepare(files, chosen, set_name, token, class_word, resolution, progress=gr.Progress()):  # noqa: B008
        def report(fraction: float | None, text: str) -> None:
            progress(fraction, desc=text)

        if files:
            folder = datasets.save_uploads(ws, [Path(f) for f in files], set_name)
            source = folder.name
        elif chosen:
            source = chosen
        else:
            raise SdloraError("upload photos or pick a folder under photos/ first")
        view = datasets.prepare(
            ws, source, set_name, token=token, class_word=class_word, resolution=resolution, progress=report
        )
        return (view.summary(), *shown(view))

    @guarded(6)
    def on_show(name):
        if not name:
            return ("", [], [], [["", "", ""]], [], gr.update())
        view = datasets.view(ws, name)
        return (view.summary(), *shown(view))

    @guarded(6)
    def on_save(name, table, new):
        rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
        excluded = [str(row[0]) for row in rows if row and row[0] and bool(row[2])]
        original = {image: caption for _, caption, image in datasets.view(ws, name).kept}
        captions = {str(r[0]): str(r[1]) for r in rows if r and r[0] in original and str(r[1]) != original[r[0]]}
        view = datasets.save_edits(ws, name, new, excluded, captions)
        return (f"saved {view.summary()}", *shown(view))

    outputs = [status, kept, dropped, reasons, edits, dataset]
    prepare.click(on_prepare, [upload, photo_set, name, token, class_word, resolution], outputs)
    dataset.input(on_show, [dataset], outputs)
    save.click(on_save, [dataset, edits, new_name], outputs)
    return {"prepare": prepare, "save": save, "dataset": dataset, "photo_set": photo_set}


# ----------------------------------------------------------------------------------------------------- Train


def _setting_input(setting: form.Setting) -> Any:
    """One input per config setting, labelled with its key and helped by its description."""
    common = {"label": setting.key, "info": setting.description, "elem_id": "setting-" + setting.key.replace(".", "-")}
    if setting.kind == "bool":
        return gr.Checkbox(value=bool(setting.default), **common)
    if setting.kind == "choice":
        return gr.Dropdown(choices=list(setting.choices), value=setting.default, **common)
    if setting.kind in ("int", "float") and setting.optional:  # a Number can't be blank: "unset" needs text
        return gr.Textbox(value="" if setting.default is None else str(setting.default), placeholder="unset", **common)
    if setting.kind in ("int", "float"):
        return gr.Number(value=setting.default, precision=0 if setting.kind == "int" else None, **common)
    return gr.Textbox(value=setting.default, lines=3 if setting.kind == "lines" else 1, **common)


def _train_tab(ws: Workspace, jobs: Jobs) -> dict[str, Any]:
    specs = form.settings()
    main = [s for s in specs if s.key in form.MAIN]
    rest = [s for s in specs if s.key not in form.MAIN]
    with gr.Row():
        dataset = gr.Dropdown(label="dataset", choices=[], value=None, elem_id="train-dataset")
        run_name = gr.Textbox(label="run name (folder under runs/)", value="me-lora", elem_id="run-name")
        base = gr.Dropdown(
            label="base model: a folder or file under models/, or a hub id",
            choices=ws.base_models(),
            value=(ws.base_models() or [None])[0],
            allow_custom_value=True,
            elem_id="base",
        )
        preset = gr.Dropdown(label="preset (examples/)", choices=["", *training.presets()], value="", elem_id="preset")
    inputs: dict[str, Any] = {}
    with gr.Group():
        for row in range(0, len(main), 4):
            with gr.Row():
                for setting in main[row : row + 4]:
                    inputs[setting.key] = _setting_input(setting)
    with gr.Accordion("All other settings", open=False, elem_id="more-settings"):
        for section in form.SECTIONS:
            mine = [s for s in rest if s.key.startswith(section + ".")]
            with gr.Accordion(f"[{section}]", open=False):
                for setting in mine:
                    inputs[setting.key] = _setting_input(setting)
    keys = list(inputs)
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start")
    status = gr.Textbox(label="status", interactive=False, elem_id="train-status")
    toml = gr.Textbox(
        label="config.toml that Start runs", lines=12, max_lines=30, interactive=False, buttons=["copy"], elem_id="toml"
    )

    @guarded(2)
    def on_preview(preset_name, base_model, *values):
        return ("", training.preview(ws, preset_name or None, base_model or "", dict(zip(keys, values, strict=True))))

    @guarded(2)
    def on_start(dataset_name, name, preset_name, base_model, *values):
        if not dataset_name:
            raise SdloraError("choose a dataset (prepare one on the Photos tab)")
        chosen = dict(zip(keys, values, strict=True))
        text = training.preview(ws, preset_name or None, base_model or "", chosen)
        return training.start(ws, jobs, dataset_name, name, preset_name or None, base_model or "", chosen), text

    @guarded(len(keys) + 2)
    def on_preset(preset_name, base_model):
        path = training.preset_path(preset_name or None)
        values = form.values_of(path)
        new_base = form.preset_base(path) or base_model
        return ("", gr.update(value=new_base), *[gr.update(value=values[key]) for key in keys])

    everything = [preset, base, *inputs.values()]
    gr.on([c.change for c in everything], on_preview, everything, [status, toml])
    preset.input(on_preset, [preset, base], [status, base, *inputs.values()])
    start.click(on_start, [dataset, run_name, *everything], [status, toml])
    return {"dataset": dataset, "base": base, "start": start}


# ----------------------------------------------------------------------------------------------------- Runs


def _runs_tab(ws: Workspace, jobs: Jobs) -> dict[str, Any]:
    with gr.Row():
        run = gr.Dropdown(label="run", choices=runs.run_names(ws, jobs), value=None, elem_id="run")
        refresh = gr.Button("Refresh list", elem_id="refresh-runs")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
        resume = gr.Button("Resume", elem_id="resume")
        resume_dataset = gr.Dropdown(
            label="dataset to resume with (runs started outside the app)", choices=[], value=None
        )
    table = gr.Dataframe(headers=["run", "status", "step", "details"], interactive=False, elem_id="run-table")
    status = gr.Textbox(label="status", interactive=False, elem_id="run-status")
    speed = gr.Textbox(label="progress", interactive=False, elem_id="run-speed")
    with gr.Row():
        loss = gr.Plot(label="loss", elem_id="loss-plot")
        lr = gr.Plot(label="learning rate", elem_id="lr-plot")
        identity = gr.Plot(label="identity", elem_id="identity-plot")
    samples = gr.Gallery(label="sample grids", columns=2, height="auto", elem_id="samples")
    with gr.Row():
        summary = gr.JSON(label="summary.json", elem_id="summary")
        files = gr.File(
            label="downloads: diffusers LoRA, kohya LoRA, pivotal embeddings (NAME_emb), best/",
            file_count="multiple",
            interactive=False,
            elem_id="files",
        )
    tail = gr.State(runs.Tail())
    timer = gr.Timer(POLL_SECONDS)

    def rows() -> list[list[Any]]:
        found = [runs.status(ws, jobs, name) for name in runs.run_names(ws, jobs)]
        return [[s.name, s.state, f"{s.step or 0}/{s.total or '?'}", s.detail] for s in found] or [["", "", "", ""]]

    @guarded(10)
    def live(name, seen: runs.Tail):
        """Only what changed since the last poll: new metric lines, new sample files."""
        if not name:
            return ("choose a run", "", *[gr.update()] * 6, rows(), seen)
        if seen.run != name:
            seen = runs.Tail(run=name)
        folder = ws.path(name, "runs")
        state = runs.status(ws, jobs, name)
        changed = seen.update(folder)
        if not changed and seen.shown == state.line():
            return (state.line(), seen.speed(state.total), *[gr.update()] * 6, rows(), seen)
        seen.shown = state.line()
        best = runs.best_step(seen, folder)
        return (
            state.line(),
            seen.speed(state.total),
            plots.curve(seen.losses, "loss", "loss"),
            plots.curve(seen.losses, "lr", "learning rate"),
            plots.identity(seen.evals, best),
            [(str(folder / layout.SAMPLES / n), n.removesuffix(".png")) for n in seen.samples],
            runs.summary(folder),
            [str(p) for p in runs.downloads(ws, folder)] or None,
            rows(),
            seen,
        )

    @guarded(2)
    def on_stop(name):
        return training.stop(ws, jobs, name), rows()

    @guarded(2)
    def on_resume(name, dataset):
        return training.resume(ws, jobs, name, dataset or None), rows()

    outputs = [status, speed, loss, lr, identity, samples, summary, files, table, tail]
    timer.tick(live, [run, tail], outputs, show_progress="hidden")
    run.change(live, [run, tail], outputs)
    refresh.click(lambda: rows(), None, table)
    stop.click(on_stop, [run], [status, table])
    resume.click(on_resume, [run, resume_dataset], [status, table])
    return {"run": run, "refresh": refresh, "resume_dataset": resume_dataset}


# ----------------------------------------------------------------------------------------------------- Generate


def _generate_tab(ws: Workspace) -> dict[str, Any]:
    with gr.Row():
        lora = gr.Dropdown(label="run or LoRA file", choices=studio.lora_choices(ws), value=None, elem_id="gen-lora")
        base = gr.Dropdown(
            label="base model (empty: the run's)", choices=ws.base_models(), value=None, allow_custom_value=True
        )
    prompt = gr.Textbox(label="prompt ({trigger} is the person)", value="a photo of {trigger}", elem_id="prompt")
    with gr.Row():
        seed = gr.Number(label="first seed (image i uses seed + i)", value=42, precision=0)
        count = gr.Number(label="images", value=4, precision=0, elem_id="gen-n")
        steps = gr.Number(label="steps", value=30, precision=0, elem_id="gen-steps")
        cfg = gr.Number(label="guidance", value=7.0)
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
            steps=int(n_steps),
            cfg=float(guidance),
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


# ----------------------------------------------------------------------------------------------------- Evaluate


def _eval_tab(ws: Workspace) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------------- launch

REPORT_ROUTE = "/sdlora/report/"


def report_url(relative: str) -> str:
    """The page link of an eval report: runs/NAME/eval/STAMP/report/index.html -> /sdlora/report/NAME/STAMP/..."""
    parts = Path(relative).parts  # ("runs", NAME, "eval", STAMP, "report", ...)
    return REPORT_ROUTE + "/".join((parts[1], parts[3], *parts[5:]))


def report_route(ws: Workspace):
    """GET /sdlora/report/NAME/STAMP/FILE: eval reports (HTML and their images), behind the app's login, only
    from runs/NAME/eval/STAMP/report/ (no `..`, no symlink out)."""
    from fastapi.responses import FileResponse, PlainTextResponse
    from fastapi.routing import APIRoute

    def handler(run: str, stamp: str, path: str, request: Request):
        app = request.app
        if getattr(app, "auth", None) is not None:
            cookie = request.cookies.get(f"access-token-{app.cookie_id}") or request.cookies.get(
                f"access-token-unsecure-{app.cookie_id}"
            )
            if app.tokens.get(cookie) is None:
                return PlainTextResponse("log in first", status_code=401)
        try:
            relative = Path(path)
            if relative.is_absolute() or ".." in relative.parts or ".." in Path(stamp).parts:
                raise SdloraError("refused")
            folder = ws.inside(ws.path(run, "runs") / "eval" / stamp / "report", "runs")
            target = ws.inside(folder / relative, "runs")
            if folder not in target.parents or not target.is_file():
                raise SdloraError("not found")
        except SdloraError:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(target, headers={"X-Content-Type-Options": "nosniff"})

    return APIRoute(REPORT_ROUTE + "{run}/{stamp}/{path:path}", handler, methods=["GET"])


def launch(
    demo: gr.Blocks,
    ws: Workspace,
    host: str,
    port: int,
    accounts: list[tuple[str, str]] | None,
    auth_file: Path | None,
) -> None:
    """Serve the page. Files are served only from the workspace's data folders; never a share link."""
    logging.basicConfig(filename=ws.state / "server.log", level=logging.INFO)
    serveable = [ws.root / name for name in ("photos", "datasets", "runs", "images")] + [ws.state / "downloads"]
    blocked = [ws.state / "jobs", ws.state / "logs", ws.state / "server.log"]
    if auth_file is not None:
        blocked.append(auth_file.resolve())
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host,
        server_port=port,
        share=False,
        auth=accounts,
        allowed_paths=[str(p) for p in serveable],
        blocked_paths=[str(p) for p in blocked],
        max_file_size=MAX_UPLOAD_BYTES,
        show_error=False,
        footer_links=[],
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        theme=theme,
        app_kwargs={"routes": [report_route(ws)]},
    )
