"""SDXL: a UNet conditioned on two CLIP text encoders (penultimate hidden states side by side), the second one's
pooled embedding and each image's size/crop "time ids"; kohya names its UNet modules by the original SGM paths."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdlora.families import Conditioning
from sdlora.families.sd.family import (
    UNetFamily,
    cross_attention_widths,
    inpainting_kind,
    one_prefix_each,
    token_ids,
)


@dataclass(frozen=True)
class StableDiffusionXL(UNetFamily):
    name: str = "sdxl"
    label: str = "SDXL"
    denoiser: str = "unet"
    denoiser_label: str = "UNet"
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    trainable_text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    text_width: int = 2048  # both encoders' hidden states, concatenated
    single_file_pipeline: str = "StableDiffusionXLPipeline"
    supports_refiner: bool = True
    vae_fp32: bool = True  # SDXL's own VAE overflows in fp16 (NaN latents, black images)
    # kohya marks SDXL LoRAs with Stability's implementation (SGM names).
    kohya_implementation: str = "https://github.com/Stability-AI/generative-models"
    kohya_versions: tuple[str, ...] = ("sdxl",)
    modelspec_prefix: str = "stable-diffusion-xl"
    embedding_keys: tuple[tuple[str, str], ...] = (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))
    # (hub id, the single file its publishers give ComfyUI users)
    comfyui_checkpoints: tuple[tuple[str, str], ...] = (
        ("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
        ("stabilityai/stable-diffusion-xl-refiner-1.0", "sd_xl_refiner_1.0.safetensors"),
    )

    def claims(self, pipe: Any) -> bool:
        config = getattr(getattr(pipe, "unet", None), "config", None)
        return getattr(config, "addition_embed_type", None) == "text_time"

    def claims_checkpoint(self, keys: set[str]) -> bool:
        # An original-format SDXL checkpoint has a second text encoder under `conditioner.embedders.1`.
        return any(key.startswith("conditioner.embedders.1.") for key in keys)

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        return cross_attention_widths(pipe)

    def inpainting_kind(self, pipe: Any) -> str | None:
        return inpainting_kind(pipe)

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        return "stable-diffusion-xl-v1-base/lora"

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        """As StableDiffusionXLPipeline.encode_prompt computes it: both encoders' penultimate hidden states side by
        side, (B, 77, D1 + D2), and the second encoder's pooled, projected embedding, (B, P)."""
        import torch

        hidden = []
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            output = encoder(token_ids(tokenizer, prompts, encoder), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": output.text_embeds}

    def predict(
        self,
        model: Any,
        noisy: Any,
        timesteps: Any,
        cond: Conditioning,
        micro_conditioning: Any,
        guidance: float | None = None,
    ) -> Any:
        added = {"text_embeds": cond["text_embeds"], "time_ids": micro_conditioning}
        return model(
            noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        from sdlora.families.sdxl.keys import sgm_namer

        rename = sgm_namer(denoiser.config)
        return lambda path: (rename(path), 0, 1)

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        """lora_te2_ for the encoder with a projection (OpenCLIP bigG), else lora_te1_, so that a list holding only
        the second encoder is still named right."""
        prefixes = ["lora_te2_" if hasattr(e, "text_projection") else "lora_te1_" for e in encoders]
        return one_prefix_each(prefixes, self.name)

    def save_single_file(self, pipe: Any, path: Any) -> None:
        from sdlora.families.sdxl.single_file import write_single_file

        write_single_file(pipe, path)

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.sdxl.tiny import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed=seed)


SDXL = StableDiffusionXL()
