"""Flux.1's own kohya metadata: the training settings kohya's sd-scripts write for a Flux.1 LoRA, so that readers
and people see how it was trained (the common keys: sdlora.lora.kohya.build_metadata)."""

from __future__ import annotations

from typing import Any


def training_metadata(info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
    """`ss_guidance_scale`, `ss_timestep_sampling`, ... of a LoRA trained on `info` (sdlora.models.ModelInfo)
    with `train` (config.train); {} for a base that is not flow-matching."""
    if info.prediction_type != "flow":
        return {}
    sampling = "shift" if train.timestep_sampling == "auto" else train.timestep_sampling
    return {
        "ss_guidance_scale": str(float(train.guidance)),
        "ss_timestep_sampling": sampling,
        "ss_discrete_flow_shift": str(float(train.timestep_shift)),
        "ss_model_prediction_type": "raw",
        "ss_weighting_scheme": "none" if train.min_snr_gamma is None else f"min_snr_{train.min_snr_gamma:g}",
        "ss_apply_t5_attn_mask": "False",
        "ss_t5xxl_max_token_length": str(max_sequence_length or ""),
        "modelspec.flux_variant": info.variant,
    }
