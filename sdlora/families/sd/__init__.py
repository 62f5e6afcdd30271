"""Stable Diffusion 1.x and 2.x: the family objects (family.py), the original LDM UNet names (keys.py), the
single-file writer of the tests (single_file.py) and the tiny pipelines (tiny.py)."""

from sdlora.families.sd.family import (
    SD1,
    SD2,
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_EXTRA,
    UNET_SAMPLERS,
    StableDiffusion,
    UNetFamily,
    unet_targets,
)

__all__ = [
    "SD1",
    "SD2",
    "TEXT_ENCODER_ATTENTION",
    "UNET_ATTENTION",
    "UNET_EXTRA",
    "UNET_SAMPLERS",
    "StableDiffusion",
    "UNetFamily",
    "unet_targets",
]
