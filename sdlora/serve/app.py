"""The Gradio page: five numbered steps (Photos, Train, Runs, Generate, Evaluate) wired to the serve package.

Every handler's first output is a one-line status; errors land there as `error: ...`, never as a traceback
(unexpected ones are logged to .sdlora-serve/server.log; see `page.guarded`). Only the page's modules (app, page,
tab_*) and `launch` import gradio.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from sdlora import __version__
from sdlora.serve import runs, studio
from sdlora.serve.boundary import CACHE_AGE_S, CACHE_CLEAN_S
from sdlora.serve.jobs import Jobs
from sdlora.serve.launch import launch
from sdlora.serve.page import guarded
from sdlora.serve.tab_photos import photos_tab
from sdlora.serve.tab_runs import runs_tab
from sdlora.serve.tab_studio import eval_tab, generate_tab
from sdlora.serve.tab_train import train_tab
from sdlora.serve.workspace import Workspace, sanitise_name

__all__ = ["build", "launch"]


def build(ws: Workspace, jobs: Jobs) -> gr.Blocks:
    # The upload cache: files older than an hour removed every ten minutes, all of it at each start.
    with gr.Blocks(title="sdlora", analytics_enabled=False, delete_cache=(CACHE_CLEAN_S, CACHE_AGE_S)) as demo:
        gr.Markdown(f"## sdlora {__version__} · workspace `{ws.root}`")
        with gr.Tabs():
            with gr.Tab("1. Photos", id="photos") as photos_page:
                photos = photos_tab(ws)
            with gr.Tab("2. Train", id="train") as train_page:
                train = train_tab(ws, jobs)
            with gr.Tab("3. Runs", id="runs") as runs_page:
                run_list = runs_tab(ws, jobs)
            with gr.Tab("4. Generate", id="generate") as generate_page:
                gen = generate_tab(ws, jobs)
            with gr.Tab("5. Evaluate", id="evaluate") as eval_page:
                ev = eval_tab(ws, jobs)
        dataset_boxes = [photos["dataset"], train["dataset"], run_list["resume_dataset"], ev["reference"]]

        @guarded(None)
        def refresh() -> tuple:
            names = ws.subfolders("datasets")
            finished = [n for n in ws.subfolders("runs") if (ws.root / "runs" / n / runs.DIFFUSERS_FILE).is_file()]
            return (
                *[gr.update(choices=names) for _ in dataset_boxes],
                gr.update(choices=ws.subfolders("photos")),
                gr.update(choices=ws.base_models()),
                gr.update(choices=runs.run_names(ws, jobs)),
                gr.update(choices=studio.lora_labels(ws)),
                gr.update(choices=finished),
            )

        refreshed = [*dataset_boxes, photos["photo_set"], train["base"], run_list["run"], gen["lora"], ev["run"]]
        demo.load(refresh, None, refreshed)
        demo.load(**train["preview"])  # the config.toml Start would run, shown before any edit

        @guarded(None)
        def prepared(status: str, name: str | None) -> tuple:
            """After a Prepare that worked: its dataset chosen in Train, the run named after it."""
            if not name or status.startswith("error"):
                return gr.update(), gr.update()
            return gr.update(choices=ws.subfolders("datasets"), value=name), f"{name}-lora"

        for button in (photos["prepare"], photos["save"], train["start"], run_list["refresh"]):
            button.click(refresh, None, refreshed)
        for button in (photos["prepare"], photos["save"]):  # after the tab's own handler has shown the dataset
            photos["done"][button].then(
                prepared, [photos["status"], photos["dataset"]], [train["dataset"], train["run_name"]]
            )
        selected = {}
        for tab in (photos_page, train_page, runs_page, generate_page, eval_page):  # new runs, datasets, LoRAs
            selected[tab] = tab.select(refresh, None, refreshed)

        @guarded(None)
        def started(status: str, name: str) -> Any:
            """After a Start that worked: its run chosen on the Runs tab."""
            return gr.update() if status.startswith("error") else gr.update(value=sanitise_name(name, "run"))

        @guarded(None)
        def newest(lora: str | None, run: str | None) -> tuple:
            """Unless one is chosen: the newest run's final LoRA in Generate, the newest finished run in Evaluate."""
            labels, names = studio.lora_labels(ws), runs.run_names(ws, jobs)
            done = [n for n in names if (ws.root / "runs" / n / runs.DIFFUSERS_FILE).is_file()]
            final = f"runs/{done[0]}" if done else None
            return (
                gr.update(choices=labels, value=lora or final),
                gr.update(choices=done, value=run or (done[0] if done else None)),
            )

        train["done"].then(started, [train["status"], train["run_name"]], [run_list["run"]])
        for tab in (generate_page, eval_page):
            selected[tab].then(newest, [gen["lora"], ev["run"]], [gen["lora"], ev["run"]])
    return demo
