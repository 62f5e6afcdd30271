"""The optimizer (AdamW, 8-bit AdamW, Prodigy; imported lazily) and the learning-rate schedule with warmup."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from sdlora.errors import UsageError


def check_optimizer(name: str) -> None:
    """Pre-flight: the optimizer's package imports (before any model loads)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # bitsandbytes raises RuntimeError/OSError on broken CUDA setups too
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(
                f"--optimizer adamw8bit needs a working bitsandbytes ({reason}); "
                "`pip install bitsandbytes` or use --optimizer adamw"
            ) from None
    if name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise UsageError("--optimizer prodigy needs the prodigyopt package: `pip install prodigyopt`")


def build_optimizer(param_groups: list[dict[str, Any]], name: str, weight_decay: float, fused: bool) -> Any:
    """`param_groups`: [{"params": [...], "lr": ...}, ...] (UNet, then text encoder with its own rate)."""
    import torch

    if name == "adamw":
        # The fused kernel is one launch per step on CUDA instead of one per tensor.
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    raise UsageError(f"unknown optimizer {name!r}; choose adamw, adamw8bit or prodigy")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base rate at optimisation step `step` (0-based): linear warmup, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise UsageError(f"unknown lr_scheduler {schedule!r}; choose constant, cosine or linear")


def build_scheduler(optimizer: Any, total_steps: int, warmup_steps: int, schedule: str) -> Any:
    """A LambdaLR over `lr_factor`; stepped once per optimisation step."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule))
