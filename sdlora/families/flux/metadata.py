"""Flux.1's own kohya metadata: the training settings kohya's sd-scripts write for a Flux.1 LoRA, so that readers
and people see how it was trained (the common keys: sdlora.lora.kohya.build_metadata)."""

from __future__ import annotations

from typing import Any

from sdlora.families.flow import kohya_flow_metadata


def training_metadata(info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
    """`ss_guidance_scale`, `ss_timestep_sampling`, ... of a LoRA trained on `info` (sdlora.models.ModelInfo)
    with `train` (config.train); {} for a base that is not flow-matching."""
    if info.prediction_type != "flow":
        return {}
    sampling = "shift" if train.timestep_sampling == "auto" else train.timestep_sampling
    return {
        "ss_guidance_scale": str(float(train.guidance)),
        **kohya_flow_metadata(train, sampling),
        "ss_apply_t5_attn_mask": "False",
        "ss_t5xxl_max_token_length": str(max_sequence_length or ""),
        "modelspec.flux_variant": info.variant,
    }
