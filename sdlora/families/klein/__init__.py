"""FLUX.2 [klein]: the family object (family.py), BFL's module names (keys.py), single files
(single_file.py) and the tiny pipeline (tiny.py)."""

from sdlora.families.klein.family import KLEIN, Klein

__all__ = ["KLEIN", "Klein"]
