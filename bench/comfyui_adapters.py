"""`bench/comfyui_check.py --adapter dora|lokr`: our DoRA and LoKr kohya files through ComfyUI's own loader.

As for plain LoRA, the UNet and CLIP text encoder(s) of SD 1.5 or SDXL are built on the meta device and ComfyUI
builds its own model from a checkpoint of broadcast zeros; the adapter's own tensors are real and random. DoRA's
result depends on the base weight, so each adapted layer gets a real random base weight W (seeded by its module
path, made one layer at a time and dropped again), its magnitude m is set to ||W + dW|| per output row times
(1 + 10% noise), and its dW is scaled to `DORA_CHANGE` of ||W|| (a trained adapter's size; see the README).

For every weight ComfyUI patched: ComfyUI's weight (comfy.lora.calculate_weight on W) against the trained adapter's
merged weight computed by peft itself (`layer.merge()` on W for DoRA, `get_delta_weight` for LoKr), as an error
relative to the largest change; for DoRA also against ComfyUI 0.3.64's own formula m (W + dW) / ||W||, which
normalises by the base weight's norm (ComfyUI PR #15458), to show that every other part of the file lands as meant.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

DORA_CHANGE = 0.05  # ||dW|| / ||W|| of each DoRA layer in this check


def base_weight(path: str, shape: torch.Size) -> torch.Tensor:
    """A layer's random base weight, the same every time for the same module path: randn / sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    return torch.randn(shape, generator=generator) / shape[1:].numel() ** 0.5


def peft_config(kind: str, rank: int, alpha: float, targets: Any):
    import peft

    if kind == "lokr":
        return peft.LoKrConfig(r=rank, alpha=alpha, target_modules=targets)
    return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=True)


def randomise(models: dict[str, Any], kind: str) -> None:
    """Real random tensors for every adapter parameter (the base stays on the meta device)."""
    from sdlora.lora import kohya

    generator = torch.Generator().manual_seed(0)
    for name, model in models.items():
        for path, layer, _ in kohya.adapter_layers(model):
            for param_name, param in list(layer.named_parameters(recurse=True)):
                if "default" not in param_name or "base_layer" in param_name:
                    continue
                module_name, _, attr = param_name.rpartition(".")
                owner = layer.get_submodule(module_name) if module_name else layer
                value = torch.randn(param.shape, generator=generator) / max(param.shape[-1], 1) ** 0.5
                setattr(owner, attr, torch.nn.Parameter(value))
            if kind == "dora":
                set_magnitude(f"{name}.{path}", layer, generator)


def set_magnitude(key: str, layer: Any, generator: torch.Generator) -> None:
    """dW scaled to DORA_CHANGE of ||W||; m = ||W + dW|| per output row, with 10% noise (a trained magnitude)."""
    weight = base_weight(key, layer.get_base_layer().weight.shape)
    up = layer.lora_B["default"].weight
    delta = layer.scaling["default"] * (up.flatten(1) @ layer.lora_A["default"].weight.flatten(1))
    factor = DORA_CHANGE * weight.norm() / delta.norm()
    layer.lora_B["default"].weight = torch.nn.Parameter(up.detach() * factor)
    norm = (weight.flatten(1) + delta * factor).norm(dim=1)
    noise = 1 + 0.1 * torch.randn(norm.shape, generator=generator)
    magnitude = layer.lora_magnitude_vector["default"]
    magnitude.weight = torch.nn.Parameter((norm * noise).reshape(magnitude.weight.shape))


