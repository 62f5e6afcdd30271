"""What a run reports while it trains: the rich progress bar, metrics.jsonl, and TensorBoard when installed."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

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


class Monitor:
    """Progress bar + metrics file of the main process (other processes get a silent one)."""

    def __init__(self, out_dir: Path, total: int, start: int, enabled: bool, cuda: bool) -> None:
        self.enabled, self.cuda = enabled, cuda
        self.smoothed: float | None = None
        self.last_time, self.last_step = time.perf_counter(), start
        self.metrics = Path(out_dir) / layout.METRICS
        self.writer = _tensorboard(Path(out_dir) / layout.TENSORBOARD) if enabled else None
        if enabled:
            _truncate_after(self.metrics, start)
        self.progress = _progress_bar() if enabled else None
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=total, completed=start, loss=float("nan"), lr=0.0, vram=""
            )

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

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

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


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


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps the resumed run will redo."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
