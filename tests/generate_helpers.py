"""Helpers of the generate tests: LoRAs made with peft on the tiny models, and reading outputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

# A1111's own pattern for the `Key: value` pairs of the settings line (quoted values may hold commas).
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def make_lora(base: Path, out_dir: Path, seed: int, metadata: dict[str, str] | None = None) -> Path:
    """A random-weight LoRA (r=4) on the base's UNet attention, saved in diffusers format in out_dir."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    pipe = DiffusionPipeline.from_pretrained(str(base))
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(config)
    type(pipe).save_lora_weights(
        out_dir,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
    )
    path = out_dir / "pytorch_lora_weights.safetensors"
    if metadata:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            old = dict(handle.metadata() or {})
        save_file(load_file(str(path)), str(path), metadata={**old, **metadata})
    return out_dir


def pixels(path_or_image: Path | Image.Image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a: Path | Image.Image, b: Path | Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) the way A1111's "PNG Info" reads a `parameters` chunk."""
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    settings = {key.strip(): value.strip() for key, value in A1111_PAIR.findall(last)}
    return "\n".join(prompt), "\n".join(negative), settings
