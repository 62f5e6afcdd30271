"""Flux.1 (dev and schnell): a rectified-flow transformer (double blocks with separate image and text streams,
then single blocks) on 2x2-packed latents, conditioned on CLIP-L's pooled output and T5's hidden states;
FLUX.1-dev also takes its distilled guidance value through an embedding. Kohya names its modules by Black Forest
Labs' original paths, with q, k and v fused (sdlora.families.flux.keys)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora.errors import UsageError
from sdlora.families import Conditioning, pipeline_class
from sdlora.families.comfyui import ComfyParts, checkpoint_file, loader
from sdlora.families.flow import cached_rows, denoiser_config, model_class
from sdlora.families.flux.keys import BFL_MARKER, bfl_module
from sdlora.families.sd.family import TEXT_ENCODER_ATTENTION, one_prefix_each

# peft matches a string target against the whole module path: the double blocks only (`single_transformer_blocks`
# does not match from the start).
DOUBLE_ATTENTION = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)
DOUBLE_FEED_FORWARD = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
SINGLE_BLOCKS = r"single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)"
SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}  # T5 tokens, as kohya and BFL use them
GENERATE_DEFAULTS = {
    "dev": {"generate.steps": 28, "generate.cfg": 3.5, "generate.scheduler": "flow_euler"},
    "schnell": {"generate.steps": 4, "generate.cfg": 0.0, "generate.scheduler": "flow_euler"},
}
# The single files Black Forest Labs publish (ComfyUI's diffusion_models folder), and ComfyUI's own text encoder
# and VAE files (Comfy-Org's repackaged ones: text_encoders/, vae/).
COMFYUI_CHECKPOINTS = {
    "black-forest-labs/FLUX.1-dev": "flux1-dev.safetensors",
    "black-forest-labs/FLUX.1-schnell": "flux1-schnell.safetensors",
}
FILES_NOTE = "clip_l, t5xxl_fp16: comfyanonymous/flux_text_encoders; ae.safetensors: the base's own repository"
# ComfyUI pads T5 prompts to 256 tokens (at least), diffusers' FluxPipeline to max_sequence_length: for dev 512 by
# default, and T5 and the transformer attend to the padding (docs/parity.md: up to 10/255 apart on the tiny Flux).
T5_NOTE = (
    "T5 prompts: ComfyUI pads them to 256 tokens, sdlora renders FLUX.1 [dev] with 512 unless "
    "model.max_sequence_length = 256 (set it for renders ComfyUI reproduces)"
)
DEFAULT_TIMESTEPS = ("shift", 3.1582)  # kohya's recommendation for Flux.1 person LoRAs


def pack(latents: Any) -> Any:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Any, height: int, width: int) -> Any:
    """The inverse of `pack` for latents of (height, width)."""
    b, _, d = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: Any) -> Any:
    """Positions (row, column) of the packed tokens for the rotary embedding: (H/2 * W/2, 3)."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Flux:
    name: str = "flux"
    label: str = "Flux.1"
    denoiser: str = "transformer"
    denoiser_label: str = "transformer"
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)  # T5 is never trained
    text_width: int = 4096  # T5-XXL's hidden states
    single_file_pipeline: str = "FluxPipeline"
    checkpoint_of: str = ""  # its single files have their own names
    supports_refiner: bool = False
    vae_fp32: bool = False
    kohya_implementation: str = "https://github.com/black-forest-labs/flux"
    kohya_versions: tuple[str, ...] = ("flux1", "flux")
    modelspec_prefix: str = "flux-1"
    # No pivotal tuning (train.pivotal refuses Flux.1): only CLIP-L could take new tokens (T5 is never trained), and
    # it gives the transformer just one pooled vector while the prompt's words reach it through T5.
    embedding_keys: tuple[tuple[str, str], ...] = ()
    samplers: tuple[str, ...] = ("flow_euler",)
    guidance_label: str | None = "Distilled CFG Scale"  # Forge's name for the guidance embedding's value
    size_multiple: int = 16  # 8x VAE, then 2x2 patches
    stage_frozen: bool = True  # T5-XXL (9.5 GB) and the VAE visit the device one at a time, only to be cached
    comfyui_diffusers_file: bool = True  # ComfyUI reads Flux diffusers keys (with .alpha, text_model. paths)
    adapter_kinds: tuple[str, ...] | None = None  # every kind (fused qkv modules: sdlora.lora.kohya.refuse_fused)
    lycoris_names: bool = False  # Forge reads kohya's names
    photo_pipeline: str | None = None  # diffusers' AutoPipelineForImage2Image/ForInpainting pick them
    edit_training: bool = False
    reference_pipelines: tuple[tuple[str, int], ...] = (("FluxKontextPipeline", 1),)  # FLUX.1 Kontext: one photo

    def claims(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        config = getattr(transformer, "config", None)
        return model_class(transformer) == "FluxTransformer2DModel" and hasattr(config, "pooled_projection_dim")

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(key.endswith(BFL_MARKER) for key in keys) and not any("single_stream_modulation" in k for k in keys)

    def variant(self, pipe: Any) -> str:
        """dev (guidance-distilled: a guidance embedding) or schnell (timestep-distilled: none)."""
        return "dev" if pipe.transformer.config.guidance_embeds else "schnell"

    def is_distilled(self, pipe: Any) -> bool:
        """False: FLUX.1-dev and -schnell are what people train on (schnell's own handling stands as it is)."""
        return False

    def undistilled_base(self, pipe: Any) -> str:
        return ""

    def prediction_type(self, pipe: Any) -> str:
        return "flow"

    def inpainting_kind(self, pipe: Any) -> str | None:
        channels = pipe.transformer.config.in_channels
        return f"{channels}-channel Fill transformer" if channels > 4 * pipe.vae.config.latent_channels else None

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        return {pipe.transformer.config.joint_attention_dim}

    def kohya_base_version(self, prediction_type: str, variant: str = "dev") -> str:
        return "flux1"

    def modelspec_architecture(self, prediction_type: str, variant: str = "dev") -> str:
        return f"flux-1-{variant or 'dev'}/lora"

    def sequence_length(self, pipe: Any, configured: int | None) -> int | None:
        """T5 tokens per prompt: `model.max_sequence_length`, else 512 for dev and 256 for schnell."""
        return configured or SEQUENCE_LENGTH[self.variant(pipe)]

    def text_to_image(self, pipe: Any) -> Any:
        return pipe

    def generate_defaults(self, pipe: Any) -> dict[str, Any]:
        return dict(GENERATE_DEFAULTS[self.variant(pipe)])

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        raise UsageError(f"{self.label} bases take no control images (edit_training)")

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        """As FluxPipeline.encode_prompt computes it: CLIP's pooled output (B, 768) and T5's last hidden states
        (B, max_sequence_length, 4096), no attention mask; an encoder given as None adds nothing."""
        cond: Conditioning = {}
        lengths = (tokenizers[0].model_max_length, max_sequence_length or 512)
        for tokenizer, encoder, length, key in zip(
            tokenizers, encoders, lengths, ("pooled_projections", "encoder_hidden_states"), strict=True
        ):
            if encoder is None:  # encoded apart (one encoder on the device at a time)
                continue
            device = next(encoder.parameters()).device
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            output = encoder(ids.input_ids.to(device), output_hidden_states=False)
            cond[key] = output.pooler_output if key == "pooled_projections" else output[0]
        return cond

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> ComfyParts:
        """UNETLoader + DualCLIPLoader (type flux) + VAELoader; dev: the scheduler's size-dependent shift as
        ModelSamplingFlux and guidance as FluxGuidance (KSampler's cfg 1, as the pipeline runs no true CFG);
        schnell: its static shift, no guidance."""
        name, note = checkpoint_file(base, COMFYUI_CHECKPOINTS)
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            shifts = {"max_shift": config.get("max_shift", 1.15), "base_shift": config.get("base_shift", 0.5)}
            sampling = loader("ModelSamplingFlux", **shifts, width=width, height=height)
        else:  # the scheduler's static `shift` (schnell's: 1, none; ComfyUI's FluxSchnell default is the same)
            sampling = loader("ModelSamplingAuraFlow", shift=float(config.get("shift", 1.0)))
        dev = self.variant(pipe) == "dev"
        kontext = pipeline_class(pipe) in dict(self.reference_pipelines)
        return ComfyParts(
            nodes={
                "unet": loader("UNETLoader", unet_name=name, weight_dtype="default"),
                "clip": loader(
                    "DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux"
                ),
                "vae": loader("VAELoader", vae_name="ae.safetensors"),
            },
            model=["unet", 0],
            clip=["clip", 0],
            vae=["vae", 0],
            latent="EmptySD3LatentImage",
            cfg=1.0,
            sampling=sampling,
            guidance=loader("FluxGuidance", guidance=cfg) if dev else None,
            notes=((note,) if note else ())
            + (FILES_NOTE, "the negative prompt is unused: no true CFG, as in diffusers")
            + ((T5_NOTE,) if dev else ()),
            references="ReferenceLatent" if kontext else None,
            # FLUX.1 Kontext's photo: scaled to the preferred size nearest its aspect, as diffusers' _auto_resize
            reference_scale=loader("FluxKontextImageScale") if kontext else None,
        )

    def render_from_cache(self, pipe: Any, rows: dict[str, Conditioning]) -> None:
        """Make `pipe` render from cached conditioning (staged training: the frozen text encoders are gone): its
        encode_prompt looks each prompt's rows up in `rows` ({prompt: {"encoder_hidden_states": (L, 4096),
        "pooled_projections": (768,)}}); a CLIP-L that trains (no pooled rows) still encodes its part live."""
        pipe.encode_prompt = CachedPrompts(pipe, rows)

    def predict(
        self,
        model: Any,
        noisy: Any,
        timesteps: Any,
        cond: Conditioning,
        micro_conditioning: Any,
        guidance: float | None = None,
    ) -> Any:
        """The velocity for (B, C, H, W) latents at sigmas `timesteps` (B,): packed into 2x2 tokens with their
        positions, the transformer's timestep in [0, 1] (it multiplies by 1000), `guidance` (default 1.0) only for
        a model with a guidance embedding; unpacked back to (B, C, H, W)."""
        import torch

        b, _, h, w = noisy.shape
        hidden = cond["encoder_hidden_states"]
        config = denoiser_config(model)
        guidance_in = None
        if config.guidance_embeds:
            guidance_in = torch.full((b,), 1.0 if guidance is None else guidance, device=noisy.device)
        out = model(
            hidden_states=pack(noisy),
            timestep=timesteps.to(noisy.dtype),
            guidance=guidance_in,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(h, w, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def objective(self, scheduler: Any, device: Any, sampling: str = "auto", shift: float | None = None) -> Any:
        from sdlora.objectives import FlowMatching

        scheme = DEFAULT_TIMESTEPS[0] if sampling == "auto" else sampling
        return FlowMatching(scheme, DEFAULT_TIMESTEPS[1] if shift is None else shift)

    def denoiser_targets(self, targets: str) -> str:
        """A regular expression over module paths (peft matches it whole): the double blocks' attention, and with
        'all' their feed-forward layers and the single blocks' attention, MLP input and output projections."""
        if targets == "all":
            return f"({DOUBLE_ATTENTION})|({DOUBLE_FEED_FORWARD})|({SINGLE_BLOCKS})"
        return DOUBLE_ATTENTION

    def text_encoder_targets(self) -> list[str]:
        return list(TEXT_ENCODER_ATTENTION)

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        return bfl_module

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        """CLIP-L is kohya's te1 (T5, te3, never carries LoRA here)."""
        for encoder in encoders:
            if type(encoder).__name__.startswith("T5"):
                raise UsageError("Flux's T5 text encoder is never trained: it has no LoRA to save")
        return one_prefix_each(["lora_te1_"] * len(encoders), self.name)

    def ui_lora_state(self, denoiser: Any, text_encoders: Sequence[Any], adapter: str, dtype: Any) -> dict | None:
        return None  # kohya's BFL names: what Forge and ComfyUI read

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """Packed (B, N, 4C) latents of a pipeline call -> what the VAE decodes: unpacked, unnormalised."""
        vae = pipe.vae
        factor = pipe.vae_scale_factor * 2
        unpacked = unpack(latents, 2 * (height // factor), 2 * (width // factor))
        return self.denormalize_latents(vae, unpacked.to(vae.dtype))

    def normalize_latents(self, vae: Any, latents: Any) -> Any:
        """Shifted, then scaled (Flux's AE: shift 0.1159, scale 0.3611), as diffusers' Flux training script does."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def denormalize_latents(self, vae: Any, latents: Any) -> Any:
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def x0_prediction(self, scheduler: Any, model_output: Any, timestep: Any, sample: Any, out: Any) -> Any:
        """x_0 = x_t - sigma v, with the sigma of the step just taken (`step` has advanced step_index past it)."""
        from sdlora.objectives import flow_x0

        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device).expand(sample.shape[0])
        return flow_x0(sample, model_output.to(sample.dtype), sigma)

    def load_single_file(self, path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
        """A BFL or ComfyUI single file (flux1-dev.safetensors, also float8_e4m3fn): its transformer, converted
        by our own BFL names at the widths of `config`'s transformer, and the rest of `config`'s pipeline."""
        from sdlora.families.flux.single_file import load_pipeline

        return load_pipeline(path, config, kwargs)

    def save_single_file(self, pipe: Any, path: Any) -> None:
        """BFL's own transformer-only file, as `flux1-dev.safetensors` ships."""
        from sdlora.families.flux.single_file import write_single_file

        write_single_file(pipe, path)

    def kohya_metadata(self, info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
        """kohya's Flux training settings (`ss_guidance_scale`, `ss_timestep_sampling`, ...)."""
        from sdlora.families.flux.metadata import training_metadata

        return training_metadata(info, train, max_sequence_length)

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.flux.tiny import tiny_flux_pipeline

        return tiny_flux_pipeline(seed=seed)


@dataclass(frozen=True)
class CachedPrompts:
    """FluxPipeline.encode_prompt from cached rows: what the pipeline computes, without its frozen text encoders."""

    pipe: Any
    rows: dict[str, Conditioning]

    def __call__(
        self,
        prompt: str | list[str],
        prompt_2: Any = None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        max_sequence_length: int = 512,
        lora_scale: float | None = None,
    ) -> tuple[Any, Any, Any]:
        import torch

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cached_rows(self.rows, prompts, "its text encoders were")
        device = device or self.pipe._execution_device

        def stacked(key: str) -> Any:
            rows = torch.stack([self.rows[p][key] for p in prompts]).to(device)
            return rows.repeat_interleave(num_images_per_prompt, dim=0)  # as the pipeline repeats each prompt

        if prompt_embeds is None:
            prompt_embeds = stacked("encoder_hidden_states")
            if "pooled_projections" in self.rows[prompts[0]]:
                pooled_prompt_embeds = stacked("pooled_projections")
            else:  # CLIP-L trains: its pooled output is computed live, as the pipeline does
                pooled_prompt_embeds = self.pipe._get_clip_prompt_embeds(
                    prompt=prompts, device=device, num_images_per_prompt=num_images_per_prompt
                )
        encoder = self.pipe.text_encoder
        dtype = encoder.dtype if encoder is not None else prompt_embeds.dtype  # the frozen CLIP-L's, as cached
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids


FLUX = Flux()
