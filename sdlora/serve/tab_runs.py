"""The Runs tab: every run's status, live curves and samples of the chosen one, Stop, Resume, downloads."""

from __future__ import annotations

from typing import Any

import gradio as gr

from sdlora.serve import plots, runs, studio, training
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
    gr.Markdown("**3. Runs**: every run, its progress, samples (newest first), Stop, Resume and the LoRA files.")
    table = gr.Dataframe(
        headers=["run", "status", "step", "LoRAs", "details"], interactive=False, wrap=True, elem_id="run-table"
    )
    status = gr.Textbox(label="status", interactive=False, elem_id="run-status")
    speed = gr.Textbox(label="progress", interactive=False, elem_id="run-speed")
    with gr.Row():
        loss = gr.Plot(label="loss", elem_id="loss-plot")
        lr = gr.Plot(label="learning rate", elem_id="lr-plot")
        identity = gr.Plot(label="identity", elem_id="identity-plot")
    samples = gr.Gallery(
        label="sample grids (newest first)", columns=2, height="auto", object_fit="contain", elem_id="samples"
    )
    log = gr.Textbox(label="log (last lines)", lines=6, max_lines=15, interactive=False, elem_id="run-log")
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
        labels: dict[str, list[str]] = {}
        for label, value in studio.lora_labels(ws):
            labels.setdefault(value.split("/")[1], []).append(label.split(": ", 1)[1])
        table = [
            [s.name, s.state, f"{s.step or 0}/{s.total or '?'}", "; ".join(labels.get(s.name, [])), s.detail]
            for s in found
        ]
        return table or [["", "", "", "", ""]]

    def progress_line(folder, state: runs.RunStatus, seen: runs.Tail) -> str:
        job = jobs.latest_for(f"runs/{folder.name}")
        if seen.losses or state.state != "running":
            return seen.speed(state.total)
        return runs.phase(folder, jobs.log_path(job) if job else None)

    def log_text(folder) -> str:
        job = jobs.latest_for(f"runs/{folder.name}")
        return "\n".join(runs.log_tail(jobs.log_path(job) if job else None))

    @guarded(11)
    def live(name, seen: runs.Tail):
        """Only what changed since the last poll: new metric lines, new sample files."""
        if not name:
            return ("choose a run", "", *[gr.update()] * 6, rows(), seen, "")
        if seen.run != name:
            seen = runs.Tail(run=name)
        folder = ws.path(name, "runs")
        state = runs.status(ws, jobs, name)
        changed = seen.update(folder)
        if not changed and seen.shown == state.line():
            return (
                state.line(),
                progress_line(folder, state, seen),
                *[gr.update()] * 6,
                rows(),
                seen,
                log_text(folder),
            )
        seen.shown = state.line()
        best = runs.best_step(seen, folder)
        return (
            state.line(),
            progress_line(folder, state, seen),
            plots.curve(seen.losses, "loss", "loss"),
            plots.curve(seen.losses, "lr", "learning rate"),
            plots.identity(seen.evals, best),
            [(str(path), path.stem) for path in reversed(runs.sample_files(folder, seen.samples))],
            runs.summary(folder),
            [str(p) for p in runs.downloads(ws, folder)] or None,
            rows(),
            seen,
            log_text(folder),
        )

    @guarded(2)
    def on_stop(name):
        return training.stop(ws, jobs, name), rows()

    @guarded(2)
    def on_resume(name, dataset):
        return training.resume(ws, jobs, name, dataset or None), rows()

    outputs = [status, speed, loss, lr, identity, samples, summary, files, table, tail, log]
    timer.tick(live, [run, tail], outputs, show_progress="hidden")
    run.change(live, [run, tail], outputs)
    refresh.click(guarded(None)(rows), None, table)
    stop.click(on_stop, [run], [status, table])
    resume.click(on_resume, [run, resume_dataset], [status, table])
    return {"run": run, "refresh": refresh, "resume_dataset": resume_dataset}
