"""What the UNet is conditioned on, one small function per model family (SD 1.x/2.x now; SDXL adds pooled text
embeddings and time ids here)."""

from __future__ import annotations

from typing import Any

from sdlora.errors import SdloraError

# A batch of conditioning is a flat dict of tensors with the batch first, so that it can be cached, indexed and
# concatenated without knowing the family; `unet_kwargs` turns it into the UNet's keyword arguments.
Conditioning = dict[str, Any]


def encode_prompts(family: str, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str]) -> Conditioning:
    """Text conditioning of `prompts` with the family's encoders (gradients flow when an encoder is trained)."""
    if family in ("sd1", "sd2"):
        return _encode_sd(tokenizers[0], text_encoders[0], prompts)
    raise SdloraError(f"training {family} models is not supported yet (SD 1.x and 2.x are)")


def _encode_sd(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> Conditioning:
    """SD 1.x/2.x: the text encoder's last hidden state, (B, 77, D), as the pipelines compute it (SD 2.x models
    ship a text encoder already cut to the penultimate layer)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return {"encoder_hidden_states": text_encoder(ids)[0]}


def unet_kwargs(family: str, cond: Conditioning) -> dict[str, Any]:
    """Keyword arguments of `unet(noisy, t, **kwargs)`."""
    if family in ("sd1", "sd2"):
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}
    raise SdloraError(f"training {family} models is not supported yet (SD 1.x and 2.x are)")


def select(cond: Conditioning, index: Any) -> Conditioning:
    """Rows `index` of every tensor in `cond`."""
    return {key: value[index] for key, value in cond.items()}


def concat(parts: list[Conditioning]) -> Conditioning:
    import torch

    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
