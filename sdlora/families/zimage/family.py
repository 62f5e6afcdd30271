"""Z-Image (Tongyi-MAI, 6B, Apache-2.0): a single-stream rectified-flow transformer over 2x2 patches of FLUX.1's AE
latents and a Qwen3-4B caption (the chat-templated prompt's second-to-last hidden layer, padding dropped: one
ragged (L_i, 2560) row per prompt). Its timestep runs the other way ((1000 - t) / 1000) and its output is the
negated velocity. Z-Image (Base, undistilled: 50 steps, CFG 5) and Z-Image-Turbo (distilled: 8 steps, no CFG) share
every weight shape; their schedulers' static shifts (6 and 3) tell them apart. ComfyUI reads its LoRAs under
`diffusion_model.` + diffusers names, never kohya's (sdlora.families.comfyui.baked_lora_state)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdlora.errors import UsageError
from sdlora.families import Conditioning
from sdlora.families.comfyui import ComfyParts, baked_lora_state, checkpoint_file, loader
from sdlora.families.flow import cached_rows, kohya_flow_metadata, model_class
from sdlora.families.zimage import keys

# peft name suffixes: every attention (main layers and both refiners, as diffusers' Z-Image script targets them);
# with 'all' also the SwiGLU feed-forward layers.
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
SEQUENCE_LENGTH = 512  # Qwen3 tokens per prompt, the pipeline's default
GENERATE_DEFAULTS = {
    "base": {"generate.steps": 50, "generate.cfg": 5.0},
    "turbo": {"generate.steps": 8, "generate.cfg": 0.0},
}
# Comfy-Org's repackaged single files (diffusion_models/, text_encoders/qwen_3_4b, vae/ae: FLUX.1's VAE).
COMFYUI_CHECKPOINTS = {
    "Tongyi-MAI/Z-Image-Turbo": "z_image_turbo_bf16.safetensors",
    "Tongyi-MAI/Z-Image": "z_image_bf16.safetensors",
}
VAE_NOTE = "ae.safetensors: Comfy-Org/z_image_turbo's split_files/vae (some installers name it z_image_turbo_vae)"
TURBO_MAX_SHIFT = 5.0  # Turbo's scheduler shifts by 3, Base's by 6
UNDISTILLED_BASE = "Tongyi-MAI/Z-Image"  # what to train on instead of Z-Image-Turbo


@dataclass(frozen=True)
class ZImage:
    name: str = "zimage"
    label: str = "Z-Image"
    denoiser: str = "transformer"
    denoiser_label: str = "transformer"
    text_encoders: tuple[str, ...] = ("text_encoder",)  # Qwen3-4B
    # Never trained: diffusers' Z-Image loader and ComfyUI read transformer LoRA only.
    trainable_text_encoders: tuple[str, ...] = ()
    text_width: int = 2560  # Qwen3-4B's hidden states
    single_file_pipeline: str = "ZImagePipeline"
    checkpoint_of: str = ""  # its single files have their own names
    supports_refiner: bool = False
    vae_fp32: bool = False
    kohya_implementation: str = "https://github.com/Tongyi-MAI/Z-Image"
    kohya_versions: tuple[str, ...] = ("zimage", "z_image", "z-image")
    modelspec_prefix: str = "Z-Image"  # musubi-tuner's `modelspec.architecture` "Z-Image/lora"
    embedding_keys: tuple[tuple[str, str], ...] = ()  # no CLIP: no pivotal tuning
    samplers: tuple[str, ...] = ("flow_euler",)
    guidance_label: str | None = None  # true CFG with a negative prompt, A1111's own "CFG scale"
    size_multiple: int = 16  # 8x VAE, then 2x2 patches
    stage_frozen: bool = True  # Qwen3-4B (8 GB in bf16) and the VAE visit the device one at a time, to be cached
    comfyui_diffusers_file: bool = False  # NAME.safetensors is ComfyUI's file (ui_lora_state)
    adapter_kinds: tuple[str, ...] | None = None  # every kind: LoRA in ui_lora_state, DoRA and LoKr in ...
    lycoris_names: bool = True  # ... LyCORIS names (sdlora.lora.kohya.denoiser_naming), which ComfyUI reads
    photo_pipeline: str | None = None  # diffusers' AutoPipelineForImage2Image/ForInpainting pick them
    edit_training: bool = False
    reference_pipelines: tuple[tuple[str, int], ...] = ()

    def claims(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        config = getattr(transformer, "config", None)
        omni = getattr(config, "siglip_feat_dim", None) is not None  # Z-Image-Omni takes image features too
        return model_class(transformer) == "ZImageTransformer2DModel" and hasattr(config, "cap_feat_dim") and not omni

    def claims_checkpoint(self, keys_: set[str]) -> bool:
        return keys.claims(keys_)

    def variant(self, pipe: Any) -> str:
        """base (undistilled) or turbo (distilled), from the scheduler's static shift (6 or 3); "base" when the
        pipeline has no scheduler (a bare denoiser, as detection sees it)."""
        scheduler = getattr(pipe, "scheduler", None)
        shift = scheduler.config.get("shift", 6.0) if scheduler is not None else 6.0
        return "turbo" if shift < TURBO_MAX_SHIFT else "base"

    def is_distilled(self, pipe: Any) -> bool:
        """Turbo (step-distilled, no CFG) is the inference target; Z-Image (Base) is the one to train on."""
        return self.variant(pipe) == "turbo"

    def undistilled_base(self, pipe: Any) -> str:
        return UNDISTILLED_BASE

    def prediction_type(self, pipe: Any) -> str:
        return "flow"

    def inpainting_kind(self, pipe: Any) -> str | None:
        return None  # Z-Image's inpainting is a ControlNet beside the same transformer

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        return {pipe.transformer.config.cap_feat_dim}

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        return "zimage"

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        return "Z-Image-Turbo/lora" if variant == "turbo" else "Z-Image/lora"

    def sequence_length(self, pipe: Any, configured: int | None) -> int | None:
        """Qwen3 tokens per prompt: `model.max_sequence_length`, else the pipeline's 512."""
        return configured or SEQUENCE_LENGTH

    def text_to_image(self, pipe: Any) -> Any:
        return pipe

    def generate_defaults(self, pipe: Any) -> dict[str, Any]:
        """Base: 50 steps, CFG 5; Turbo: 8 steps, CFG 0; and training's flow shift is the scheduler's own (6 or 3),
        as diffusers' Z-Image script shifts its training sigmas."""
        shift = float(pipe.scheduler.config.get("shift", 6.0))
        own = {"generate.scheduler": "flow_euler", "train.timestep_shift": shift}
        return {**GENERATE_DEFAULTS[self.variant(pipe)], **own}

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        raise UsageError(f"{self.label} bases take no control images (edit_training)")

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        """As ZImagePipeline.encode_prompt computes it (chat template with enable_thinking=True, the padded batch
        through Qwen3 with its mask, the second-to-last hidden layer), kept padded so that rows cache and batch:
        "prompt_embeds" (B, L, D) with zeros at the padding and "prompt_mask" (B, L) bool; the pipeline's ragged
        rows are prompt_embeds[i][prompt_mask[i]]. {} when the encoder is given as None (encoded apart)."""
        tokenizer, encoder = tokenizers[0], encoders[0]
        if encoder is None:
            return {}
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for prompt in prompts
        ]
        length = max_sequence_length or SEQUENCE_LENGTH
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        mask = ids.attention_mask.to(device).bool()
        hidden = encoder(input_ids=ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        embeds = hidden.hidden_states[-2]
        return {"prompt_embeds": embeds * mask[..., None].to(embeds.dtype), "prompt_mask": mask}

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> ComfyParts:
        """UNETLoader + CLIPLoader (Qwen3-4B, ComfyUI's type "lumina2") + VAELoader, the scheduler's static shift as
        ModelSamplingAuraFlow. The pipeline's guidance is pos + g * (pos - neg), on when g > 0; ComfyUI's cfg is
        neg + cfg * (pos - neg): cfg = 1 + g (Turbo's g 0: cfg 1, the positive prompt alone)."""
        name, note = checkpoint_file(base, COMFYUI_CHECKPOINTS)
        return ComfyParts(
            nodes={
                "unet": loader("UNETLoader", unet_name=name, weight_dtype="default"),
                "clip": loader("CLIPLoader", clip_name="qwen_3_4b.safetensors", type="lumina2", device="default"),
                "vae": loader("VAELoader", vae_name="ae.safetensors"),
            },
            model=["unet", 0],
            clip=["clip", 0],
            vae=["vae", 0],
            latent="EmptySD3LatentImage",
            cfg=1.0 + cfg if cfg > 0 else 1.0,
            sampling=loader("ModelSamplingAuraFlow", shift=float(pipe.scheduler.config.get("shift", 6.0))),
            notes=((note,) if note else ()) + (VAE_NOTE,),
        )

    def render_from_cache(self, pipe: Any, rows: dict[str, Conditioning]) -> None:
        """Make `pipe` render from cached conditioning (staged training: Qwen3 is gone): its encode_prompt looks
        each prompt (and the negative prompt) up in `rows` ({prompt: {"prompt_embeds": (L, D), "prompt_mask":
        (L,)}})."""
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
        """The velocity for (B, C, H, W) latents at sigmas `timesteps` (B,): the transformer takes a list of
        (C, 1, H, W) latents, the reversed time 1 - sigma and the ragged caption rows, and predicts -velocity."""
        import torch

        latents = list(noisy.unsqueeze(2).unbind(0))  # one (C, F=1, H, W) per image
        masks = cond["prompt_mask"].bool()  # a staged cache stores it in the encoder's dtype
        captions = [row[mask] for row, mask in zip(cond["prompt_embeds"], masks, strict=True)]
        out = model(latents, (1 - timesteps).to(noisy.dtype), captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(noisy.dtype)

    def objective(self, scheduler: Any, device: Any, sampling: str = "auto", shift: float | None = None) -> Any:
        """Flow matching; 'auto' is the shift scheme with train.timestep_shift (by default the scheduler's own)."""
        from sdlora.objectives import FlowMatching

        own = float(scheduler.config.get("shift", 6.0))
        return FlowMatching("shift" if sampling == "auto" else sampling, own if shift is None else shift)

    def denoiser_targets(self, targets: str) -> list[str]:
        return ATTENTION + FEED_FORWARD if targets == "all" else list(ATTENTION)

    def text_encoder_targets(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]  # Qwen3's attention (never trained here)

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        """diffusers' own module paths, one layer each (the UI file keeps them: ui_lora_state)."""
        return lambda path: (path, 0, 1)

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        if encoders:
            raise UsageError("Z-Image's Qwen3 text encoder is never trained: it has no LoRA to save")
        return []

    def ui_lora_state(self, denoiser: Any, text_encoders: Sequence[Any], adapter: str, dtype: Any) -> dict | None:
        """ComfyUI's Z-Image LoRA: `diffusion_model.` + diffusers names, alpha/rank baked into lora_B."""
        return baked_lora_state(denoiser, adapter, dtype, self.label)

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """A pipeline call's (B, C, H, W) latents (unpacked) -> what the VAE decodes: unnormalised."""
        return self.denormalize_latents(pipe.vae, latents.to(pipe.vae.dtype))

    def normalize_latents(self, vae: Any, latents: Any) -> Any:
        """Shifted, then scaled (FLUX.1's AE: shift 0.1159, scale 0.3611), as ZImagePipeline undoes it."""
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def denormalize_latents(self, vae: Any, latents: Any) -> Any:
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def x0_prediction(self, scheduler: Any, model_output: Any, timestep: Any, sample: Any, out: Any) -> Any:
        """x_0 = x_t - sigma v, with the sigma of the step just taken (the pipeline passes the velocity, negated
        back, to the scheduler)."""
        from sdlora.objectives import flow_x0

        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device).expand(sample.shape[0])
        return flow_x0(sample, model_output.to(sample.dtype), sigma)

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        """A transformer-only original file (`z_image_turbo_bf16.safetensors`), read by diffusers' own converter,
        with the rest of `config`'s pipeline."""
        from diffusers import ZImagePipeline, ZImageTransformer2DModel

        if config is None:
            raise UsageError(
                f"{path}: a Z-Image single file holds the transformer only; name a diffusers Z-Image folder or hub "
                "id for the rest and the configs: --set model.single_file_config=Tongyi-MAI/Z-Image"
            )
        dtype = {"torch_dtype": kwargs["torch_dtype"]} if kwargs.get("torch_dtype") is not None else {}
        transformer = ZImageTransformer2DModel.from_single_file(
            str(path), config=config, subfolder="transformer", **dtype
        )
        return ZImagePipeline.from_pretrained(config, transformer=transformer, **kwargs)

    def save_single_file(self, pipe: Any, path: Any) -> None:
        """The transformer alone under its original names, as `z_image_turbo_bf16.safetensors` ships."""
        from safetensors.torch import save_file

        state = keys.to_original(pipe.transformer.state_dict())
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def kohya_metadata(self, info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
        """How the LoRA was trained, in kohya's keys, and the variant it was trained on."""
        sampling = "shift" if train.timestep_sampling == "auto" else train.timestep_sampling
        return kohya_flow_metadata(train, sampling) | {
            "ss_max_token_length": str(max_sequence_length or ""),
            "sdlora.zimage_variant": info.variant,
        }

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.zimage.tiny import tiny_zimage_pipeline

        return tiny_zimage_pipeline(seed=seed)


@dataclass(frozen=True)
class CachedPrompts:
    """ZImagePipeline.encode_prompt from cached rows: what the pipeline computes, without Qwen3."""

    pipe: Any
    rows: dict[str, Conditioning]

    def __call__(
        self,
        prompt: str | list[str],
        device: Any = None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        max_sequence_length: int = 512,
    ) -> tuple[list[Any], list[Any]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self.pipe._execution_device

        def ragged(texts: list[str]) -> list[Any]:
            rows = cached_rows(self.rows, texts)
            return [row["prompt_embeds"][row["prompt_mask"].bool()].to(device) for row in rows]

        positive = prompt_embeds if prompt_embeds is not None else ragged(prompts)
        if not do_classifier_free_guidance:
            return positive, []
        if negative_prompt_embeds is not None:
            return positive, negative_prompt_embeds
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        return positive, ragged(list(negatives or [""] * len(prompts)))


ZIMAGE = ZImage()
