"""DoRA: peft's LoraConfig with use_dora; in kohya/LyCORIS keys `NAME.lora_down.weight` (r, in),
`NAME.lora_up.weight` (out, r), `NAME.alpha` and `NAME.dora_scale`, peft's magnitude on the output axis as LyCORIS
writes it (`wd_on_out`): shape (out, 1) for a linear layer, (out, 1, 1, 1) for a conv. Never 1-D: ComfyUI divides
it by a (out, 1) norm and a (out,) vector would broadcast to (out, out) (ComfyUI issue #12938). The merged weight
is m * (W + dW) / ||W + dW|| per output row, as peft computes it; ComfyUI 0.3.64 divides by the base weight's row
norm ||W|| instead (PR #15458 fixes that), so it differs from the trained model by ||W|| / ||W + dW|| per row
(README "Adapter types" gives the measured size)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError
from sdlora.lora.kinds import lora

if TYPE_CHECKING:
    import torch

KEY_FRAGMENTS = (".dora_scale", ".lora_magnitude_vector")  # kohya/LyCORIS and peft names


def peft_config(rank: int, alpha: float, dropout: float, targets: Any) -> Any:
    return lora.peft_config(rank, alpha, dropout, targets, use_dora=True)


def holds(layer: Any, adapter: str) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(layer, LoraLayer) and adapter in layer.lora_A and bool(layer.use_dora.get(adapter))


def is_config(config: Any) -> bool:
    return str(getattr(config.peft_type, "value", config.peft_type)) != "LOKR" and bool(
        getattr(config, "use_dora", False)
    )


def module_tensors(layer: Any, adapter: str) -> dict[str, torch.Tensor]:
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


def peft_keys(tensors: Mapping[str, torch.Tensor], layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """One kohya module's tensors -> peft's lora_A/lora_B/magnitude of `layer`; the scale must be on the output
    axis."""
    magnitude = layer.lora_magnitude_vector[adapter].weight
    scale = tensors["dora_scale"]
    if scale.numel() != magnitude.numel() or scale.shape[0] != layer.get_base_layer().weight.shape[0]:
        raise SdloraError(
            f"dora_scale of shape {tuple(scale.shape)} is not on the output axis (older LyCORIS files normalise "
            "per input column, which peft's DoRA can't represent)"
        )
    state = {"lora_A.weight": tensors["lora_down.weight"], "lora_B.weight": tensors["lora_up.weight"]}
    return state | {"lora_magnitude_vector": scale.reshape(magnitude.shape)}


def load_config(settings: Mapping[str, Any], target: str) -> Any:
    from peft import LoraConfig

    keep = ("r", "lora_alpha", "use_rslora")
    return LoraConfig(target_modules=target, use_dora=True, **{key: settings[key] for key in keep if key in settings})


def settings(modules: Mapping[str, Mapping[str, torch.Tensor]], stored: Any = None) -> dict[str, Any]:
    """peft's r and lora_alpha of kohya DoRA modules (one value each across a model), from the tensors."""
    ranks = {tensors["lora_down.weight"].shape[0] for tensors in modules.values()}
    alphas = {float(tensors["alpha"]) for tensors in modules.values() if "alpha" in tensors}
    if len(ranks) != 1 or len(alphas) > 1:
        raise SdloraError(f"DoRA modules of several ranks {sorted(ranks)} or alphas {sorted(alphas)}")
    rank = ranks.pop()
    return {"r": rank, "lora_alpha": alphas.pop() if alphas else float(rank)}
