"""Qwen-Image (Qwen, 20B, Apache-2.0; Qwen-Image and Qwen-Image-2512 share every shape): a double-stream MMDiT
(60 blocks, 24 heads of 128) over 2x2 patches of AutoencoderKLQwenImage's 16-channel latents (a one-frame video
VAE: 5-D latents, normalised per channel by its latents_mean/latents_std), conditioned on Qwen2.5-VL-7B's last
hidden layer of a fixed system template, the template's first 34 tokens dropped and the padding masked. True CFG
(a second pass on the negative prompt, 4 by default) over 50 steps, with a resolution-dependent (dynamic) shift.
ComfyUI names its modules as diffusers does (sdlora.families.qwenimage.keys). The Edit pipelines (same transformer
class, images in the prompt) are not this family.

The denoiser's latent space here is the VAE's (B, 16, 1, H/8, W/8) latents with the frame axis dropped and each
channel normalised: element for element what the pipeline packs into tokens, ordered as an image, so that noise,
targets and masks stay (B, C, H, W) like every other family's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdlora.errors import SdloraError, UsageError
from sdlora.families import Conditioning, pipeline_class
from sdlora.families.comfyui import ComfyParts, baked_lora_state, checkpoint_file, loader, true_cfg
from sdlora.families.flow import (
    UNSHIFTED,
    cached_rows,
    denoiser_config,
    kohya_flow_metadata,
    model_class,
    unshifted_sampling,
)
from sdlora.families.qwenimage import keys

# peft name suffixes: the image stream's attention, as diffusers' Qwen-Image script targets it; 'all' adds the text
# stream's attention and both streams' feed-forward layers.
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
EXTRA = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2"]
EXTRA += ["txt_mlp.net.0.proj", "txt_mlp.net.2"]
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP = 34  # the template's tokens before the prompt, dropped from the hidden states (QwenImagePipeline)
TOKENIZER_MAX = 1024  # the pipeline's tokenizer_max_length (and its max_sequence_length limit)
SEQUENCE_LENGTH = 512  # Qwen2.5-VL tokens per prompt kept: diffusers' Qwen-Image script's --max_sequence_length
GENERATE_DEFAULTS = {"generate.steps": 50, "generate.cfg": 4.0, "generate.scheduler": "flow_euler"}
# Training sigmas: unshifted U(0, 1), as diffusers' Qwen-Image script draws them (weighting_scheme "none" on the
# scheduler's grid, which use_dynamic_shifting leaves unshifted); the dynamic shift applies at sampling only. A
# train.timestep_shift other than 1 switches 'auto' to the shift scheme at that value (musubi's "shift", 2.2-3.1).
# Pipelines of this family: text-to-image and the img2img/inpaint pipelines AutoPipelineFor* make from it. The Edit,
# Layered and ControlNet pipelines share the transformer class but not its use.
PIPELINES = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")


def pack(latents: Any) -> Any:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) tokens of 2x2 patches (QwenImagePipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Any, height: int, width: int) -> Any:
    """(B, N, 4C) tokens of an (height x width) latent -> (B, C, height, width): the inverse of `pack`."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def channel_stats(vae: Any, like: Any) -> tuple[Any, Any]:
    """The VAE's latents_mean and 1 / latents_std, shaped to broadcast over `like` ((B, C, H, W) or (B, C, F, H, W)),
    on its device and dtype: the two factors QwenImagePipeline and diffusers' script use."""
    import torch

    shape = (1, vae.config.z_dim) + (1,) * (like.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std


def packed(rows: list[Any], length: int, dtype: Any) -> Conditioning:
    """Rows of hidden states ((n_i, D) each, the template's tokens dropped) cut to `length` and left-packed into
    "prompt_embeds" (B, length, D) in `dtype`, zero-padded, with "prompt_mask" (B, length) int64, 1 on real tokens."""
    import torch

    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    masks = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        row = row[:length]
        embeds[i, : len(row)], masks[i, : len(row)] = row, 1
    return {"prompt_embeds": embeds.to(dtype), "prompt_mask": masks}


# The single files Comfy-Org publishes (ComfyUI's models/diffusion_models, text_encoders, vae).
COMFYUI_CHECKPOINTS = {
    "Qwen/Qwen-Image": "qwen_image_bf16.safetensors",
    "Qwen/Qwen-Image-2512": "qwen_image_2512_bf16.safetensors",
}
COMFYUI_TEXT_ENCODER = "qwen_2.5_vl_7b.safetensors"
# Measured by bench/parity.py (tiny-qwenimage, docs/parity.md): with these two taken out of sdlora's render, the
# fork's latents equal sdlora's to 4e-7 (prompt template and its cut, shift, true CFG scale, normalisation: the same).
COMFYUI_NOTES = (
    "qwen_2.5_vl_7b.safetensors and qwen_image_vae.safetensors: Comfy-Org/Qwen-Image_ComfyUI's split_files",
    "the pipeline stretches its sigmas to end at shift_terminal (0.02) and rescales true CFG's result to the "
    "conditional prediction's norm; ComfyUI's ModelSamplingAuraFlow and KSampler do neither",
)


@dataclass(frozen=True)
class QwenImage:
    name: str = "qwenimage"
    label: str = "Qwen-Image"
    denoiser: str = "transformer"
    denoiser_label: str = "transformer"
    text_encoders: tuple[str, ...] = ("text_encoder",)  # Qwen2.5-VL-7B
    # Never trained: diffusers' Qwen-Image loader and ComfyUI read transformer LoRA only.
    trainable_text_encoders: tuple[str, ...] = ()
    text_width: int = 3584  # Qwen2.5-VL-7B's hidden states
    single_file_pipeline: str = "QwenImagePipeline"
    checkpoint_of: str = ""  # its single files have their own names
    supports_refiner: bool = False
    vae_fp32: bool = False
    kohya_implementation: str = "https://github.com/QwenLM/Qwen-Image"
    kohya_versions: tuple[str, ...] = ("qwen_image", "qwen-image")  # musubi-tuner writes "qwen_image"
    modelspec_prefix: str = "Qwen-Image"  # musubi-tuner's ARCH_QWEN_IMAGE: "Qwen-Image/lora"
    embedding_keys: tuple[tuple[str, str], ...] = ()  # no CLIP: no pivotal tuning
    samplers: tuple[str, ...] = ("flow_euler",)
    guidance_label: str | None = None  # true CFG with a negative prompt: A1111's own "CFG scale"
    size_multiple: int = 16  # 8x VAE, then 2x2 patches
    stage_frozen: bool = True  # Qwen2.5-VL-7B (16 GB in bf16) and the VAE visit the device one at a time, to be cached
    comfyui_diffusers_file: bool = False  # NAME.safetensors is ComfyUI's file (ui_lora_state)
    adapter_kinds: tuple[str, ...] | None = None  # every kind: LoRA in ui_lora_state, DoRA and LoKr in ...
    lycoris_names: bool = True  # ... LyCORIS names (sdlora.lora.kohya.denoiser_naming), which ComfyUI reads
    photo_pipeline: str | None = None  # AutoPipelineForImage2Image/ForInpainting: QwenImageImg2Img/InpaintPipeline
    edit_training: bool = False
    reference_pipelines: tuple[tuple[str, int], ...] = ()  # the Edit pipelines are sdlora.families.qwenedit's
    template: str = TEMPLATE  # the text encoder's prompt template (the Edit family's differs) ...
    drop: int = DROP  # ... and its tokens before the prompt, dropped from the hidden states

    def claims(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        if model_class(transformer) != "QwenImageTransformer2DModel":
            return False
        config = denoiser_config(transformer)
        # Edit-2511 conditions its reference tokens at t = 0; Layered has its own RoPE and timestep conditioning.
        own = not any(getattr(config, k, False) for k in ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond"))
        pipeline = pipeline_class(pipe)
        return own and (pipeline is None or pipeline in PIPELINES)

    def claims_checkpoint(self, keys_: set[str]) -> bool:
        return keys.claims(keys_)

    def variant(self, pipe: Any) -> str:
        return ""  # Qwen-Image and Qwen-Image-2512 differ in weights only

    def is_distilled(self, pipe: Any) -> bool:
        return False  # the released checkpoints are undistilled bases (step-distilled LoRAs are separate files)

    def undistilled_base(self, pipe: Any) -> str:
        return ""

    def prediction_type(self, pipe: Any) -> str:
        return "flow"

    def inpainting_kind(self, pipe: Any) -> str | None:
        return None  # QwenImageInpaintPipeline uses the ordinary transformer

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        return {pipe.transformer.config.joint_attention_dim}

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        return "qwen_image"

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        return "Qwen-Image/lora"

    def sequence_length(self, pipe: Any, configured: int | None) -> int | None:
        """Qwen2.5-VL tokens per prompt after the template's 34: `model.max_sequence_length`, else 512 (diffusers'
        script; the pipeline allows 1024)."""
        length = configured or SEQUENCE_LENGTH
        if length > TOKENIZER_MAX:
            raise UsageError(f"model.max_sequence_length: Qwen-Image takes at most {TOKENIZER_MAX} tokens ({length})")
        return length

    def generate_defaults(self, pipe: Any) -> dict[str, Any]:
        """50 steps, true CFG 4 (against generate.negative, "" by default); training sigmas unshifted (UNSHIFTED)."""
        return {**GENERATE_DEFAULTS, "train.timestep_shift": UNSHIFTED}

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        raise UsageError(f"{self.label} bases take no control images (edit_training)")

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        """As QwenImagePipeline.encode_prompt computes it (the fixed template, the batch padded to its longest
        prompt through Qwen2.5-VL with its mask, the last hidden layer, the first 34 tokens dropped, rows left-packed
        and zero-padded): "prompt_embeds" (B, L, D) and "prompt_mask" (B, L) int64, 1 on real tokens. With
        `max_sequence_length` both are cut or zero-padded to exactly that length, so that rows of different batches
        cache and concatenate (predict trims the padding again). {} when the encoder is given as None."""
        tokenizer, encoder = tokenizers[0], encoders[0]
        if encoder is None:
            return {}
        texts = [self.template.format(prompt) for prompt in prompts]
        ids = tokenizer(texts, max_length=TOKENIZER_MAX + self.drop, padding=True, truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        mask = ids.attention_mask.to(device)
        hidden = encoder(input_ids=ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        states = hidden.hidden_states[-1]
        rows = [row[keep.bool()][self.drop :] for row, keep in zip(states, mask, strict=True)]
        length = max_sequence_length or min(max(len(row) for row in rows), TOKENIZER_MAX)
        return packed(rows, length, encoder.dtype)

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> ComfyParts:
        """UNETLoader + CLIPLoader (Qwen2.5-VL, ComfyUI's type "qwen_image") + VAELoader, and the pipeline's
        resolution-dependent shift at this size as ModelSamplingAuraFlow: exponential shifting by mu is the shift
        exp(mu) of sigma' = s t / (1 + (s - 1) t). True CFG neg + g * (pos - neg) for g > 1, as ComfyUI's."""
        import math

        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        name, note = checkpoint_file(base, COMFYUI_CHECKPOINTS)
        config = pipe.scheduler.config
        tokens = (height // 16) * (width // 16)  # 8x VAE, then 2x2 patches
        mu = calculate_shift(
            tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return ComfyParts(
            nodes={
                "unet": loader("UNETLoader", unet_name=name, weight_dtype="default"),
                "clip": loader(
                    "CLIPLoader", clip_name="qwen_2.5_vl_7b.safetensors", type="qwen_image", device="default"
                ),
                "vae": loader("VAELoader", vae_name="qwen_image_vae.safetensors"),
            },
            model=["unet", 0],
            clip=["clip", 0],
            vae=["vae", 0],
            latent="EmptySD3LatentImage",
            cfg=true_cfg(cfg),
            sampling=loader("ModelSamplingAuraFlow", shift=round(math.exp(mu), 6)),
            notes=((note,) if note else ()) + COMFYUI_NOTES,
        )

    def text_to_image(self, pipe: Any) -> Any:
        return pipe

    def render_from_cache(self, pipe: Any, rows: dict[str, Conditioning]) -> None:
        """Make `pipe` render from cached conditioning (staged training: Qwen2.5-VL is gone): its encode_prompt
        looks each prompt (and the negative prompt) up in `rows` ({prompt: {"prompt_embeds": (L, D),
        "prompt_mask": (L,)}})."""
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
        """The velocity for (B, C, H, W) normalised latents at sigmas `timesteps` (B,): packed into (B, H/2 * W/2,
        4C) tokens with their shapes for RoPE, the caption trimmed to the batch's longest (its mask passed, None
        where nothing is padding, as the pipeline passes it), the timestep in [0, 1] (the pipeline's t / 1000)."""
        b, _, h, w = noisy.shape
        mask = cond["prompt_mask"] > 0  # a staged cache stores it in the encoder's dtype
        length = max(int(mask.sum(1).max()), 1)
        mask = mask[:, :length]
        out = model(
            hidden_states=pack(noisy),
            encoder_hidden_states=cond["prompt_embeds"][:, :length].to(noisy.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.long(),
            timestep=timesteps.to(noisy.dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack(out, h, w).to(noisy.dtype)

    def objective(self, scheduler: Any, device: Any, sampling: str = "auto", shift: float | None = None) -> Any:
        """Flow matching; 'auto' draws unshifted U(0, 1) sigmas as diffusers' Qwen-Image script does, or, with a
        train.timestep_shift other than 1, the shift scheme at that value."""
        from sdlora.objectives import FlowMatching

        shift = UNSHIFTED if shift is None else shift
        return FlowMatching(unshifted_sampling(sampling, shift), shift)

    def denoiser_targets(self, targets: str) -> list[str]:
        return ATTENTION + EXTRA if targets == "all" else list(ATTENTION)

    def text_encoder_targets(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]  # Qwen2.5-VL's attention (never trained here)

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        """diffusers' own module paths, one layer each (ComfyUI's names; the UI file keeps them: ui_lora_state)."""
        return lambda path: (path, 0, 1)

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        if encoders:
            raise UsageError("Qwen-Image's Qwen2.5-VL text encoder is never trained: it has no LoRA to save")
        return []

    def ui_lora_state(self, denoiser: Any, text_encoders: Sequence[Any], adapter: str, dtype: Any) -> dict | None:
        """ComfyUI's Qwen-Image LoRA: `diffusion_model.` + diffusers names, alpha/rank baked into lora_B."""
        return baked_lora_state(denoiser, adapter, dtype, self.label)

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """A pipeline call's packed (B, N, 4C) latents of a (width, height) image -> what the VAE decodes: the
        (B, C, 1, H/8, W/8) unnormalised latents."""
        factor = pipe.vae_scale_factor
        image = unpack(latents, 2 * (height // (factor * 2)), 2 * (width // (factor * 2))).to(pipe.vae.dtype)
        return self.denormalize_latents(pipe.vae, image).unsqueeze(2)

    def normalize_latents(self, vae: Any, latents: Any) -> Any:
        """(B, C, H, W) posterior latents (the frame axis dropped) -> (x - mean) * (1 / std), per channel, as
        diffusers' Qwen-Image script computes it."""
        mean, inv_std = channel_stats(vae, latents)
        return (latents - mean) * inv_std

    def denormalize_latents(self, vae: Any, latents: Any) -> Any:
        """x / (1 / std) + mean, as QwenImagePipeline computes it before decoding."""
        mean, inv_std = channel_stats(vae, latents)
        return latents / inv_std + mean

    def x0_prediction(self, scheduler: Any, model_output: Any, timestep: Any, sample: Any, out: Any) -> Any:
        """x_0 = x_t - sigma v, with the sigma of the step just taken (`step` has advanced step_index past it)."""
        from sdlora.objectives import flow_x0

        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device).expand(sample.shape[0])
        return flow_x0(sample, model_output.to(sample.dtype), sigma)

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        """A transformer-only file (`qwen_image_bf16.safetensors`, diffusers' names, bare or under ComfyUI's
        `model.diffusion_model.`) with the rest of `config`'s pipeline."""
        from diffusers import QwenImagePipeline

        if config is None:
            raise UsageError(
                f"{path}: a Qwen-Image single file holds the transformer only; name a diffusers Qwen-Image folder or "
                "hub id for the rest and the configs: --set model.single_file_config=Qwen/Qwen-Image (an Edit "
                "model's file: --set model.single_file_config=Qwen/Qwen-Image-Edit-2511)"
            )
        transformer, kwargs = single_file_transformer(path, config, kwargs)
        return QwenImagePipeline.from_pretrained(config, transformer=transformer, **kwargs)

    def save_single_file(self, pipe: Any, path: Any) -> None:
        """The transformer alone under its own (diffusers = ComfyUI) names, as `qwen_image_bf16.safetensors` ships."""
        from safetensors.torch import save_file

        state = pipe.transformer.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def kohya_metadata(self, info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
        """How the LoRA was trained, in kohya's keys ('auto' recorded as what it drew: uniform, the unshifted
        sigmas of diffusers' Qwen-Image script, or shift), and the sampling shift its previews used."""
        return kohya_flow_metadata(train, unshifted_sampling(train.timestep_sampling, train.timestep_shift)) | {
            "ss_max_token_length": str(max_sequence_length or SEQUENCE_LENGTH),
            # The scheduler's resolution-dependent shift at sampling (QwenImagePipeline's mu from the image tokens).
            "sdlora.sampling_shift": "dynamic",
        }

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.qwenimage.tiny import tiny_qwenimage_pipeline

        return tiny_qwenimage_pipeline(seed=seed)


def single_file_transformer(path: Any, config: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The transformer of a transformer-only file with `config`'s transformer config (Edit-2511's zero_cond_t
    too), and the pipeline's from_pretrained arguments left for the rest (a quantization config is the
    transformer's)."""
    from diffusers import QwenImageTransformer2DModel

    kwargs = dict(kwargs)
    options = {k: kwargs[k] for k in ("torch_dtype",) if kwargs.get(k) is not None}
    if kwargs.get("quantization_config") is not None:  # the pipeline's: the transformer's own part
        from diffusers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(**kwargs.pop("quantization_config").quant_kwargs)
    try:
        transformer = QwenImageTransformer2DModel.from_single_file(
            keys.transformer_state(path), config=config, subfolder="transformer", **options
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise SdloraError(f"{path}: not the Qwen-Image transformer of {config} ({first})") from None
    return transformer, kwargs


@dataclass(frozen=True)
class CachedPrompts:
    """QwenImagePipeline.encode_prompt from cached rows: what the pipeline computes, without Qwen2.5-VL."""

    pipe: Any
    rows: dict[str, Conditioning]

    def __call__(
        self,
        prompt: str | list[str] | None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: Any = None,
        prompt_embeds_mask: Any = None,
        max_sequence_length: int = TOKENIZER_MAX,
    ) -> tuple[Any, Any]:
        import torch

        device = device or self.pipe._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [""])
            real = [row["prompt_embeds"][row["prompt_mask"] > 0] for row in cached_rows(self.rows, prompts)]
            length = max(len(row) for row in real)
            prompt_embeds = torch.stack([torch.nn.functional.pad(row, (0, 0, 0, length - len(row))) for row in real])
            prompt_embeds_mask = torch.stack([(torch.arange(length) < len(row)).long() for row in real])
            prompt_embeds, prompt_embeds_mask = prompt_embeds.to(device), prompt_embeds_mask.to(device)
        prompt_embeds = prompt_embeds[:, :max_sequence_length].repeat_interleave(num_images_per_prompt, dim=0)
        if prompt_embeds_mask is not None:
            prompt_embeds_mask = prompt_embeds_mask[:, :max_sequence_length]
            prompt_embeds_mask = prompt_embeds_mask.repeat_interleave(num_images_per_prompt, dim=0)
            if prompt_embeds_mask.all():
                prompt_embeds_mask = None
        return prompt_embeds, prompt_embeds_mask


QWENIMAGE = QwenImage()
