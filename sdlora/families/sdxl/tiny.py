"""The tiny SDXL pipeline (random weights, built from configs) for the tests and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.families.offline_text import clip_text_config, clip_tokenizer
from sdlora.families.sd.tiny import UNET, vae


def tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """Tiny SDXL: two text encoders (the second with a projection), text_time conditioning, Euler."""
    import tempfile

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
        tokenizer_2 = clip_tokenizer(Path(tmp) / "tok2", pad_token="!")
    unet = UNet2DConditionModel(
        **UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=CLIPTextModel(clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(hidden_act="gelu")),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def save_with_distinct_encoders(folder: Path, seed: int = 0) -> Path:
    """The tiny SDXL pipeline with its second text encoder wider than the first (48 vs 32), as a diffusers folder.

    diffusers' single-file loader tells SDXL's two text encoders apart by width (768 and 1280 in the real model):
    with the equal widths of the tiny SDXL it loads the first encoder's weights into the second.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = tiny_sdxl_pipeline(seed=seed)
    torch.manual_seed(seed + 1)
    te2_config = CLIPTextConfig.from_dict({**pipe.text_encoder_2.config.to_dict(), "hidden_size": 48})
    te2 = CLIPTextModelWithProjection(te2_config)
    width = pipe.text_encoder.config.hidden_size + te2_config.hidden_size  # the UNet attends to both, concatenated
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": width})
    wide = StableDiffusionXLPipeline(**{**pipe.components, "text_encoder_2": te2, "unet": unet})
    wide.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
