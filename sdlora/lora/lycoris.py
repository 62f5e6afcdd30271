"""DoRA and LoKr layers in kohya/LyCORIS keys (what ComfyUI and A1111 read), both ways: peft layer -> tensors of
one kohya module, and a kohya file of ours -> peft adapters on a loaded pipeline.

Per kohya module `NAME` (ComfyUI 0.3.64, comfy/weight_adapter/lora.py, lokr.py and base.py):
- DoRA: `NAME.lora_down.weight` (r, in), `NAME.lora_up.weight` (out, r), `NAME.alpha` and `NAME.dora_scale`, peft's
  magnitude on the output axis as LyCORIS writes it (`wd_on_out`): shape (out, 1) for a linear layer,
  (out, 1, 1, 1) for a conv. Never 1-D: ComfyUI divides it by a (out, 1) norm and a (out,) vector would broadcast
  to (out, out) (ComfyUI issue #12938). The merged weight is m * (W + dW) / ||W + dW|| per output row, as peft
  computes it; ComfyUI 0.3.64 divides by the base weight's row norm ||W|| instead (PR #15458 fixes that), so it
  differs from the trained model by ||W|| / ||W + dW|| per row (README "Adapter types" gives the measured size).
- LoKr: `NAME.lokr_w1` or `NAME.lokr_w1_a`/`_b`, `NAME.lokr_w2` or `NAME.lokr_w2_a`/`_b` (and `NAME.lokr_t2`),
  `NAME.alpha`; the change is kron(w1, w2) * alpha / dim, where dim is the rank of a factorised part, and 1 when
  neither factor is factorised (readers then ignore alpha): peft's scale alpha / r is then folded into lokr_w1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError

if TYPE_CHECKING:
    import torch

KINDS = ("lora", "dora", "lokr")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# Key fragments that tell an adapter kind from a file's keys (kohya/LyCORIS or peft names).
_DORA_KEYS = (".dora_scale", ".lora_magnitude_vector")


def layer_kind(layer: Any, adapter: str = "default") -> str | None:
    """'lora', 'dora' or 'lokr' for a peft layer holding `adapter`, else None."""
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoKrLayer) and adapter in layer._available_adapters:
        return "lokr"
    if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
        return "dora" if layer.use_dora.get(adapter) else "lora"
    return None


def file_kind(keys: Any) -> str:
    """The adapter kind of a LoRA file's tensor keys (kohya or peft/diffusers names)."""
    keys = list(keys)
    if any(".lokr_" in key for key in keys):
        return "lokr"
    return "dora" if any(fragment in key for key in keys for fragment in _DORA_KEYS) else "lora"


def module_tensors(layer: Any, adapter: str, kind: str) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors (suffix -> fp32 copy) of one peft DoRA or LoKr layer."""
    return dora_tensors(layer, adapter) if kind == "dora" else lokr_tensors(layer, adapter)


def dora_tensors(layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """lora_down/lora_up/alpha as for LoRA, and dora_scale: peft's magnitude as (out, 1) or (out, 1, 1, 1)."""
    import torch

    weight = layer.get_base_layer().weight
    magnitude = layer.lora_magnitude_vector[adapter].weight.detach().to("cpu", copy=True)
    return {
        "lora_down.weight": layer.lora_A[adapter].weight.detach().to("cpu", copy=True),
        "lora_up.weight": layer.lora_B[adapter].weight.detach().to("cpu", copy=True),
        # Readers scale by alpha / rank: the alpha that gives peft's scaling (also with rsLoRA).
        "alpha": torch.tensor(float(layer.scaling[adapter]) * layer.r[adapter], dtype=torch.float32),
        "dora_scale": magnitude.reshape(weight.shape[0], *[1] * (weight.ndim - 1)),
    }


