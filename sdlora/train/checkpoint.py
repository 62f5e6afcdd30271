"""Resumable checkpoints (Accelerate state + LoRA files + step), written atomically with a completion record and
verified before a resume; which settings a resume may change; OUT_DIR ownership checks."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdlora import fsutil, layout
from sdlora.errors import SdloraError, UsageError

CHECKPOINTS, STATE_FILE, LORA_STATE = layout.CHECKPOINTS, layout.TRAINER_STATE, layout.LORA_STATE
RECORD = layout.CHECKPOINT_RECORD
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
# Settings that may change between a run and its resume (or extension) without making it a different run: the
# cadence of checkpoints, logs, samples and evaluation; the learning rates and the number of steps (the schedule
# runs on to the new last step); what samples and evaluations render and how they are scored; speed only.
RESUMABLE_KEYS = {
    "steps",
    "resume",
    "overwrite",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "sample_prompts",
    "sample_steps",
    "log_every",
    "eval_every",
    "learning_rate",
    "text_encoder_learning_rate",
    "text_encoder_2_learning_rate",
    "pivotal_learning_rate",
    "compile",  # speed only
}
RESUMABLE_SECTIONS = {"generate", "eval"}  # sampling settings of sample grids and identity scoring; scoring
RESUMABLE_MODEL_KEYS = {"allow_pickle", "allow_distilled"}  # permissions, not properties of the run
# Why the rest can't change: it is baked into the checkpoint (optimizer state and LoRA shapes), the data order
# and noise (seed, batch, resolution), or the meaning of the steps done so far.
WHY_FIXED = "the checkpoint's LoRA shapes and optimizer state, the data order and the steps done so far depend on them"


def step_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def step_of(folder: Path) -> int:
    match = _STEP_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else -1


def step_folders(out_dir: Path) -> list[Path]:
    """Every step-N folder (temporary folders start with '.'), oldest first; complete or not."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Finished checkpoints (with their step file), oldest first; not verified (see `good_checkpoints`)."""
    return [p for p in step_folders(out_dir) if (p / STATE_FILE).is_file()]


