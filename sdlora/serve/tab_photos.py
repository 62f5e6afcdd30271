"""The Photos tab: upload photos or pick a folder, Prepare (sdlora prep), see kept and dropped, save edits."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.serve import datasets
from sdlora.serve.page import guarded
from sdlora.serve.workspace import CAPTION_SUFFIXES, PHOTO_SUFFIXES, Workspace


def photos_tab(ws: Workspace) -> dict[str, Any]:
    gr.Markdown(
        "**1. Photos**: upload 10-30 photos of one person (or pick a folder under `photos/`), choose the trigger word "
        "that will stand for them in prompts, then **Prepare**: faces are found, cropped and captioned."
    )
    with gr.Row():
        upload = gr.File(
            label="photos (JPEG, PNG, WebP, HEIC, ...; .txt captions beside them are read)",
            file_count="multiple",
            file_types=sorted(PHOTO_SUFFIXES | CAPTION_SUFFIXES),
            elem_id="upload",
        )
        with gr.Column():
            photo_set = gr.Dropdown(label="or a folder under photos/", choices=[], value=None, elem_id="photo-set")
            with gr.Row():
                token = gr.Textbox(label="trigger word (the person in prompts)", value="sks", elem_id="trigger")
                class_word = gr.Textbox(label="class word", value="person")
            name = gr.Textbox(label="name of the new photo set and dataset", value="me", elem_id="dataset-name")
            with gr.Row():
                resolution = gr.Number(label="resolution", value=512, precision=0, elem_id="prep-resolution")
                captions = gr.Dropdown(
                    label="captions (empty: prep's own)",
                    choices=list(datasets.CAPTION_POLICIES),
                    value="",
                    elem_id="captions",
                )
                captioner = gr.Textbox(label="captioner model (for vlm; empty: prep's own)", elem_id="captioner")
            prepare = gr.Button("Prepare", variant="primary", elem_id="prepare")
    status = gr.Textbox(label="status", interactive=False, elem_id="photos-status")
    dataset = gr.Dropdown(label="dataset shown", choices=[], value=None, elem_id="dataset-shown")
    kept = gr.Gallery(label="kept crops (caption under each)", columns=6, height="auto", elem_id="kept")
    dropped = gr.Gallery(label="dropped photos and why", columns=6, height="auto", elem_id="dropped")
    reasons = gr.Dataframe(headers=["photo", "reason", "details"], interactive=False, wrap=True, elem_id="reasons")
    with gr.Accordion("Edit: exclude crops, change captions (saved as a new dataset; photos are never changed)"):
        edits = gr.Dataframe(
            headers=["image", "caption", "exclude", "crop"],
            datatype=["str", "str", "bool", "markdown"],
            interactive=True,
            elem_id="edits",
        )
        with gr.Row():
            new_name = gr.Textbox(label="new dataset name", value="me-edited", elem_id="edited-name")
            save = gr.Button("Save as new dataset", elem_id="save-dataset")

    def thumbnail(path: Path) -> str:
        """The crop as a small picture in the caption table (gradio's file route serves datasets/ only)."""
        return f"![{path.name}](/gradio_api/file={quote(str(path))})"

    def shown(view: datasets.DatasetView) -> tuple:
        return (
            [(str(path), caption) for path, caption, _ in view.kept],
            [(str(photo), f"{file}: {reason}") for photo, file, reason, _ in view.dropped if photo is not None],
            [[file, reason, message] for _, file, reason, message in view.dropped] or [["", "", ""]],
            [[image, caption, False, thumbnail(path)] for path, caption, image in view.kept],
            gr.update(choices=ws.subfolders("datasets"), value=view.name),
        )

    @guarded(6)
    def on_prepare(files, chosen, set_name, token, class_word, resolution, policy, model, progress=gr.Progress()):  # noqa: B008
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
            ws,
            source,
            set_name,
            token=token,
            class_word=class_word,
            resolution=resolution,
            extra=datasets.caption_options(ws, policy, model),
            progress=report,
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
    done = {
        prepare: prepare.click(
            on_prepare, [upload, photo_set, name, token, class_word, resolution, captions, captioner], outputs
        ),
        save: save.click(on_save, [dataset, edits, new_name], outputs),
    }
    dataset.input(on_show, [dataset], outputs)
    return {
        "prepare": prepare,
        "save": save,
        "dataset": dataset,
        "photo_set": photo_set,
        "status": status,
        "done": done,
    }
