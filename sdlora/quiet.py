"""Quiet the libraries (warnings, logging, loading bars) so the terminal shows our own progress and messages;
`sdlora --debug` leaves them as they are. Standard library only: safe to call before any heavy import."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Keep the terminal for our progress and messages: the libraries' warnings, loading bars and multi-line
    LoRA-loading reports show with --debug. Environment variables act when the libraries are imported later
    (inside the commands); a library already imported is told directly."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward" on CPUs
    for name in ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    # models.load_pipeline turns diffusers' own bars ("Loading pipeline components") off with the hub's.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    # peft's "Loading adapter weights ... led to unexpected keys" and diffusers' key dumps are UserWarnings.
    warnings.filterwarnings("ignore", module="peft.*")
    warnings.filterwarnings("ignore", module="diffusers.*")
