"""Qwen-Image-Edit (2509/2511 and the first Edit): the family object (family.py), the processor stand-in
(processor.py) and the tiny pipeline (tiny.py)."""

from sdlora.families.qwenedit.family import QWENEDIT, QwenImageEdit

__all__ = ["QWENEDIT", "QwenImageEdit"]
