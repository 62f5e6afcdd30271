"""The Train tab: the form generated from the config, the exact config.toml, Start (queued behind a running run)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.serve import form, training
from sdlora.serve.jobs import Jobs
from sdlora.serve.page import guarded
from sdlora.serve.workspace import Workspace


def setting_input(setting: form.Setting) -> Any:
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


def train_tab(ws: Workspace, jobs: Jobs) -> dict[str, Any]:
    specs = form.settings()
    main = [s for s in specs if s.key in form.MAIN]
    rest = [s for s in specs if s.key not in form.MAIN]
    gr.Markdown(
        "**2. Train**: the dataset you just prepared is chosen; the defaults suit most people. Start queues the run "
        "(one at a time); follow it on **3. Runs**."
    )
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
                    inputs[setting.key] = setting_input(setting)
    with gr.Accordion("All other settings", open=False, elem_id="more-settings"):
        for section in form.SECTIONS:
            mine = [s for s in rest if s.key.startswith(section + ".")]
            with gr.Accordion(f"[{section}]", open=False):
                for setting in mine:
                    inputs[setting.key] = setting_input(setting)
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
        if not preset_name:  # the box emptied or left without a choice: the user's settings stay as they are
            return ("", gr.update(), *[gr.update() for _ in keys])
        path = training.preset_path(preset_name)
        values = form.values_of(path)
        new_base = form.preset_base(path) or base_model
        return ("", gr.update(value=new_base), *[gr.update(value=values[key]) for key in keys])

    @guarded(None)
    def on_dataset(name):
        return f"{name}-lora" if name else gr.update()

    everything = [preset, base, *inputs.values()]
    # One preview at a time, the last edit's last: quick edits never leave an older preview on top.
    preview = {"fn": on_preview, "inputs": everything, "outputs": [status, toml], "trigger_mode": "always_last"}
    preview |= {"concurrency_limit": 1, "concurrency_id": "toml-preview", "show_progress": "hidden"}
    gr.on([c.change for c in everything], **preview)
    preset.select(on_preset, [preset, base], [status, base, *inputs.values()])
    dataset.input(on_dataset, [dataset], [run_name])
    done = start.click(on_start, [dataset, run_name, *everything], [status, toml], concurrency_id="toml-preview")
    return {
        "dataset": dataset,
        "base": base,
        "start": start,
        "run_name": run_name,
        "preview": preview,
        "status": status,
        "done": done,
    }
