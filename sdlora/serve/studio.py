"""Generate and Evaluate for the page: `sdlora generate` into images/, `sdlora eval` into the run's eval/ folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora import layout
from sdlora.errors import UsageError
from sdlora.serve.commands import Progress, run_sdlora
from sdlora.serve.runs import DIFFUSERS_FILE, own, run_config
from sdlora.serve.workspace import PHOTO_SUFFIXES, Workspace, sanitise_name


@dataclass
class Images:
    folder: str  # workspace-relative
    images: list[tuple[Path, str]] = field(default_factory=list)  # (png, its parameters in words)
    grid: Path | None = None
    compare: Path | None = None


@dataclass
class Evaluation:
    summary: dict[str, Any]
    notes: list[str]
    report: str  # workspace-relative index.html
    json: str


def lora_choices(workspace: Workspace) -> list[str]:
    """Runs with a LoRA (runs/NAME) and every LoRA file in them (top level and best/), workspace-relative."""
    choices = []
    for name in workspace.subfolders("runs"):
        run = workspace.root / "runs" / name
        if (run / DIFFUSERS_FILE).is_file():
            choices.append(f"runs/{name}")
        for path in sorted(run.glob("*.safetensors")) + sorted(run.glob("best/*.safetensors")):
            if own(run, path) is None:  # a link out of the run is never offered
                continue
            choices.append(f"runs/{name}/{path.relative_to(run).as_posix()}")
    return choices


def _run_of(workspace: Workspace, lora: Path) -> Path | None:
    """The run folder a LoRA (folder or file) belongs to."""
    runs = (workspace.root / "runs").resolve()
    for folder in (lora, *lora.parents):
        if folder.parent == runs:
            return folder
    return None


def generate(
    workspace: Workspace,
    lora: str,
    prompt: str,
    *,
    base: str | None = None,
    seed: int = 42,
    n: int = 4,
    steps: int | None = None,
    cfg: float | None = None,
    size: str | None = None,
    compare: bool = False,
    keep_face: Path | None = None,
    progress: Progress | None = None,
) -> Images:
    """Render `prompt` ({trigger} allowed) with a run's LoRA; base and size default to the run's own, steps and
    guidance (None) to the base's own (Z-Image-Turbo: 8 steps, CFG 0; Flux.1-dev: 28, guidance 3.5)."""
    if not prompt.strip():
        raise UsageError("write a prompt (use {trigger} for the person)")
    lora_path = workspace.inside(workspace.path(lora), "runs")
    if not lora_path.exists():
        raise UsageError(f"{lora}: no such LoRA")
    run = _run_of(workspace, lora_path)
    settings = run_config(run) if run else {}
    base = base or settings.get("model", {}).get("base")
    if not base:
        raise UsageError("choose a base model")
    resolution = settings.get("train", {}).get("resolution", 512)
    out = workspace.new_folder("images", f"{time.strftime('%Y%m%d-%H%M%S')}-{run.name if run else 'lora'}")
    args = ["generate", "--base", _base(workspace, base), "--lora", str(lora_path), "--prompt", prompt]
    args += ["--seed", str(int(seed)), "--n", str(int(n))]
    args += ["--steps", str(int(steps))] if steps is not None else []
    args += ["--cfg", str(float(cfg))] if cfg is not None else []
    args += ["--size", size or f"{resolution}x{resolution}", "--out", str(out)]
    if compare:
        args.append("--compare")
    if keep_face is not None:
        face = workspace.take_upload(Path(keep_face), out.with_name(out.name + "-face"), PHOTO_SUFFIXES)
        args += ["--keep-face", str(face)]
    run_sdlora(workspace, args, "generate", progress)
    return images_of(workspace, out)


def _base(workspace: Workspace, base: str) -> str:
    """A base model from a run's config (an absolute path train was given) or the page (workspace-relative)."""
    if Path(base).is_absolute():
        return str(workspace.inside(Path(base)))
    return workspace.model_ref(base)


def images_of(workspace: Workspace, folder: Path) -> Images:
    """The images of a generate folder with their parameters (from each NNNN-SEED.json)."""
    folder = workspace.inside(folder, "images")
    result = Images(workspace.relative(folder))
    for png in workspace.within(sorted(folder.glob("[0-9][0-9][0-9][0-9]-*.png")), "images"):
        if png.stem.endswith("-steps"):
            continue
        try:
            record = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        words = ", ".join(f"{key}: {record[key]}" for key in ("prompt", "seed", "steps", "cfg") if key in record)
        result.images.append((png, words or png.name))
    result.grid, result.compare = (
        next((p for p in workspace.within([folder / name], "images") if p.is_file()), None)
        for name in (layout.GRID, layout.COMPARE)
    )
    return result


def evaluate(
    workspace: Workspace,
    run: str,
    reference: str,
    *,
    base: str | None = None,
    n: int = 1,
    progress: Progress | None = None,
) -> Evaluation:
    """`sdlora eval` of a run's LoRA against a dataset, with its JSON and HTML report in runs/NAME/eval/STAMP/."""
    folder = workspace.path(run, "runs")
    if not (folder / DIFFUSERS_FILE).is_file():
        raise UsageError(f"runs/{folder.name} has no finished LoRA yet")
    ref = workspace.path(reference, "datasets")
    settings = run_config(folder)
    base = base or settings.get("model", {}).get("base")
    if not base:
        raise UsageError("choose a base model")
    resolution = settings.get("train", {}).get("resolution", 512)
    steps = settings.get("train", {}).get("sample_steps", 20)
    out = workspace.inside(folder / "eval" / sanitise_name(time.strftime("%Y%m%d-%H%M%S")), "runs")
    if out.exists():
        raise UsageError(f"{workspace.relative(out)} already exists; wait a second and try again")
    json_path, report = out / "eval.json", out / "report"
    args = ["eval", "--reference", str(ref), "--lora", str(folder), "--base", _base(workspace, base), "--n", str(n)]
    args += ["--json", str(json_path), "--report", str(report)]
    args += ["--set", f"generate.size={resolution}x{resolution}", "--set", f"generate.steps={steps}"]
    out.mkdir(parents=True)
    run_sdlora(workspace, args, "eval", progress)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    return Evaluation(
        summary=data.get("summary", {}),
        notes=list(data.get("notes", [])),
        report=workspace.relative(report / "index.html"),
        json=workspace.relative(json_path),
    )
