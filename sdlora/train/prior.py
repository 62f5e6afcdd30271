"""DreamBooth prior preservation: the class images, from a folder or generated once with the base model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.errors import UsageError
from sdlora.fsutil import atomic_path

if TYPE_CHECKING:
    from sdlora.generate.render import Sampling
from sdlora.train.data import Example, list_images

CLASS_IMAGES = layout.CLASS_IMAGES


def check_class_dir(class_dir: Path | None) -> None:
    """Pre-flight: a given --class-dir exists and holds images."""
    if class_dir is None:
        return
    if not Path(class_dir).is_dir() or not list_images(Path(class_dir)):
        raise UsageError(f"--class-dir {class_dir}: no folder of .png/.jpg class images there")


def class_examples(class_dir: Path, prompt: str, limit: int) -> list[Example]:
    """Up to `limit` images of `class_dir`, each captioned with the class prompt."""
    return [Example(path, prompt) for path in list_images(class_dir)[:limit]]


def generate_class_images(
    pipe: Any,
    folder: Path,
    *,
    prompt: str,
    count: int,
    seed: int,
    sampling: Sampling,
) -> None:
    """Render the missing class images (class-NNNNN.png, image i from seed + i) into `folder` with the same code
    as `sdlora generate`; images already there are reused, so a second run generates nothing."""
    from sdlora.generate.render import render_images

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (folder / f"class-{i:05d}.png").is_file()]
    for start in range(0, len(missing), sampling.batch_size):
        chunk = missing[start : start + sampling.batch_size]
        images = render_images(pipe, [prompt] * len(chunk), [seed + i for i in chunk], sampling)
        for i, image in zip(chunk, images, strict=True):
            with atomic_path(folder / f"class-{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
