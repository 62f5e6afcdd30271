"""Start, stop and resume `sdlora train` from the page: the exact config.toml, the queue, the resume command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sdlora
from sdlora import layout
from sdlora.config import Config
from sdlora.errors import UsageError
from sdlora.fsutil import atomic_write_text
from sdlora.serve import form
from sdlora.serve.jobs import Jobs
from sdlora.serve.runs import checkpoints, status
from sdlora.serve.workspace import Workspace, sanitise_name

# Settings that name files: they must resolve inside the workspace like every other path the page takes.
PATH_SETTINGS = ("train.class_dir", "model.vae", "model.single_file_config")


def presets() -> dict[str, Path]:
    """The complete configs shipped in the repository's examples/ (read only), by file name."""
    folder = Path(sdlora.__file__).resolve().parents[1] / "examples"
    return {path.name: path for path in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def preset_path(name: str | None) -> Path | None:
    if not name:
        return None
    found = presets()
    if name not in found:
        raise UsageError(f"{name}: no such preset (choose one of {', '.join(found) or 'none'})")
    return found[name]


def build(workspace: Workspace, preset: str | None, base: str, values: dict[str, Any]) -> Config:
    """The config a Start would run: preset < form values, with workspace paths checked."""
    overrides = {}
    for key in PATH_SETTINGS:
        raw = str(values.get(key) or "").strip()
        if raw:
            overrides[key] = workspace.model_ref(raw) if key.startswith("model.") else str(workspace.path(raw))
    return form.build_config(preset_path(preset), workspace.model_ref(base), values, overrides)


def preview(workspace: Workspace, preset: str | None, base: str, values: dict[str, Any]) -> str:
    """The config.toml that Start will run, as text."""
    return form.toml_of(build(workspace, preset, base, values))


def start(
    workspace: Workspace, jobs: Jobs, dataset: str, name: str, preset: str | None, base: str, values: dict[str, Any]
) -> str:
    """Queue `sdlora train datasets/DATASET runs/NAME --config TOML` (it starts at once if nothing runs)."""
    data = workspace.path(dataset, "datasets")
    if not (data / layout.MANIFEST).is_file() and not data.is_dir():
        raise UsageError(f"datasets/{dataset}: no such dataset; prepare one first")
    run = workspace.path(sanitise_name(name, "run"), "runs")
    if run.exists() or jobs.latest_for(f"runs/{run.name}") is not None:
        raise UsageError(f"runs/{run.name} already exists; choose another name (or Resume it)")
    text = preview(workspace, preset, base, values)
    config_file = jobs.folder / f"{run.name}.config.toml"
    atomic_write_text(config_file, text)
    job = jobs.submit(
        f"runs/{run.name}", f"datasets/{data.name}", ["train", str(data), str(run), "--config", str(config_file)]
    )
    return (
        status(workspace, jobs, run.name).line() if job.started else f"runs/{run.name}: queued behind the running run"
    )


def stop(workspace: Workspace, jobs: Jobs, name: str) -> str:
    run = workspace.path(name, "runs")
    return jobs.stop(f"runs/{run.name}")


def resume(workspace: Workspace, jobs: Jobs, name: str, dataset: str | None = None) -> str:
    """`sdlora train DATASET runs/NAME --config runs/NAME/config.toml --resume latest`, queued like a Start. The
    dataset is the one the app started the run with, else `dataset` (a run started from the command line)."""
    run = workspace.path(name, "runs")
    current = status(workspace, jobs, run.name)
    if current.state in ("running", "queued"):
        raise UsageError(f"runs/{run.name} is {current.state}; nothing to resume")
    if not checkpoints(run) or not (run / layout.CONFIG_TOML).is_file():
        raise UsageError(f"runs/{run.name} has no checkpoint to resume from")
    chosen = dataset or current.dataset
    if not chosen:
        raise UsageError(f"runs/{run.name} was started outside the app: choose its dataset to resume it")
    data = workspace.path(Path(chosen).name, "datasets")
    args = ["train", str(data), str(run), "--config", str(run / layout.CONFIG_TOML), "--resume", "latest"]
    job = jobs.submit(f"runs/{run.name}", f"datasets/{data.name}", args)
    return f"runs/{run.name}: resumed" if job.started else f"runs/{run.name}: resume queued behind the running run"
