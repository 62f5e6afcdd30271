"""Running `sdlora prep|generate|eval` as a child process for the page: progress from its bar, one error line.

Each command runs as `python -m sdlora ...` in its own session with its output in .sdlora-serve/logs/, so a crash
(or a C extension's abort) never takes the server down, and a failure reaches the page as its `error:` line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.ansi import AnsiDecoder

from sdlora.errors import SdloraError
from sdlora.serve.runs import error_line
from sdlora.serve.workspace import Workspace

Progress = Callable[[float | None, str], None]  # (fraction done or None, what is happening)


class CommandFailed(SdloraError):
    """A command the page ran ended with an error; `log` is its output, for the page to explain more."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log


_COUNT = re.compile(r"(\d+)/(\d+)")


def run_sdlora(workspace: Workspace, args: list[str], label: str, progress: Progress | None = None) -> None:
    """Run `sdlora ARGS` to the end. Raises SdloraError with its error line on failure."""
    logs = workspace.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}-{args[0]}.log"
    # Rich draws its progress bars into a file only when told it is a terminal: the page reads N/M from them.
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "NO_COLOR": "1", "COLUMNS": "100"}
    started = time.monotonic()
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "sdlora", *args],
            cwd=workspace.root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        while child.poll() is None:
            time.sleep(0.5)
            if progress is not None:
                done = bar_fraction(log)
                progress(done, f"{label}: {time.monotonic() - started:.0f} s")
    if child.returncode != 0:
        raise CommandFailed(f"{label} failed: {error_line(log).removeprefix('error: ')}", log)


def bar_fraction(log: Path) -> float | None:
    """The fraction of the last `N/M` a rich progress bar drew into `log` (its last 2 KB), if any."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - 2048))
            text = handle.read().decode("utf-8", errors="replace")
        tail = "\n".join(line.plain for line in AnsiDecoder().decode(text))
    except OSError:
        return None
    matches = _COUNT.findall(tail)
    if not matches:
        return None
    done, total = (int(part) for part in matches[-1])
    return min(1.0, done / total) if total else None
