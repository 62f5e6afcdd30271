"""Qwen-Image: the family object (family.py), its LoRA and single-file names (keys.py) and the tiny pipeline
(tiny.py)."""

from sdlora.families.qwenimage.family import QWENIMAGE, QwenImage

__all__ = ["QWENIMAGE", "QwenImage"]
