"""The tiny SD 1.x / 2.x pipelines (random weights, built from configs) for the tests and the demo, and the parts
SDXL's tiny pipeline shares: the VAE with the real 8x downsampling, the UNet block layout, SD's noise schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.families.offline_text import clip_text_config, clip_tokenizer


def vae() -> Any:
    """A tiny AutoencoderKL: 4 latent channels, 8x downsampling."""
    from diffusers import AutoencoderKL

    # Four blocks give the real 8x downsampling, so latent shapes and SDXL crop maths match the real models.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    )


# Both tiny UNets: two blocks of two layers, the second with cross-attention.
UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def tiny_sd_pipeline(v2: bool, seed: int = 0) -> Any:
    """Tiny SD 1.x (epsilon, quick-GELU CLIP) or SD 2.x (v-prediction, linear projections, GELU CLIP)."""
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
    unet = UNet2DConditionModel(
        **UNET, cross_attention_dim=32, attention_head_dim=(2, 4) if v2 else 8, use_linear_projection=v2
    )
    scheduler = sd_scheduler("v_prediction" if v2 else "epsilon")
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=CLIPTextModel(clip_text_config(hidden_act="gelu" if v2 else "quick_gelu")),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """DDIM with Stable Diffusion's own noise schedule (the tiny models' and the identity benchmark's base)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
