"""FLUX.2 [klein] (Black Forest Labs; 4B Apache-2.0, 9B non-commercial): FLUX.2's rectified-flow transformer (double
blocks with separate image and text streams, then single blocks, global modulation, no guidance embedding) over
2x2 patches of AutoencoderKLFlux2's 32-channel latents normalised by the VAE's batch-norm statistics, conditioned
on Qwen3 hidden layers 9, 18 and 27 stacked along the width. The base checkpoints (50 steps, CFG 4) and the
step-distilled ones (4 steps, no CFG) share every weight shape: the pipeline config's `is_distilled` tells them
apart. Kohya, musubi and ComfyUI name its modules by BFL's original paths, q/k/v fused (sdlora.families.klein.keys).

The denoiser's latent space here is the VAE's (B, 32, H/8, W/8) latents normalised per patch position and channel
(patchified, batch-normed, unpatchified): element for element what the pipeline's packed tokens hold, only
ordered as an image, so that noise, targets and masks stay (B, C, H, W) like every other family's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdlora.errors import SdloraError, UsageError
from sdlora.families import Conditioning
from sdlora.families.comfyui import ComfyParts, checkpoint_file, loader, true_cfg
from sdlora.families.flow import (
    UNSHIFTED,
    cached_rows,
    denoiser_config,
    kohya_flow_metadata,
    model_class,
    unshifted_sampling,
)
from sdlora.families.klein import keys

# peft matches a string target against the whole module path. 'attention' is what diffusers' klein script trains:
# the double blocks' image attention and the single blocks' fused qkv+MLP input and output; 'all' adds the text
# stream's attention and both streams' feed-forward layers.
ATTENTION = (
    r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0))"
    r"|(single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))"
)
DOUBLE_EXTRA = (
    r"(transformer_blocks\.\d+\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out))"
    r"|(transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out))"
)
SEQUENCE_LENGTH = 512  # Qwen3 tokens per prompt, padded (no mask reaches the transformer), as the pipeline does
TEXT_LAYERS = (9, 18, 27)  # the pipeline's hidden layers ([dev]'s Mistral uses 10, 20, 30)
GENERATE_DEFAULTS = {
    "base": {"generate.steps": 50, "generate.cfg": 4.0},
    # Step-distilled: CFG off (the pipeline ignores guidance above 1 for it), 4 steps.
    "distilled": {"generate.steps": 4, "generate.cfg": 1.0},
}
SIZES = {3072: "4b", 4096: "9b"}  # transformer width -> checkpoint size (musubi's names)
# Training sigmas: unshifted U(0, 1), as diffusers' klein script draws them (weighting_scheme "none" on the
# scheduler's unshifted grid: the shift is dynamic, at inference only); a train.timestep_shift set to anything but
# 1 switches 'auto' to the shift scheme at that value.
# The single files BFL publishes for each checkpoint (ComfyUI's models/diffusion_models), and each size's Qwen3 file.
COMFYUI_CHECKPOINTS = {
    f"black-forest-labs/FLUX.2-klein-{kind}{size}": f"flux-2-klein-{kind.lower()}{size.lower()}.safetensors"
    for kind in ("", "base-")
    for size in ("4B", "9B")
}
COMFYUI_TEXT_ENCODERS = {"4b": "qwen_3_4b.safetensors", "9b": "qwen_3_8b.safetensors"}


def patchify(latents: Any) -> Any:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch's pixels as channels (Flux2KleinPipeline._patchify_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: Any) -> Any:
    """The inverse of `patchify`."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // 4, h * 2, w * 2)


