"""Prompt fidelity: CLIP cosine similarity between each image and its prompt (transformers' CLIPModel)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdlora.errors import SdloraError


class ClipScorer:
    """A CLIP model from a hub id or a local folder; loaded once, scores (image, text) pairs."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self._model: Any = CLIPModel.from_pretrained(model).to(device).eval()
            self._processor: Any = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SdloraError(f"--clip {model!r}: could not load a CLIP model ({first})") from None
        self._device = device

    def score(self, images: Sequence[Any], texts: Sequence[str], batch_size: int = 8) -> list[float]:
        """Cosine similarity of image i and text i, in [-1, 1] (CLIPScore is 2.5 x max(this, 0))."""
        import torch

        scores: list[float] = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            inputs = self._processor(
                text=list(texts[chunk]), images=list(images[chunk]), return_tensors="pt", padding=True, truncation=True
            ).to(self._device)
            with torch.inference_mode():
                out = self._model(**inputs)
            image_emb = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            text_emb = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            scores += (image_emb * text_emb).sum(-1).tolist()
        return scores
