"""generate --reference: the reference photos an edit model keeps the person from, given as photos or picked from a
prepped dataset by face quality, checked against the base before any weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from sdlora.errors import UsageError, printable
from sdlora.layout import MANIFEST

SHARP_FACE = 256  # px: a face this wide in the prepped image counts fully; smaller ones count by their width


def reference_count(model: Any) -> int:
    """How many reference photos the base (model.base, peeked, no weights) takes; a UsageError where none."""
    from sdlora import families, models

    family, stand_in = models.peek_base(model)
    count = families.references(family, stand_in)
    if not count:
        capable = ", ".join(sorted({name for f in families.REGISTRY.values() for name, _ in f.reference_pipelines}))
        raise UsageError(
            f"--reference: {model.base} ({family.label}) takes no reference images; use a base whose pipeline does "
            f"({capable}), e.g. Qwen/Qwen-Image-Edit-2511"
        )
    return count


def choose(paths: list[Path], count: int) -> list[Path]:
    """The photos given (at most `count`), or, for one dataset folder, its `min(count, 3)` best faces."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return best_faces(Path(paths[0]), min(count, 3))
    if len(paths) > count:
        raise UsageError(f"--reference: {len(paths)} photos given; this base takes at most {count}")
    for path in paths:
        if Path(path).is_dir():
            raise UsageError(f"--reference {printable(path)}: a folder goes alone (its best faces are picked)")
    return [Path(p) for p in paths]


def quality(entry: Any) -> float:
    """A prepped image's face quality: its sharpness (prep's variance of the Laplacian) times how wide the face is in
    it, up to SHARP_FACE px; 0 without a face."""
    if entry.face_box is None:
        return 0.0
    crop_width = max(1, entry.crop_box[2] - entry.crop_box[0])
    face_px = (entry.face_box[2] - entry.face_box[0]) * entry.width / crop_width
    return float(entry.sharpness) * min(1.0, face_px / SHARP_FACE)


def best_faces(dataset: Path, count: int) -> list[Path]:
    """The `count` prepped images of `dataset` with the best faces (quality), best first."""
    from sdlora.prep.manifest import confined, read_manifest

    if not (dataset / MANIFEST).is_file():
        raise UsageError(
            f"--reference {printable(dataset)}: no {MANIFEST} (not a prepped dataset); run `sdlora prep` on it or "
            "give 1-3 photos"
        )
    ranked = sorted(read_manifest(dataset), key=quality, reverse=True)
    chosen = [entry for entry in ranked if entry.face_box is not None][:count]
    if not chosen:
        raise UsageError(f"--reference {printable(dataset)}: no image in {MANIFEST} has a face; give 1-3 photos")
    return [confined(dataset, entry.image) for entry in chosen]


def load(paths: list[Path]) -> list[Image.Image]:
    """The photos, RGB and upright (EXIF), each a one-line error when missing or not an image."""
    from sdlora.prep.images import read_image

    return [read_image(path, "--reference") for path in paths]
