"""The real SD 1.5 / SDXL architectures from their published configs with random weights (no download), and the
tiny test model: what the benchmark scripts run on. Speed and memory do not depend on the weights' values."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

MODELS = ("tiny", "tiny-sdxl", "sd15", "sdxl")

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
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
)


def native_resolution(model: str) -> int:
    return {"tiny": 64, "tiny-sdxl": 64, "sd15": 512, "sdxl": 1024}[model]


def build_pipeline(model: str, seed: int = 0, device: str = "cpu") -> Any:
    """A diffusers pipeline of `model` with random weights, built in fp32 directly on `device`."""
    import torch

    if model.startswith("tiny"):
        from sdlora.testing import build_tiny_pipeline

        return build_tiny_pipeline("sdxl" if model == "tiny-sdxl" else "sd1", seed=seed)
    if model not in MODELS:
        raise SystemExit(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU is seconds instead of minutes for SDXL
        return _build_sdxl() if model == "sdxl" else _build_sd15()


def _tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    from sdlora.testing import clip_tokenizer

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
