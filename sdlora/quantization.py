"""--quantize: how the frozen denoiser is stored. nf4 and int8 go through diffusers' PipelineQuantizationConfig
(bitsandbytes, CUDA only); fp8 quantizes after loading (sdlora.fp8)."""

from __future__ import annotations

from typing import Any

from sdlora.errors import UsageError

# bitsandbytes through diffusers' PipelineQuantizationConfig: the denoiser only (QLoRA); the LoRA stays fp32.
QUANTIZE_BACKENDS = {
    "nf4": ("bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    "int8": ("bitsandbytes_8bit", {"load_in_8bit": True}),
}


def check_quantize(quantize: str, cuda: bool) -> None:
    """diffusers' bitsandbytes quantizer refuses to run without a CUDA GPU, fp8 needs torchao: say so before
    anything loads."""
    if quantize == "fp8":
        from sdlora import fp8

        fp8.check_available()
        return
    if quantize != "none" and not cuda:
        raise UsageError(
            f"--quantize {quantize}: bitsandbytes quantization in diffusers needs a CUDA GPU and none is visible; "
            "use --quantize none on this machine"
        )


def quantization_config(quantize: str, torch_dtype: Any) -> Any:
    """The quantization config of `from_pretrained` for the denoiser ("transformer" or "unet"), or None (fp8
    quantizes after loading: sdlora.fp8)."""
    if quantize not in QUANTIZE_BACKENDS:
        return None
    import torch
    from diffusers import PipelineQuantizationConfig

    backend, kwargs = QUANTIZE_BACKENDS[quantize]
    if quantize == "nf4":
        kwargs = {**kwargs, "bnb_4bit_compute_dtype": torch_dtype or torch.bfloat16}
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=["transformer", "unet"]
    )
