"""The UNet module names of the original (LDM/SGM) layout: the keys of SD 1.x/2.x and SDXL single-file checkpoints,
and SDXL's kohya LoRA names (sdlora.families.sdxl.keys).

SGM numbers every layer of the UNet in one sequence: `input_blocks.0` is conv_in, then each down block has
`layers_per_block` (resnet, attention) pairs and a downsampler; each up block has one layer more. Inside a layer,
`.0` is the resnet and `.1` the attention (`.1`/`.2` the upsampler after it).
"""

from __future__ import annotations

from collections.abc import Sequence

from sdlora.errors import SdloraError

# Inside a diffusers ResnetBlock2D -> inside an SGM ResBlock.
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the down/mid/up blocks.
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sgm_path(path: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str:
    """Map a diffusers UNet module path to the original SGM path.

    SGM numbers every layer of the UNet in one sequence: `input_blocks.0` is conv_in, then each down block
    has `layers_per_block` (resnet, attention) pairs and a downsampler; each up block has one layer more.
    Inside a layer, `.0` is the resnet and `.1` the attention (`.1`/`.2` the upsampler after it).
    """
    for diffusers_name, sgm_name in _SGM_TOP.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return sgm_name + path[len(diffusers_name) :]
    parts = path.split(".")
    stride = layers_per_block + 1
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = {"resnets": 2 * index, "attentions": 1}[kind]
        return ".".join(["middle_block", str(slot), *_inner(kind, rest)])
    if parts[0] not in ("down_blocks", "up_blocks"):
        raise SdloraError(f"UNet module {path!r} has no known SGM name")
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # diffusers' `conv` is SGM's `op`
            return ".".join(["input_blocks", str(1 + block * stride + layers_per_block), "0", "op", *rest[1:]])
        layer = 1 + block * stride + index
        return ".".join(["input_blocks", str(layer), _slot(kind), *_inner(kind, rest)])
    if kind == "upsamplers":
        slot = "2" if up_has_attention[block] else "1"
        return ".".join(["output_blocks", str(block * stride + layers_per_block), slot, *rest])
    return ".".join(["output_blocks", str(block * stride + index), _slot(kind), *_inner(kind, rest)])


def _slot(kind: str) -> str:
    return {"resnets": "0", "attentions": "1"}[kind]


def _inner(kind: str, rest: list[str]) -> list[str]:
    """Resnet submodules are renamed; attention (transformer) submodules keep their names in SGM."""
    if kind == "resnets" and rest:
        return [*_SGM_RESNET[rest[0]].split("."), *rest[1:]]
    return rest
