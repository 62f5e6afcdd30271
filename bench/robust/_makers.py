"""Bad and careless inputs for bench.robust.inputs: damaged model and LoRA files, odd images, odd folders."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy
from PIL import Image


def photo(seed: int, side: int = 96) -> Image.Image:
    """A textured picture (smooth blobs, like a photo) that hashes unlike other seeds."""
    rng = numpy.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(numpy.uint8)).resize((side, side), Image.BICUBIC)


def photos(folder: Path, count: int = 3, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(start + i).save(folder / f"photo{i}.png")
    return folder


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but holds almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def truncated_png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    photo(seed).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def safetensors(path: Path, tensors: int = 2, cut: int = 0) -> Path:
    """A valid .safetensors file of `tensors` float32 tensors of 4 values, without its last `cut` bytes."""
    header = {f"t{i}": {"dtype": "F32", "shape": [4], "data_offsets": [16 * i, 16 * (i + 1)]} for i in range(tensors)}
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * 16 * tensors
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - cut])
    return path


def lora_run(folder: Path) -> Path:
    """A folder that looks like a train OUT_DIR (its diffusers file is header-only: enough for the checks)."""
    safetensors(folder / "pytorch_lora_weights.safetensors")
    return folder


def sparse(path: Path, head: bytes, size: int) -> Path:
    """A file of `size` bytes on paper (a few KB on disk) that starts with `head`."""
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def copy_model(tiny: Path, folder: Path) -> Path:
    shutil.copytree(tiny, folder)
    return folder


def reference_set(folder: Path) -> Path:
    """Photos with a real face (scikit-image's astronaut), as eval's --reference."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    face = Image.fromarray(data.astronaut())
    face.crop((100, 0, 400, 300)).save(folder / "ref0.png")
    face.crop((120, 10, 380, 270)).resize((300, 300)).save(folder / "ref1.jpg", quality=92)
    return folder


@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A small tmpfs mounted at `path` (needs root); yields False when it can't be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def raw_name(folder: Path, name: bytes, data: bytes) -> None:
    """Write a file whose name is raw bytes (maybe not valid UTF-8)."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(data)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    photo(seed).save(buffer, "PNG")
    return buffer.getvalue()
