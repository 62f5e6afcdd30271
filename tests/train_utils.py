"""Helpers of the train tests: a small real-photo subject set and the CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

# Four fixed crops of scikit-image's astronaut photo (a real face): (left, top, side) in its 512x512 pixels.
CROPS = [(140, 30, 200), (120, 10, 240), (160, 50, 170), (100, 0, 280)]


def subject_set(folder: Path, resolution: int = 64, token: str = "sks", class_word: str = "person") -> Path:
    """A plain dataset folder: 4 PNG crops with .txt captions and prep's config.json (trigger phrase)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    for i, (left, top, side) in enumerate(CROPS):
        crop = photo.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
        crop.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of {token} {class_word}", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"prep": {"token": token, "class_word": class_word}}))
    return folder
