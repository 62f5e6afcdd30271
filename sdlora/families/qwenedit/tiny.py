"""The tiny Qwen-Image-Edit-2511 pipeline (random weights, built from configs) for the tests: tiny Qwen-Image's
components, the transformer with Edit-2511's zero_cond_t, and the processor stand-in with a PIL image processor
that keeps reference images at a few vision tokens."""

from __future__ import annotations

from typing import Any

# The image processor's pixel budget: 56x56 to 112x112, so a reference image is 16 to 64 vision patches of 14 px.
TINY_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}


def tiny_qwenedit_pipeline(seed: int = 0) -> Any:
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2VLImageProcessorPil

    from sdlora.families.qwenedit.processor import REAL_CLASS, VLProcessor
    from sdlora.families.qwenimage.tiny import tiny_parts

    parts = tiny_parts(seed, zero_cond_t=True)
    processor = VLProcessor(Qwen2VLImageProcessorPil(size=TINY_PIXELS), parts["tokenizer"])
    pipe = QwenImageEditPlusPipeline(**parts, processor=processor)
    pipe.register_to_config(processor=tuple(REAL_CLASS))  # saved as the released folders name it
    return pipe
