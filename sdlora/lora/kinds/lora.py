"""Plain LoRA: peft's LoraConfig with Gaussian A and zero B; kohya's own `lora_down`/`lora_up`/`alpha` keys
(written and fused by sdlora.lora.kohya, read by diffusers' load_lora_weights)."""

from __future__ import annotations

from typing import Any


def peft_config(rank: int, alpha: float, dropout: float, targets: Any, **extra: Any) -> Any:
    from peft import LoraConfig

    # Gaussian init of A (B starts at zero), as diffusers' LoRA scripts do: the adapter starts as a no-op.
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets, **extra
    )


def holds(layer: Any, adapter: str) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(layer, LoraLayer) and adapter in layer.lora_A and not layer.use_dora.get(adapter)


def is_config(config: Any) -> bool:
    """Any other peft config (asked last: sdlora.lora.kinds)."""
    return not getattr(config, "use_dora", False)
