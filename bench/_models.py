"""The real SD 1.5 / SDXL architectures from their published configs with random weights (no download), reduced-depth
Flux.1, Z-Image, FLUX.2 [klein] 4B and Qwen-Image (bench/qwen_models.py) with the real widths, and the tiny test
models: what the benchmark scripts run on. Speed and memory do not depend on the weights' values."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

MODELS = ("tiny", "tiny-sdxl", "tiny-flux", "tiny-zimage", "tiny-klein", "sd15", "sdxl", "flux", "zimage", "klein")
MODELS += ("zimage-6b", "klein-4b")  # the transformers at full depth (text encoders reduced: see FULL_DEPTH)
MODELS += ("tiny-qwenimage", "qwenimage", "qwenimage-20b")  # bench/qwen_models.py
# The family each model is (sdlora.families' name).
FAMILY = {"tiny": "sd1", "tiny-sdxl": "sdxl", "sd15": "sd1", "sdxl": "sdxl", "tiny-flux": "flux", "flux": "flux"}
FAMILY |= {"tiny-zimage": "zimage", "zimage": "zimage", "tiny-klein": "klein", "klein": "klein"}
FAMILY |= {"zimage-6b": "zimage", "klein-4b": "klein"}
FAMILY |= {"tiny-qwenimage": "qwenimage", "qwenimage": "qwenimage", "qwenimage-20b": "qwenimage"}

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
# Qwen3-4B (Qwen/Qwen3-4B config.json), the text encoder of Z-Image and FLUX.2 [klein] 4B: width 2560, the real
# vocabulary (its embedding is 389 M of the encoder's weights), tied embeddings; depth is set per model (36 real).
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
# Z-Image (Tongyi-MAI/Z-Image transformer/config.json; diffusers' ZImageTransformer2DModel defaults are the same):
# dim 3840 = 30 heads x 128, caption width 2560 (Qwen3-4B), 16 latent channels in 2x2 patches. FLUX.1's AE.
ZIMAGE_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
# The `zimage` model's reduced depth (Z-Image: 30 layers, 2 refiner layers on each side, Qwen3 36 layers; the
# caption is Qwen3's second-to-last hidden layer, so 2 layers is the least).
ZIMAGE_DEPTH = {"layers": 2, "refiner": 1, "qwen3": 2}
# FLUX.2 [klein] 4B (black-forest-labs/FLUX.2-klein-4B transformer/config.json): hidden 3072 = 24 heads x 128, text
# width 7680 = three stacked Qwen3-4B hidden layers, 128 input channels (32 latent channels in 2x2 patches), no
# guidance embedding; 5 double + 20 single blocks.
KLEIN_4B_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
# The `klein` model's reduced depth. klein stacks Qwen3's hidden layers 9, 18 and 27 (of 36), so its Qwen3 keeps
# 27 layers, at the real width 2560 and vocabulary but with narrow layers (QWEN3_NARROW), so that it weighs about
# what Z-Image's 2-layer one does (0.6 B) instead of 3.1 B: its output (27 x 2560 -> 7680 wide) is the real shape.
KLEIN_DEPTH = {"double": 1, "single": 2, "qwen3": 27}
QWEN3_NARROW = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
# `zimage-6b` and `klein-4b` (the GPU benchmark): every transformer layer; Qwen3 stays at the reduced depth, since
# both trainers cache the captions and move Qwen3 off the GPU before the first step (the steps never see it).
FULL_DEPTH = {
    "zimage-6b": {**ZIMAGE_DEPTH, "layers": 30, "refiner": 2},
    "klein-4b": {**KLEIN_DEPTH, "double": 5, "single": 20},
}
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
)


def native_resolution(model: str) -> int:
    return 64 if model.startswith("tiny") else {"sd15": 512}.get(model, 1024)


def build_pipeline(model: str, seed: int = 0, device: str = "cpu") -> Any:
    """A diffusers pipeline of `model` with random weights, built in fp32 directly on `device`."""
    import torch

    if model == "tiny-flux":
        from sdlora.families.flux.tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(seed=seed)
    if model in ("tiny-zimage", "tiny-klein", "tiny-qwenimage"):
        from sdlora import families

        return families.get(FAMILY[model]).tiny_pipeline(seed)
    if model.startswith("tiny"):
        from sdlora.testing import build_tiny_pipeline

        return build_tiny_pipeline("sdxl" if model == "tiny-sdxl" else "sd1", seed=seed)
    if model not in MODELS:
        raise SystemExit(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU is seconds instead of minutes for SDXL
        if FAMILY[model] == "qwenimage":
            from qwen_models import FULL_DEPTH as QWEN_FULL_DEPTH
            from qwen_models import build_qwenimage

            return build_qwenimage(QWEN_FULL_DEPTH.get(model), device)
        if FAMILY[model] in ("zimage", "klein"):
            return {"zimage": build_zimage, "klein": build_klein}[FAMILY[model]](FULL_DEPTH.get(model), device)
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


def qwen3_4b(layers: int, causal_lm: bool = False, narrow: bool = False) -> Any:
    """Qwen3-4B's widths and vocabulary at `layers` layers (`narrow`: QWEN3_NARROW's attention and MLP), behind the
    offline byte-level Qwen tokenizer (whose ids are all within the real vocabulary): Qwen3Model for Z-Image,
    Qwen3ForCausalLM for klein."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from sdlora.families.offline_text import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    widths = QWEN3_4B | (QWEN3_NARROW if narrow else {})
    config = Qwen3Config(**widths, num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config), tokenizer


