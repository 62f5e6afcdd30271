"""What the flow-matching transformer families (FLUX.1, Z-Image, FLUX.2 [klein], Qwen-Image) do alike: the
transformer config behind training's wrappers, the cached prompt rows a staged family renders from, what
train.timestep_sampling = 'auto' draws where the anchors train on unshifted sigmas, and kohya's keys saying how a
flow-matching LoRA was trained."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sdlora.errors import SdloraError

UNSHIFTED = 1.0  # a timestep shift of 1 leaves the sigmas as drawn


def denoiser_config(model: Any) -> Any:
    """The transformer config behind DDP's `module` and torch.compile's `_orig_mod` wrappers."""
    while not hasattr(model, "config"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.config


def model_class(model: Any) -> str:
    """The denoiser's class name through torch FSDP2's wrapper class (`fully_shard` turns a ZImageTransformer2DModel
    into an FSDPZImageTransformer2DModel, a subclass), so that a sharded denoiser is still its family's."""
    return next((c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP")), "")


def unshifted_sampling(sampling: str, shift: float) -> str:
    """What 'auto' draws in a family trained on unshifted sigmas (diffusers' klein and Qwen-Image scripts):
    uniform U(0, 1), or with a train.timestep_shift other than 1 the shift scheme at that value."""
    if sampling != "auto":
        return sampling
    return "uniform" if float(shift) == UNSHIFTED else "shift"


def cached_rows(rows: Mapping[str, Any], prompts: Iterable[str], encoders: str = "its text encoder was") -> list[Any]:
    """The cached conditioning row of each prompt; a prompt that was not cached before the encoders left is an
    SdloraError."""
    prompts = list(prompts)
    missing = [p for p in prompts if p not in rows]
    if missing:
        raise SdloraError(f"prompt {missing[0]!r} was not cached before {encoders} freed")
    return [rows[p] for p in prompts]


def kohya_flow_metadata(train: Any, sampling: str) -> dict[str, str]:
    """kohya's keys of a flow-matching run: the timestep `sampling` drawn, train.timestep_shift, the raw velocity
    target and the loss weighting."""
    return {
        "ss_timestep_sampling": sampling,
        "ss_discrete_flow_shift": str(float(train.timestep_shift)),
        "ss_model_prediction_type": "raw",
        "ss_weighting_scheme": "none" if train.min_snr_gamma is None else f"min_snr_{train.min_snr_gamma:g}",
    }
