"""Helpers of the web-app tests: a workspace with the tiny model and a few real photos, quick train settings."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

# Demo photos: three of the astronaut (kept), a re-encoded copy (duplicate) and coffee (no face).
PHOTOS = ("IMG_0001.jpg", "IMG_0002.jpg", "IMG_0003.jpg", "IMG_0008.jpg", "IMG_0010.jpg")

# 4 steps at 64 px: every step logged and sampled (so Stop has time to land mid-run), identity scored at the last.
QUICK = {
    "train.steps": 4,
    "train.resolution": 64,
    "lora.rank": 4,
    "lora.alpha": 4,
    "train.learning_rate": 1e-3,
    "train.checkpoint_every": 1,
    "train.sample_every": 1,
    "train.sample_steps": 4,
    "train.log_every": 1,
    "train.eval_every": 4,
    "eval.n": 1,
}


def photo_files(folder: Path) -> list[Path]:
    from sdlora.demo.photos import write_demo_photos

    write_demo_photos(folder)
    return [folder / name for name in PHOTOS]


def make_workspace(root: Path, tiny_sd1: Path) -> Path:
    """A workspace with the tiny SD 1.x model under models/tiny-sd1."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_sd1, root / "models" / "tiny-sd1")
    return root


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
