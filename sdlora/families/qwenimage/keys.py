"""Qwen-Image's names outside diffusers: the released single files (Qwen's and ComfyUI's `qwen_image*.safetensors`)
and ComfyUI's own module names are diffusers' QwenImageTransformer2DModel names, so a transformer needs no renaming
(diffusers' single-file mapping for it is the identity) and ComfyUI reads LoRA files under `diffusion_model.`,
`transformer.` or bare diffusers names, and `lycoris_` + the names with "_" for "." (its comfy/lora.py, QwenImage
branch; checked on the pip-installable fork; sdlora's DoRA and LoKr files use those: lora.kohya.denoiser_naming).
Here: telling a Qwen-Image transformer from its keys (its ComfyUI LoRA file:
sdlora.families.comfyui.baked_lora_state)."""

from __future__ import annotations

from typing import Any

# What a Qwen-Image transformer has and FLUX.1/FLUX.2/Z-Image files don't: the RMS norm of the text input and the
# image stream's modulation of block 0. Qwen-Image 2.1 names its text norm `txt_in.text_norm`: not this family.
MARKERS = ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")
CHECKPOINT_PREFIX = "model.diffusion_model."  # ComfyUI's prefix in a file that holds more than the transformer


def claims(keys: set[str]) -> bool:
    """True for a Qwen-Image transformer's tensor keys, bare or under ComfyUI's `model.diffusion_model.`."""
    bare = {key.removeprefix(CHECKPOINT_PREFIX) for key in keys}
    return all(marker in bare for marker in MARKERS)


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
