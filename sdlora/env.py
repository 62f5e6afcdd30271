"""`sdlora env`: versions, device and setup facts, paste-ready for a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from sdlora import __version__

_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "safetensors",
    "dlib-bin",
)


def collect_env() -> dict[str, str]:
    """Facts about this machine as ordered `name -> value` strings."""
    info = {"sdlora": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    info.update(_device())
    info["bitsandbytes 8-bit optimizers"] = _bnb_status()
    info.update(_hf_cache())
    return info


def _device() -> dict[str, str]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "device": f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}",
            "vram": f"{props.total_memory / 2**30:.1f} GiB",
            "bf16": "yes" if torch.cuda.is_bf16_supported() else "no",
            "cuda (torch build)": str(torch.version.cuda),
        }
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return {"device": "mps (Apple GPU)", "bf16": "no"}
    return {"device": f"cpu ({os.cpu_count()} cores)", "bf16": "autocast only (slow on most CPUs)"}


def _bnb_status() -> str:
    """Try one AdamW8bit step on the default device: the only reliable test that 8-bit optimizers work."""
    try:
        import bitsandbytes as bnb
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        param = torch.nn.Parameter(torch.ones(4096, device=device))
        optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
        param.grad = torch.ones_like(param)
        optimizer.step()
        return f"yes ({device})"
    except Exception as exc:  # any failure means "not usable here", and the reason is the useful part
        return f"no ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _hf_cache() -> dict[str, str]:
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return {"hf cache": str(constants.HF_HUB_CACHE), "hf offline": "yes" if offline else "no"}
