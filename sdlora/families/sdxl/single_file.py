"""Write a loaded SDXL pipeline as ONE original-format (SGM, "A1111") `.safetensors` checkpoint, the layout of the
SDXL files people download: the UNet and VAE as SD's (sdlora.families.sd.single_file), the first text encoder
under `conditioner.embedders.0.transformer.<CLIP path>`, the second under `conditioner.embedders.1.model.<OpenCLIP
path>` (one fused `in_proj` per attention, `text_projection` stored transposed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.families.sd import single_file as sd_single_file

CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def write_single_file(pipe: Any, path: Path) -> None:
    """Convert a loaded SDXL pipeline to one SGM checkpoint at `path`."""
    text = sd_single_file.clip_state(pipe.text_encoder, CLIP_PREFIX)
    text |= sd_single_file.open_clip_state(pipe.text_encoder_2, OPEN_CLIP_PREFIX)
    sd_single_file.write_single_file(pipe, path, text_state=text)
