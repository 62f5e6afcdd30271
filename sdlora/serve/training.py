"""Start, stop and resume `sdlora train` from the page: the exact config.toml, the queue, the resume command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sdlora
from sdlora import fsutil, layout
from sdlora.config import Config
from sdlora.errors import UsageError
from sdlora.fsutil import atomic_write_text
from sdlora.serve import form
from sdlora.serve.jobs import Jobs
from sdlora.serve.runs import checkpoints, failed_empty, status
from sdlora.serve.workspace import Workspace, sanitise_name

# Every text setting of the form, by what it holds (a test checks each text setting is in exactly one, so a new
# one can't slip through unchecked). Paths resolve inside the workspace like every other path the page takes
# (True: a hub id owner/name is taken too); a file name must be a bare name; the rest is plain text.
PATH_SETTINGS = {
    "train.class_dir": False,
    "train.control_dir": False,
    "model.vae": True,
    "model.single_file_config": True,
    "model.training_adapter": True,
    "eval.clip": True,
}
NAME_SETTINGS = ("train.name",)
TEXT_SETTINGS = ("train.class_prompt", "train.sample_prompts", "train.resolutions", "generate.negative")


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
    for key, hub in PATH_SETTINGS.items():
        raw = str(values.get(key) or "").strip()
        try:
            if raw:
                overrides[key] = workspace.model_ref(raw) if hub else str(workspace.path(raw))
        except UsageError as exc:
            raise UsageError(f"{key}: {exc}") from None
    for key in NAME_SETTINGS:
        raw = str(values.get(key) or "").strip()
        if raw and sanitise_name(raw) != raw:
            raise UsageError(f"{key}: {raw!r} is not a plain file name; use letters, digits, '.', '_' and '-'")
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
    # A run that failed before its first checkpoint frees its name: train replaces what it left (--overwrite).
    again = run.exists() and failed_empty(workspace, jobs, run.name)
    if run.exists() and not again:
        raise UsageError(f"runs/{run.name} already exists; choose another name (or Resume it)")
    # A run stopped before train made its folder left nothing: its name is free again.
    jobs.refuse_active(f"runs/{run.name}")
    text = preview(workspace, preset, base, values)
    config_file = jobs.folder / f"{run.name}.config.toml"
    atomic_write_text(config_file, text)
    args = ["train", str(data), str(run), "--config", str(config_file), *(["--overwrite"] if again else [])]
    job = jobs.submit(f"runs/{run.name}", f"datasets/{data.name}", args)
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
    if not run.is_dir():
        raise UsageError(f"runs/{run.name}: nothing was written yet; Start it again under this name")
    # A run stopped before its first checkpoint (e.g. while its model loaded) resumes from step 0: train starts
    # it again in its own folder. Its config is the one train stored, else the one the app wrote for Start.
    config_file = run / layout.CONFIG_TOML
    if not config_file.is_file():
        config_file = jobs.folder / f"{run.name}.config.toml"
    if not (checkpoints(run) or fsutil.owner(run) == "train") or not config_file.is_file():
        raise UsageError(f"runs/{run.name} holds no run of sdlora train to resume; Start a new run instead")
    chosen = dataset or current.dataset
    if not chosen:
        raise UsageError(f"runs/{run.name} was started outside the app: choose its dataset to resume it")
    data = workspace.path(Path(chosen).name, "datasets")
    args = ["train", str(data), str(run), "--config", str(config_file), "--resume", "latest"]
    job = jobs.submit(f"runs/{run.name}", f"datasets/{data.name}", args)
    return f"runs/{run.name}: resumed" if job.started else f"runs/{run.name}: resume queued behind the running run"
