"""Atomic file and folder writes, ownership markers and per-folder locks: a crash never leaves a half-written
output, no command writes into a folder another command owns, and two writers never share one folder.

- Every folder a command creates holds a marker, `.sdlora.json`: {"command", "run_id", "created", "version"}.
- A command writing a folder holds `.sdlora.lock` in it: {"pid", "command", "started"} (a web UI reads exactly
  this file to show a run as running). A lock whose process is gone (kill -9) is stale and is taken over.
- Files are written under a temporary name and renamed; they get the permissions the umask gives (0644 usually),
  like any file the user creates, not mkstemp's 0600.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora import __version__, layout
from sdlora.errors import SdloraError, UsageError, printable

MARKER, LOCK = layout.MARKER, layout.LOCK
# Temporary names our writers use; anything matching them in a folder we own is a leftover of a killed run.
_NEW, _OLD = ".sdlora-new.", ".sdlora-old."
_TEMPORARY = re.compile(r"^\..+\.tmp(\.[^.]+)?$|^\..+\.old$")
_OURS = re.compile(r"^\.sdlora-(new|old)\..*\.tmp$")  # atomic_dir's: never anyone else's


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask must set one to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path` (with `replace`
    False: FileExistsError, and nothing written, when `path` exists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600 files: a UI running as another user could not read them
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(Path(tmp), path, replace)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, *, replace: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), replace=replace)


@contextlib.contextmanager
def atomic_path(path: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (e.g. safetensors, PIL);
    rename it to `path` only if the block succeeds (with `replace` False: only if `path` does not exist, else
    FileExistsError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # some writers (safetensors) make 0600 files
        _publish(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished `tmp` to `path`; without `replace`, a hard link, which fails on an existing `path`
    (the kernel checks, so no file appearing meanwhile is replaced), then the temporary name goes."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network shares): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)


# --- markers -----------------------------------------------------------------------------------------------------


def new_marker(command: str, run_id: str | None = None) -> dict[str, Any]:
    return {
        "command": command,
        "run_id": run_id or uuid.uuid4().hex[:12],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": __version__,
    }


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / MARKER, json.dumps(marker, indent=2) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none (an unreadable one counts as none)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("command"), str) else None


def contents(folder: Path) -> list[str]:
    """Names in `folder` other than our marker, lock and temporaries (what makes a folder non-empty)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK) and not _OURS.match(p.name))


