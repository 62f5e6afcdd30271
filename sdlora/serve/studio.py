"""Generate and Evaluate for the page: `sdlora generate` into images/, `sdlora eval` into the run's eval/ folder."""

from __future__ import annotations

import json
import re
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
    threshold: float | None = None
    face_model: str = ""
    edits: dict[str, Any] | None = None  # eval.json's "edits" (editability), where it was measured

    def explained(self) -> list[list[str]]:
        """The report's summary table: [metric, value, what it means, what good looks like] per number
        (editability after bleed, only where it was measured)."""
        from sdlora.evaluation.edits import JUDGED_BY, READING
        from sdlora.evaluation.metrics import READINGS, reading

        rows = []
        for key in READINGS:
            value = self.summary.get(key)
            shown = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
            rows.append([key, shown, *reading(key, self.threshold if self.threshold is not None else 0.0)])
            if key == "bleed" and self.edits:
                judge = JUDGED_BY.get(self.edits.get("judge", ""), "")
                value = f"{self.edits['editability']:.3f} ({self.edits.get('edited')}/{self.edits.get('images')})"
                rows.append(["editability", value, READING[0].format(judge=judge), READING[1]])
        return rows


def lora_choices(workspace: Workspace) -> list[str]:
    """What the LoRA pickers offer, workspace-relative: each run's final LoRA (runs/NAME) and its best checkpoint
    (runs/NAME/best). The same LoRA in kohya format and pivotal tuning's NAME_emb files (embeddings, not LoRAs)
    are left out; a run folder without the diffusers file offers its other .safetensors files."""
    return [value for _, value in lora_labels(workspace)]


def lora_labels(workspace: Workspace) -> list[tuple[str, str]]:
    """(label, value) of every `lora_choices` entry: 'NAME: final', 'NAME: best (step N, identity X)'."""
    choices = []
    for name in workspace.subfolders("runs"):
        run = workspace.root / "runs" / name
        best = own(run, run / layout.BEST)
        if own(run, run / DIFFUSERS_FILE) is not None and (run / DIFFUSERS_FILE).is_file():
            choices.append((f"{name}: final", f"runs/{name}"))
        elif best is None or not (best / DIFFUSERS_FILE).is_file():
            for path in sorted(run.glob("*.safetensors")):
                if own(run, path) is not None and not path.stem.endswith("_emb"):  # a link out is never offered
                    choices.append((f"{name}: {path.name}", f"runs/{name}/{path.name}"))
        if best is not None and (best / DIFFUSERS_FILE).is_file():
            choices.append((f"{name}: {best_label(run)}", f"runs/{name}/{layout.BEST}"))
    return choices


def best_label(run: Path) -> str:
    """'best (step N, identity X)' from best/best.json ('best' alone when it can't be read)."""
    record = _json_of(run, f"{layout.BEST}/{layout.BEST_FILE}")
    step, identity = record.get("step"), (record.get("eval") or {}).get("identity")
    if step is None:
        return "best"
    scored = f"identity {identity:.3f}" if isinstance(identity, float | int) else "no face scored"  # tiny models
    return f"best (step {step}, {scored})"


def _json_of(run: Path, name: str) -> dict[str, Any]:
    path = own(run, run / name)
    try:
        found = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


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
    weight: float = 1.0,
    negative: str = "",
    sampler: str | None = None,
    compare: bool = False,
    keep_face: Path | None = None,
    progress: Progress | None = None,
) -> Images:
    """Render `prompt` ({trigger} allowed) with a run's LoRA at `weight`; base and size default to the run's own,
    steps, guidance and sampler (None) to the base's own (Z-Image-Turbo: 8 steps, CFG 0; Flux.1-dev: 28, guidance
    3.5). Each option is one of `sdlora generate`'s (--lora PATH:WEIGHT, --negative, --size, --scheduler)."""
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
    if size and not re.fullmatch(r"\d{2,5}x\d{2,5}", size.strip()):
        raise UsageError(f"size {size!r}: write WIDTHxHEIGHT, e.g. 512x768 (empty: the run's resolution)")
    spec = str(lora_path) if float(weight) == 1.0 else f"{lora_path}:{float(weight):g}"
    args = ["generate", "--base", _base(workspace, base), "--lora", spec, "--prompt", prompt]
    args += ["--seed", str(int(seed)), "--n", str(int(n))]
    args += ["--negative", negative] if negative.strip() else []
    args += ["--scheduler", sampler] if sampler else []
    args += ["--steps", str(int(steps))] if steps is not None else []
    args += ["--cfg", str(float(cfg))] if cfg is not None else []
    args += ["--size", (size or "").strip() or f"{resolution}x{resolution}", "--out", str(out)]
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
        return str(workspace.model_path(Path(base)))
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
    n: int | None = None,
    face_model: str | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """`sdlora eval` of a run's LoRA against a dataset, with its JSON and HTML report in runs/NAME/eval/STAMP/.
    The run's own settings (its config.toml: face model, threshold, images per prompt, seed) apply unless `n`
    or `face_model` is given; images are rendered at the run's resolution and sample steps."""
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
    args = ["eval", "--reference", str(ref), "--lora", str(folder), "--base", _base(workspace, base)]
    stored = own(folder, folder / layout.CONFIG_TOML)
    args += ["--config", str(stored)] if stored is not None and stored.is_file() else []
    args += ["--n", str(int(n))] if n else []
    args += ["--set", f"eval.face_model={face_model}"] if face_model else []
    args += ["--json", str(json_path), "--report", str(report)]
    args += ["--set", f"generate.size={resolution}x{resolution}", "--set", f"generate.steps={steps}"]
    out.mkdir(parents=True)
    run_sdlora(workspace, args, "eval", progress)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    return Evaluation(
        summary=data.get("summary", {}),
        edits=data.get("edits"),
        threshold=data.get("threshold"),
        face_model=data.get("face_model", ""),
        notes=list(data.get("notes", [])),
        report=workspace.relative(report / "index.html"),
        json=workspace.relative(json_path),
    )
