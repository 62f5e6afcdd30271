"""bench.robust.inputs: bad, damaged and hostile inputs (issue 17). Every failure must be one line
`error: <file>: <what happened>; <what to do>` with the right exit code, never a traceback or a hang, and no file
of the user's may change.

Each kind of input is a function below, registered with the class of the issue it covers; `cases(work, quick)`
makes the inputs under `work`, runs the real commands on them (each in a subprocess with a time limit; with
--quick, the commands that import torch run in this process through Typer's runner, which is what keeps the CI
subset under a minute) and returns one Case per kind. The fuzz kinds run hypothesis properties in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.robust import Case, Ran, modified, sdlora, snapshot

GROUP = "inputs"
BUG = "this is a bug in sdlora"


@dataclass(frozen=True)
class Kind:
    cls: str  # the issue's class: disk, models, names, images, reads, numbers, messages, duplicates, noise, fuzz,
    # processes, outputs, serve
    name: str
    quick: bool
    make: Callable[[Context], Case]


KINDS: list[Kind] = []


def kind(cls: str, name: str, quick: bool = True):
    def register(function: Callable[[Context], Case]) -> Callable[[Context], Case]:
        KINDS.append(Kind(cls, name, quick, function))
        return function

    return register


class Context:
    """The work folder, the run mode, and inputs built once (a tiny model, photos)."""

    def __init__(self, work: Path, quick: bool) -> None:
        self.work, self.quick = work, quick
        self._model: Path | None = None
        self._count = 0

    def folder(self, label: str) -> Path:
        self._count += 1
        path = self.work / f"{self._count:02d}-{label}"
        path.mkdir(parents=True)
        return path

    @property
    def model(self) -> Path:
        """A tiny SD 1.x diffusers folder (random weights)."""
        if self._model is None:
            from sdlora import testing

            self._model = testing.save_tiny_pipeline("sd1", self.work / "tiny-sd1")
        return self._model

    def run(self, *args: str, timeout: float = 120, inprocess: bool = False, env: dict | None = None) -> Ran:
        if inprocess and self.quick:
            return _in_process(args)
        return sdlora(*args, timeout=timeout, env=env)


def _in_process(args: tuple[str, ...]) -> Ran:
    from typer.testing import CliRunner

    from sdlora.cli import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, list(args))
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return Ran(result.exit_code, result.stdout, stderr, time.perf_counter() - start)


def judged(
    name: str, expected: str, ran: Ran, *, code: int, words: tuple[str, ...] = (), before=None, after=None
) -> Case:
    """A Case for a command expected to fail with one error line holding `words`, exit `code`."""
    problems = []
    line = ran.error_line
    if ran.code is None:
        problems.append("hung")
    elif ran.code != code:
        problems.append(f"exit {ran.code}, expected {code}")
    if not line:
        problems.append("no error line")
    problems += [f"no {word!r}" for word in words if word not in line]
    if BUG in ran.stderr:
        problems.append("an unexpected exception")
    changed = modified(before, after) if before is not None else 0
    return _case(name, expected, ran, problems, changed, line)


def succeeded(name: str, expected: str, ran: Ran, problem: str | None, before=None, after=None) -> Case:
    """A Case for a command expected to succeed (exit 0) and pass `problem` (None when all is well)."""
    changed = modified(before, after) if before is not None else 0
    problems = [p for p in (problem, "hung" if ran.code is None else None) if p]
    if ran.code not in (0, None):
        problems.append(f"exit {ran.code}: {ran.error_line or ran.stderr[-300:]}")
    return _case(name, expected, ran, problems, changed, "ok")


def _case(name: str, expected: str, ran: Ran, problems: list[str], changed: int, fine: str) -> Case:
    """The record of one case: its problems (plus modified user files), or `fine` as the detail when none."""
    if changed:
        problems.append(f"{changed} user file(s) modified")
    return Case(
        group=GROUP,
        name=name,
        expected=expected,
        ok=not problems and not ran.traceback,
        exit_code=ran.code,
        traceback=ran.traceback or BUG in ran.stderr,
        hung=ran.code is None,
        user_files_modified=changed,
        seconds=round(ran.seconds, 2),
        detail="; ".join(problems) or fine,
    )


def error_case(ctx: Context, name: str, args: list[str], code: int, words: tuple[str, ...], protect: Path | None = None,
               inprocess: bool = False, timeout: float = 120) -> Case:  # fmt: skip
    before = snapshot(protect) if protect else None
    ran = ctx.run(*args, inprocess=inprocess, timeout=timeout)
    after = snapshot(protect) if protect else None
    expected = f"exit {code}, one error line with {', '.join(map(repr, words)) or 'the cause'}"
    return judged(name, expected, ran, code=code, words=words, before=before, after=after)


def prep_args(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["prep", str(photos), str(out), "--crop", "center", "--resolution", "64", "--workers", "1",
            "--min-images", "1", *extra]  # fmt: skip


GEN = ["--prompt", "x", "--n", "1", "--steps", "2", "--size", "64x64"]


def cases(work: Path, quick: bool, only: str | None = None) -> list[Case]:
    """One Case per kind (the quick subset with quick=True; with `only`, the kinds whose class or name holds it),
    each with its class in `extra`."""
    ctx = Context(Path(work), quick)
    results = []
    for item in KINDS:
        if quick and not item.quick:
            continue
        if only is not None and only != item.cls and only.lower() not in item.name.lower():
            continue
        try:
            case = item.make(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken case is reported, not fatal to the suite
            case = Case(GROUP, item.name, "", ok=False, detail=f"the case itself failed: {type(exc).__name__}: {exc}")
        case.name = item.name
        case.extra = {"class": item.cls, **case.extra}
        results.append(case)
    return results


def interrupt_train(ctx: Context, dataset: Path, out: Path) -> Ran:
    """Start a tiny training run, SIGINT it once it has logged a step, and collect what it printed."""
    command = [sys.executable, "-m", "sdlora", "train", str(dataset), str(out), "--base", str(ctx.model),
               "--resolution", "64", "--rank", "4", "--steps", "100000", "--sample-every", "0",
               "--checkpoint-every", "0", "--eval-every", "0", "--set", "train.log_every=1"]  # fmt: skip
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return Ran(None, stdout, stderr, time.perf_counter() - start)
    return Ran(proc.returncode, stdout, stderr, time.perf_counter() - start)


# Importing the case modules registers their kinds (in this order).
from bench.robust import (  # noqa: E402, F401
    _cases_disk_models,
    _cases_issue28,
    _cases_issue28_outputs,
    _cases_numbers_fuzz,
    _cases_text_images,
)
