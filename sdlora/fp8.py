"""--quantize fp8: the frozen denoiser's Linear weights stored in float8 e4m3 with a scale per output row.

torchao's `Float8WeightOnlyConfig` does it (a maintained library, and peft wraps its `Float8Tensor` weights in
`TorchaoLoraLinear`, so the LoRA on top stays an fp32 peft adapter): each Linear weight becomes float8 e4m3 data
plus one fp32 scale per output row (absmax / 448, e4m3's largest value), dequantized to the weight's original
dtype at each matmul. The compute dtype is the training's: bf16 on a GPU with bf16, fp32 on the CPU (bf16 matmuls
are ~2x slower on CPUs without AVX512-BF16; the weights are float8 either way). Norms, embeddings, convolutions and
biases keep their dtype. diffusers' `enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)` is not used: it
is a bare cast with no scale, which flushes small weights to zero and saturates large ones.

It quantizes after loading (one call for every family and every load path: folders, single files, a family's own
loader), so the CPU holds the full-precision denoiser for a moment while loading; the GPU only ever sees float8.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from sdlora.errors import UsageError

INSTALL = "pip install 'sdlora[fp8]' (torchao 0.18)"


def installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_available() -> None:
    """torchao importable, said in one line before any model loads."""
    if not installed():
        raise UsageError(f"--quantize fp8 needs torchao, which is not installed: {INSTALL}, or use --quantize none")


def quantize(module: Any) -> int:
    """Every nn.Linear of `module` (the denoiser) stored as float8 e4m3 with per-row scales, in place; returns
    how many were quantized. Their weights stop being trainable parameters (the denoiser is frozen anyway)."""
    import torch

    config = _float8_config()
    from torchao.quantization import quantize_

    # Plain nn.Linear only (a peft or already-quantized layer is a subclass or holds a tensor subclass).
    linears = [m for m in module.modules() if type(m) is torch.nn.Linear]
    quantize_(module, config, filter_fn=lambda m, _name: type(m) is torch.nn.Linear)
    return len(linears)


def import_quietly() -> None:
    """Import torchao, if installed, with its start-up warnings kept quiet. diffusers imports it in every
    `from_pretrained` once it is installed (whatever --quantize says), and on a CPU build of torch it then logs
    that its CUDA kernels (.so files for sm90 and mxfp8) can't load, which the weight-only path never calls, and
    torch logs a deprecation for each of its Enum types."""
    if not installed():
        return
    # A filter, not a level: importing torchao imports torch._dynamo, whose logging set-up resets torch's levels.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    for log in quiet:
        log.addFilter(_drop)
    try:
        import torchao.quantization  # noqa: F401
    finally:
        for log in quiet:
            log.removeFilter(_drop)


def _drop(_record: logging.LogRecord) -> bool:
    return False


def _float8_config() -> Any:
    """torchao's weight-only float8 config: e4m3 data with one scale per output row."""
    import torch

    import_quietly()
    from torchao.quantization import Float8WeightOnlyConfig, PerRow

    # PerRow: one scale per output row (torchao's default, said here); no change to torch.compile's global settings.
    return Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn, granularity=PerRow(), set_inductor_config=False)
