"""prep's worker processes: a pool whose workers exit when prep does, however prep ends (even `kill -9`)."""

from __future__ import annotations

import os
import select
import threading
import time
from concurrent.futures import ProcessPoolExecutor

POLL = 0.5  # s between checks where the system can't wake a thread on another process's exit


def pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes that import prep's modules once and exit when this process exits."""
    import multiprocessing

    # Not fork: a parent that already ran dlib (workers=1 earlier, eval, tests) holds its threads' locks, and a
    # forked child deadlocks on them. forkserver forks workers from a clean server that has only imported our
    # modules (preloaded once), so they start fast without inheriting any state.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["sdlora.prep.examine", "sdlora.prep.workers"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with, initargs=(os.getpid(),))


def exit_with(pid: int) -> None:
    """Worker initializer: a daemon thread ends this process as soon as process `pid` (prep) has ended.

    Needed because nothing else ends them: a worker waits on its task queue, whose write end every worker also
    holds, so prep's death closes nothing; and a forkserver worker's parent is the forkserver, which waits for
    its children, so a parent-death signal (PR_SET_PDEATHSIG) would never fire. A pidfd wakes the thread the
    moment prep exits (a zombie counts); elsewhere the thread polls."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:  # prep died while this worker started
        os._exit(1)
    except (AttributeError, OSError):  # not Linux >= 5.3
        handle = None
    threading.Thread(target=_watch, args=(pid, handle), name="sdlora-exit-with-prep", daemon=True).start()


def _watch(pid: int, handle: int | None) -> None:
    if handle is not None:
        select.select([handle], [], [])  # readable once the process has exited
    else:
        while _alive(pid):
            time.sleep(POLL)
    os._exit(1)  # not sys.exit: this is a side thread, and nothing is left to clean up for a dead parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: prep's pid was reused, so prep is gone
        return False
    return True
