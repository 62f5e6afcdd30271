"""Shared pieces of `bench/robustness.py`: one case's record, running the CLI with a time limit, and checking that
no file the user owns was modified.

Each group of cases is a module here with `cases(work: Path) -> list[Case]` (bench.robust.lost: what issue 15
guards, nothing lost; bench.robust.inputs: bad and hostile inputs, every failure one clear line).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Case:
    """One tried input or interruption and what happened."""

    group: str  # "lost", "inputs", "interrupt", ...
    name: str  # what was tried, e.g. "prep --overwrite on a folder with a thesis"
    expected: str  # what should happen, e.g. "error naming OUT_DIR, exit 2, folder untouched"
    ok: bool  # the outcome was the expected one
    exit_code: int | None = None
    traceback: bool = False  # a Python traceback reached the user
    hung: bool = False  # the command ran past its time limit
    user_files_modified: int = 0
    seconds: float = 0.0
    detail: str = ""  # the error line, or what differed
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Ran:
    code: int | None  # None when it hung
    stdout: str
    stderr: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.stdout or TRACEBACK in self.stderr

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        return lines[-1] if lines else ""


def sdlora(*args: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None) -> Ran:
    """Run `python -m sdlora ARGS` offline in a subprocess; a run past `timeout` is killed and counts as hung."""
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} | (env or {})
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sdlora", *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Ran(None, out, err, time.perf_counter() - start)
    return Ran(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (symlinks recorded by their target)."""
    folder = Path(folder)
    state: dict[str, str] = {}
    if not folder.exists():
        return state
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def modified(before: dict[str, str], after: dict[str, str]) -> int:
    """How many of the files in `before` were changed or removed in `after`."""
    return sum(1 for rel, digest in before.items() if after.get(rel) != digest)
