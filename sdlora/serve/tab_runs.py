"""The Runs tab: every run's status, live curves and samples of the chosen one, Stop, Resume, downloads."""

from __future__ import annotations

from typing import Any

import gradio as gr

from sdlora.serve import plots, runs, training
from sdlora.serve.jobs import Jobs
from sdlora.serve.page import guarded
from sdlora.serve.workspace import Workspace

POLL_SECONDS = 2.0


def runs_tab(ws: Workspace, jobs: Jobs) -> dict[str, Any]:
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
            [(str(path), path.stem) for path in runs.sample_files(folder, seen.samples)],
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
    refresh.click(guarded(None)(rows), None, table)
    stop.click(on_stop, [run], [status, table])
    resume.click(on_resume, [run, resume_dataset], [status, table])
    return {"run": run, "refresh": refresh, "resume_dataset": resume_dataset}
