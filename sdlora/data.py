"""Training examples (prep manifest or a plain folder), the trigger phrase, pixels, and the deterministic data order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Example:
    """One training image and its caption."""

    image: Path
    caption: str


def load_examples(dataset_dir: Path, default_caption: str) -> list[Example]:
    """Examples of `dataset_dir`: prep's manifest.jsonl when present, else every image with its optional
    `.txt` caption (`default_caption` otherwise)."""
    from sdlora.prep.manifest import MANIFEST, read_manifest

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UsageError(f"{dataset_dir}: dataset folder not found; run `sdlora prep PHOTOS {dataset_dir}` first")
    if (dataset_dir / MANIFEST).is_file():
        examples = [Example(dataset_dir / e.image, e.caption) for e in read_manifest(dataset_dir)]
    else:
        examples = [Example(path, _caption_of(path, default_caption)) for path in list_images(dataset_dir)]
    if not examples:
        raise UsageError(f"{dataset_dir}: no training images (expected manifest.jsonl or .png/.jpg files)")
    missing = [e.image for e in examples if not e.image.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: image listed in the manifest is missing; re-run `sdlora prep`")
    return examples


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _caption_of(image: Path, default: str) -> str:
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").strip()
        if text:
            return text
    return default


def trigger_parts(dataset_dir: Path, token: str, class_word: str) -> tuple[str, str]:
    """(token, class_word) from the dataset's config.json (what prep used) if present, else the given ones;
    the trigger phrase is "{token} {class_word}"."""
    config_file = Path(dataset_dir) / "config.json"
    if config_file.is_file():
        try:
            prep: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8")).get("prep", {})
        except (json.JSONDecodeError, AttributeError):
            prep = {}
        token, class_word = prep.get("token", token), prep.get("class_word", class_word)
    return str(token), str(class_word)


def load_pixels(path: Path, resolution: int):
    """(3, R, R) float tensor in [-1, 1]: the image resized on its short side and centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class DataOrder:
    """Which example (and flip) feeds each sample slot, a pure function of (seed, position).

    Position p of the endless stream is example `perm_e[p % n]` of epoch e = p // n. Making the order a function
    of the step, not of an iterator's state, means resume and multi-process runs see the same samples as one
    uninterrupted single-process run with the same global batch.
    """

    n: int
    seed: int
    flip: bool

    def _epoch(self, epoch: int):
        import torch

        generator = torch.Generator().manual_seed(stream_seed("order", self.seed, epoch))
        perm = torch.randperm(self.n, generator=generator)
        flips = torch.randint(0, 2, (self.n,), generator=generator) if self.flip else torch.zeros(self.n)
        return perm.tolist(), [int(f) for f in flips.tolist()]

    def slots(self, positions: range) -> list[tuple[int, int]]:
        """(example index, flip 0/1) for each position."""
        out, cache = [], {}
        for p in positions:
            epoch = p // self.n
            if epoch not in cache:
                cache[epoch] = self._epoch(epoch)
            perm, flips = cache[epoch]
            out.append((perm[p % self.n], flips[p % self.n]))
        return out


def micro_batch_positions(micro_index: int, batch_size: int, num_processes: int, rank: int) -> range:
    """Stream positions of this rank's share of global micro-batch `micro_index` (size batch_size x processes)."""
    start = micro_index * batch_size * num_processes + rank * batch_size
    return range(start, start + batch_size)


def stream_seed(kind: str, seed: int, index: int) -> int:
    """An independent 63-bit seed for random stream `kind` at `index` (epoch, micro-batch) of run `seed`."""
    digest = hashlib.sha256(f"{kind}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
