"""`sdlora generate`'s ComfyUI workflows: one per image (the PNG's `prompt` chunk, which ComfyUI opens when the
image is dropped on it) and one per run (comfyui.json beside the images, every image of the run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdlora.comfyui.workflow import LoraFile
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


def reproducible_run(config: Config) -> str | None:
    """Why a workflow can't remake this run's images (it renders text to image from the base alone), or None."""
    g = config.generate
    for setting, value in (("--init-image", g.init_image), ("--keep-face", g.keep_face), ("--refiner", g.refiner)):
        if value:
            return f"{setting}: a ComfyUI workflow of it is not written yet"
    return None


def workflow(
    parts: ComfyParts, config: Config, loras: list[LoraFile], images: list[tuple[str, int]], prefix: str
) -> dict[str, Any]:
    """The graph that renders (prompt, seed) `images` with generate's settings."""
    from sdlora.comfyui.workflow import Settings, build

    g = config.generate
    width, height = g.width_height
    settings = Settings(g.steps, g.cfg, g.scheduler, width, height, g.negative)
    return build(parts, loras, settings, images, prefix=prefix, vae=config.model.vae)
