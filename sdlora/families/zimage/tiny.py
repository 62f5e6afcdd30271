"""The tiny Z-Image pipeline (random weights, built from configs) for the tests and the demo, and Z-Image's own
scheduler configs."""

from __future__ import annotations

from typing import Any

from sdlora.families.offline_text import qwen_tokenizer

# The scheduler's static shift tells the checkpoints apart (as InvokeAI reads it): Z-Image (the undistilled base)
# ships 6.0, Z-Image-Turbo (distilled) 3.0.
BASE_SHIFT, TURBO_SHIFT = 6.0, 3.0


def zimage_scheduler(turbo: bool = False) -> Any:
    """Z-Image's FlowMatchEulerDiscreteScheduler config: a static shift, no resolution-dependent one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = TURBO_SHIFT if turbo else BASE_SHIFT
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def tiny_zimage_pipeline(seed: int = 0, turbo: bool = False) -> Any:
    """Tiny Z-Image (Base; `turbo`: the distilled checkpoint's scheduler): a 2-layer Qwen3 text encoder of width
    16 behind the byte-level Qwen tokenizer, a transformer of width 32 with 2 layers and 1 refiner layer each side,
    FLUX.1's AE at 4 latent channels (the real one has 16)."""
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from sdlora.families.flux.tiny import flux_vae  # Z-Image uses FLUX.1's AE, shift and scale included

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],  # head dim 16 = their sum
        axes_lens=[1024, 64, 64],  # caption positions (<= 512 tokens) then image rows and columns of 2x2 patches
    )
    return ZImagePipeline(
        scheduler=zimage_scheduler(turbo),
        vae=flux_vae(),
        text_encoder=Qwen3Model(text),
        tokenizer=tokenizer,
        transformer=transformer,
    )
