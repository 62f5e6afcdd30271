"""SDXL: the family object (family.py), its kohya SGM names (keys.py), the single-file writer of the tests
(single_file.py) and the tiny pipeline (tiny.py)."""

from sdlora.families.sdxl.family import SDXL, StableDiffusionXL

__all__ = ["SDXL", "StableDiffusionXL"]
