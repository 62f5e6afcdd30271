"""What a run reports while it trains: the rich progress bar (a plain line every ~30 s when stdout is not a
terminal), metrics.jsonl (and reading it back, torn last line and all), and TensorBoard when installed."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from sdlora import layout
from sdlora.errors import SdloraError

METRICS = layout.METRICS
PLAIN_EVERY = 30.0  # seconds between plain progress lines (logs, CI, `sdlora train ... > train.log`)


class Monitor:
    """Progress bar + metrics file of the main process (other processes get a silent one)."""

    def __init__(
        self,
        out_dir: Path,
        total: int,
        start: int,
        enabled: bool,
        cuda: bool,
        stream: TextIO | None = None,
        plain_every: float = PLAIN_EVERY,
    ) -> None:
        self.enabled, self.cuda = enabled, cuda
        self.smoothed: float | None = None
        self.last_time, self.last_step = time.perf_counter(), start
        self.metrics = Path(out_dir) / METRICS
        self.writer = _tensorboard(Path(out_dir) / layout.TENSORBOARD) if enabled else None
        if enabled:
            _truncate_after(self.metrics, start)
        self.stream = stream or sys.stdout
        terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.plain = _PlainProgress(self.stream, total, start, plain_every) if enabled and not terminal else None
        self.progress = _progress_bar() if enabled and terminal else None
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=total, completed=start, loss=float("nan"), lr=0.0, vram=""
            )

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)
        if self.plain is not None:
            self.plain.advance(self.smoothed)

    def log(self, step: int, loss: float, lr: float) -> None:
        """Record the mean loss of the steps since the last log (called every log_every steps: it costs a sync)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        seconds = (now - self.last_time) / max(1, step - self.last_step)
        self.last_time, self.last_step = now, step
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        record = {"step": step, "loss": loss, "lr": lr, "seconds_per_step": round(seconds, 4)}
        with self.metrics.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.writer.add_scalar("loss", loss, step)
            self.writer.add_scalar("lr", lr, step)
        if self.progress is not None:
            self.progress.update(self.task, loss=self.smoothed, lr=lr, vram=_peak_vram(self.cuda))

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


class _PlainProgress:
    """`step N/M loss L it/s R ETA T` lines, at most one per `every` seconds, for a stdout that is not a terminal
    (a rich bar there prints nothing until it ends)."""

    def __init__(self, stream: TextIO, total: int, start: int, every: float) -> None:
        self.stream, self.total, self.step, self.every = stream, total, start, every
        self.since, self.since_step = time.perf_counter(), start

    def advance(self, loss: float | None) -> None:
        self.step += 1
        now = time.perf_counter()
        if now - self.since < self.every and self.step < self.total:
            return
        rate = (self.step - self.since_step) / max(now - self.since, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else 0.0
        shown = "-" if loss is None else f"{loss:.4f}"
        print(
            f"step {self.step}/{self.total} loss {shown} it/s {rate:.2f} ETA {_clock(eta)}",
            file=self.stream,
            flush=True,
        )
        self.since, self.since_step = now, self.step


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        _SpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[vram]}"),
        transient=False,
    )


class _SpeedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0.0:.2f} it/s")


def _peak_vram(cuda: bool) -> str:
    if not cuda:
        return ""
    import torch

    return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def _tensorboard(folder: Path) -> Any:
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (what a crash or a full disk leaves) is left out; a bad
    line before it is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a step record")
        except ValueError:
            if number == len(lines):
                break  # torn: the write of the last record did not finish
            raise SdloraError(f"{path}:{number}: not a metrics record; delete that line and try again") from None
        records.append(record)
    return records


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps the resumed run will redo (and a torn last line)."""
    from sdlora.fsutil import atomic_write_text

    if not path.is_file():
        return
    kept = [json.dumps(record) for record in read_records(path) if record["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