def lokr_tensors(layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors of one peft LoKr layer (lokr_w1..., alpha), with the scale readers apply."""
    import torch

    out = {
        part: getattr(layer, part)[adapter].detach().to("cpu", copy=True)
        for part in LOKR_PARTS
        if adapter in getattr(layer, part)
    }
    scale, rank = float(layer.scaling[adapter]), layer.r[adapter]
    if "lokr_w1" in out and "lokr_w2" in out:  # readers apply no scale: fold peft's into w1
        out["lokr_w1"] = out["lokr_w1"] * scale
    out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out


def reader_scale(tensors: Mapping[str, torch.Tensor]) -> float:
    """The scale ComfyUI and A1111 apply to kron(w1, w2) of a LoKr module: alpha / dim of a factorised part, else 1."""
    dim = None
    if "lokr_w1_b" in tensors:
        dim = tensors["lokr_w1_b"].shape[0]
    if "lokr_w2_b" in tensors:
        dim = tensors["lokr_w2_b"].shape[0]
    alpha = tensors.get("alpha")
    return float(alpha) / dim if dim and alpha is not None else 1.0


def peft_keys(kind: str, tensors: Mapping[str, torch.Tensor], layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """One kohya module's tensors -> the peft state-dict entries (suffixes) of `layer`, which holds `adapter`
    with the config the file's metadata gave; shapes are checked."""
    if kind == "dora":
        magnitude = layer.lora_magnitude_vector[adapter].weight
        scale = tensors["dora_scale"]
        if scale.numel() != magnitude.numel() or scale.shape[0] != layer.get_base_layer().weight.shape[0]:
            raise SdloraError(
                f"dora_scale of shape {tuple(scale.shape)} is not on the output axis (older LyCORIS files normalise "
                "per input column, which peft's DoRA can't represent)"
            )
        state = {"lora_A.weight": tensors["lora_down.weight"], "lora_B.weight": tensors["lora_up.weight"]}
        return state | {"lora_magnitude_vector": scale.reshape(magnitude.shape)}
    state = {part: tensors[part] for part in LOKR_PARTS if part in tensors}
    expected = {
        part: tuple(getattr(layer, part)[adapter].shape) for part in LOKR_PARTS if adapter in getattr(layer, part)
    }
    if {part: tuple(t.shape) for part, t in state.items()} != expected:
        raise SdloraError(f"LoKr factors {sorted(state)} don't have the shapes of the adapter config {expected}")
    scale, trained = reader_scale(tensors), float(layer.scaling[adapter])
    if scale != trained:  # lokr_tensors folded peft's scale into w1: take it out again (within 1 ulp)
        first = "lokr_w1" if "lokr_w1" in state else "lokr_w1_b"
        state[first] = state[first] * scale / trained
    return state


def group_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Kohya keys `NAME.suffix` -> {NAME: {suffix: tensor}} (kohya module names hold no dots)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def adapter_config(kind: str, settings: Mapping[str, Any], paths: list[str]) -> Any:
    """A peft config for `kind` from stored settings (a peft config's to_dict), targeting exactly `paths`."""
    from peft import LoKrConfig, LoraConfig

    targets = [f"^{re.escape(path)}$" for path in paths]
    # One regular expression: peft matches a string target against whole module paths.
    target = "|".join(targets)
    if kind == "lokr":
        keep = ("r", "alpha", "decompose_both", "decompose_factor", "use_effective_conv2d", "rank_dropout")
        return LoKrConfig(target_modules=target, **{key: settings[key] for key in keep if key in settings})
    keep = ("r", "lora_alpha", "use_rslora")
    return LoraConfig(target_modules=target, use_dora=True, **{key: settings[key] for key in keep if key in settings})


def jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A peft config's to_dict() with sets as sorted lists and enums as their values (for JSON metadata)."""
    import enum

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, set | frozenset):
            return sorted(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return {key: plain(value) for key, value in config.items()}


def load_kohya(pipe: Any, family: Any, path: Any, adapter_name: str) -> None:
    """A kohya-format DoRA or LoKr file of ours -> peft adapters called `adapter_name` on the pipeline's models.
    Module names are matched by naming every layer of the loaded base as the writer does (family.kohya_namer);
    DoRA's rank and alpha come from the tensors, LoKr's factorisation from the file's `sdlora.adapter_config`."""
    import json

    from sdlora.lora import kohya, peft

    state, metadata = kohya.read_kohya(path)
    kind = file_kind(state)
    modules = group_modules(state)
    stored = json.loads(metadata.get("sdlora.adapter_config") or "{}")
    used: set[str] = set()
    for attr, model, names in kohya.named_models(pipe, family):
        mine = {name: modules[name] for name in names.keys() & modules.keys()}
        if not mine:
            continue
        settings = stored.get(attr) if kind == "lokr" else dora_settings(mine)
        if not settings:
            raise SdloraError(
                f"{path}: a LoKr file without sdlora's adapter config (made by another trainer); load it in "
                "ComfyUI or A1111"
            )
        model.add_adapter(adapter_config(kind, settings, [names[name] for name in mine]), adapter_name=adapter_name)
        layers = dict(model.named_modules())
        peft_state = {
            f"{names[name]}.{suffix}": tensor
            for name, tensors in mine.items()
            for suffix, tensor in peft_keys(kind, tensors, layers[names[name]], adapter_name).items()
        }
        peft.set_loaded_state(model, peft_state, adapter_name)
        used |= mine.keys()
    unknown = sorted(modules.keys() - used)
    if unknown:
        raise SdloraError(f"{path}: module {unknown[0]} matches no layer of the base model ({len(unknown)} such)")


def dora_settings(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """peft's r and lora_alpha of kohya DoRA modules (one value each across a model)."""
    ranks = {tensors["lora_down.weight"].shape[0] for tensors in modules.values()}
    alphas = {float(tensors["alpha"]) for tensors in modules.values() if "alpha" in tensors}
    if len(ranks) != 1 or len(alphas) > 1:
        raise SdloraError(f"DoRA modules of several ranks {sorted(ranks)} or alphas {sorted(alphas)}")
    rank = ranks.pop()
    return {"r": rank, "lora_alpha": alphas.pop() if alphas else float(rank)}
