"""Image files with their generation settings: A1111's `parameters` and ComfyUI's `prompt` PNG text chunks, and a
JSON sidecar."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdlora.fsutil import atomic_path, atomic_write_text


def quote(value: Any) -> str:
    """A1111's quoting of a value in the settings line: JSON-quoted when it holds ',', ':' or a newline."""
    text = str(value)
    if not any(char in text for char in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative: str, settings: dict[str, Any]) -> str:
    """The text A1111 writes and reads back ("PNG Info"): prompt, `Negative prompt: ...`, `Key: value, ...`.

    Settings whose value is None are left out.
    """
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in settings.items() if value is not None))
    return "\n".join(lines)


def lora_hashes(named_hashes: list[tuple[str, str]]) -> str | None:
    """A1111's `Lora hashes` value: "name: hash12, name: hash12" (first 12 hex digits of the addnet hash)."""
    return ", ".join(f"{name}: {digest[:12]}" for name, digest in named_hashes) or None


def model_hash(path: Path) -> str | None:
    """A1111's `Model hash` of a single-file checkpoint: the first 10 hex digits of its SHA-256; None for folders."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def save_png(
    path: Path,
    image: Image.Image,
    parameters: str | None = None,
    *,
    replace: bool = True,
    prompt: dict[str, Any] | None = None,
) -> None:
    """Write a PNG atomically, with A1111's `parameters` text chunk and ComfyUI's `prompt` chunk (the API-format
    workflow, as ComfyUI's own SaveImage writes it) when given (`replace` False: never over a file)."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt, ensure_ascii=False))
    with atomic_path(path, replace=replace) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def save_json(path: Path, data: dict[str, Any], *, replace: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", replace=replace)
