"""Flux.1 from one original-format file: Black Forest Labs' transformer-only `flux1-dev.safetensors` (bf16 or
float8_e4m3fn) or a ComfyUI checkpoint (`model.diffusion_model.` + VAE + text encoders), with the other components
and every config from `model.single_file_config`. diffusers' own reader splits fused layers at the real widths
only and needs the hub for the rest; this one reads the widths from the config. Also the tests' writer of such a
file (write_single_file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError, UsageError

# The top-level modules of BFL's transformer; a ComfyUI file's other parts (vae., text_encoders.) are skipped.
TRANSFORMER_TOPS = {
    "double_blocks",
    "single_blocks",
    "time_in",
    "vector_in",
    "guidance_in",
    "txt_in",
    "img_in",
    "final_layer",
}


def read_transformer(path: Path, dtype: Any) -> dict[str, Any]:
    """The transformer's BFL-named tensors in `dtype` (float8 files are widened as they are read)."""
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            name = key.removeprefix("model.diffusion_model.")
            if name.split(".", 1)[0] in TRANSFORMER_TOPS:
                state[name] = handle.get_tensor(key).to(dtype)
    return state


def load_pipeline(path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from sdlora.families.flux.keys import from_bfl

    if config is None:
        raise UsageError(
            f"{path}: a Flux.1 single file holds the transformer (and at most a VAE and text encoders under "
            "ComfyUI's names); name a diffusers Flux folder or hub id for the rest and the configs: "
            "--set model.single_file_config=black-forest-labs/FLUX.1-dev"
        )
    kwargs = dict(kwargs)
    quantization = kwargs.pop("quantization_config", None)
    dtype = kwargs.get("dtype") or torch.float32
    transformer_config = FluxTransformer2DModel.load_config(config, subfolder="transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(transformer_config)
    try:
        state = from_bfl(read_transformer(path, dtype), transformer.config)
    except KeyError as exc:
        raise SdloraError(f"{path}: no {exc.args[0]} in it: not the Flux.1 transformer of {config}") from None
    except ValueError as exc:  # a fused q/k/v (or linear1) of other widths
        raise SdloraError(f"{path}: {exc}: not the Flux.1 transformer of {config}") from None
    missing = sorted(set(transformer.state_dict()) - set(state))
    if missing:
        raise SdloraError(f"{path}: lacks {missing[0]} (and {len(missing) - 1} more) of {config}'s transformer")
    if quantization is not None:
        transformer = quantized_transformer(state, config, quantization, dtype)
        return FluxPipeline.from_pretrained(config, transformer=transformer.eval(), **kwargs)
    try:
        transformer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1]
        raise SdloraError(f"{path}: its transformer does not fit {config}'s config ({first})") from None
    return FluxPipeline.from_pretrained(config, transformer=transformer.eval(), **kwargs)


def quantized_transformer(state: dict[str, Any], config: str, quantization: Any, dtype: Any) -> Any:
    """The transformer of diffusers-named tensors `state`, quantized as it loads (--quantize nf4/int8): diffusers'
    from_single_file takes a state dict, and one already in its own names is loaded as it is, at any width.
    `quantization`: the pipeline's PipelineQuantizationConfig (sdlora.quantization.quantization_config)."""
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    bnb = BitsAndBytesConfig(**quantization.quant_kwargs)
    return FluxTransformer2DModel.from_single_file(
        state, config=config, subfolder="transformer", quantization_config=bnb, dtype=dtype
    )


def write_single_file(pipe: Any, path: Path) -> None:
    """The loaded pipeline's transformer alone under BFL's names (`double_blocks.0.img_attn.qkv.weight`), fused
    layers concatenated, as `flux1-dev.safetensors` ships."""
    from safetensors.torch import save_file

    from sdlora.families.flux.keys import to_bfl

    save_file({k: v.contiguous() for k, v in to_bfl(pipe.transformer.state_dict()).items()}, str(path))
