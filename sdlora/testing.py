"""Test helpers that are about no one family: every registered family's tiny pipeline, built or saved by name.

The tiny pipelines themselves (random weights, built from configs) live in each family's folder
(`sdlora/families/<name>/tiny.py`), reached through the family's `tiny_pipeline`; the offline tokenizers they
share live in sdlora.families.offline_text and are re-exported here for the tests and the benchmarks. They are
saved in diffusers folder format so that every loading path is the real one (`from_pretrained` on a local folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.families import NAMES
from sdlora.families.offline_text import (  # re-exported: the tests' and benchmarks' offline tokenizers
    clip_bpe_path,
    clip_text_config,
    clip_tokenizer,
    t5_tokenizer,
    write_clip_vocab,
)

__all__ = [
    "FAMILIES",
    "build_tiny_pipeline",
    "clip_bpe_path",
    "clip_text_config",
    "clip_tokenizer",
    "save_tiny_pipeline",
    "t5_tokenizer",
    "write_clip_vocab",
    "write_single_file",
]

FAMILIES = tuple(sorted(NAMES))  # every registered family, in name order


def build_tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A tiny, randomly initialised pipeline of `family` (diffusers classes, real CLIP tokenizer)."""
    from sdlora import families

    return families.get(family).tiny_pipeline(seed)


def save_tiny_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline of `family` and save it as a diffusers folder; returns the folder."""
    folder = Path(folder)
    build_tiny_pipeline(family, seed=seed).save_pretrained(folder, safe_serialization=True)
    return folder


def write_single_file(folder: Path, path: Path) -> Path:
    """Convert the diffusers pipeline in `folder` to one original-format checkpoint at `path` (the layout A1111,
    ComfyUI and civitai files use), written by its family's `save_single_file`."""
    from diffusers import DiffusionPipeline

    from sdlora import families

    pipe = DiffusionPipeline.from_pretrained(str(folder), **families.stand_ins(str(folder), {}))
    families.detect(pipe).save_single_file(pipe, Path(path))
    return Path(path)
