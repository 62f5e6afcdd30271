"""Big frozen parts in CPU RAM, on the device only while their outputs are cached: for families whose text encoders
and VAE would not fit beside the denoiser (Flux.1's T5-XXL is 9.5 GB in bf16). Each visits the device alone, so
the device's peak is the largest part, not their sum; text encoders no render needs later leave RAM too."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from typing import Any


def staged_parts(config: Any, family: Any) -> list[str]:
    """Pipeline attributes that stay on the CPU: the family's frozen text encoders and, with cached latents, the
    VAE; [] for families that keep everything on the device (SD, SDXL: train.offload moves parts afterwards)."""
    if not family.stage_frozen:
        return []
    trained = family.trainable_text_encoders if config.lora.train_text_encoder else ()
    names = [name for name in family.text_encoders if name not in trained]
    return names + (["vae"] if config.train.cache_latents else [])


@contextlib.contextmanager
def visiting(pipe: Any, names: Sequence[str], device: Any) -> Iterator[None]:
    """`names` on `device` for the block, back in CPU RAM afterwards."""
    for name in names:
        getattr(pipe, name).to(device)
    try:
        yield
    finally:
        for name in names:
            getattr(pipe, name).to("cpu")
        if names and getattr(device, "type", str(device)) == "cuda":
            import torch

            torch.cuda.empty_cache()


def release(pipe: Any, names: Sequence[str]) -> None:
    """Drop `names` from the pipeline and free their memory (nothing renders with them any more)."""
    for name in names:
        setattr(pipe, name, None)
    gc.collect()


def renders_later(config: Any, dataset_dir: Any) -> bool:
    """Whether training renders (sample grids, identity scoring) and so needs the text encoders again. Scoring is
    on where identity.cadence puts it (by default only on a prep dataset), not wherever eval_every is unset."""
    from sdlora.train import identity

    return bool(config.train.sample_every) or identity.cadence(config, dataset_dir)[0] is not None
