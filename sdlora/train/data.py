"""Training examples (prep manifest or a plain folder), the trigger phrase, pixels with their size and crop
(aspect-ratio buckets, SDXL micro-conditioning), and the deterministic, bucket-aware data order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora import layout
from sdlora.errors import UsageError, not_utf8
from sdlora.prep.manifest import confined


@dataclass(frozen=True)
class Example:
    """One training image and its caption; prep's manifest adds the image's size and where it was cut from."""

    image: Path
    caption: str
    size: tuple[int, int] | None = None  # (width, height) of the image file, from the manifest
    original_size: tuple[int, int] | None = None  # (height, width) of the source, scaled like the crop
    crop_top_left: tuple[int, int] | None = None  # (top, left) of the crop in that scaled source
    mask: Path | None = None  # prep's soft face-and-hair mask of the image (same size), for train.masked_loss
    control: Path | None = None  # edit training's control image (cut to the image's training size), or None


@dataclass(frozen=True)
class Geometry:
    """The size an example trains at and SDXL's micro-conditioning for it, all in training pixels."""

    size: tuple[int, int]  # (width, height): the bucket; images of one micro-batch share it
    original_size: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]  # (top, left)

    def time_ids(self, flipped: bool) -> list[int]:
        """SDXL's add_time_ids: original size, crop top-left, target size (each (height, width)). A flipped image
        was cut from the mirrored source, so its crop's left edge is mirrored too."""
        (width, height), (top, left) = self.size, self.crop_top_left
        if flipped:
            left = self.original_size[1] - left - width
        return [*self.original_size, top, left, height, width]


def load_examples(dataset_dir: Path, default_caption: str, control_dir: Path | None = None) -> list[Example]:
    """Examples of `dataset_dir`: prep's manifest.jsonl when present, else every image with its optional
    `.txt` caption (`default_caption` otherwise); control images from the manifest's `control` or, named as each
    image, from `control_dir`."""
    from sdlora.prep.manifest import MANIFEST, read_manifest

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UsageError(f"{dataset_dir}: dataset folder not found; run `sdlora prep PHOTOS {dataset_dir}` first")
    if (dataset_dir / MANIFEST).is_file():
        examples = [
            Example(
                confined(dataset_dir, e.image),
                e.caption,
                (e.width, e.height),
                e.original_size,
                e.crop_top_left,
                confined(dataset_dir, e.mask) if e.mask else None,
                confined(dataset_dir, e.control) if e.control else None,
            )
            for e in read_manifest(dataset_dir)
        ]
    else:
        images = [confined(dataset_dir, path.name) for path in list_images(dataset_dir)]
        examples = [Example(path, caption_of(path, default_caption)) for path in images]
    if not examples:
        raise UsageError(f"{dataset_dir}: no training images (expected manifest.jsonl or .png/.jpg files)")
    missing = [e.image for e in examples if not e.image.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: image listed in the manifest is missing; re-run `sdlora prep`")
    return with_controls(examples, Path(control_dir)) if control_dir is not None else examples


def check_controls(examples: list[Example], family: Any, train: Any) -> None:
    """Control images need an edit model, and every image its own (class images have none)."""
    given = [e for e in examples if e.control]
    if not given:
        return
    where = "--control-dir" if train.control_dir else "manifest.jsonl's control"
    if not family.edit_training:
        raise UsageError(f"{where}: {family.label} bases take no control images; use an edit model or drop them")
    if len(given) < len(examples):
        raise UsageError(f"{where}: {len(examples) - len(given)} image(s) have no control image; give every one")
    if train.preservation == "class_images":
        raise UsageError(f"{where}: class images have no control images; set train.preservation to none or output")


def with_controls(examples: list[Example], control_dir: Path) -> list[Example]:
    """Each example with its control image: the file of `control_dir` with the image's name (any image suffix)."""
    from dataclasses import replace

    if not control_dir.is_dir():
        raise UsageError(f"--control-dir {control_dir}: no such folder")
    found = {path.stem: path for path in list_images(control_dir)}
    missing = [e.image.name for e in examples if e.image.stem not in found]
    if missing:
        raise UsageError(f"--control-dir {control_dir}: no control image for {missing[0]} (name it {missing[0]})")
    return [replace(e, control=confined(control_dir, found[e.image.stem].name)) for e in examples]


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in layout.IMAGE_SUFFIXES and p.is_file())


def caption_of(image: Path, default: str) -> str:
    """The caption of a plain folder's image (training photos, ready class images): its IMG.txt, else `default`."""
    sidecar = image.with_suffix(".txt")
    if sidecar.is_file():
        sidecar = confined(image.parent, sidecar.name)
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:  # a usage error (exit 2) naming the caption, not the generic line
            raise UsageError(not_utf8(sidecar, exc)) from None
        if text:
            return text
    return default


