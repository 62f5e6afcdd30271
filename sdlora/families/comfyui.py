"""What each family tells the ComfyUI workflow writer (sdlora.comfyui.workflow): the built-in nodes that load its
base and set its sampling as sdlora's render does, and the file names a ComfyUI models folder holds for a base."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LORA_PREFIX = "diffusion_model."  # ComfyUI's own prefix of a DiT's LoRA keys in diffusers names
Link = list[Any]  # ComfyUI API format's link to another node's output: [node id, output index]


@dataclass(frozen=True)
class ComfyParts:
    """A family's part of a ComfyUI API-format graph; the writer adds the LoRA, prompts, sampler and decoding."""

    nodes: dict[str, dict[str, Any]]  # node id -> {"class_type", "inputs"}: the loaders of base, text encoders, VAE
    model: Link  # the denoiser (MODEL) output
    clip: Link  # the text encoders (CLIP) output
    vae: Link  # the VAE output
    latent: str  # the empty-latent node class (takes width, height, batch_size)
    cfg: float  # KSampler's cfg that reproduces the diffusers pipeline's guidance_scale
    # A node that takes "model" (the writer links it after the LoRA) and sets the sampling (shift, v-prediction)
    # as the diffusers scheduler does; None: the checkpoint's own, as ComfyUI detects it, is the same.
    sampling: dict[str, Any] | None = None
    # Distilled guidance: a node taking "conditioning" (FluxGuidance with its "guidance" value) that the positive
    # prompt passes through; None when the base has none.
    guidance: dict[str, Any] | None = None
    # A sigmas node taking (steps, width, height) whose schedule the diffusers pipeline uses (FLUX.2's
    # Flux2Scheduler: a shift that depends on size and steps): the images then sample with SamplerCustomAdvanced
    # (RandomNoise, CFGGuider, KSamplerSelect) on its sigmas instead of KSampler's scheduler. None: KSampler.
    sigmas: str | None = None
    notes: tuple[str, ...] = field(default=())  # what differs from sdlora's render, or which file to fetch
    # generate --reference's photos, where the base takes them: the prompt encoder node that takes them with the VAE
    # (Qwen-Image-Edit: TextEncodeQwenImageEditPlus, image1..3; the first Edit: TextEncodeQwenImageEdit, image), or
    # "ReferenceLatent" (each photo VAE-encoded and chained onto both prompts' conditioning: FLUX.1 Kontext,
    # FLUX.2 [klein]); None where it takes none.
    references: str | None = None
    reference_scale: dict[str, Any] | None = None  # a node taking "image": each photo scaled as the pipeline does
    reference_method: dict[str, Any] | None = None  # a node taking "conditioning", after the photos (Edit-2511's)
    reference_notes: tuple[str, ...] = field(default=())  # what differs, said where the run has photos
    # The node that encodes a prompt (it takes "clip") and the name of its text input: where the family's prompt
    # template is not the one CLIPTextEncode applies (Qwen-Image-Edit's: TextEncodeQwenImageEditPlus, no image).
    prompt_node: tuple[str, str] = ("CLIPTextEncode", "text")


def checkpoint_file(base: str, known: dict[str, str]) -> tuple[str, str | None]:
    """The file name a ComfyUI models folder holds for `base` (model.base), and a note when it is a guess: a
    single file keeps its own name; a known hub id the name its publishers give the single file; anything else
    (a diffusers folder, another hub id) its last path part + ".safetensors"."""
    path = Path(base)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".sft", ".gguf") and not base.endswith("/"):
        return path.name, None
    if base in known:
        note = f"{known[base]}: the single file published for {base}; rename it in the loader if yours differs"
        return known[base], note
    name = f"{path.name or base}.safetensors"
    return name, f"{name}: named after {base} (no single file known for it); pick your file in the loader"


def loader(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def v_prediction(scheduler_config: Any) -> dict[str, Any] | None:
    """ModelSamplingDiscrete for a v-prediction UNet (ComfyUI tells SD 2.x-768's from its keys, but not a v-tuned
    SD 1.x/SDXL); None for epsilon."""
    if scheduler_config.get("prediction_type", "epsilon") != "v_prediction":
        return None
    zsnr = bool(scheduler_config.get("rescale_betas_zero_snr", False))
    return loader("ModelSamplingDiscrete", sampling="v_prediction", zsnr=zsnr)


def true_cfg(cfg: float) -> float:
    """KSampler's cfg for a diffusers guidance_scale of uncond + cfg * (cond - uncond): the same, except that
    diffusers turns guidance off at cfg <= 1 where ComfyUI's cond-only value is exactly 1."""
    return cfg if cfg > 1 else 1.0


def baked_lora_state(denoiser: Any, adapter: str, dtype: Any, label: str) -> dict[str, Any]:
    """The LoRA file ComfyUI reads for a family whose LoRA keys are diffusers module names under `diffusion_model.`
    (Z-Image, Qwen-Image): `diffusion_model.<module>.lora_A.weight`/`.lora_B.weight` of every LoRA layer of
    `denoiser` holding `adapter`, peft's scale (alpha / r) multiplied into lora_B and no `.alpha` keys. ComfyUI then
    scales by 1, and so do diffusers' readers of these families (an `.alpha` beside a prefix breaks diffusers 0.42's
    conversion of both). `label` names the family in errors."""
    from peft.tuners.lora import LoraLayer

    from sdlora.errors import SdloraError

    state: dict[str, Any] = {}
    for path, layer in denoiser.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
            raise SdloraError(f"{path}: {label}'s ComfyUI LoRA file holds plain LoRA layers only; use --adapter lora")
        while path.startswith(("module.", "_orig_mod.")):  # DDP's and torch.compile's wrappers
            path = path.split(".", 1)[1]
        down = layer.lora_A[adapter].weight.detach().to("cpu", copy=True)  # (r, in)
        up = layer.lora_B[adapter].weight.detach().to("cpu", copy=True) * float(layer.scaling[adapter])  # (out, r)
        state[f"{LORA_PREFIX}{path}.lora_A.weight"] = down.to(dtype).contiguous()
        state[f"{LORA_PREFIX}{path}.lora_B.weight"] = up.to(dtype).contiguous()
    if not state:
        raise SdloraError(f"no LoRA layers named {adapter!r} in the transformer: nothing to save")
    return state
