"""FLUX.2 [klein] from one original-format file: BFL's transformer-only `flux-2-klein-4b.safetensors` (bare names,
or ComfyUI's `model.diffusion_model.`), read by diffusers' own FLUX.2 converter, with the other components and every
config from `model.single_file_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError, UsageError


def load_pipeline(path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    if config is None:
        raise UsageError(
            f"{path}: a FLUX.2 [klein] single file holds the transformer only; name a diffusers klein folder or hub "
            "id for the rest and the configs: --set model.single_file_config=black-forest-labs/FLUX.2-klein-base-4B"
        )
    kwargs = dict(kwargs)
    options = {k: kwargs[k] for k in ("torch_dtype", "quantization_config") if kwargs.get(k) is not None}
    if "quantization_config" in options:  # the pipeline's PipelineQuantizationConfig: the transformer's own part
        from diffusers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(**options["quantization_config"].quant_kwargs)
        kwargs.pop("quantization_config")
    try:
        transformer = Flux2Transformer2DModel.from_single_file(
            transformer_state(path), config=config, subfolder="transformer", **options
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise SdloraError(f"{path}: not the FLUX.2 [klein] transformer of {config} ({first})") from None
    return Flux2KleinPipeline.from_pretrained(config, transformer=transformer, **kwargs)


def transformer_state(path: Path) -> Any:
    """What diffusers' converter reads: the file's path, or, where its transformer sits under ComfyUI's
    `model.diffusion_model.` (beside a VAE and text encoders), those tensors alone under their bare BFL names (the
    converter knows no prefix)."""
    from safetensors import safe_open

    from sdlora.families.klein.keys import COMFYUI_PREFIX

    with safe_open(str(path), framework="pt") as handle:
        names = [key for key in handle.keys() if key.startswith(COMFYUI_PREFIX)]  # noqa: SIM118 (not a dict)
        if not names:
            return str(path)
        return {key.removeprefix(COMFYUI_PREFIX): handle.get_tensor(key) for key in names}