def trigger_parts(dataset_dir: Path, token: str, class_word: str) -> tuple[str, str]:
    """(token, class_word) from the dataset's config.json (what prep used) if present, else the given ones;
    the trigger phrase is "{token} {class_word}"."""
    config_file = Path(dataset_dir) / layout.CONFIG_JSON
    if config_file.is_file():
        try:
            prep: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8")).get("prep", {})
        except (json.JSONDecodeError, AttributeError):
            prep = {}
        token, class_word = prep.get("token", token), prep.get("class_word", class_word)
    return str(token), str(class_word)


def train_size(example: Example, resolution: int) -> tuple[int, int]:
    """(width, height) `example` trains at: the aspect-ratio bucket nearest its manifest size at `resolution`
    (prep --buckets), else a square."""
    from sdlora.prep.crops import nearest_bucket

    if example.size is None or example.size[0] == example.size[1]:
        return resolution, resolution
    return nearest_bucket(example.size, resolution)


def load_example(example: Example, resolution: int):
    """((3, H, W) pixels in [-1, 1], Geometry): the image scaled to cover its training size, centre-cropped.

    The micro-conditioning follows the manifest (prep's crop of the source photo), scaled to training pixels
    and shifted by the centre crop; a plain-folder image counts as its own uncropped source."""
    from PIL import Image, ImageOps

    from sdlora.prep.images import read_image

    size = train_size(example, resolution)
    image = read_image(example.image)
    width, height = image.size
    scale = max(size[0] / width, size[1] / height)
    # ImageOps.fit's centre crop, in the scaled image's pixels
    top, left = round((height * scale - size[1]) / 2), round((width * scale - size[0]) / 2)
    source = example.original_size or (height, width)
    crop = example.crop_top_left or (0, 0)
    geometry = Geometry(
        size=size,
        original_size=(round(source[0] * scale), round(source[1] * scale)),
        crop_top_left=(round(crop[0] * scale) + top, round(crop[1] * scale) + left),
    )
    return _to_tensor(ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)), geometry


def load_mask(example: Example, resolution: int):
    """(1, H, W) float tensor in [0, 1]: the example's mask cut exactly as `load_example` cuts its image (scaled
    to cover the training size, centre-cropped); all ones when the example has no mask."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from sdlora.prep.images import read_image

    width, height = train_size(example, resolution)
    if example.mask is None:
        return torch.ones(1, height, width)
    mask = read_image(example.mask, "mask").convert("L")
    fitted = ImageOps.fit(mask, (width, height), method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)[None]


def load_pixels(path: Path, resolution: int):
    """(3, R, R) float tensor in [-1, 1]: the image resized on its short side and centre-cropped."""
    return load_example(Example(Path(path), ""), resolution)[0]


def _to_tensor(image: Any):
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DataOrder:
    """Which example (and flip) fills each slot of global micro-batch k, a pure function of (seed, k).

    Each epoch shuffles the examples (seeded by (seed, epoch)), splits them by bucket (training size) and cuts
    each bucket into global micro-batches of `group` slots (the last one of a bucket wraps round to its start),
    then shuffles the micro-batches when there are several buckets. So every micro-batch holds one size, and
    since the order depends only on (seed, k), resumed and multi-process runs see the same samples as one
    uninterrupted single-process run with the same global batch.
    """

    def __init__(self, buckets: list[Any], seed: int, flip: bool, group: int) -> None:
        self.buckets, self.seed, self.flip, self.group = list(buckets), seed, flip, group
        sizes = [self.buckets.count(b) for b in dict.fromkeys(self.buckets)]
        self.per_epoch = sum(-(-n // group) for n in sizes)  # micro-batches per epoch
        self._cache: dict[int, list[list[tuple[int, int]]]] = {}

    def _epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        import torch

        generator = torch.Generator().manual_seed(stream_seed("order", self.seed, epoch))
        n = len(self.buckets)
        perm = torch.randperm(n, generator=generator).tolist()
        flips = torch.randint(0, 2, (n,), generator=generator).tolist() if self.flip else [0] * n
        per_bucket: dict[Any, list[tuple[int, int]]] = {}
        for position, index in enumerate(perm):
            per_bucket.setdefault(self.buckets[index], []).append((index, int(flips[position])))
        batches = [
            [members[(start + j) % len(members)] for j in range(self.group)]
            for members in per_bucket.values()
            for start in range(0, len(members), self.group)
        ]
        if len(per_bucket) > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def batch(self, k: int) -> list[tuple[int, int]]:
        """(example index, flip 0/1) of each slot of global micro-batch k."""
        epoch = k // self.per_epoch
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch(epoch)}  # the loop walks forward: keep one epoch
        return self._cache[epoch][k % self.per_epoch]


def stream_seed(kind: str, seed: int, index: int) -> int:
    """An independent 63-bit seed for random stream `kind` at `index` (epoch, micro-batch) of run `seed`."""
    digest = hashlib.sha256(f"{kind}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
