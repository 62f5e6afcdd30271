"""Z-Image: the family object (family.py), the original and ComfyUI names of its transformer (keys.py) and the tiny
pipeline (tiny.py)."""

from sdlora.families.zimage.family import ZIMAGE, ZImage

__all__ = ["ZIMAGE", "ZImage"]
