"""SDXL's kohya LoRA names: kohya trains SDXL on the original SGM UNet, so its files name UNet modules by their SGM
paths (`lora_unet_input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_...`), not diffusers'."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdlora.errors import SdloraError
from sdlora.families.sd.keys import sgm_path


def sgm_namer(config: Any) -> Callable[[str], str]:
    """A function from a diffusers UNet module path to its SGM path, for this UNet's block layout."""
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        if len(set(per_block)) != 1:
            raise SdloraError(f"SDXL UNet with uneven layers_per_block {per_block} has no SGM naming")
        per_block = per_block[0]
    up_has_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    return lambda path: sgm_path(path, per_block, up_has_attention)
