"""The tiny FLUX.2 [klein] pipeline (random weights, built from configs) for the tests and the demo, and klein's
own scheduler config."""

from __future__ import annotations

from typing import Any

from sdlora.families.offline_text import qwen_tokenizer

# Deep enough that the pipeline's own hidden layers (9, 18, 27) exist and none of them is the last (normed) one,
# as in the real 36-layer Qwen3-4B/8B: the pipeline, diffusers' loaders and sdlora then need no layer choice of
# their own for the tiny model (a 3-layer encoder would need `text_encoder_out_layers` passed to every call).
TEXT_LAYERS = 28


def klein_scheduler() -> Any:
    """FLUX.2 [klein]'s FlowMatchEulerDiscreteScheduler config: the shift is dynamic (the pipeline passes mu from
    compute_empirical_mu), so the scheduler's own sigmas, and diffusers' klein training script's, are unshifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def klein_vae(seed: int = 0) -> Any:
    """A tiny AutoencoderKLFlux2: 8x downsampling as the real one, 4 latent channels (the real one has 32), and
    batch-norm running statistics that are not the identity, so that the normalisation is seen in the tests."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae


def tiny_klein_pipeline(seed: int = 0, distilled: bool = False) -> Any:
    """Tiny FLUX.2 [klein] (base; `distilled`: the step-distilled checkpoint's pipeline config): a 28-layer Qwen3
    of width 16 behind the byte-level Qwen tokenizer (text width 3 x 16 = 48), a transformer of width 32 with 1
    double and 2 single blocks and no guidance embedding, the tiny AutoencoderKLFlux2 above."""
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 2x2 patches of 4 latent channels
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # three stacked Qwen3 layers of width 16
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    return Flux2KleinPipeline(
        scheduler=klein_scheduler(),
        vae=klein_vae(seed),
        text_encoder=Qwen3ForCausalLM(text),
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )
