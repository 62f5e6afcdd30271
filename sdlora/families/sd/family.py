"""Stable Diffusion 1.x and 2.x: a UNet conditioned on one CLIP text encoder's last hidden states, DDPM training
(epsilon on SD 1.x, epsilon or v-prediction on SD 2.x, read from the scheduler)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdlora.errors import UsageError
from sdlora.families import Conditioning
from sdlora.families.comfyui import ComfyParts, checkpoint_file, loader, true_cfg, v_prediction

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Feed-forward and the transformer blocks' input/output projections (Conv2d 1x1 on SD 1.x, Linear on SD 2.x).
UNET_EXTRA = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
UNET_CROSS_ATTENTION = ["attn2.to_k", "attn2.to_v"]  # lora.targets = "cross_attention"
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Our names of the samplers for UNet bases (sdlora.generate.render.SCHEDULERS).
UNET_SAMPLERS = ("dpmpp_2m_karras", "euler_a", "euler", "ddim", "unipc")


def token_ids(tokenizer: Any, prompts: list[str], encoder: Any) -> Any:
    """Padded token ids of `prompts` (B, 77) on the encoder's device."""
    device = next(encoder.parameters()).device
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def unet_objective(scheduler: Any, device: Any, sampling: str = "auto") -> Any:
    """DDPM with the scheduler's noise schedule, kept before sampling swaps the pipeline's scheduler; integer
    timesteps are drawn uniformly (the other train.timestep_sampling schemes are for flow-matching bases)."""
    import torch

    from sdlora.objectives import DDPM

    if sampling not in ("auto", "uniform"):
        raise UsageError(
            f"train.timestep_sampling {sampling!r} is for flow-matching bases (Flux.1); "
            "SD and SDXL bases train with 'uniform' (or 'auto')"
        )
    alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
    return DDPM(alphas_cumprod, scheduler.config.get("prediction_type", "epsilon"))


def unet_targets(targets: str) -> list[str]:
    """Module-name suffixes of the UNet layers that get LoRA ('attention', 'all' or 'cross_attention': the key and
    value projections of the cross-attention (attn2), the only layers that read the text, as Custom Diffusion
    trains)."""
    if targets == "cross_attention":
        return list(UNET_CROSS_ATTENTION)
    return UNET_ATTENTION + (UNET_EXTRA if targets == "all" else [])


def cross_attention_widths(pipe: Any) -> set[int]:
    dims = pipe.unet.config.cross_attention_dim
    return set(dims) if isinstance(dims, list | tuple) else {dims}


def inpainting_kind(pipe: Any) -> str | None:
    """Inpainting UNets take 9 channels: latents, mask and masked-image latents."""
    return "9-channel UNet" if pipe.unet.config.in_channels == 9 else None


def scheduler_x0(scheduler: Any, out: Any) -> Any:
    """The x0 prediction of a scheduler step: Euler, Euler a and DDIM return it (pred_original_sample);
    DPM-Solver++ and UniPC keep it as their latest model output."""
    if isinstance(out, tuple):
        if len(out) > 1:
            return out[1]
    elif getattr(out, "pred_original_sample", None) is not None:
        return out.pred_original_sample
    outputs = getattr(scheduler, "model_outputs", None)  # DPM-Solver++ / UniPC: x0 predictions, newest last
    return outputs[-1] if outputs and outputs[-1] is not None else None


class UNetFamily:
    """What SD 1.x/2.x and SDXL share beyond the functions above (a mixin of methods, no state)."""

    trainable_text_encoders: tuple[str, ...]
    comfyui_checkpoints: tuple[tuple[str, str], ...]
    samplers: tuple[str, ...] = UNET_SAMPLERS
    guidance_label: str | None = None
    size_multiple: int = 8
    checkpoint_of: str = ""  # its single files have their own names
    stage_frozen: bool = False
    comfyui_diffusers_file: bool = False  # ComfyUI reads no diffusers-format SD keys at all
    photo_pipeline: str | None = None  # diffusers' AutoPipelineForImage2Image/ForInpainting pick them
    edit_training: bool = False
    reference_pipelines: tuple[tuple[str, int], ...] = ()
    adapter_kinds: tuple[str, ...] | None = None  # every kind: kohya's LoRA and LyCORIS's DoRA/LoKr keys
    lycoris_names: bool = False  # A1111 and Forge read kohya's names alone

    def variant(self, pipe: Any) -> str:
        return ""

    def is_distilled(self, pipe: Any) -> bool:
        return False

    def undistilled_base(self, pipe: Any) -> str:
        return ""

    def prediction_type(self, pipe: Any) -> str:
        return pipe.scheduler.config.get("prediction_type", "epsilon")

    def sequence_length(self, pipe: Any, configured: int | None) -> int | None:
        return None

    def text_to_image(self, pipe: Any) -> Any:
        return pipe

    def generate_defaults(self, pipe: Any) -> dict[str, Any]:
        return {}

    def objective(self, scheduler: Any, device: Any, sampling: str = "auto", shift: float | None = None) -> Any:
        return unet_objective(scheduler, device, sampling)

    def denoiser_targets(self, targets: str) -> list[str]:
        return unet_targets(targets)

    def text_encoder_targets(self) -> list[str]:
        return list(TEXT_ENCODER_ATTENTION)

    def normalize_latents(self, vae: Any, latents: Any) -> Any:
        """Scaled by the VAE's scaling_factor (SD 1.x 0.18215, SDXL 0.13025): unit variance for the UNet."""
        return latents * vae.config.scaling_factor

    def denormalize_latents(self, vae: Any, latents: Any) -> Any:
        return latents / vae.config.scaling_factor

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        return self.denormalize_latents(pipe.vae, latents.to(pipe.vae.dtype))

    def render_from_cache(self, pipe: Any, rows: dict[str, Conditioning]) -> None:
        raise NotImplementedError("UNet families keep their text encoders (stage_frozen is False)")

    def kohya_metadata(self, info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
        return {}  # kohya's common keys (sdlora.lora.kohya.build_metadata) say all

    def x0_prediction(self, scheduler: Any, model_output: Any, timestep: Any, sample: Any, out: Any) -> Any:
        return scheduler_x0(scheduler, out)

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        return None  # diffusers' from_single_file reads LDM/SGM checkpoints whole

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> ComfyParts:
        """One CheckpointLoaderSimple (UNet, CLIP and VAE in one file), true CFG, v-prediction said outright."""
        name, note = checkpoint_file(base, dict(self.comfyui_checkpoints))
        return ComfyParts(
            nodes={"checkpoint": loader("CheckpointLoaderSimple", ckpt_name=name)},
            model=["checkpoint", 0],
            clip=["checkpoint", 1],
            vae=["checkpoint", 2],
            latent="EmptyLatentImage",
            cfg=true_cfg(cfg),
            sampling=v_prediction(pipe.scheduler.config),
            notes=(note,) if note else (),
        )

    def ui_lora_state(self, denoiser: Any, text_encoders: Sequence[Any], adapter: str, dtype: Any) -> dict | None:
        return None  # kohya's names: what A1111, Forge and ComfyUI read

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        raise UsageError(f"{self.label} bases take no control images (edit_training)")


def one_prefix_each(prefixes: list[str], family: str) -> list[str]:
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"{family}: text encoders {prefixes} would share a key prefix; pass each encoder once")
    return prefixes


@dataclass(frozen=True)
class StableDiffusion(UNetFamily):
    """SD 1.x (`v2=False`) or SD 2.x: SD 2.x's transformers use linear projections and OpenCLIP-H text."""

    name: str
    label: str
    v2: bool
    text_width: int
    modelspec_prefix: str
    denoiser: str = "unet"
    denoiser_label: str = "UNet"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)
    single_file_pipeline: str = "StableDiffusionPipeline"
    supports_refiner: bool = False
    vae_fp32: bool = False
    kohya_implementation: str = "diffusers"
    embedding_keys: tuple[tuple[str, str], ...] = (("text_encoder", "clip_l"),)
    # (hub id, the single file its publishers give ComfyUI users) of the family's well-known bases
    comfyui_checkpoints: tuple[tuple[str, str], ...] = ()

    @property
    def kohya_versions(self) -> tuple[str, ...]:
        return ("sd_v2",) if self.v2 else ("sd_v1",)

    def claims(self, pipe: Any) -> bool:
        config = getattr(getattr(pipe, "unet", None), "config", None)
        if config is None or getattr(config, "addition_embed_type", None) == "text_time":
            return False
        return bool(getattr(config, "use_linear_projection", False)) == self.v2

    def claims_checkpoint(self, keys: set[str]) -> bool:
        # LDM checkpoints: SD 2.x's OpenCLIP text encoder lives under cond_stage_model.model.
        if not any(key.startswith("model.diffusion_model.") for key in keys):
            return False
        return any(key.startswith("cond_stage_model.model.") for key in keys) == self.v2

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        return cross_attention_widths(pipe)

    def inpainting_kind(self, pipe: Any) -> str | None:
        return inpainting_kind(pipe)

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        if not self.v2:
            return "sd_v1"
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        if not self.v2:
            return "stable-diffusion-v1/lora"
        v = prediction_type == "v_prediction"
        return "stable-diffusion-v2-768-v/lora" if v else "stable-diffusion-v2-512/lora"

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        return {"encoder_hidden_states": encoders[0](token_ids(tokenizers[0], prompts, encoders[0]))[0]}

    def predict(
        self,
        model: Any,
        noisy: Any,
        timesteps: Any,
        cond: Conditioning,
        micro_conditioning: Any,
        guidance: float | None = None,
    ) -> Any:
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        return lambda path: (path, 0, 1)  # kohya names SD 1.x/2.x UNet modules by their diffusers paths

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        return one_prefix_each(["lora_te_"] * len(encoders), self.name)

    def save_single_file(self, pipe: Any, path: Any) -> None:
        from sdlora.families.sd.single_file import write_single_file

        write_single_file(pipe, path)

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.sd.tiny import tiny_sd_pipeline

        return tiny_sd_pipeline(v2=self.v2, seed=seed)


SD1 = StableDiffusion(
    name="sd1",
    label="SD 1.x",
    v2=False,
    text_width=768,
    modelspec_prefix="stable-diffusion-v1",
    comfyui_checkpoints=(
        ("runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
    ),
)
SD2 = StableDiffusion(
    name="sd2",
    label="SD 2.x",
    v2=True,
    text_width=1024,
    modelspec_prefix="stable-diffusion-v2",
    embedding_keys=(("text_encoder", "clip_h"),),  # OpenCLIP ViT-H: ComfyUI's SD 2.x key
    comfyui_checkpoints=(
        ("stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors"),
        ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors"),
    ),
)
