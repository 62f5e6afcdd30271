"""Prompt fidelity: CLIP cosine similarity between each image and its prompt (transformers' CLIPModel), and whether
CLIP sees an edit prompt's change (it prefers the prompt to the same prompt without the change)."""

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


def edit_preferences(
    scorer: ClipScorer,
    images: Sequence[Any],
    texts: Sequence[str | None],
    prompts: Sequence[str | None],
    similarities: Sequence[float | None] | None = None,
) -> list[bool | None]:
    """For each image whose prompt asks one change (edits.find): whether CLIP matches it better to its text than
    to the same text without the change; None for the others. `similarities`: image-text scores already made."""
    from sdlora.evaluation import edits

    known = similarities or [None] * len(images)
    asked = [(i, edits.find(prompts[i])) for i in range(len(images))]
    asked = [(i, edit) for i, edit in asked if edit is not None and texts[i]]
    preferences: list[bool | None] = [None] * len(images)
    if not asked:
        return preferences
    pictures = [images[i] for i, _ in asked]
    missing = [i for i, _ in asked if known[i] is None]
    scored = scorer.score([images[i] for i in missing], [str(texts[i]) for i in missing]) if missing else []
    fresh = dict(zip(missing, scored, strict=True))
    plain = scorer.score(pictures, [edits.without(str(texts[i]), edit) for i, edit in asked])
    for (i, _), without in zip(asked, plain, strict=True):
        preferences[i] = bool((known[i] if known[i] is not None else fresh[i]) > without)
    return preferences
