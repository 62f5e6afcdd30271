"""Face masks for a prepped benchmark dataset, from the toy renderer's known face and hair (train.masked_loss).

dlib finds no face in a toy render, so prep writes no masks for it; the decoder finds the head exactly on a clean
render and `world.face_shapes` says where the render drew the face and hair around it. The masks are softened
as prep softens its own (sdlora.prep.masks), and the manifest is rewritten with their paths.
"""

from __future__ import annotations

from pathlib import Path

from sdlora import layout
from sdlora.faces import toyworld as world


def write_masks(dataset: Path, subject: world.Identity) -> int:
    """masks/NNNN.png for every image of `dataset` (a `sdlora prep` output of renders of `subject`) and their
    paths in its manifest (written atomically); returns how many were written."""
    from PIL import Image

    from sdlora.fsutil import atomic_path
    from sdlora.prep import masks
    from sdlora.prep.manifest import read_manifest, write_manifest

    dataset = Path(dataset)
    entries = read_manifest(dataset)
    (dataset / layout.DATASET_MASKS).mkdir(exist_ok=True)
    updated = []
    for entry in entries:
        with Image.open(dataset / entry.image) as opened:
            image = opened.convert("RGB")
        box = world.read(image).box  # in the decoder's 64 px frame
        scale = image.width / world.SIZE
        polygons, ellipses = world.face_shapes(subject, box)
        polygons = [[(x * scale, y * scale) for x, y in polygon] for polygon in polygons]
        ellipses = [tuple(v * scale for v in ellipse) for ellipse in ellipses]
        mask = masks.soften(polygons, ellipses, image.size, (box[2] - box[0]) * scale)
        name = f"{layout.DATASET_MASKS}/{Path(entry.image).stem}.png"
        with atomic_path(dataset / name) as tmp:
            mask.save(tmp, format="PNG")
        updated.append(entry.model_copy(update={"mask": name}))
    write_manifest(dataset / layout.MANIFEST, updated)
    return len(updated)
