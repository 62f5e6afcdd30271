"""The real Flux.1 architecture (FLUX.1-dev's published transformer config, typed in) at any depth, built with
random or no weights: what the Flux benchmarks and the ComfyUI check run on. Speed and memory do not depend on
the weights' values; depth is reduced where a check needs the widths, not the 19 + 38 blocks."""

from __future__ import annotations

from typing import Any

# black-forest-labs/FLUX.1-dev transformer/config.json: hidden 3072 = 24 heads x 128, T5-XXL 4096, CLIP-L 768.
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
T5_XXL_WIDTH, CLIP_L_WIDTH, LATENT_CHANNELS = 4096, 768, 16


def flux_transformer(double: int, single: int, device: str = "meta", dtype: Any = None) -> Any:
    """FluxTransformer2DModel with FLUX.1-dev's widths and `double` + `single` blocks, on `device`."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        model = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double, "num_single_layers": single})
    return model if dtype is None else model.to(dtype)
