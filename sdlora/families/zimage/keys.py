"""Z-Image's two sets of names: diffusers' (ZImageTransformer2DModel) and the original ones of the released single
files (Tongyi-MAI's and ComfyUI's `z_image*.safetensors`), where q, k and v are one fused `attention.qkv`. The LoRA
file ComfyUI reads for Z-Image is `diffusion_model.` + diffusers module names, alpha/rank baked in
(sdlora.families.comfyui.baked_lora_state): its Z-Image loader maps those onto the fused layers, and reads no kohya
`lora_unet_` names. DoRA and LoKr go under SimpleTuner's `lycoris_` + diffusers names, which it maps the same way
(sdlora.lora.kohya.denoiser_naming)."""

from __future__ import annotations

from typing import Any

# What diffusers' own single-file detection looks for (Lumina 2's modulation is `adaLN_modulation.1`).
MARKER = "layers.0.adaLN_modulation.0.weight"
# diffusers name fragment -> original name fragment (diffusers' convert_z_image_transformer_checkpoint_to_diffusers,
# read backwards).
_RENAMES = {
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_k.": ".attention.k_norm.",
    ".attention.norm_q.": ".attention.q_norm.",
}
_QKV = (".attention.to_q.", ".attention.to_k.", ".attention.to_v.")


def claims(keys: set[str]) -> bool:
    """True for a Z-Image transformer's original-format tensor keys (bare or under `model.diffusion_model.`)."""
    return MARKER in keys or f"model.diffusion_model.{MARKER}" in keys


def to_original(state: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ZImageTransformer2DModel state dict under the original names, q/k/v concatenated into qkv."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[int, Any]] = {}
    for key, tensor in state.items():
        part = next((i for i, fragment in enumerate(_QKV) if fragment in key), None)
        if part is not None:
            fused.setdefault(key.replace(_QKV[part], ".attention.qkv."), {})[part] = tensor
            continue
        for old, new in _RENAMES.items():
            key = key.replace(old, new)
        out[key] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in range(3)])
    return out
