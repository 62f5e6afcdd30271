"""Write a loaded SD pipeline as ONE original-format (LDM, "A1111") `.safetensors` checkpoint: the tests' stand-in
for the files people download (the inverse of diffusers' `from_single_file`, which loads them).

The layout is what A1111, ComfyUI and civitai files use, and what diffusers' `from_single_file` reads:
- UNet: `model.diffusion_model.<LDM path>` (`input_blocks.4.1...`), named by sdlora.families.sd.keys.sgm_path;
- VAE: `first_stage_model.<LDM path>` (`encoder.down.0.block.1...`; its attention q/k/v/proj_out are 1x1 convs);
- SD 1.x text encoder: `cond_stage_model.transformer.<transformers-4 CLIP path>`;
- SD 2.x text encoder (OpenCLIP-H): `cond_stage_model.model.<OpenCLIP path>`;
- OpenCLIP: one fused `in_proj` per attention, `text_projection` stored transposed.
SDXL's single files (sdlora.families.sdxl.single_file) are made of the same parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.families.clip_keys import text_encoder_path
from sdlora.families.sd.keys import sgm_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."

# Inside a diffusers VAE ResnetBlock2D -> inside an LDM ResnetBlock (only the shortcut differs).
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# Inside the VAE's mid-block attention: diffusers Attention -> LDM AttnBlock.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Outside the VAE's blocks.
_VAE_TOP = {"conv_norm_out": "norm_out"}
# Inside an OpenCLIP residual block (besides the fused q/k/v projection).
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def write_single_file(pipe: Any, path: Path, text_state: dict[str, Any] | None = None) -> None:
    """Write a loaded SD 1.x/2.x pipeline as one LDM checkpoint at `path`; `text_state`: the text encoders'
    tensors under their single-file names when the caller (SDXL) lays them out itself."""
    from safetensors.torch import save_file

    state = {UNET_PREFIX + unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    state |= vae_state(pipe.vae)
    if text_state is not None:
        state |= text_state
    elif pipe.unet.config.use_linear_projection:  # SD 2.x: OpenCLIP-H, no projection
        state |= open_clip_state(pipe.text_encoder, SD2_OPEN_CLIP_PREFIX)
    else:
        state |= clip_state(pipe.text_encoder, CLIP_PREFIX)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def unet_key(key: str, config: Any) -> str:
    """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight`."""
    module, _, param = key.rpartition(".")
    up_has_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    return f"{sgm_path(module, config.layers_per_block, up_has_attention)}.{param}"


def vae_state(vae: Any) -> dict[str, Any]:
    """The VAE's tensors under LDM names; attention projections become (C, C, 1, 1) convolutions."""
    levels = len(vae.config.block_out_channels)
    state = {}
    for key, tensor in vae.state_dict().items():
        name = vae_key(key, levels)
        if ".attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[VAE_PREFIX + name] = tensor
    return state


def vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key -> its LDM name; `levels`: resolution levels (decoder blocks count down)."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    names = rest.split(".")
    if names[0] in ("down_blocks", "up_blocks"):
        index = int(names[1])
        stage, level = ("down", index) if names[0] == "down_blocks" else ("up", levels - 1 - index)
        if names[2] == "resnets":  # down_blocks.0.resnets.1.conv1 -> down.0.block.1.conv1
            inner = _rename(".".join(names[4:]), _VAE_RESNET)
            return f"{part}.{stage}.{level}.block.{names[3]}.{inner}"
        # downsamplers.0.conv -> downsample.conv; upsamplers.0.conv -> upsample.conv
        return f"{part}.{stage}.{level}.{names[2][:-2]}.{'.'.join(names[4:])}"
    if names[0] == "mid_block":
        inner = ".".join(names[3:])
        if names[1] == "resnets":  # mid_block.resnets.0 -> mid.block_1
            return f"{part}.mid.block_{int(names[2]) + 1}.{_rename(inner, _VAE_RESNET)}"
        return f"{part}.mid.attn_1.{_rename(inner, _VAE_ATTENTION)}"
    return f"{part}.{_rename(rest, _VAE_TOP)}"


def _rename(path: str, table: dict[str, str]) -> str:
    """Replace the leading module name of `path` (`to_out.0.weight`) by its entry in `table`."""
    for old, new in table.items():
        if path.startswith(old + "."):
            return new + path[len(old) :]
    return path


def clip_state(encoder: Any, prefix: str) -> dict[str, Any]:
    """A CLIP text encoder under `prefix` + its transformers-4 path (`text_model.encoder.layers.0...`)."""
    return {prefix + text_encoder_path(k): v for k, v in encoder.state_dict().items()}


def open_clip_state(encoder: Any, prefix: str) -> dict[str, Any]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout: q/k/v fused into `in_proj_*`, projection transposed."""
    import torch

    sd = {text_encoder_path(k).removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    state = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:  # OpenCLIP multiplies x @ proj: (width, embed)
        state["text_projection"] = sd.pop("text_projection.weight").T
    for layer in range(encoder.config.num_hidden_layers):
        old, new = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{old}self_attn.{p}_proj.{kind}") for p in "qkv"]
            state[f"{new}attn.in_proj_{kind}"] = torch.cat(qkv)  # (3 * width, width): q, k, v stacked
        for key in [k for k in sd if k.startswith(old)]:
            state[new + _rename(key[len(old) :], _OPEN_CLIP_LAYER)] = sd.pop(key)
    if sd:
        raise ValueError(f"OpenCLIP layout has no place for {sorted(sd)[:3]}")
    return {prefix + k: v for k, v in state.items()}
