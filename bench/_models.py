"""The real SD 1.5 / SDXL architectures from their published configs with random weights (no download), a
reduced-depth Flux.1 with the real widths, and the tiny test models: what the benchmark scripts run on. Speed and
memory do not depend on the weights' values."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

MODELS = ("tiny", "tiny-sdxl", "tiny-flux", "sd15", "sdxl", "flux")

# Published configs (stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0), typed in.
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=64,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu"
)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu")
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
# Flux.1's autoencoder (FLUX.1-dev vae/config.json): 16 latent channels, no quant convs, shift and scale.
FLUX_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=16,
    sample_size=1024,
    shift_factor=0.1159,
    scaling_factor=0.3611,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# T5-XXL v1.1 (FLUX.1-dev text_encoder_2/config.json) at FLUX_DEPTH's T5 depth: the real widths and vocabulary.
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
FLUX_DEPTH = {"double": 1, "single": 2, "t5": 2}  # the `flux` model: reduced depth (FLUX.1-dev: 19, 38, 24)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
)


def native_resolution(model: str) -> int:
    return {"tiny": 64, "tiny-sdxl": 64, "tiny-flux": 64, "sd15": 512, "sdxl": 1024, "flux": 1024}[model]


def build_pipeline(model: str, seed: int = 0, device: str = "cpu") -> Any:
    """A diffusers pipeline of `model` with random weights, built in fp32 directly on `device`."""
    import torch

    if model == "tiny-flux":
        from sdlora.families.flux.tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(seed=seed)
    if model.startswith("tiny"):
        from sdlora.testing import build_tiny_pipeline

        return build_tiny_pipeline("sdxl" if model == "tiny-sdxl" else "sd1", seed=seed)
    if model not in MODELS:
        raise SystemExit(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU is seconds instead of minutes for SDXL
        return {"sdxl": _build_sdxl, "flux": lambda: _build_flux(device)}.get(model, _build_sd15)()


def _tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    from sdlora.families.offline_text import clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return clip_tokenizer(Path(tmp) / "tok", pad_token=pad_token)


def _build_sd15() -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE, sample_size=512, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **CLIP_COMMON)),
        tokenizer=_tokenizer(),
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl() -> Any:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    big_g = CLIPTextConfig(**CLIP_G, **CLIP_COMMON, projection_dim=1280, pad_token_id=0)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **CLIP_COMMON)),
        text_encoder_2=CLIPTextModelWithProjection(big_g),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=EulerDiscreteScheduler(**SCHEDULER, timestep_spacing="leading"),
    )


def _build_flux(device: str) -> Any:
    """FLUX.1-dev's widths at FLUX_DEPTH: transformer (hidden 3072 = 24 heads x 128), CLIP-L, T5-XXL, the real AE;
    the tokenizers are the real CLIP BPE and sdlora.testing's small offline T5 vocabulary (ids within T5's)."""
    from diffusers import AutoencoderKL, FluxPipeline
    from flux_models import flux_transformer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sdlora.families.flux.tiny import flux_scheduler
    from sdlora.families.offline_text import t5_tokenizer

    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=AutoencoderKL(**FLUX_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **CLIP_COMMON)),
        tokenizer=_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(**T5_XXL, num_layers=FLUX_DEPTH["t5"])),
        tokenizer_2=t5_tokenizer(),
        transformer=flux_transformer(FLUX_DEPTH["double"], FLUX_DEPTH["single"], device=device),
    )


def write_dataset(folder: Path, count: int, resolution: int, caption: str = "a photo of sks person") -> Path:
    """`count` smooth random PNGs of `resolution` px with .txt captions: a plain sdlora dataset folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder
