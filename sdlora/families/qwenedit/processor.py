"""Qwen2.5-VL's prompt processor for the Edit pipelines without torchvision: transformers' Qwen2VLProcessor wants a
video processor (torchvision) even for still images, so sdlora loads the pipeline's `processor/` folder as this
stand-in (its tokenizer and the PIL image processor) and passes it to the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import ProcessorMixin

IMAGE_PAD = "<|image_pad|>"
REAL_CLASS = ["transformers", "Qwen2VLProcessor"]  # what model_index.json names (the released Edit pipelines)


class VLProcessor(ProcessorMixin):
    """What QwenImageEdit(Plus)Pipeline calls of Qwen2VLProcessor: processor(text=, images=, padding=,
    return_tensors=) -> input_ids, attention_mask, pixel_values, image_grid_thw, each `<|image_pad|>` of the text
    expanded to the image's tokens after the 2x2 merge (grid t*h*w / merge_size**2), in order. A ProcessorMixin
    for diffusers' save_pretrained alone (it saves a component by its base class); nothing of its __init__ runs."""

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:  # noqa: D107 (no ProcessorMixin.__init__)
        self.image_processor, self.tokenizer = image_processor, tokenizer

    @classmethod
    def from_pretrained(cls, root: str | Path, subfolder: str = "processor") -> VLProcessor:
        from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil

        tokenizer = Qwen2Tokenizer.from_pretrained(str(root), subfolder=subfolder)
        return cls(Qwen2VLImageProcessorPil.from_pretrained(str(root), subfolder=subfolder), tokenizer)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """The files the released `processor/` folder holds for these two parts (no video processor)."""
        self.image_processor.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))

    def __call__(self, text: list[str], images: Any = None, padding: bool = True, return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        pixels: dict[str, Any] = {}
        if images:
            pixels = dict(self.image_processor(images=images, return_tensors=return_tensors))
            counts = iter(int(grid.prod()) // self.image_processor.merge_size**2 for grid in pixels["image_grid_thw"])
            # Every image's pad token becomes its own count of pad tokens, images in the order they appear.
            text = [
                "".join(
                    part + (IMAGE_PAD * next(counts) if i < t.count(IMAGE_PAD) else "")
                    for i, part in enumerate(t.split(IMAGE_PAD))
                )
                for t in text
            ]
        tokens = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**tokens, **pixels})


def load_kwargs(root: str | Path) -> dict[str, Any]:
    """The stand-in as from_pretrained's `processor=` where model_index.json names Qwen2VLProcessor and torchvision
    is missing; {} otherwise (transformers then loads its own)."""
    import importlib.util
    import json

    index = Path(root) / "model_index.json"
    try:
        named = json.loads(index.read_text(encoding="utf-8")).get("processor")
    except (OSError, ValueError):
        return {}
    if named != REAL_CLASS or importlib.util.find_spec("torchvision") is not None:
        return {}
    return {"processor": VLProcessor.from_pretrained(root)}
