"""`sdlora generate`'s ComfyUI workflows: one per image (the PNG's `prompt` chunk, which ComfyUI opens when the
image is dropped on it) and one per run (comfyui.json beside the images, every image of the run); from
--init-image's or --keep-face's photo or with --reference's photos (written beside the images for ComfyUI's input
folder) and through --refiner."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdlora.comfyui.workflow import LoraFile, Photo, Refiner
    from sdlora.config import Config
    from sdlora.families.comfyui import ComfyParts
    from sdlora.lora.files import Lora


def lora_files(loras: list[Lora]) -> list[LoraFile]:
    """The --lora files as ComfyUI's loras folder holds them, under the name A1111's `<lora:NAME:w>` tag gives them
    (a train OUT_DIR: its kohya file NAME.safetensors, what ComfyUI reads), with its pivotal embedding NAME_emb."""
    from safetensors import safe_open

    from sdlora.comfyui.workflow import LoraFile
    from sdlora.lora.embeddings import NEEDS_KEY, WORD_KEY

    found = []
    for lora in loras:
        path = lora.a1111_file or lora.path
        with safe_open(str(path), framework="pt") as handle:
            text_encoders = any(key.startswith(("lora_te", "text_encoder")) for key in handle.keys())  # noqa: SIM118 (safe_open is no dict)
            metadata = {**lora.metadata, **(handle.metadata() or {})}
        word = metadata.get(WORD_KEY)
        emb = Path(metadata[NEEDS_KEY]).stem if metadata.get(NEEDS_KEY) else f"{lora.name}_emb"
        found.append(LoraFile(f"{lora.name}.safetensors", lora.scale, text_encoders, (word, emb) if word else None))
    return found


def refiner(config: Config, family: Any, strength: float) -> Refiner:
    """--refiner's pass as generate runs it: img2img at `strength`, at least one step however few --steps."""
    from sdlora.comfyui.workflow import Refiner
    from sdlora.families.comfyui import checkpoint_file

    g = config.generate
    name, note = checkpoint_file(str(g.refiner), dict(getattr(family, "comfyui_checkpoints", ())))
    return Refiner(name, strength, max(g.steps, math.ceil(1 / strength)), note)


def workflow(
    parts: ComfyParts,
    config: Config,
    loras: list[LoraFile],
    images: list[tuple[str, int]],
    prefix: str,
    photo: Photo | None = None,
    refiner: Refiner | None = None,
    references: list[str] | None = None,
) -> dict[str, Any]:
    """The graph that renders (prompt, seed) `images` with generate's settings (from --init-image's or
    --keep-face's `photo`, through the `refiner`, with --reference's photos saved as `references`)."""
    from sdlora.comfyui.workflow import Settings, build

    g = config.generate
    width, height = g.width_height
    settings = Settings(g.steps, g.cfg, g.scheduler, width, height, g.negative)
    extra = {"photo": photo, "refiner": refiner, "references": references}
    return build(parts, loras, settings, images, prefix=prefix, vae=config.model.vae, **extra)
