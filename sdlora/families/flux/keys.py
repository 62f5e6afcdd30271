"""Flux.1's two sets of module names: diffusers' (FluxTransformer2DModel) and Black Forest Labs' original ones (the
single-file checkpoints, kohya's LoRA names, ComfyUI), where q, k and v (and, in single blocks, the MLP input)
are one fused layer. Used for kohya LoRA names and to convert whole transformer state dicts both ways."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Inside double block N: diffusers linear module -> (BFL module, part, parts); parts > 1: rows of a fused layer.
DOUBLE_LINEAR = {
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1),
    "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
    "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1),
    "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
SINGLE_LINEAR = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation.lin", 0, 1),
}
DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
TOP_LINEAR = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # BFL stores (shift, scale), diffusers (scale, shift)
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"  # what diffusers' own detection looks for


@dataclass(frozen=True)
class BflNames:
    """Black Forest Labs' names of one transformer's linear modules (FLUX.1's, FLUX.2's): inside a double block and a
    single block, diffusers module -> (BFL module, part, parts), and the top-level ones; the norms are the same."""

    double: Mapping[str, tuple[str, int, int]]
    single: Mapping[str, tuple[str, int, int]]
    top: Mapping[str, str]

    def module(self, path: str) -> tuple[str, int, int]:
        """A diffusers linear module path -> (BFL module path, part, parts); KeyError for modules BFL has no name
        for."""
        match = _BLOCK.match(path)
        if match is None:
            return self.top[path], 0, 1
        kind, index, rest = match.groups()
        double = kind == "transformer_blocks"
        module, part, parts = (self.double if double else self.single)[rest]
        return f"{'double_blocks' if double else 'single_blocks'}.{index}.{module}", part, parts

    def to_bfl(self, state: dict[str, Any]) -> dict[str, Any]:
        """A diffusers transformer state dict under BFL names, fused layers concatenated (the inverse of diffusers'
        convert_flux_transformer_checkpoint_to_diffusers and convert_flux2_transformer_checkpoint_to_diffusers)."""
        import torch

        fused: dict[str, dict[int, Any]] = {}
        out: dict[str, Any] = {}
        for key, tensor in state.items():
            module, _, param = key.rpartition(".")
            block = _BLOCK.match(key)
            norms = (DOUBLE_NORMS if block.group(1) == "transformer_blocks" else SINGLE_NORMS) if block else {}
            if block and block.group(3) in norms:
                prefix = "double_blocks" if block.group(1) == "transformer_blocks" else "single_blocks"
                out[f"{prefix}.{block.group(2)}.{norms[block.group(3)]}"] = tensor
                continue
            name, part, parts = self.module(module)
            if module == "norm_out.linear":
                tensor = _swap_halves(tensor)
            if parts > 1:
                fused.setdefault(f"{name}.{param}", {})[part] = tensor
            else:
                out[f"{name}.{param}"] = tensor
        for key, members in fused.items():
            out[key] = torch.cat([members[i] for i in sorted(members)])
        return out


def _swap_halves(tensor: Any) -> Any:
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


FLUX1_NAMES = BflNames(DOUBLE_LINEAR, SINGLE_LINEAR, TOP_LINEAR)
bfl_module, to_bfl = FLUX1_NAMES.module, FLUX1_NAMES.to_bfl


def from_bfl(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """BFL-named tensors (with or without ComfyUI's `model.diffusion_model.` prefix) -> diffusers names, the fused
    layers split by the widths of `config` (a FluxTransformer2DModel config), not the real model's widths.
    KeyError for a missing tensor, ValueError for a fused one whose rows don't split at those widths."""
    inner = config.num_attention_heads * config.attention_head_dim
    mlp = int(inner * getattr(config, "mlp_ratio", 4.0))
    state = {key.removeprefix("model.diffusion_model."): value for key, value in state.items()}
    out: dict[str, Any] = {}
    wanted: list[tuple[str, str]] = [(bfl, dif) for dif, bfl in TOP_LINEAR.items()]
    for i in range(config.num_layers):
        wanted += [(f"double_blocks.{i}.{b}", f"transformer_blocks.{i}.{d}") for d, b in DOUBLE_NORMS.items()]
    for i in range(config.num_single_layers):
        wanted += [(f"single_blocks.{i}.{b}", f"single_transformer_blocks.{i}.{d}") for d, b in SINGLE_NORMS.items()]
    for bfl, dif in wanted:
        for param in ("weight", "bias", ""):
            source = f"{bfl}.{param}" if param else bfl
            if source in state:
                tensor = state[source]
                out[f"{dif}.{param}" if param else dif] = _swap_halves(tensor) if dif == "norm_out.linear" else tensor
    for kind, count, table, sizes in (
        ("transformer_blocks", config.num_layers, DOUBLE_LINEAR, [inner] * 3),
        ("single_transformer_blocks", config.num_single_layers, SINGLE_LINEAR, [inner] * 3 + [mlp]),
    ):
        for i in range(count):
            for rest in table:
                name, part, parts = bfl_module(f"{kind}.{i}.{rest}")
                for param in ("weight", "bias"):
                    tensor = state[f"{name}.{param}"]
                    if parts > 1:
                        if tensor.shape[0] != sum(sizes):
                            widths = " + ".join(str(size) for size in sizes)
                            raise ValueError(
                                f"{name}.{param} has {tensor.shape[0]} rows where the config's widths give "
                                f"{sum(sizes)} ({widths})"
                            )
                        tensor = tensor.split(sizes, dim=0)[part]
                    out[f"{kind}.{i}.{rest}.{param}"] = tensor
    return out
