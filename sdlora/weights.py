"""Checks of weight files before anything loads them: whole .safetensors headers, and pickles refused unless
allowed (`--allow-pickle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.errors import UsageError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

# Weight files of a diffusers folder's components (unet/, vae/, text_encoder/, ...).
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# A .safetensors header larger than this is not a real one (real headers are a few MB at most).
MAX_HEADER = 100 * 1024 * 1024
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_safetensors(path: Path, what: str) -> dict[str, Any]:
    """Read and check a .safetensors file's header without loading anything: not empty, not a pickle renamed,
    the header whole and valid JSON, every tensor's bytes present (a partial download fails here, in
    milliseconds, instead of deep inside the loader). Returns the header; `what` names the file in messages."""
    import json

    from sdlora.errors import printable

    where = printable(what)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if size == 0:
                raise UsageError(f"{where}: the file is empty (0 bytes); download or copy it again")
            if head.startswith(PICKLE_MAGIC):
                raise UsageError(
                    f"{where}: a pickle (PyTorch .ckpt/.bin) renamed .safetensors, not a safetensors file; "
                    "use the real .safetensors file, or convert this one"
                )
            if len(head) < 8 or length <= 1 or length > min(MAX_HEADER, size - 8):
                raise UsageError(
                    f"{where}: not a .safetensors file, or truncated ({size} bytes; its header claims {length}); "
                    "download or copy it again"
                )
            header = json.loads(handle.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UsageError(f"{where}: not a .safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{where}: not a .safetensors file (its header is not a JSON object)")
    ends = [v.get("data_offsets", [0, 0])[-1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + length + max((int(end) for end in ends if isinstance(end, int)), default=0)
    if need > size:
        raise UsageError(
            f"{where}: truncated: {size} bytes, but its tensors need {need} (a partial download?); "
            "download or copy it again"
        )
    return header


def _check_folder_weights(folder: Path, base: str, allow_pickle: bool) -> None:
    """A local diffusers folder: its components' .safetensors headers are whole, and a component whose only
    weights are pickles is refused unless allowed (diffusers would fall back to them silently)."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        weights = [p for p in component.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()]
        safe = [p for p in weights if p.suffix.lower() == ".safetensors"]
        for file in safe:
            check_safetensors(file, str(file))
        if weights and not safe and not allow_pickle:
            raise UsageError(
                f"{base}: {component.name}/ holds only pickle weights ({weights[0].name}), which can run code when "
                "loaded; convert them to .safetensors, or pass --allow-pickle if you trust the source"
            )
