"""The tiny Qwen-Image pipeline (random weights, built from configs) for the tests and the demo, and Qwen-Image's
own scheduler config."""

from __future__ import annotations

from typing import Any

from sdlora.families.offline_text import qwen_tokenizer

# Qwen/Qwen-Image's scheduler_config.json: the shift is dynamic (the pipeline passes mu from the image's token
# count, exponential time shift between base_shift and max_shift, sigmas stretched to end at shift_terminal).
SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


def qwenimage_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def qwenimage_vae(seed: int = 0) -> Any:
    """A tiny AutoencoderKLQwenImage: 8x spatial downsampling as the real one (three stages), 4 latent channels (the
    real one has 16), and per-channel latents_mean/std that are not the identity, so that the normalisation is seen
    in the tests."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    generator = torch.Generator().manual_seed(seed)
    mean = (0.1 * torch.randn(4, generator=generator)).tolist()
    std = (0.5 + torch.rand(4, generator=generator)).tolist()
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=mean,
        latents_std=std,
    )


def tiny_qwenimage_pipeline(seed: int = 0) -> Any:
    """Tiny Qwen-Image: a 2-layer Qwen2.5-VL (text width 16, a 2-layer vision tower never used for text-to-image)
    behind the byte-level Qwen tokenizer, a transformer of width 48 (3 heads of 16) with 2 blocks, the tiny VAE
    above."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**tiny_parts(seed))


def tiny_parts(seed: int = 0, **transformer: Any) -> dict[str, Any]:
    """The tiny pipeline's components, by pipeline argument (the Edit pipelines add their processor); `transformer`:
    config changes (Edit-2511's zero_cond_t)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text = vl_config(tokenizer)
    denoiser = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 2x2 patches of 4 latent channels
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        **transformer,
    )
    return {
        "scheduler": qwenimage_scheduler(),
        "vae": qwenimage_vae(seed),
        "text_encoder": Qwen2_5_VLForConditionalGeneration(text).eval(),
        "tokenizer": tokenizer,
        "transformer": denoiser,
    }


def vl_config(tokenizer: Any) -> Any:
    """A 2-layer Qwen2.5-VL of text width 16 with a 2-layer vision tower (the Edit pipelines use it; text-to-image
    never does), its special-token ids those of the tiny byte-level `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.pad_token_id,  # the real ids (151643/151645) lie outside the tiny vocabulary
            "eos_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tokenizer),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|image_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
