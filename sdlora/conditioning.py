"""What the UNet is conditioned on, one small function per model family: SD 1.x/2.x text hidden states; SDXL's
two text encoders, pooled text embedding and size/crop time ids."""

from __future__ import annotations

from typing import Any

# A batch of conditioning is a flat dict of tensors with the batch first, so that it can be cached, indexed and
# concatenated without knowing the family; `unet_kwargs` turns it into the UNet's keyword arguments.
Conditioning = dict[str, Any]


def text_encoder_names(family: str) -> list[str]:
    """Pipeline attributes of the family's text encoders (their tokenizers: `tokenizer`, `tokenizer_2`)."""
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def tokenizers_of(pipe: Any, family: str) -> list[Any]:
    return [getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in text_encoder_names(family)]


def encode_prompts(family: str, tokenizers: list[Any], text_encoders: list[Any], prompts: list[str]) -> Conditioning:
    """Text conditioning of `prompts` with the family's encoders (gradients flow when an encoder is trained)."""
    if family == "sdxl":
        return _encode_sdxl(tokenizers, text_encoders, prompts)
    return {"encoder_hidden_states": text_encoders[0](_token_ids(tokenizers[0], prompts, text_encoders[0]))[0]}


def _token_ids(tokenizer: Any, prompts: list[str], encoder: Any) -> Any:
    device = next(encoder.parameters()).device
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _encode_sdxl(tokenizers: list[Any], text_encoders: list[Any], prompts: list[str]) -> Conditioning:
    """SDXL, as StableDiffusionXLPipeline.encode_prompt computes it: both encoders' penultimate hidden states side
    by side, (B, 77, D1 + D2), and the second encoder's pooled, projected embedding, (B, P)."""
    import torch

    hidden = []
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        output = encoder(_token_ids(tokenizer, prompts, encoder), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": output.text_embeds}


def unet_kwargs(family: str, cond: Conditioning, time_ids: Any) -> dict[str, Any]:
    """Keyword arguments of `unet(noisy, t, **kwargs)`; `time_ids` (B, 6): SDXL's original size, crop top-left and
    target size of each image (unused by SD 1.x/2.x)."""
    if family == "sdxl":
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "added_cond_kwargs": added}
    return {"encoder_hidden_states": cond["encoder_hidden_states"]}


def select(cond: Conditioning, index: Any) -> Conditioning:
    """Rows `index` of every tensor in `cond`."""
    return {key: value[index] for key, value in cond.items()}


def concat(parts: list[Conditioning]) -> Conditioning:
    import torch

    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