def owner(folder: Path) -> str | None:
    """The command that wrote `folder`: its marker's, else recognised from what earlier versions (which wrote no
    marker) left there; None for an empty, missing or foreign folder."""
    marker = read_marker(folder)
    if marker is not None:
        return marker["command"]
    names = set(contents(folder))
    if not names:
        return None
    if layout.MANIFEST in names:
        return "prep"
    index = Path(folder) / "index.html"
    if index.is_file() and 'content="sdlora eval"' in index.read_text(encoding="utf-8", errors="replace"):
        return "eval"
    if layout.CONFIG_JSON not in names:
        return None
    try:
        saved = json.loads((Path(folder) / layout.CONFIG_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        return None
    if any(re.match(r"^\d{4}-\d+\.(png|json)$", name) for name in names) and layout.CHECKPOINTS not in names:
        return "generate"
    return "train"


def describe(folder: Path) -> str:
    """'a `sdlora train` training run' / 'files sdlora did not write (thesis.tex, src, ...)' for messages."""
    made_by = owner(folder)
    if made_by is not None:
        kind = {"prep": "dataset", "train": "training run", "generate": "image folder", "eval": "report"}
        return f"a `sdlora {made_by}` {kind.get(made_by, 'output')}"
    names = contents(folder)
    return f"files sdlora did not write ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def check_own_or_empty(folder: Path, command: str, option: str = "--out") -> None:
    """`folder` is new, empty or an earlier `sdlora command`'s output; anything else is refused in one line that
    says what it holds (a file, another command's output, files sdlora did not write)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {printable(folder)}: is a file; give a folder")
    made_by = owner(folder)
    if made_by not in (None, command) or (made_by is None and contents(folder)):
        raise UsageError(
            f"{option} {printable(folder)}: holds {describe(folder)}; {command} writes only into a new or empty "
            f"folder or one of its own: choose another {option}"
        )


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what killed writers left under `folder` (temporary files and folders of atomic writes and
    checkpoints). Call only while holding the folder's lock: a live writer's temporaries look the same."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            if _TEMPORARY.match(name):
                path = Path(root) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        dirs[:] = [d for d in dirs if not _TEMPORARY.match(d)]
    return removed


# --- locks -------------------------------------------------------------------------------------------------------


def _alive(pid: int, started: float | None) -> bool:
    """Whether process `pid` runs and is the one that took the lock (not a later process given the same pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    began = _process_start(pid)
    # 10 s of slack for the coarse boot time of /proc/stat and clock steps
    return began is None or started is None or began <= started + 10.0


def _process_start(pid: int) -> float | None:
    """Start time of `pid` in seconds since the epoch (Linux /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if "btime" in line)
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def holder(folder: Path, ignore_siblings: bool = False) -> dict[str, Any] | None:
    """The live holder of `folder`'s lock ({"pid", "command", "started"}), or None when free or stale (or, with
    `ignore_siblings`, held by a process with our parent: another process of one multi-process run)."""
    try:
        record = json.loads((Path(folder) / LOCK).read_text(encoding="utf-8"))
        pid = int(record["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # torn or foreign: not a live lock (a live holder writes it whole before anything else)
    started = record.get("started_at")
    if pid == os.getpid() or not _alive(pid, started if isinstance(started, (int, float)) else None):
        return None
    if ignore_siblings and record.get("ppid") == os.getppid():
        return None
    return record


def in_use_message(folder: Path, record: dict[str, Any]) -> str:
    return (
        f"{folder}: in use by `sdlora {record.get('command', '?')}` (pid {record['pid']}, since "
        f"{record.get('started', '?')}); wait for it to finish or stop it (if that process is not sdlora, delete "
        f"{Path(folder) / LOCK})"
    )


@dataclass
class FolderLock:
    """`folder/.sdlora.lock` held by this process. Creating the folder is part of taking the lock; releasing
    removes a folder the lock created if nothing but our marker was written into it."""

    folder: Path
    command: str
    created: bool = False
    held: bool = field(default=False, repr=False)

    def acquire(self) -> FolderLock:
        folder = self.folder
        try:
            self.created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            record = {
                "pid": os.getpid(),
                "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "started_at": time.time(),
                "ppid": os.getppid(),
            }
            for _ in range(3):
                if self._create(json.dumps(record) + "\n"):
                    self.held = True
                    return self
                live = holder(folder)
                if live is not None:
                    raise SdloraError(in_use_message(folder, live))
                (folder / LOCK).unlink(missing_ok=True)  # stale: its process is gone
        except PermissionError as exc:
            raise UsageError(f"{folder}: not writable ({exc.strerror}); choose a folder you can write to") from None
        except OSError as exc:
            raise SdloraError(f"{folder}: can't write there ({exc.strerror or exc}); choose another folder") from None
        raise SdloraError(f"{folder}: could not take {LOCK}; another command keeps taking it")

    def _create(self, text: str) -> bool:
        try:
            fd = os.open(self.folder / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        lock = self.folder / LOCK
        with contextlib.suppress(OSError, ValueError, KeyError):
            if int(json.loads(lock.read_text(encoding="utf-8"))["pid"]) == os.getpid():
                lock.unlink()
        if self.created and not contents(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)  # nothing of the command's was written: leave no trace

    def __enter__(self) -> FolderLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock(folder: Path, command: str) -> FolderLock:
    """A lock on `folder` for `command`; use as `with lock(folder, "train"):` (taken on entry)."""
    return FolderLock(Path(folder), command)


# --- claims: a folder a command will replace whole ---------------------------------------------------------------


@dataclass
class Claim:
    """What a command checked about a folder it will replace with atomic_dir: who owned it then (marker run id, or
    None for a new/empty one), the marker the new contents get, and the lock (taken now or by atomic_dir)."""

    folder: Path
    marker: dict[str, Any]
    seen_run_id: str | None
    seen_contents: list[str]
    lock: FolderLock

    def drop(self) -> None:
        """Forget the claim and release its lock (nothing happens if its atomic_dir did so already)."""
        if _claims.get(str(self.folder.resolve())) is self:
            del _claims[str(self.folder.resolve())]
        self.lock.release()


# A claim made by a command's checks, honoured by the atomic_dir that later replaces the folder. Module state,
# against our style, because the two sit in functions owned apart (prep's checks and its writer); a process holds
# at most a few, and each is dropped when its atomic_dir ends (or at exit).
_claims: dict[str, Claim] = {}


def claim(folder: Path, command: str, *, lock_now: bool) -> Claim:
    """Record that `command` will replace `folder` (checked by the caller); with `lock_now` the folder's lock is
    taken at once (the folder must exist), else by atomic_dir. Refuses a folder in use."""
    folder = Path(folder)
    live = holder(folder) if folder.is_dir() else None
    if live is not None:
        raise SdloraError(in_use_message(folder, live))
    marker = read_marker(folder)
    seen = Claim(folder, new_marker(command), marker and marker.get("run_id"), contents(folder), lock(folder, command))
    if lock_now:
        seen.lock.acquire()
        atexit.register(seen.lock.release)
    _claims[str(folder.resolve())] = seen
    return seen


def _check_unchanged(found: Claim) -> None:
    marker = read_marker(found.folder)
    now = marker and marker.get("run_id")
    if now == found.marker["run_id"]:
        return  # the claiming command marked the folder itself (it writes into it before replacing it)
    if now != found.seen_run_id or (found.seen_run_id is None and contents(found.folder) != found.seen_contents):
        raise SdloraError(
            f"{found.folder}: written by another command while this one ran (it now holds "
            f"{describe(found.folder)}); nothing was replaced: choose another folder"
        )


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder inside `path`; when the block succeeds its entries replace `path`'s (our marker
    and lock stay). `path` itself is never renamed (it may be a mount point or hold our lock); a `path` that
    didn't exist and gets nothing is removed again. A folder claimed with `claim()` is locked meanwhile, must
    still be as its claim saw it, and gets the claim's marker."""
    path = Path(path)
    found = _claims.pop(str(path.resolve()), None)
    held = found.lock if found is not None else FolderLock(path, "sdlora")
    created = not path.exists()
    if found is not None and not found.lock.held:
        found.lock.acquire()
    else:
        path.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_NEW, suffix=".tmp", dir=path))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            if found is not None:
                _check_unchanged(found)
                write_marker(tmp, found.marker)
            _swap(path, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        held.release()
        if created and not contents(path):
            shutil.rmtree(path, ignore_errors=True)


def _swap(path: Path, new: Path) -> None:
    """Move `path`'s entries aside, `new`'s in, then delete the old ones (rolled back if a move fails)."""
    old = Path(tempfile.mkdtemp(prefix=_OLD, suffix=".tmp", dir=path))
    keep = {MARKER, LOCK, new.name, old.name}
    moved: list[str] = []
    try:
        for entry in path.iterdir():
            if entry.name not in keep:
                os.replace(entry, old / entry.name)
                moved.append(entry.name)
        for entry in new.iterdir():
            os.replace(entry, path / entry.name)
    except OSError:
        for name in moved:
            with contextlib.suppress(OSError):
                os.replace(old / name, path / name)
        raise
    shutil.rmtree(old, ignore_errors=True)
