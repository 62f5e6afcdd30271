"""Qwen-Image's real architecture (Qwen/Qwen-Image's published configs, typed in) at any depth, with random weights:
what the Qwen-Image benchmarks and the ComfyUI check run on. Speed and memory do not depend on the weights' values.

- `qwenimage` (the CPU benchmark): the transformer at its real widths with QWENIMAGE_DEPTH's 2 blocks (60 real),
  Qwen2.5-VL-7B's real text widths and vocabulary at 1 layer, the real VAE.
- `qwenimage-20b` (the GPU benchmark): every one of the 60 blocks (20.4 B parameters); Qwen2.5-VL stays reduced,
  since sdlora encodes the captions and frees it before the transformer loads (the steps never see it).
"""

from __future__ import annotations

from typing import Any

# Qwen/Qwen-Image transformer/config.json (diffusers' QwenImageTransformer2DModel defaults are the same): hidden
# 3072 = 24 heads x 128, text width 3584 (Qwen2.5-VL-7B), 64 input channels = 16 latent channels in 2x2 patches.
QWENIMAGE_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)
# Qwen/Qwen-Image text_encoder/config.json (Qwen2.5-VL-7B-Instruct): the language model's widths, its multimodal
# RoPE sections and vocabulary; the vision tower's widths (never used for text-to-image, loaded all the same).
QWEN25_VL_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
    vocab_size=152064,
    hidden_act="silu",
)
QWEN25_VL_VISION = dict(
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    tokens_per_second=2,
)
# Reduced depth: the transformer's blocks, Qwen2.5-VL's language layers (the pipeline takes the last hidden layer,
# so 1 is the least) and vision blocks (32 real). The 7B's lm_head (545 M, unused when encoding) is tied to the
# embedding here, so the encoder weighs 0.84 B instead of 1.39 B at this depth.
QWENIMAGE_DEPTH = {"layers": 2, "text_layers": 1, "vision_layers": 1}
FULL_DEPTH = {"qwenimage-20b": {**QWENIMAGE_DEPTH, "layers": 60}}


def qwenimage_transformer(layers: int, device: str = "cpu") -> Any:
    """QwenImageTransformer2DModel at Qwen-Image's widths with `layers` blocks, built on `device`."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device(device):
        return QwenImageTransformer2DModel(**{**QWENIMAGE_TRANSFORMER, "num_layers": layers})


def qwen25_vl(text_layers: int, vision_layers: int) -> tuple[Any, Any]:
    """Qwen2.5-VL-7B's widths and vocabulary at the given depths (lm_head tied: QWENIMAGE_DEPTH), behind sdlora's
    offline byte-level Qwen tokenizer (its ids are within the real vocabulary)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from sdlora.families.offline_text import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    pad = tokenizer.pad_token_id
    text = {**QWEN25_VL_TEXT, "num_hidden_layers": text_layers, "tie_word_embeddings": True}
    config = Qwen2_5_VLConfig(
        text_config={**text, "bos_token_id": pad, "eos_token_id": pad, "pad_token_id": pad},
        vision_config={**QWEN25_VL_VISION, "depth": vision_layers, "fullatt_block_indexes": [vision_layers - 1]},
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|image_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer


def build_qwenimage(depth: dict[str, int] | None = None, device: str = "cpu") -> Any:
    """Qwen-Image at `depth` (default QWENIMAGE_DEPTH), real widths: the real VAE (AutoencoderKLQwenImage's
    defaults are Qwen-Image's vae/config.json) and scheduler config."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    from sdlora.families.qwenimage.tiny import qwenimage_scheduler

    depth = depth or QWENIMAGE_DEPTH
    text_encoder, tokenizer = qwen25_vl(depth["text_layers"], depth["vision_layers"])
    return QwenImagePipeline(
        scheduler=qwenimage_scheduler(),
        vae=AutoencoderKLQwenImage(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=qwenimage_transformer(depth["layers"], device),
    )