def good_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints that verify, oldest first."""
    return [p for p in step_folders(out_dir) if verify(p) is None]


def resolve_resume(out_dir: Path, resume: str | None, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint folder `--resume latest|PATH` names, or None (no --resume, or `latest` in an OUT_DIR with no
    checkpoint yet: the run starts from step 0). `latest` takes the newest checkpoint that verifies and says which
    newer ones it skipped and why."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        problem = verify(path) if path.is_dir() else "no such folder"
        if problem:
            raise UsageError(f"--resume {resume}: not a usable checkpoint ({problem}); use 'latest' or another step-N")
        return path
    found = step_folders(out_dir)
    skipped = []
    for folder in reversed(found):
        problem = verify(folder)
        if problem is None:
            for name, why in skipped:
                say(f"note: --resume latest skipped {name} ({why})")
            if skipped:
                say(f"note: resuming from {folder.name}, the newest checkpoint that verifies")
            return folder
        skipped.append((folder.name, problem))
    if skipped:
        details = "; ".join(f"{name}: {why}" for name, why in skipped[:3])
        raise UsageError(
            f"--resume latest: none of the {len(found)} checkpoints in {Path(out_dir) / CHECKPOINTS} is usable "
            f"({details}); start the run again with --overwrite"
        )
    if fsutil.owner(out_dir) != "train":  # no run here at all (a run killed at its start has its marker)
        raise UsageError(f"--resume latest: no checkpoint in {Path(out_dir) / CHECKPOINTS}; drop --resume")
    say(f"note: {Path(out_dir) / CHECKPOINTS} has no checkpoint yet: the run starts again from step 0")
    return None


def read_step(checkpoint: Path) -> int:
    return int(json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))["step"])


def verify(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint with finite LoRA tensors, else what is wrong with it. A
    checkpoint of an earlier version (no completion record) is checked by what it must hold."""
    folder = Path(folder)
    try:
        step = read_step(folder)
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} unreadable"
    record_file = folder / RECORD
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
            files, recorded_step = dict(record["files"]), int(record["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"{RECORD} unreadable"
        if recorded_step != step:
            return f"{STATE_FILE} says step {step}, {RECORD} says {recorded_step}"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != size:
                return f"{name} is {path.stat().st_size} bytes, {size} when written"
    else:  # an earlier version's checkpoint: the files a resume reads
        for name in (LORA_STATE, "optimizer.bin", "scheduler.bin"):
            path = folder / name
            if not path.is_file() or path.stat().st_size == 0:
                return f"{name} missing or empty"
    return nonfinite(folder / LORA_STATE)


def nonfinite(path: Path) -> str | None:
    """None when every tensor of the safetensors file is finite, else which (or why the file can't be read)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        return f"{path.name} unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        return f"{len(bad)} of {len(tensors)} LoRA tensors in {path.name} hold NaN/inf (e.g. {bad[0]})"
    return None


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config (as JSON) that defines a run: everything a resume may not change."""
    settings = json.loads(json.dumps(config))
    for key in RESUMABLE_KEYS:
        settings.get("train", {}).pop(key, None)
    for key in RESUMABLE_MODEL_KEYS:
        settings.get("model", {}).pop(key, None)
    for section in RESUMABLE_SECTIONS:
        settings.pop(section, None)
    return settings


def check_owner(out_dir: Path, dataset_dir: Path) -> None:
    """OUT_DIR is not the dataset (nor inside it, nor around it) and holds nothing but a train run's files."""
    out, data = Path(out_dir).resolve(), Path(dataset_dir).resolve()
    if out == data or data in out.parents or out in data.parents:
        raise UsageError(
            f"OUT_DIR {out_dir}: is the dataset {dataset_dir} or inside/around it; train never writes into its "
            "inputs: choose another OUT_DIR"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder; choose another OUT_DIR")
    live = fsutil.holder(out_dir, ignore_siblings=True) if out_dir.is_dir() else None  # (not this run's ranks)
    if live is not None:
        raise SdloraError(fsutil.in_use_message(out_dir, live))
    made_by = fsutil.owner(out_dir)
    if made_by not in (None, "train"):
        raise UsageError(
            f"OUT_DIR {out_dir}: holds {fsutil.describe(out_dir)}, not a training run; choose a new folder"
        )
    if made_by is None and fsutil.contents(out_dir):
        raise UsageError(
            f"OUT_DIR {out_dir}: holds {fsutil.describe(out_dir)}; train writes only into a new or empty folder "
            "(or one of its own runs): choose another OUT_DIR"
        )


def saved_config(out_dir: Path) -> dict[str, Any] | None:
    """The settings the run in OUT_DIR saved (its config.json), None when there is none."""
    saved_file = Path(out_dir) / layout.CONFIG_JSON
    if not saved_file.is_file():
        return None
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{saved_file}: unreadable ({exc}); pass --overwrite to start the run again") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{saved_file}: unreadable (not a table of settings); pass --overwrite to start the run again")
    return saved


def check_out_dir(out_dir: Path, config: dict[str, Any], resume: str | None, overwrite: bool) -> None:
    """Refuse an OUT_DIR that holds another run, unless resuming it (same run settings) or overwriting it."""
    stored = None if overwrite else saved_config(out_dir)
    if stored is None:
        return
    saved = run_settings(stored)
    differences = _differences(saved, run_settings(config), _defaults())
    if resume:  # the per-process batch may follow the number of processes (check_resumed_batch, once it is known)
        differences = [d for d in differences if d != "train.batch_size"]
    if resume and differences:
        shown = ", ".join(differences[:3]) + (", ..." if len(differences) > 3 else "")
        raise UsageError(
            f"{out_dir} holds a run with other settings ({shown}); these can't change at a resume ({WHY_FIXED}); "
            "only the learning rates, --steps, checkpoint/log/sample/eval settings and --compile may. Resume with "
            f"--config {Path(out_dir) / layout.CONFIG_TOML}, or pass --overwrite to start over"
        )
    if not resume:
        what = f"a different run ({', '.join(differences[:3])})" if differences else "a run"
        later = "" if step_folders(out_dir) else " (no checkpoint yet: it starts again from step 0)"
        raise UsageError(f"{out_dir} already holds {what}; pass --resume latest to continue it{later} or --overwrite")


def check_resumed_batch(out_dir: Path, resume_from: Path | None, batch_size: int, processes: int) -> str | None:
    """At a resume, --batch-size (per process) may change with the number of processes if the global batch
    (batch_size x processes) stays: 2 processes x 1 resume on one as 1 x 2 and train on exactly as they would
    have. Returns a note when the global batch changes (same --batch-size on another number of processes)."""
    stored = saved_config(out_dir) if resume_from is not None else None  # the resumed run's (rewritten later)
    if stored is None:
        return None
    before = int(stored.get("train", {}).get("batch_size", batch_size))
    try:
        then = int(json.loads((Path(resume_from) / STATE_FILE).read_text(encoding="utf-8")).get("processes", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        then = 0  # an earlier version's checkpoint: its number of processes is unknown
    if before == batch_size:
        if not then or then == processes:
            return None
        return f"note: global batch {before * then} -> {batch_size * processes} ({processes} processes now)"
    if then and before * then == batch_size * processes:
        return None
    fits = f"--batch-size {before * then // processes}" if then and before * then % processes == 0 else None
    raise UsageError(
        f"--batch-size {batch_size}: {resume_from} trained {before} per process x "
        f"{then or 'an unknown number of'} processes, which {processes} processes can't keep; resume with "
        + (f"{fits} (the same global batch) or " if fits else "")
        + f"--batch-size {before} (the per-process batch)"
    )


def _differences(a: dict[str, Any], b: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The settings that differ between two runs' settings. A setting one side lacks (its run was made by an
    earlier version, before the setting existed) counts as that version's behaviour: the default."""
    defaults = defaults or {}
    keys = []
    for section in sorted(set(a) | set(b)):
        left, right = a.get(section, {}), b.get(section, {})
        if not isinstance(left, dict) or not isinstance(right, dict):
            keys += [section] if left != right else []
            continue
        fallback = defaults.get(section, {})
        for key in sorted(set(left) | set(right)):
            missing = object()
            mine, theirs = left.get(key, fallback.get(key, missing)), right.get(key, fallback.get(key, missing))
            keys += [f"{section}.{key}"] if mine != theirs else []
    return keys


# What a setting a run's saved settings lack meant in the versions before it existed, where that is not today's
# default: the recommended person settings (sdlora.train.recommended) came after pivotal tuning and preservation.
EARLIER = {"train": {"pivotal": False, "preservation": "none"}}


def _defaults() -> dict[str, Any]:
    """Every setting's meaning in a run that was saved without it: its default, or what it was before (EARLIER)."""
    from sdlora.config import Config

    defaults = run_settings(Config().model_dump(mode="json"))
    return {section: {**values, **EARLIER.get(section, {})} for section, values in defaults.items()}


def mark_run(out_dir: Path, fresh: bool) -> None:
    """OUT_DIR's marker: a new run id for a new run (or --overwrite); a resumed run keeps its own, and a run of an
    earlier version, which wrote none, gets one."""
    marker = fsutil.read_marker(out_dir)
    if fresh or marker is None or marker.get("command") != "train":
        fsutil.write_marker(out_dir, fsutil.new_marker("train"))


def clear_run(out_dir: Path) -> None:
    """--overwrite (of a folder check_owner accepted): remove the previous run's outputs (class images are kept:
    they depend only on the base)."""
    out_dir = Path(out_dir)
    for name in (layout.CHECKPOINTS, layout.SAMPLES, layout.TENSORBOARD, layout.BEST):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (layout.METRICS, layout.CONFIG_JSON, layout.IDENTITY_PLOT, layout.SUMMARY):
        (out_dir / name).unlink(missing_ok=True)


def save(
    accelerator: Any,
    out_dir: Path,
    step: int,
    write_files: Callable[[Path], None],
    keep: int,
    save_state: Callable[[str], Any] | None = None,
) -> Path | None:
    """Write checkpoint `step` on every process: Accelerate's state (optimizer, LR scheduler, grad scaler, RNG
    states; models via the hooks of `register_hooks`; `save_state` writes it when given, else
    accelerator.save_state), then `write_files(folder)`, the step and the completion
    record on the main process. Everything goes into a hidden temporary folder that is renamed when complete, so
    a crash never leaves a half-written checkpoint. Returns the folder (None on other processes)."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    (save_state or accelerator.save_state)(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_files(tmp)
        state = {"step": step, "processes": accelerator.num_processes}  # the global batch: batch_size x processes
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
        write_record(tmp, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(out_dir, keep, step)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def write_record(folder: Path, step: int) -> None:
    """complete.json, last: every file's size, once the LoRA state is known to be finite."""
    problem = nonfinite(folder / LORA_STATE)
    if problem:
        raise SdloraError(f"checkpoint at step {step} not written: {problem}")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    record = {"step": step, "files": files, "lora_finite": True}
    fsutil.atomic_write_text(folder / RECORD, json.dumps(record, indent=2) + "\n")


def prune(out_dir: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (later ones, left by a run resumed from an earlier one,
    are replaced when the run gets there)."""
    done = [p for p in step_folders(out_dir) if step_of(p) <= step]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def apply_learning_rates(optimizer: Any, lr_scheduler: Any, rates: list[float]) -> bool:
    """After a resume: make the LR schedule run on from the checkpoint with these base rates (one per parameter
    group) instead of the saved ones. True when they differed (nothing is touched otherwise)."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # Accelerate's wrapper
    if [float(r) for r in scheduler.base_lrs] == [float(r) for r in rates]:
        return False
    groups = optimizer.param_groups
    lambdas = getattr(scheduler, "lr_lambdas", [lambda _: 1.0] * len(groups))
    scheduler.base_lrs = list(rates)
    for group, rate, factor in zip(groups, rates, lambdas, strict=True):
        group["initial_lr"] = rate
        group["lr"] = rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    return True


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
