"""The exception types the CLI turns into one-line messages and exit codes, and the translation of the other
failures a user can cause (full disks, damaged files, odd text) into the same one-line form."""

from __future__ import annotations

import errno
import os
import traceback
import unicodedata
from pathlib import PurePath
from types import TracebackType


class SdloraError(Exception):
    """An expected failure: the CLI prints `error: <message>` and exits 1."""

    exit_code = 1


class UsageError(SdloraError):
    """Bad options, config or input paths: exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or --set override that does not validate."""


class Interrupted(SdloraError):
    """A run stopped by SIGINT/SIGTERM after saving its state: not an error, so the CLI prints it as it is."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# What happened and what to do, for the errno values a user's disk or folder can produce.
OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or choose an output folder on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose an output folder on another disk"),
    errno.EROFS: ("the file system is read-only", "choose an output folder on a writable disk"),
    errno.EACCES: ("permission denied", "check the permissions of the file and its folder, or choose another"),
    errno.EPERM: ("operation not permitted", "check the permissions of the file and its folder, or choose another"),
    errno.EBUSY: ("device or resource busy", "close what uses it (or, for a mount point, give a folder inside it)"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose a path whose parents are folders"),
    errno.EISDIR: ("is a folder, not a file", "give a file"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "remove it or choose another name"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "choose a shorter path"),
    errno.ELOOP: ("too many levels of symbolic links (a link loop?)", "fix the link"),
    errno.EIO: ("input/output error", "the disk or network share may be failing: check it, or copy the files"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
    errno.ENFILE: ("too many open files in the system", "close other programs or use fewer workers"),
    errno.ENOMEM: ("out of memory", "close other programs, use fewer workers or smaller images"),
    errno.EXDEV: ("cannot move files across devices", "choose an output folder on the same disk"),
}
MEMORY = "out of memory (RAM); close other programs, use fewer --workers, a smaller resolution or batch size"
GPU_MEMORY = (
    "out of GPU memory; lower --batch-size or --resolution, or use --gradient-checkpointing or 8-bit optimizers"
)
BUG = "this is a bug in sdlora: please report it with the output of `sdlora --debug ...` and `sdlora env`"


def printable(text: str | os.PathLike) -> str:
    """`text` (usually a file name) safe to print and to write as UTF-8: bytes that were not valid UTF-8
    (surrogate escapes) become `\\xNN`, control characters `\\xNN`/`\\uNNNN`; everything else is kept."""
    text = os.fspath(text)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's escape of an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF or unicodedata.category(char) in ("Cc", "Cf") and char not in "\u200d":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def last_words(exc: BaseException, debug: bool) -> tuple[str, int]:
    """What the CLI prints on stderr, and its exit code, when a command ends in `exc`: Ctrl-C is 'interrupted' (130),
    a run stopped on request after saving its state says so (not an error), anything else is one `error: ...` line;
    with --debug the traceback comes first."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, Interrupted):
        return str(exc), exc.exit_code
    message, code = one_line(exc)
    return f"error: {message}", code


def one_line(exc: Exception) -> tuple[str, int]:
    """The CLI's one line and exit code for any exception: ours as they are, the known failures of a user's input
    or machine described (`describe`), anything else said to be a bug."""
    if isinstance(exc, SdloraError):
        return str(exc), exc.exit_code
    known = describe(exc)
    if known is not None:
        return known
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {printable(first)[:300]}; {BUG}", 1


def not_utf8(where: object, exc: UnicodeDecodeError) -> str:
    """`where`'s one line when it is not UTF-8 text: which byte, where, and what to do."""
    byte = exc.object[exc.start : exc.start + 1].hex() if exc.object else "?"
    return f"{where}: not UTF-8 text (byte 0x{byte} at position {exc.start}); save it as UTF-8"


def describe(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message (`<file>: <what happened>; <what to do>`) and exit code of a failure that is not ours
    but that a user's input or machine causes; None for a failure we know nothing about (a bug)."""
    if isinstance(exc, MemoryError):
        return MEMORY, 1
    name = type(exc).__name__
    if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return GPU_MEMORY, 1
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_error(exc), 1
    if isinstance(exc, UnicodeDecodeError):
        return not_utf8(_file_of(exc.__traceback__) or "a text file", exc), 1
    if isinstance(exc, UnicodeEncodeError):
        return f"{printable(exc.object[:80])!r}: can't be written as {exc.encoding} text; rename it", 1
    if name == "JSONDecodeError":
        where = _file_of(exc.__traceback__) or "a JSON file"
        return f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); fix the file or write it again", 1
    known = _library_error(exc)
    if known is not None:
        return known
    decode = isinstance(exc, SyntaxError | EOFError) or isinstance(exc, OSError) and exc.errno is None
    if decode and _origin(exc.__traceback__).startswith("PIL."):  # a damaged image (a full disk has an errno)
        where = _file_of(exc.__traceback__) or "an image"
        first = (str(exc).strip().splitlines() or [name])[0]
        return f"{where}: could not be decoded ({first}); the file may be truncated or corrupt: replace it", 1
    return None


def _library_error(exc: BaseException) -> tuple[str, int] | None:
    """safetensors' and Pillow's errors (matched by module, so neither is imported here)."""
    module, name = type(exc).__module__ or "", type(exc).__name__
    first = (str(exc).strip().splitlines() or [name])[0]
    if name == "SafetensorError":
        where = _file_of(exc.__traceback__) or "a .safetensors file"
        return (
            f"{where}: not a valid .safetensors file ({first}); it may be truncated or a partial download: "
            "download or copy it again",
            1,
        )
    if module.startswith("PIL"):
        where = _file_of(exc.__traceback__)
        if name == "UnidentifiedImageError":
            return f"{where or first}: not an image Pillow can read; remove it or convert it to PNG or JPEG", 1
        if name == "DecompressionBombError":
            return f"{where or 'an image'}: too many pixels ({first}); use a smaller image", 1
        return f"{where or 'an image'}: could not be decoded ({first}); the file may be truncated or corrupt", 1
    return None


def _os_error(exc: OSError) -> str:
    what, todo = OS_ERRORS.get(exc.errno or 0, (exc.strerror or str(exc), "check the path and the disk"))
    files = [printable(f) for f in (exc.filename, exc.filename2) if f is not None]
    where = " -> ".join(files) if files else _file_of(exc.__traceback__) or "a file"
    return f"{where}: {what}; {todo}"


# Local variable names that hold the file being read in our code and in pathlib/json/PIL frames.
PATH_NAMES = ("path", "file", "filename", "fp", "self", "source", "sidecar", "caption", "config_file")


def _origin(tb: TracebackType | None) -> str:
    """The module in which the exception was raised (the innermost frame)."""
    name = ""
    while tb is not None:
        name = str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    return name


def _file_of(tb: TracebackType | None) -> str | None:
    """The file being read where the failure happened: the innermost frame (ours, pathlib's or Pillow's) with a
    path-valued local. A guess from the stack, used only for messages."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in PATH_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, PurePath):
                return printable(value)
            if name in ("filename", "file", "path", "fp") and isinstance(value, str) and os.path.exists(value):
                return printable(value)
            inner = getattr(value, "name", None)  # an open file object
            if name == "fp" and isinstance(inner, str) and os.path.exists(inner):
                return printable(inner)
    return None
