"""Qwen-Image's names outside diffusers: the released single files (Qwen's and ComfyUI's `qwen_image*.safetensors`)
and ComfyUI's own module names are diffusers' QwenImageTransformer2DModel names, so a transformer needs no renaming
(diffusers' single-file mapping for it is the identity) and ComfyUI reads LoRA files under `diffusion_model.`,
`transformer.` or bare diffusers names (its comfy/lora.py, QwenImage branch; checked on the pip-installable fork).
Here: telling a Qwen-Image transformer from its keys, and the LoRA file ComfyUI reads."""

from __future__ import annotations

from typing import Any

# What a Qwen-Image transformer has and FLUX.1/FLUX.2/Z-Image files don't: the RMS norm of the text input and the
# image stream's modulation of block 0. Qwen-Image 2.1 names its text norm `txt_in.text_norm`: not this family.
MARKERS = ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")
CHECKPOINT_PREFIX = "model.diffusion_model."  # ComfyUI's prefix in a file that holds more than the transformer
COMFYUI_PREFIX = "diffusion_model."  # the prefix ComfyUI's own Qwen-Image LoRA files use


def claims(keys: set[str]) -> bool:
    """True for a Qwen-Image transformer's tensor keys, bare or under ComfyUI's `model.diffusion_model.`."""
    bare = {key.removeprefix(CHECKPOINT_PREFIX) for key in keys}
    return all(marker in bare for marker in MARKERS)


def comfyui_lora_state(denoiser: Any, adapter: str, dtype: Any) -> dict[str, Any]:
    """`diffusion_model.<module>.lora_A.weight`/`.lora_B.weight` of every LoRA layer of `denoiser` holding
    `adapter`, with peft's scale (alpha / r) multiplied into lora_B and no `.alpha` keys: ComfyUI then scales by 1,
    and diffusers' Qwen-Image reader, which strips `diffusion_model.`, by 1 (an `.alpha` key would send diffusers
    0.42 down its kohya conversion)."""
    from peft.tuners.lora import LoraLayer

    from sdlora.errors import SdloraError

    state: dict[str, Any] = {}
    for path, layer in denoiser.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
            raise SdloraError(f"{path}: Qwen-Image's ComfyUI LoRA file holds plain LoRA layers; use --adapter lora")
        while path.startswith(("module.", "_orig_mod.")):  # DDP's and torch.compile's wrappers
            path = path.split(".", 1)[1]
        down = layer.lora_A[adapter].weight.detach().to("cpu", copy=True)  # (r, in)
        up = layer.lora_B[adapter].weight.detach().to("cpu", copy=True) * float(layer.scaling[adapter])  # (out, r)
        state[f"{COMFYUI_PREFIX}{path}.lora_A.weight"] = down.to(dtype).contiguous()
        state[f"{COMFYUI_PREFIX}{path}.lora_B.weight"] = up.to(dtype).contiguous()
    if not state:
        raise SdloraError(f"no LoRA layers named {adapter!r} in the transformer: nothing to save")
    return state


def transformer_state(path: Any) -> Any:
    """What diffusers' single-file reader takes: the file's path, or, where the transformer sits under ComfyUI's
    `model.diffusion_model.` (its mapping for Qwen-Image is the identity and knows no prefix), those tensors alone
    under their bare names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = [key for key in handle.keys() if key.startswith(CHECKPOINT_PREFIX)]  # noqa: SIM118 (not a dict)
        if not names:
            return str(path)
        return {key.removeprefix(CHECKPOINT_PREFIX): handle.get_tensor(key) for key in names}
