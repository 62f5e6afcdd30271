"""The tiny Flux.1 pipeline (random weights, built from configs) for the tests and the demo, and Flux.1's own
scheduler configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.families.offline_text import clip_text_config, clip_tokenizer, t5_tokenizer


def flux_vae() -> Any:
    """A tiny version of Flux's AE: 4 latent channels, 8x downsampling, Flux's shift and scale."""
    from diffusers import AutoencoderKL

    # Flux's AE: no quant convs, latents normalised with a shift and a scale (the real ones: 0.1159, 0.3611).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_scheduler(schnell: bool = False) -> Any:
    """Flux.1's own FlowMatchEulerDiscreteScheduler config: dev shifts by image size at inference, schnell not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if schnell:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )


def tiny_flux_pipeline(seed: int = 0, schnell: bool = False, layers: int = 1, single_layers: int = 1) -> Any:
    """Tiny Flux.1 (dev: guidance embedding; schnell: none): CLIP-L-like pooled text, a 2-layer T5, a transformer
    with `layers` double and `single_layers` single blocks, the 16-channel packing of 2x2 patches of 4 latents."""
    import tempfile

    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
    tokenizer_2 = t5_tokenizer(256 if schnell else 512)
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=not schnell,
    )
    return FluxPipeline(
        scheduler=flux_scheduler(schnell),
        vae=flux_vae(),
        text_encoder=CLIPTextModel(clip_text_config(hidden_act="quick_gelu")),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
