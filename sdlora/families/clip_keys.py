"""The module paths of CLIP text encoders in the files other tools read (kohya LoRAs, single-file checkpoints):
shared by every family with a CLIP encoder (SD 1.x/2.x, SDXL, Flux.1's CLIP-L)."""

from __future__ import annotations


def text_encoder_path(path: str) -> str:
    """The transformers-4 CLIP module path every kohya reader expects (`text_model.encoder.layers.0...`).

    transformers 5's CLIPTextModel has no `text_model` level (`encoder.layers.0...`), while
    CLIPTextModelWithProjection still has it (`text_model.encoder...`, `text_projection`).
    """
    if path.startswith(("text_model.", "text_projection")):
        return path
    return f"text_model.{path}"
