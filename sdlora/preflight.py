"""Checks before the slow part: can the output folder be written, with some free space, before any model
loads or photo is processed? (A full or read-only disk found after an hour of work loses that hour.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdlora.errors import UsageError, printable

MIN_FREE = 64 * 1024 * 1024  # bytes every command wants free beyond its own estimate


def check_output_dir(path: Path, what: str, need: int = MIN_FREE) -> None:
    """Refuse now (one line naming `what` and the path) an output folder that can't be made or written: a file
    in its place or among its parents, a read-only file system, no write permission, or less than `need`
    bytes free. Nothing is created: the nearest existing folder is inspected."""
    path = Path(path).absolute()
    where = f"{what} {printable(path)}"
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise UsageError(f"{where}: {printable(existing)} is a dangling symbolic link; remove it or fix it")
        existing = existing.parent
    if not existing.is_dir():
        blocked = "is a file" if existing == path else f"is below {printable(existing)}, which is a file"
        raise UsageError(f"{where}: {blocked}, not a folder; choose a path whose parents are folders")
    try:
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        free = shutil.disk_usage(existing).free
    except (OSError, AttributeError):  # no statvfs (Windows) or an odd file system: the writes will tell
        return
    if readonly:
        raise UsageError(f"{where}: {printable(existing)} is on a read-only file system; choose a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{where}: no permission to write in {printable(existing)}; choose another folder")
    if free < need:
        raise UsageError(
            f"{where}: only {_megabytes(free)} free on its disk, and up to {_megabytes(need)} are needed; "
            "free some space or choose a folder on another disk"
        )


def _megabytes(size: int) -> str:
    """'0 MB', '0.07 MB', '2.1 MB', '67 MB': enough digits that a small need doesn't read as 0 MB."""
    value = size / 1e6
    if value < 0.005 or value >= 10:
        return f"{value:.0f} MB"
    return f"{value:.2g} MB"
