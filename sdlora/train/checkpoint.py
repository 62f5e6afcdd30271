"""Resumable checkpoints (Accelerate state + LoRA files + step), written atomically; OUT_DIR ownership checks."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdlora import layout
from sdlora.errors import UsageError

CHECKPOINTS, STATE_FILE, LORA_STATE = layout.CHECKPOINTS, layout.TRAINER_STATE, layout.LORA_STATE
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
# Settings that may change between a run and its resume (or extension) without making it a different run.
RESUMABLE_KEYS = {
    "steps",
    "resume",
    "overwrite",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "log_every",
    "eval_every",
    "compile",  # speed only
}


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints (temporary folders start with '.'), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(out_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder `--resume latest|PATH` names, or None."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise UsageError(f"--resume latest: no checkpoint in {Path(out_dir) / CHECKPOINTS}; drop --resume")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(
            f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); use 'latest' or a step-N folder"
        )
    return path


def read_step(checkpoint: Path) -> int:
    return int(json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))["step"])


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (as JSON) that defines a run: everything but RESUMABLE_KEYS."""
    settings = json.loads(json.dumps(config))
    for key in RESUMABLE_KEYS:
        settings.get("train", {}).pop(key, None)
    return settings


def check_out_dir(out_dir: Path, config: dict[str, Any], resume: str | None, overwrite: bool) -> None:
    """Refuse an OUT_DIR that holds another run, unless resuming it (same settings) or overwriting it."""
    saved_file = Path(out_dir) / layout.CONFIG_JSON
    if overwrite or not saved_file.is_file():
        return
    saved = run_settings(json.loads(saved_file.read_text(encoding="utf-8")))
    differences = _differences(saved, run_settings(config))
    if resume and differences:
        raise UsageError(
            f"{out_dir} holds a run with other settings ({', '.join(differences[:3])}); "
            "resume with the same settings, or pass --overwrite to start over"
        )
    if not resume:
        what = f"a different run ({', '.join(differences[:3])})" if differences else "a run"
        raise UsageError(f"{out_dir} already holds {what}; pass --resume latest to continue it or --overwrite")


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = []
    for section in sorted(set(a) | set(b)):
        left, right = a.get(section, {}), b.get(section, {})
        keys += [f"{section}.{k}" for k in sorted(set(left) | set(right)) if left.get(k) != right.get(k)]
    return keys


def clear_run(out_dir: Path) -> None:
    """--overwrite: remove the previous run's outputs (class images are kept: they depend only on the base)."""
    out_dir = Path(out_dir)
    for name in (layout.CHECKPOINTS, layout.SAMPLES, layout.TENSORBOARD, layout.BEST):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (layout.METRICS, layout.CONFIG_JSON, layout.IDENTITY_PLOT, layout.SUMMARY):
        (out_dir / name).unlink(missing_ok=True)


def save(accelerator: Any, out_dir: Path, step: int, write_files: Callable[[Path], None], keep: int) -> Path | None:
    """Write checkpoint `step` on every process: Accelerate's state (optimizer, LR scheduler, grad scaler, RNG
    states; models via the hooks of `register_hooks`), then `write_files(folder)` and the step on the main
    process. Everything goes into a hidden temporary folder that is renamed when complete, so a crash never
    leaves a half-written checkpoint. Returns the folder (None on other processes)."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_files(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(out_dir, keep)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def prune(out_dir: Path, keep: int) -> None:
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def register_hooks(accelerator: Any, models: dict[str, Any], unwrap: Callable[[Any], Any]) -> None:
    """Make save_state/load_state store only the LoRA tensors (not the frozen multi-GB base weights)."""
    from sdlora.lora import peft

    def save_hook(prepared: list[Any], weights: list[Any], folder: str) -> None:
        if accelerator.is_main_process:
            peft.save_state(Path(folder) / LORA_STATE, {name: unwrap(m) for name, m in models.items()})
        weights.clear()  # nothing else for Accelerate to write

    def load_hook(prepared: list[Any], folder: str) -> None:
        peft.load_state(Path(folder) / LORA_STATE, {name: unwrap(m) for name, m in models.items()})
        prepared.clear()  # already loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
