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


# Bucketed crops of the astronaut photo, (left, top, right, bottom): two squares (64x64) and two landscapes (96x64).
BUCKET_CROPS = [(140, 30, 340, 230), (60, 100, 360, 300), (120, 10, 360, 250), (30, 60, 480, 360)]


def bucketed_set(folder: Path, token: str = "sks", class_word: str = "person") -> Path:
    """A prep-style dataset (manifest.jsonl) whose images have two aspect-ratio buckets at 64 px, as
    `sdlora prep --buckets --resolution 64` writes them: real crop boxes of a 512x512 source photo."""
    from PIL import Image
    from skimage import data

    from sdlora.prep.manifest import ManifestEntry, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    entries = []
    for i, box in enumerate(BUCKET_CROPS):
        size = (64, 64) if box[2] - box[0] == box[3] - box[1] else (96, 64)
        photo.crop(box).resize(size, Image.LANCZOS).save(folder / f"img{i}.png")
        entries.append(
            ManifestEntry(
                image=f"img{i}.png",
                caption=f"a photo of {token} {class_word}",
                source="/photos/astronaut.png",
                source_sha256="0" * 64,
                source_size=(512, 512),
                crop_box=box,
                sharpness=100.0,
                width=size[0],
                height=size[1],
            )
        )
    write_manifest(folder / "manifest.jsonl", entries)
    (folder / "config.json").write_text(json.dumps({"prep": {"token": token, "class_word": class_word}}))
    return folder


def square_entry(image: str, source: str, mask: str | None = None):
    """A manifest entry of a 64 px square crop captioned "a photo of sks person" (optionally with a mask path)."""
    from sdlora.prep.manifest import ManifestEntry

    return ManifestEntry(
        image=image,
        caption="a photo of sks person",
        source=source,
        source_sha256="0" * 64,
        source_size=(64, 64),
        crop_box=(0, 0, 64, 64),
        sharpness=1.0,
        width=64,
        height=64,
        mask=mask,
    )


def plain(args) -> list[str]:
    """`sdlora train` arguments for the plain LoRA these tests were written for: --no-pivotal unless they choose
    pivotal tuning, --preservation none unless they choose a preservation (or class images). The recommended
    settings that an unset pivotal and preservation become have their own tests (test_recommended.py)."""
    args = [str(a) for a in args]

    def chooses(*keys: str) -> bool:  # an option (--key) or a --set value (train.key=...)
        return any(a == f"--{k.replace('_', '-')}" or a.startswith(f"train.{k}=") for a in args for k in keys)

    extra = [] if chooses("pivotal", "no_pivotal") else ["--no-pivotal"]
    extra += [] if chooses("preservation", "class_prompt", "class_dir") else ["--preservation", "none"]
    return [*args, *extra]
