"""Training runs as found on disk under runs/: status, progress, the live tail of metrics and samples, downloads.

A run started from the command line has no job record; its status comes from its files alone: the final LoRA
file means finished, checkpoints without it mean stopped, and a live `OUT_DIR/.sdlora.lock` ({"pid": N, ...},
written by `sdlora train` where available) means running. A job record of the app adds queued, running and
failed (with the last `error:` line of its log).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.ansi import AnsiDecoder

from sdlora import layout
from sdlora.serve.jobs import Job, Jobs, process_alive
from sdlora.serve.workspace import Workspace

DIFFUSERS_FILE, METRICS = layout.DIFFUSERS_LORA, layout.METRICS
LOCK = ".sdlora.lock"
STOPPED_CODES = (130, 143)  # SIGINT, SIGTERM: train checkpointed and stopped
# Terminal codes rich's decoder may leave at a line's start (cursor show/hide, erase line): never part of a message.
_CSI_START = re.compile(r"\x1b\[\?25[hl]")  # rich hides the cursor while a bar draws: the error follows it
_CSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class RunStatus:
    name: str
    state: str  # running, queued, finished, stopped, failed
    detail: str  # the error line of a failed run, or what happened
    step: int | None
    total: int | None
    dataset: str | None  # workspace-relative, when the app started the run

    def line(self) -> str:
        progress = f" step {self.step}/{self.total}" if self.step is not None and self.total else ""
        return f"{self.name}: {self.state}{progress}" + (f" ({self.detail})" if self.detail else "")


def run_names(workspace: Workspace, jobs: Jobs) -> list[str]:
    """Every run folder under runs/, and the app's runs that have none (queued, starting, or failed before train
    made one), newest first."""
    names = set(workspace.subfolders("runs"))
    latest = {Path(job.run).name: job for job in jobs.all() if not job.cancelled}
    for name, job in latest.items():
        code = jobs.returncode(job)
        if jobs.state(job) != "ended" or (code not in (None, 0) and code not in STOPPED_CODES):
            names.add(name)
    run_dir = workspace.root / "runs"

    def modified(name: str) -> float:
        with contextlib.suppress(OSError):
            return (run_dir / name).stat().st_mtime
        return float("inf")  # no folder yet: shown first

    return sorted(names, key=lambda name: (-modified(name), name))


def failed_empty(workspace: Workspace, jobs: Jobs, name: str) -> bool:
    """True when `runs/NAME` is a run the app started that failed before its first checkpoint: its name is free
    again (a new Start replaces what train left there with --overwrite)."""
    current = status(workspace, jobs, name)
    folder = workspace.path(name, "runs")
    return current.state == "failed" and not checkpoints(folder) and not (folder / DIFFUSERS_FILE).exists()


def status(workspace: Workspace, jobs: Jobs, name: str) -> RunStatus:
    folder = workspace.path(name, "runs")
    job = jobs.latest_for(f"runs/{folder.name}")
    step, total = last_step(folder), total_steps(folder, job)
    dataset = job.dataset if job else None

    def make(state: str, detail: str = "") -> RunStatus:
        return RunStatus(folder.name, state, detail, step, total, dataset)

    job_state = jobs.state(job) if job else None
    if job_state == "queued":
        return make("queued", "waits for the running run to end")
    if job_state == "running" or lock_alive(folder):
        return make("running")
    has_checkpoints = bool(checkpoints(folder))
    code = jobs.returncode(job) if job else None
    if code is not None and code != 0:
        if code in STOPPED_CODES and has_checkpoints:
            return make("stopped", "resumable from its last checkpoint")
        if code in STOPPED_CODES:
            again = "Resume starts it again from step 0" if folder.is_dir() else "nothing was written: Start it again"
            return make("stopped", f"before its first checkpoint; {again}")
        return make("failed", error_line(jobs.log_path(job)))
    if (folder / DIFFUSERS_FILE).is_file():
        return make("finished")
    if has_checkpoints:
        return make("stopped", "resumable from its last checkpoint")
    if code == 0:
        return make("failed", "ended without writing its LoRA")
    return make("stopped", "no checkpoint yet; Resume starts it again from step 0")


def lock_alive(folder: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return process_alive(int(json.loads((folder / LOCK).read_text(encoding="utf-8"))["pid"]))
    return False


def checkpoints(folder: Path) -> list[Path]:
    top = folder / layout.CHECKPOINTS
    return sorted(p for p in top.iterdir() if p.name.startswith("step-")) if top.is_dir() else []


def error_line(log: Path) -> str:
    """The last `error: ...` line of a log, else its last line (never a traceback). Lines are read as a terminal
    shows them (rich's decoder: colour and cursor codes dropped, a carriage return overwrites), so an error line
    drawn after a progress bar is still found."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "no log"
    lines = [_CSI.sub("", line.plain).strip() for line in AnsiDecoder().decode(_CSI_START.sub("\n", text))]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def own(folder: Path, path: Path) -> Path | None:
    """`path` resolved, if it lies inside the run `folder` (itself checked inside the workspace), else None: a
    symlink in a run folder that leads anywhere else is never read, zipped, shown or served."""
    try:
        top, resolved = folder.resolve(), path.resolve()
    except (OSError, RuntimeError):  # a link loop
        return None
    return resolved if top in resolved.parents else None


def _read_json(folder: Path, name: str) -> Any:
    """The JSON file `name` of a run folder, or None (missing, damaged, or a symlink out of the run)."""
    path = own(folder, folder / name)
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    return None


def run_config(folder: Path) -> dict[str, Any]:
    found = _read_json(folder, layout.CONFIG_JSON)
    return found if isinstance(found, dict) else {}


def total_steps(folder: Path, job: Job | None = None) -> int | None:
    steps = run_config(folder).get("train", {}).get("steps")
    if steps is None and job is not None and "--steps" in job.argv:
        steps = job.argv[job.argv.index("--steps") + 1]
    with contextlib.suppress(TypeError, ValueError):
        return int(steps)
    return None


def last_step(folder: Path) -> int | None:
    """The step of the last record of metrics.jsonl, reading only the end of the file."""
    path = own(folder, folder / METRICS)
    try:
        if path is None:
            return None
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["step"])
    return None


