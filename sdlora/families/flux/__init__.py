"""Flux.1: the family object (family.py), BFL's module names (keys.py), its kohya metadata (metadata.py), single
files (single_file.py) and the tiny pipeline (tiny.py)."""

from sdlora.families.flux.family import FLUX, Flux

__all__ = ["FLUX", "Flux"]
