"""Training jobs the web app started: records on disk, one run at a time, the rest queued behind it.

Each job is WORKSPACE/.sdlora-serve/jobs/ID.json (the command, the run, the runner's pid and start time) beside
ID.log (the command's output), ID.pid (the training process's pid and start time) and ID.rc (its exit code), the
last two written by `sdlora.serve.runner`. Everything is read back from these files, so a restarted server knows
its running, finished and queued jobs; the processes themselves never depend on it. A job runs while either of
its processes lives (each known by pid and start time, as the folder locks are): a training whose runner died
still holds the queue, and Stop still reaches it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdlora.errors import UsageError
from sdlora.fsutil import _process_start, atomic_write_text
from sdlora.serve.workspace import Workspace


@dataclass
class Job:
    id: str
    run: str  # workspace-relative run folder, e.g. runs/alice
    dataset: str  # workspace-relative dataset folder
    argv: list[str]  # the sdlora command (after `python -m sdlora`)
    created: float = field(default_factory=time.time)
    started: float | None = None
    pid: int | None = None  # of the runner process
    started_at: float | None = None  # time.time() just after the runner started (tells it from a reused pid)
    ended: float | None = None
    returncode: int | None = None
    cancelled: bool = False


def process_alive(pid: int | None, marker: str | None = None, started: float | None = None) -> bool:
    """True while `pid` runs (not a zombie); with `marker`, only if its command line contains it, and with
    `started`, only if it began by then (not a later process given the same pid)."""
    if not pid:
        return False
    began = _process_start(pid)
    if started is not None and began is not None and began > started + 10.0:  # 10 s: /proc's coarse boot time
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # not Linux: trust kill(0)
        return True
    with contextlib.suppress(OSError):
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if marker is not None:
            return marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace")
    return True


class Jobs:
    """The job records of one workspace. tick() reaps ended jobs and starts the next queued one."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.folder = workspace.state / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._children: dict[int, subprocess.Popen] = {}  # started by this server: reaped here (no zombies)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- records

    def log_path(self, job: Job) -> Path:
        return self.folder / f"{job.id}.log"

    def _rc_path(self, job: Job) -> Path:
        return self.folder / f"{job.id}.rc"

    def _trainer(self, job: Job) -> tuple[int, float] | None:
        """The pid and start time of the job's training process (the runner's child), if recorded."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads((self.folder / f"{job.id}.pid").read_text(encoding="utf-8"))
            return int(record["pid"]), float(record["started_at"])
        return None

    def _live_process(self, job: Job) -> int | None:
        """The pid to signal for a running job: its runner (which passes signals on and records the exit code),
        else its training process when the runner died; None when neither lives."""
        if process_alive(job.pid, str(self._rc_path(job)), job.started_at):
            return job.pid
        trainer = self._trainer(job)
        if trainer is not None and process_alive(trainer[0], None, trainer[1]):
            return trainer[0]
        return None

    def _save(self, job: Job) -> None:
        atomic_write_text(self.folder / f"{job.id}.json", json.dumps(asdict(job), indent=2) + "\n")

    def all(self) -> list[Job]:
        jobs = []
        for path in sorted(self.folder.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, TypeError):
                jobs.append(Job(**json.loads(path.read_text(encoding="utf-8"))))
        return sorted(jobs, key=lambda job: (job.created, job.id))

    def latest_for(self, run: str) -> Job | None:
        mine = [job for job in self.all() if job.run == run and not job.cancelled]
        return mine[-1] if mine else None

    def state(self, job: Job) -> str:
        """queued, running or ended."""
        if job.started is None:
            return "queued"
        if job.ended is None and self._live_process(job) is not None:
            return "running"
        return "ended"

    def returncode(self, job: Job) -> int | None:
        if job.returncode is not None:
            return job.returncode
        with contextlib.suppress(OSError, ValueError):
            return int(self._rc_path(job).read_text().strip())
        return None

    # ------------------------------------------------------------------------------------------- actions

    def refuse_active(self, run: str) -> None:
        """An error when `run` has a queued or running job."""
        active = self.latest_for(run)
        if active is not None and self.state(active) != "ended":
            raise UsageError(f"{run} is already {self.state(active)}; stop it first")

    def submit(self, run: str, dataset: str, argv: list[str]) -> Job:
        """Queue a job; it starts at once when nothing else runs."""
        self.refuse_active(run)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        job = Job(id=f"{stamp}-{time.time_ns() % 10**6:06d}-{Path(run).name}", run=run, dataset=dataset, argv=argv)
        self._save(job)
        self.tick()
        return self._load(job.id)

    def stop(self, run: str) -> str:
        """SIGTERM to the running job of `run` (train checkpoints and exits), or take it out of the queue."""
        job = self.latest_for(run)
        if job is None or self.state(job) == "ended":
            raise UsageError(f"{run} is not running or queued here")
        if self.state(job) == "queued":
            job.cancelled = True
            self._save(job)
            return f"{run}: taken out of the queue"
        pid = self._live_process(job)
        with contextlib.suppress(ProcessLookupError, TypeError):  # it ended meanwhile
            os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
        return f"{run}: stopping (the current step finishes, then a checkpoint is written)"

    def tick(self) -> None:
        """Record how ended jobs ended; start the oldest queued job when none runs. Safe from many threads and
        from two servers on one workspace (a file lock)."""
        with self._lock, self._file_lock():
            for pid, child in list(self._children.items()):
                if child.poll() is not None:
                    del self._children[pid]
            jobs = [job for job in self.all() if not job.cancelled]
            running = False
            for job in jobs:
                state = self.state(job)
                if state == "ended" and job.ended is None:
                    job.ended, job.returncode = time.time(), self.returncode(job)
                    self._save(job)
                running = running or state == "running"
            queued = [job for job in jobs if job.started is None]
            if queued and not running:
                self._start(queued[0])

    def command(self, job: Job) -> list[str]:
        """The process the job runs under the runner: `python -m sdlora ARGV`."""
        return [sys.executable, "-m", "sdlora", *job.argv]

    def _start(self, job: Job) -> None:
        log, rc = self.log_path(job), self._rc_path(job)
        command = [sys.executable, "-m", "sdlora.serve.runner", str(log), str(rc), "--", *self.command(job)]
        log.write_text(f"$ sdlora {' '.join(job.argv)}\n", encoding="utf-8")
        child = subprocess.Popen(
            command,
            cwd=self.workspace.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own session: survives the server and a Ctrl-C in the server's terminal
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._children[child.pid] = child
        job.started, job.pid, job.started_at = time.time(), child.pid, time.time()
        self._save(job)

    def _load(self, job_id: str) -> Job:
        return Job(**json.loads((self.folder / f"{job_id}.json").read_text(encoding="utf-8")))

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        with (self.folder / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
