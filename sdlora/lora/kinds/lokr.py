"""LoKr: peft's LoKrConfig, whose r is the rank of its factorised part; in kohya/LyCORIS keys `NAME.lokr_w1` or
`NAME.lokr_w1_a`/`_b`, `NAME.lokr_w2` or `NAME.lokr_w2_a`/`_b` (and `NAME.lokr_t2`), `NAME.alpha`; the change is
kron(w1, w2) * alpha / dim, where dim is the rank of a factorised part, and 1 when neither factor is factorised
(readers then ignore alpha): peft's scale alpha / r is then folded into lokr_w1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError

if TYPE_CHECKING:
    import torch

PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
KEY_FRAGMENTS = (".lokr_",)


def peft_config(rank: int, alpha: float, dropout: float, targets: Any, factor: int = -1) -> Any:
    """`factor`: lora.lokr_factor, peft's decompose_factor: a width it divides splits into (factor, width/factor),
    the first in lokr_w1, as in LyCORIS up to the width's square root (above it LyCORIS puts the smaller one
    first, peft doesn't: a 64-wide layer at factor 16 has a 16 x 16 w1 here, 4 x 4 there). Readers take the
    shapes from the tensors (sdlora's from the stored config), so any factor loads."""
    from peft import LoKrConfig

    # peft's default init: lokr_w1 zero, so the adapter starts as a no-op like LoRA's zero B. (No dropout: the
    # config refuses lora.dropout with lokr.)
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=factor)


def holds(layer: Any, adapter: str) -> bool:
    from peft.tuners.lokr import LoKrLayer

    return isinstance(layer, LoKrLayer) and adapter in layer._available_adapters


def is_config(config: Any) -> bool:
    return str(getattr(config.peft_type, "value", config.peft_type)) == "LOKR"


def module_tensors(layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors of one peft LoKr layer (lokr_w1..., alpha), with the scale readers apply."""
    import torch

    out = {
        part: getattr(layer, part)[adapter].detach().to("cpu", copy=True)
        for part in PARTS
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


def peft_keys(tensors: Mapping[str, torch.Tensor], layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """One kohya module's factors -> peft's of `layer` (shapes checked), peft's scale taken out of w1 again."""
    state = {part: tensors[part] for part in PARTS if part in tensors}
    expected = {part: tuple(getattr(layer, part)[adapter].shape) for part in PARTS if adapter in getattr(layer, part)}
    if {part: tuple(t.shape) for part, t in state.items()} != expected:
        raise SdloraError(f"LoKr factors {sorted(state)} don't have the shapes of the adapter config {expected}")
    scale, trained = reader_scale(tensors), float(layer.scaling[adapter])
    if scale != trained:  # module_tensors folded peft's scale into w1: take it out again (within 1 ulp)
        first = "lokr_w1" if "lokr_w1" in state else "lokr_w1_b"
        state[first] = state[first] * scale / trained
    return state


def load_config(settings: Mapping[str, Any], target: str) -> Any:
    from peft import LoKrConfig

    keep = ("r", "alpha", "decompose_both", "decompose_factor", "use_effective_conv2d", "rank_dropout")
    return LoKrConfig(target_modules=target, **{key: settings[key] for key in keep if key in settings})


def settings(modules: Mapping[str, Mapping[str, torch.Tensor]], stored: Any = None) -> Any:
    """The factorisation can't be read off the tensors: the peft config sdlora stored (None in another trainer's
    file)."""
    return stored
