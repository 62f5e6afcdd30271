"""Helpers of the web-app tests: a workspace with the tiny model and a few real photos, quick train settings."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Hashable
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


# Seconds a command may go without visible progress (see `activity`) before a test counts it as hung.
STALL = 300


def photo_files(folder: Path) -> list[Path]:
    from sdlora.demo.photos import write_demo_photos

    write_demo_photos(folder)
    return [folder / name for name in PHOTOS]


def make_workspace(root: Path, tiny_sd1: Path) -> Path:
    """A workspace with the tiny SD 1.x model under models/tiny-sd1."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_sd1, root / "models" / "tiny-sd1")
    return root


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    every: float = 0.1,
    progress: Callable[[], Hashable] | None = None,
) -> None:
    """Wait until `condition()`. Without `progress`, fail after `timeout` s. With it (a value that changes while the
    work moves on: a run's step, the files a command writes), fail only after `timeout` s without a change: a busy
    machine makes a command slow, only a hung one stands still."""
    seen = progress() if progress is not None else None
    deadline = time.monotonic() + timeout
    while not condition():
        if progress is not None:
            now = progress()
            if now != seen:
                seen, deadline = now, time.monotonic() + timeout
        if time.monotonic() > deadline:
            stalled = " without progress" if progress is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s{stalled} waiting for {what}")
        time.sleep(every)


def activity(workspace: Path) -> Callable[[], Hashable]:
    """The progress of every command the app runs in `workspace`: the files under runs/, datasets/ and images/
    (steps, checkpoints, samples, crops, images), the job logs, and the N/M of the newest command's progress bar
    (its log's size is no sign: a live bar is redrawn even when nothing moves)."""
    from sdlora.serve.commands import bar_fraction

    def snapshot() -> Hashable:
        files = []
        for top in ("runs", "datasets", "images", ".sdlora-serve/jobs"):
            for path in sorted((workspace / top).rglob("*")) if (workspace / top).is_dir() else []:
                with contextlib.suppress(OSError):
                    files.append((str(path), path.stat().st_size))
        logs = sorted((workspace / ".sdlora-serve" / "logs").glob("*.log"))
        return tuple(files), (logs[-1].name, bar_fraction(logs[-1])) if logs else None

    return snapshot


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workspace: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`sdlora serve WORKSPACE` on a free port, as a process of its own; returns it and its URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "sdlora", "serve", str(workspace), "--port", str(port), *extra]
    log = workspace.parent / f"serve-{port}.log"
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert server.poll() is None, log.read_text()  # a server that died fails at once
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    # A slow start (imports on a busy machine) is waited for while the server lives and writes its log.
    wait_for(up, 300, "the server to answer", every=0.5, progress=lambda: log.stat().st_size)
    return server, url


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def get(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