@dataclass
class Tail:
    """What the live view has already shown of one run: the metrics file's offset, its records, the samples."""

    run: str = ""
    offset: int = 0
    losses: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "seconds_per_step"}
    evals: list[dict] = field(default_factory=list)  # {"step", "eval": {...}}
    samples: list[str] = field(default_factory=list)  # file names in samples/, in order
    shown: str = ""  # the status line last shown: a new one (e.g. finished) refreshes summary and downloads

    def update(self, folder: Path) -> bool:
        """Read only the new lines of metrics.jsonl and the new sample files; True when something changed."""
        changed = False
        path = own(folder, folder / METRICS)
        size = path.stat().st_size if path is not None and path.is_file() else 0
        if size < self.offset:  # a resume truncated the file: read it again
            self.offset, self.losses, self.evals, changed = 0, [], [], True
        if size > self.offset:
            with path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(size - self.offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
            self.offset += len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    (self.evals if "eval" in record else self.losses).append(record)
                    changed = True
        samples = own(folder, folder / layout.SAMPLES)
        if samples is not None and samples.is_dir():
            with os.scandir(samples) as entries:
                names = sorted(e.name for e in entries if e.name.endswith(".png") and not e.name.startswith("."))
            names = [name for name in names if own(samples, samples / name) is not None]
            new = [name for name in names if name not in set(self.samples)]
            if new:
                self.samples = sorted(set(self.samples) | set(new))
                changed = True
        return changed

    def speed(self, total: int | None) -> str:
        """'5.2 it/s, ETA 0:01:20' from the recent records. The pace is the median seconds per step of the last
        ones: a step that also scored identity or drew samples is not what every remaining step costs."""
        if not self.losses:
            return ""
        last = self.losses[-1]
        paces = [float(r.get("seconds_per_step") or 0) for r in self.losses[-20:]]
        seconds = statistics.median([p for p in paces if p > 0] or [0.0])
        text = f"step {last['step']}" + (f"/{total}" if total else "") + f", loss {last['loss']:.4f}"
        if seconds > 0:
            text += f", {1 / seconds:.2f} it/s"
            if total and total > last["step"]:
                eta = int(seconds * (total - last["step"]))
                text += f", ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        return text


def phase(folder: Path, log: Path | None) -> str:
    """What a run does before its first step: 'class images 48/100' while prior preservation renders them,
    else the last line its log shows (loading the base, caching latents)."""
    wanted = run_config(folder).get("train", {}).get("num_class_images")
    classes = own(folder, folder / layout.CLASS_IMAGES)
    if wanted and classes is not None and classes.is_dir():
        made = sum(1 for p in classes.glob("class-*.png"))
        if made < int(wanted):
            return f"class images {made}/{wanted}"
    lines = log_tail(log, 1)
    return f"before step 1: {lines[-1]}" if lines else "starting"


def log_tail(log: Path | None, count: int = 15) -> list[str]:
    """The last `count` lines a run's log shows in a terminal (progress bars redrawn in place count once)."""
    if log is None:
        return []
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [_CSI.sub("", line.plain).rstrip() for line in AnsiDecoder().decode(_CSI_START.sub("\n", text))]
    return [line for line in lines if line.strip()][-count:]


def sample_files(folder: Path, names: list[str]) -> list[Path]:
    """The sample grids `names` of a run, resolved; any that leads out of the run folder is left out."""
    found = (own(folder, folder / layout.SAMPLES / name) for name in names)
    return [path for path in found if path is not None]


def best_step(tail: Tail, folder: Path) -> int | None:
    """The step best/ holds (best/best.json), else the one sdlora train's rule (pick_best) would keep among the
    steps scored so far, with the run's floors (none when its config.json can't be read)."""
    from sdlora.evaluation.checkpoints import pick_best

    with contextlib.suppress(KeyError, TypeError, ValueError):
        return int(_read_json(folder, f"{layout.BEST}/{layout.BEST_FILE}")["step"])
    rows = [{"step": e["step"], **e["eval"]} for e in tail.evals if e["eval"].get("identity") is not None]
    if not rows:
        return None
    floors = run_config(folder).get("eval")
    floors = floors if isinstance(floors, dict) else {}
    with contextlib.suppress(TypeError, ValueError):
        return pick_best(rows, float(floors.get("min_diversity", 0.0)), float(floors.get("max_bleed", 1.0)))[0]
    return pick_best(rows, 0.0, 1.0)[0]


def summary(folder: Path) -> dict[str, Any] | None:
    found = _read_json(folder, layout.SUMMARY)
    return found if isinstance(found, dict) else None


def downloads(workspace: Workspace, folder: Path) -> list[Path]:
    """Both LoRA files (diffusers and kohya format), pivotal tuning's NAME_emb.safetensors and best/ as a zip,
    when they exist.
    Anything that resolves outside the run folder (a symlinked file or best/) is left out."""
    folder = workspace.inside(folder, "runs")
    files = [folder / DIFFUSERS_FILE] + sorted(p for p in folder.glob("*.safetensors") if p.name != DIFFUSERS_FILE)
    found = [path for path in (own(folder, p) for p in files) if path is not None and path.is_file()]
    best = own(folder, folder / layout.BEST)
    if best is not None and best.is_dir():
        found.append(zip_folder(best, workspace.state / "downloads" / f"{folder.name}-best.zip"))
    return found


def zip_folder(folder: Path, target: Path) -> Path:
    """`folder` as a zip (rebuilt when a file in it is newer); symlinks and anything resolving outside it are
    left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and own(folder, p) is not None)
    newest = max((p.stat().st_mtime for p in files), default=0)
    if target.is_file() and target.stat().st_mtime >= newest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # safetensors do not compress
        for path in files:
            archive.write(path, Path(folder.name) / path.relative_to(folder))
    shutil.move(tmp, target)
    return target