def zimage_transformer(layers: int, refiner: int, device: str = "cpu") -> Any:
    """ZImageTransformer2DModel at Z-Image's widths with `layers` main and `refiner` refiner layers (each side)."""
    import torch
    from diffusers import ZImageTransformer2DModel

    with torch.device(device):
        return ZImageTransformer2DModel(**{**ZIMAGE_TRANSFORMER, "n_layers": layers, "n_refiner_layers": refiner})


def klein_transformer(double: int, single: int, device: str = "cpu") -> Any:
    """Flux2Transformer2DModel at FLUX.2 [klein] 4B's widths with `double` + `single` blocks."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device(device):
        return Flux2Transformer2DModel(**{**KLEIN_4B_TRANSFORMER, "num_layers": double, "num_single_layers": single})


def build_zimage(depth: dict[str, int] | None = None, device: str = "cpu") -> Any:
    """Z-Image (the undistilled base's scheduler, static shift 6) at `depth` (default ZIMAGE_DEPTH), real widths."""
    from diffusers import AutoencoderKL, ZImagePipeline

    from sdlora.families.zimage.tiny import zimage_scheduler

    depth = depth or ZIMAGE_DEPTH
    text_encoder, tokenizer = qwen3_4b(depth["qwen3"])
    return ZImagePipeline(
        scheduler=zimage_scheduler(),
        vae=AutoencoderKL(**FLUX_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=zimage_transformer(depth["layers"], depth["refiner"], device),
    )


def build_klein(depth: dict[str, int] | None = None, device: str = "cpu") -> Any:
    """FLUX.2 [klein] 4B, the undistilled base (`is_distilled` False), at `depth` (default KLEIN_DEPTH), real
    widths; the real FLUX.2 VAE (AutoencoderKLFlux2's defaults: 32 channels, batch-norm statistics) and the
    scheduler config diffusers' FLUX.2 conversion gives it (FLUX.1-dev's: dynamic shift)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from sdlora.families.flux.tiny import flux_scheduler  # diffusers' FLUX.2 conversion takes FLUX.1-dev's

    depth = depth or KLEIN_DEPTH
    text_encoder, tokenizer = qwen3_4b(depth["qwen3"], causal_lm=True, narrow=True)
    return Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=AutoencoderKLFlux2(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=klein_transformer(depth["double"], depth["single"], device),
        is_distilled=False,
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
