"""prep's worker processes end with prep: a `kill -9` of prep leaves no worker behind (each held ~480 MB)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import prep_photos
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")


def _descendants(pid: int) -> set[int]:
    """Every live (not zombie) process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
        except OSError:
            pass
    return out


def _kill_and_wait(process: subprocess.Popen, workers: set[int], within: float = 5.0) -> set[int]:
    """SIGKILL `process`; the processes of `workers` still alive after `within` seconds."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + within
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(workers)
    for pid in left:  # don't leave them to the next test
        os.kill(pid, signal.SIGKILL)
    return left


def _wait_for(process: subprocess.Popen, count: int, timeout: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        below = _descendants(process.pid)
        if len(below) >= count:
            return below
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} processes below prep after {timeout} s")


def test_busy_workers_exit_when_prep_is_killed(tmp_path):
    """The pool prep uses, with both workers busy for a minute: killed, they are gone within seconds."""
    script = textwrap.dedent(
        """
        import time
        from sdlora.prep.workers import pool
        with pool(2) as workers:
            busy = [workers.submit(time.sleep, 60) for _ in range(4)]
            print("ready", flush=True)
            busy[0].result()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        below = _wait_for(process, 3)  # the forkserver and its two workers (and the resource tracker)
        assert _kill_and_wait(process, below) == set()
    finally:
        process.kill()


def test_kill_9_of_prep_leaves_no_worker(tmp_path):
    """`sdlora prep --workers 2` killed mid-run: its workers, forkserver and resource tracker all exit."""
    photos = tmp_path / "photos"
    photos.mkdir()
    prep_photos.framing(40, 20, 400, 1600).save(photos / "p00.png", compress_level=0)
    for i in range(1, 24):  # copies: each is examined whole before the duplicates are found
        shutil.copy(photos / "p00.png", photos / f"p{i:02d}.png")
    command = [sys.executable, "-m", "sdlora", "prep", str(photos), str(tmp_path / "out"), "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        below = _wait_for(process, 4)  # resource tracker, forkserver, two workers
        assert process.poll() is None, "prep finished before it could be killed; give it more photos"
        assert _kill_and_wait(process, below) == set()
    finally:
        process.kill()