def expected_weight(key: str, layer: Any, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W, peft's merged weight, ComfyUI 0.3.64's DoRA formula or None) of one adapted layer."""
    base = layer.get_base_layer()
    weight = base_weight(key, base.weight.shape)
    if kind == "lokr":
        return weight, weight + layer.get_delta_weight("default"), None
    meta = base.weight
    base.weight = torch.nn.Parameter(weight.clone())
    layer.merge(adapter_names=["default"])  # peft's own DoRA merge: m (W + dW) / ||W + dW||
    merged = base.weight.detach().clone()
    base.weight, layer.merged_adapters = meta, []
    delta = layer.get_delta_weight("default").reshape(weight.shape)
    rows = (1,) * (weight.ndim - 1)
    magnitude = layer.lora_magnitude_vector["default"].weight.reshape(-1, *rows)
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *rows) + torch.finfo(weight.dtype).eps
    return weight, merged, (weight + delta) * magnitude / norm


def compare(patcher, lora: dict, layers: dict[str, tuple[str, Any]], kind: str) -> dict:
    """Patched weights and the largest relative errors against the trained merge (and ComfyUI's DoRA formula)."""
    import comfy.lora
    import comfy.utils

    ids = {id(t): k.split(".", 1)[0] for k, t in lora.items()}
    worst, worst_formula = 0.0, 0.0
    for key, patches in patcher.patches.items():
        if len(patches) != 1:
            raise SystemExit(f"{key}: {len(patches)} patches, expected one module per weight")
        adapter = patches[0][1]
        module = next(ids[id(t)] for t in adapter.weights if isinstance(t, torch.Tensor) and id(t) in ids)
        path_key, layer = layers[module]
        weight, merged, formula = expected_weight(path_key, layer, kind)
        if comfy.utils.get_attr(patcher.model, key).shape != weight.shape:
            raise SystemExit(f"{key}: ComfyUI's weight has another shape than {module}'s base layer")
        patched = comfy.lora.calculate_weight(patches, weight.clone(), key)  # fp32 throughout
        change = (merged - weight).abs().max()
        worst = max(worst, ((patched - merged).abs().max() / change).item())
        if formula is not None:
            worst_formula = max(worst_formula, ((patched - formula).abs().max() / change).item())
    result = {"weights_patched": len(patcher.patches), "max_relative_error_vs_trained": worst}
    if kind == "dora":
        result["max_relative_error_vs_comfyui_formula"] = worst_formula
    return result


def check_adapter(family: str, kind: str, workdir: Path, build_models, original_checkpoint, collect_cls) -> dict:
    """Write our kohya file of a `kind` adapter on the full SD 1.5 / SDXL architecture, load it with ComfyUI's
    loader, count the keys it used and compare every patched weight with the trained adapter's merge."""
    import comfy.sd
    import comfy.utils

    from sdlora import families
    from sdlora.lora import kohya

    started = time.time()
    unet, encoders = build_models(family, kind)
    models = {"unet": unet} | {f"text_encoder{'_2' if i else ''}": e for i, e in enumerate(encoders)}
    randomise(models, kind)
    path = workdir / f"check-{family}-{kind}.safetensors"
    kohya.save_kohya(path, kohya.kohya_state_dict(unet, encoders, family, dtype=torch.float32), {})
    pipe = SimpleNamespace(**models)
    layers: dict[str, tuple[str, Any]] = {}
    for attr, model, names in kohya.named_models(pipe, families.get(family)):
        modules = dict(model.named_modules())
        layers |= {name: (f"{attr}.{p}", modules[p]) for name, p in names.items() if hasattr(modules[p], "r")}
    checkpoint = original_checkpoint(family, unet, encoders)
    collect = collect_cls()
    logging.getLogger().addHandler(collect)
    try:
        dtype = {"dtype": torch.float16} if family == "sdxl" else {}
        model, clip, _, _ = comfy.sd.load_state_dict_guess_config(
            checkpoint, output_vae=False, model_options=dtype, te_model_options=dtype
        )
        del checkpoint
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(collect)
    skipped = [m for m in collect.messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
    errors = [m for m in collect.messages if m.startswith("ERROR")]
    unet_result = compare(new_model, lora, layers, kind)
    clip_result = compare(new_clip.patcher, lora, layers, kind)
    return {
        "family": family,
        "adapter": kind,
        "keys_in_file": len(lora),
        "keys_skipped": len(skipped),
        "skipped_examples": skipped[:5],
        "comfyui_errors": errors[:5],
        "adapter_modules": len(layers),
        "unet": unet_result,
        "text_encoders": clip_result,
        "seconds": round(time.time() - started, 1),
    }
