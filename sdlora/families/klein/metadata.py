"""FLUX.2 [klein]'s own kohya metadata: how the LoRA was trained (timestep sampling and shift, kohya's keys) and
the checkpoint it was trained on, for readers and people (the common keys: sdlora.lora.kohya.build_metadata)."""

from __future__ import annotations

from typing import Any

from sdlora.families.klein.family import SEQUENCE_LENGTH, TEXT_LAYERS, UNSHIFTED


def training_metadata(info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
    """`ss_timestep_sampling`, `ss_discrete_flow_shift`, ... of a LoRA trained on `info` (sdlora.models.ModelInfo)
    with `train` (config.train, the family's defaults applied): 'auto' is recorded as what it drew (uniform, the
    unshifted sigmas of diffusers' klein script, or shift)."""
    sampling = train.timestep_sampling
    if sampling == "auto":
        sampling = "uniform" if float(train.timestep_shift) == UNSHIFTED else "shift"
    size, _, kind = info.variant.rpartition("-")
    return {
        "ss_timestep_sampling": sampling,
        "ss_discrete_flow_shift": str(float(train.timestep_shift)),
        "ss_model_prediction_type": "raw",
        "ss_weighting_scheme": "none" if train.min_snr_gamma is None else f"min_snr_{train.min_snr_gamma:g}",
        "ss_max_token_length": str(max_sequence_length or SEQUENCE_LENGTH),
        "ss_text_encoder_layers": ",".join(str(layer) for layer in TEXT_LAYERS),
        "sdlora.klein_variant": info.variant,
        "sdlora.klein_size": size,
        "sdlora.klein_distilled": str(kind == "distilled"),
    }