def batch_norm_stats(vae: Any, like: Any) -> tuple[Any, Any]:
    """The VAE's batch-norm mean and std (1, 4C, 1, 1) of patchified latents, on `like`'s device and dtype."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def image_ids(batch: int, height: int, width: int, device: Any) -> Any:
    """Positions (t, h, w, l) of (height x width) packed tokens, h-major: (B, H*W, 4), as the pipeline makes them."""
    import torch

    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


def text_ids(prompt_embeds: Any) -> Any:
    """Positions (0, 0, 0, l) of (B, L, D) text tokens: (B, L, 4), as the pipeline makes them."""
    import torch

    b, length, _ = prompt_embeds.shape
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(b, -1, -1).to(prompt_embeds.device)


REFERENCE_NOTE = (
    "reference photos: diffusers scales one over 1 megapixel down to 1 megapixel and cuts its sides to multiples "
    "of 16 before encoding it; ComfyUI's VAEEncode takes it as saved (comfyui-reference-N.png)"
)


@dataclass(frozen=True)
class Klein:
    name: str = "klein"
    label: str = "FLUX.2 [klein]"
    denoiser: str = "transformer"
    denoiser_label: str = "transformer"
    text_encoders: tuple[str, ...] = ("text_encoder",)  # Qwen3-4B (klein-4B) or Qwen3-8B (klein-9B)
    # Never trained: diffusers' FLUX.2 loader and ComfyUI read transformer LoRA only.
    trainable_text_encoders: tuple[str, ...] = ()
    text_width: int = 7680  # klein-4B: three Qwen3-4B layers of 2560 (klein-9B: 12288)
    single_file_pipeline: str = "Flux2KleinPipeline"
    checkpoint_of: str = ""  # its single files have their own names
    supports_refiner: bool = False
    vae_fp32: bool = False
    kohya_implementation: str = "https://github.com/black-forest-labs/flux2"
    # musubi-tuner and ai-toolkit write `flux2_klein_4b` / `flux2_klein_9b`; before FLUX.1's "flux" in REGISTRY.
    kohya_versions: tuple[str, ...] = ("flux2_klein", "flux2-klein", "flux.2-klein")
    modelspec_prefix: str = "Flux.2-klein"  # musubi-tuner's "Flux.2-klein-4b/lora", "Flux.2-klein-9b/lora"
    embedding_keys: tuple[tuple[str, str], ...] = ()  # no CLIP: no pivotal tuning
    samplers: tuple[str, ...] = ("flow_euler",)
    guidance_label: str | None = None  # true CFG against the empty prompt: A1111's own "CFG scale"
    size_multiple: int = 16  # 8x VAE, then 2x2 patches
    stage_frozen: bool = True  # Qwen3 (8-16 GB in bf16) and the VAE visit the device one at a time, to be cached
    comfyui_diffusers_file: bool = False  # ComfyUI reads no diffusers FLUX.2 names: NAME.safetensors is kohya's
    # Every kind: the BFL names fuse q, k and v into one qkv module, which a DoRA magnitude or a LoKr factor of each
    # can't be, so DoRA and LoKr take LyCORIS names, one layer each, which ComfyUI's Flux map reads (into qkv rows).
    adapter_kinds: tuple[str, ...] | None = None
    lycoris_names: bool = True
    # diffusers' AutoPipelineForImage2Image maps klein to its text-to-image pipeline (whose `image` is a reference,
    # not a start) and AutoPipelineForInpainting has none: --init-image and --keep-face use klein's inpainting
    # pipeline (--init-image with the whole image masked, at --strength).
    photo_pipeline: str | None = "Flux2KleinInpaintPipeline"
    edit_training: bool = False
    reference_pipelines: tuple[tuple[str, int], ...] = (("Flux2KleinPipeline", 3),)  # its multi-reference `image`

    def claims(self, pipe: Any) -> bool:
        transformer = getattr(pipe, "transformer", None)
        config = getattr(transformer, "config", None)
        # FLUX.2 [dev] has a guidance embedding (and a Mistral text encoder): not this family.
        return model_class(transformer) == "Flux2Transformer2DModel" and not getattr(config, "guidance_embeds", True)

    def claims_checkpoint(self, keys_: set[str]) -> bool:
        return keys.claims(keys_)

    def is_distilled(self, pipe: Any) -> bool:
        """The pipeline config's `is_distilled` (the 4-step klein checkpoints); False without a pipeline config (a
        bare transformer, as detection sees it)."""
        config = getattr(pipe, "config", None)
        return bool(getattr(config, "is_distilled", False) or (isinstance(config, dict) and config.get("is_distilled")))

    def undistilled_base(self, pipe: Any) -> str:
        """The base checkpoint of the loaded size to train on (BFL's klein-base-4B/-9B); "" at other widths or
        without a transformer (a single file's stand-in without model.single_file_config)."""
        transformer = getattr(pipe, "transformer", None)
        if transformer is None:
            return ""
        config = denoiser_config(transformer)
        size = SIZES.get(config.num_attention_heads * config.attention_head_dim)
        return f"black-forest-labs/FLUX.2-klein-base-{size.upper()}" if size else ""

    def variant(self, pipe: Any) -> str:
        """ "4b-base", "4b-distilled", "9b-base", "9b-distilled"; "base"/"distilled" alone at other widths."""
        config = denoiser_config(pipe.transformer)
        size = SIZES.get(config.num_attention_heads * config.attention_head_dim)
        kind = "distilled" if self.is_distilled(pipe) else "base"
        return f"{size}-{kind}" if size else kind

    def prediction_type(self, pipe: Any) -> str:
        return "flow"

    def inpainting_kind(self, pipe: Any) -> str | None:
        return None  # klein inpaints with its ordinary transformer (the photo as reference tokens)

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        return {pipe.transformer.config.joint_attention_dim}

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        size = variant.split("-")[0] if "-" in variant else ""
        return f"flux2_klein_{size}" if size else "flux2_klein"

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        size = variant.split("-")[0] if "-" in variant else ""
        return f"Flux.2-klein-{size}/lora" if size else "Flux.2-klein/lora"

    def sequence_length(self, pipe: Any, configured: int | None) -> int | None:
        """Qwen3 tokens per prompt: `model.max_sequence_length`, else the pipeline's 512."""
        return configured or SEQUENCE_LENGTH

    def text_to_image(self, pipe: Any) -> Any:
        return pipe

    def generate_defaults(self, pipe: Any) -> dict[str, Any]:
        """Base: 50 steps, CFG 4; distilled: 4 steps, CFG off; training sigmas unshifted (UNSHIFTED)."""
        kind = "distilled" if self.is_distilled(pipe) else "base"
        own = {"generate.scheduler": "flow_euler", "train.timestep_shift": UNSHIFTED}
        return {**GENERATE_DEFAULTS[kind], **own}

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        raise UsageError(f"{self.label} bases take no control images (edit_training)")

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        """As Flux2KleinPipeline.encode_prompt computes it: the chat template with enable_thinking=False, padded
        to 512 tokens (the mask goes to Qwen3, not to the transformer), hidden layers 9, 18 and 27 stacked along
        the width: "prompt_embeds" (B, L, 3D). {} when the encoder is given as None (encoded apart)."""
        import torch

        tokenizer, encoder = tokenizers[0], encoders[0]
        if encoder is None:
            return {}
        depth = encoder.config.num_hidden_layers
        if depth < max(TEXT_LAYERS):
            raise SdloraError(
                f"the text encoder has {depth} layers; FLUX.2 [klein] reads its hidden layers {TEXT_LAYERS} "
                "(Qwen3-4B/8B have 36): not a klein text encoder"
            )
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for prompt in prompts
        ]
        length = max_sequence_length or SEQUENCE_LENGTH
        ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        output = encoder(
            input_ids=ids.input_ids.to(device),
            attention_mask=ids.attention_mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([output.hidden_states[k] for k in TEXT_LAYERS], dim=1).to(encoder.dtype)
        b, layers, tokens, width = stacked.shape
        return {"prompt_embeds": stacked.permute(0, 2, 1, 3).reshape(b, tokens, layers * width)}

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> ComfyParts:
        """UNETLoader + CLIPLoader (Qwen3, ComfyUI's type "flux2") + VAELoader, EmptyFlux2LatentImage and the
        Flux2Scheduler sigmas (the pipeline's resolution-dependent shift, compute_empirical_mu); no guidance
        embedding. The base pipeline's CFG is neg + g * (pos - neg) for g > 1, as ComfyUI's; distilled: cfg 1."""
        name, note = checkpoint_file(base, COMFYUI_CHECKPOINTS)
        config = denoiser_config(pipe.transformer)
        size = SIZES.get(config.num_attention_heads * config.attention_head_dim, "4b")
        text = COMFYUI_TEXT_ENCODERS[size]
        return ComfyParts(
            nodes={
                "unet": loader("UNETLoader", unet_name=name, weight_dtype="default"),
                "clip": loader("CLIPLoader", clip_name=text, type="flux2", device="default"),
                "vae": loader("VAELoader", vae_name="flux2-vae.safetensors"),
            },
            model=["unet", 0],
            clip=["clip", 0],
            vae=["vae", 0],
            latent="EmptyFlux2LatentImage",
            cfg=1.0 if self.is_distilled(pipe) else true_cfg(cfg),
            sigmas="Flux2Scheduler",
            notes=((note,) if note else ()) + (f"{text}: the Qwen3 text encoder of this klein size",),
            references="ReferenceLatent",  # each photo's latent on both prompts, as the pipeline's image tokens
            reference_notes=(REFERENCE_NOTE,),
        )

    def render_from_cache(self, pipe: Any, rows: dict[str, Conditioning]) -> None:
        """Make `pipe` render from cached conditioning (staged training: Qwen3 is gone): its encode_prompt looks
        each prompt (and the empty negative prompt) up in `rows` ({prompt: {"prompt_embeds": (L, 3D)}})."""
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
        """The velocity for (B, C, H, W) normalised latents at sigmas `timesteps` (B,): patchified and packed into
        (B, H/2 * W/2, 4C) tokens with their (t, h, w, l) positions, the text's positions, the timestep in [0, 1]
        (the pipeline's t / 1000), no guidance; unpacked back to (B, C, H, W)."""
        b, _, h, w = noisy.shape
        patches = patchify(noisy)  # (B, 4C, h, w)
        channels = patches.shape[1]
        tokens = patches.reshape(b, channels, (h // 2) * (w // 2)).permute(0, 2, 1)
        prompt_embeds = cond["prompt_embeds"].to(noisy.dtype)
        out = model(
            hidden_states=tokens,
            timestep=timesteps.to(noisy.dtype),
            guidance=None,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids(prompt_embeds),
            img_ids=image_ids(b, h // 2, w // 2, noisy.device),
            return_dict=False,
        )[0]
        out = out[:, : tokens.shape[1]].permute(0, 2, 1).reshape(b, channels, h // 2, w // 2)
        return unpatchify(out).to(noisy.dtype)

    def objective(self, scheduler: Any, device: Any, sampling: str = "auto", shift: float | None = None) -> Any:
        """Flow matching; 'auto' draws unshifted U(0, 1) sigmas as diffusers' klein script does, or, with a
        train.timestep_shift other than 1, the shift scheme at that value."""
        from sdlora.objectives import FlowMatching

        shift = UNSHIFTED if shift is None else shift
        return FlowMatching(unshifted_sampling(sampling, shift), shift)

    def denoiser_targets(self, targets: str) -> str:
        """A regular expression over module paths (peft matches it whole)."""
        return f"{ATTENTION}|{DOUBLE_EXTRA}" if targets == "all" else ATTENTION

    def text_encoder_targets(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]  # Qwen3's attention (never trained here)

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        return keys.bfl_module

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        if encoders:
            raise UsageError("FLUX.2 [klein]'s Qwen3 text encoder is never trained: it has no LoRA to save")
        return []

    def ui_lora_state(self, denoiser: Any, text_encoders: Sequence[Any], adapter: str, dtype: Any) -> dict | None:
        return None  # kohya's BFL names (`lora_unet_double_blocks_0_img_attn_qkv`): what ComfyUI reads for FLUX.2

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """A pipeline call's packed (B, N, 4C) latents of a (width, height) image -> what the VAE decodes."""
        vae = pipe.vae
        h, w = height // (pipe.vae_scale_factor * 2), width // (pipe.vae_scale_factor * 2)
        b, _, channels = latents.shape
        patches = latents.permute(0, 2, 1).reshape(b, channels, h, w).to(vae.dtype)
        mean, std = batch_norm_stats(vae, patches)
        return unpatchify(patches * std + mean)

    def normalize_latents(self, vae: Any, latents: Any) -> Any:
        """Patchified, normalised by the VAE's batch-norm statistics, unpatchified (the pipeline's
        _encode_vae_image, in image order)."""
        patches = patchify(latents)
        mean, std = batch_norm_stats(vae, patches)
        return unpatchify((patches - mean) / std)

    def denormalize_latents(self, vae: Any, latents: Any) -> Any:
        patches = patchify(latents)
        mean, std = batch_norm_stats(vae, patches)
        return unpatchify(patches * std + mean)

    def x0_prediction(self, scheduler: Any, model_output: Any, timestep: Any, sample: Any, out: Any) -> Any:
        """x_0 = x_t - sigma v, with the sigma of the step just taken (`step` has advanced step_index past it)."""
        from sdlora.objectives import flow_x0

        sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device).expand(sample.shape[0])
        return flow_x0(sample, model_output.to(sample.dtype), sigma)

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        """A transformer-only original file (`flux-2-klein-4b.safetensors`, bare or under ComfyUI's
        `model.diffusion_model.`), read by diffusers' own FLUX.2 converter, with the rest of `config`'s pipeline."""
        from sdlora.families.klein.single_file import load_pipeline

        return load_pipeline(path, config, kwargs)

    def save_single_file(self, pipe: Any, path: Any) -> None:
        """The transformer alone under BFL's names, as `flux-2-klein-4b.safetensors` ships."""
        from safetensors.torch import save_file

        state = keys.to_bfl(pipe.transformer.state_dict())
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def kohya_metadata(self, info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
        """How the LoRA was trained, in kohya's keys (with the family's defaults applied, 'auto' recorded as what
        it drew: uniform, the unshifted sigmas of diffusers' klein script, or shift), and the checkpoint it was
        trained on (size and whether distilled)."""
        size, _, kind = info.variant.rpartition("-")
        return kohya_flow_metadata(train, unshifted_sampling(train.timestep_sampling, train.timestep_shift)) | {
            "ss_max_token_length": str(max_sequence_length or SEQUENCE_LENGTH),
            "ss_text_encoder_layers": ",".join(str(layer) for layer in TEXT_LAYERS),
            "sdlora.klein_variant": info.variant,
            "sdlora.klein_size": size,
            "sdlora.klein_distilled": str(kind == "distilled"),
        }

    def tiny_pipeline(self, seed: int) -> Any:
        from sdlora.families.klein.tiny import tiny_klein_pipeline

        return tiny_klein_pipeline(seed=seed)


@dataclass(frozen=True)
class CachedPrompts:
    """Flux2KleinPipeline.encode_prompt from cached rows: what the pipeline computes, without Qwen3."""

    pipe: Any
    rows: dict[str, Conditioning]

    def __call__(
        self,
        prompt: str | list[str] | None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: Any = None,
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = TEXT_LAYERS,
    ) -> tuple[Any, Any]:
        import torch

        prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
        device = device or self.pipe._execution_device
        if prompt_embeds is None:
            rows = cached_rows(self.rows, prompts)
            prompt_embeds = torch.stack([row["prompt_embeds"] for row in rows]).to(device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)  # as the pipeline repeats
        return prompt_embeds, text_ids(prompt_embeds).to(device)


KLEIN = Klein()
