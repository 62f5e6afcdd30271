"""Where to crop: a square around the face (or the centre) given the photo's size, in source pixels."""

from __future__ import annotations

Box = tuple[int, int, int, int]  # (left, top, right, bottom)

# The face box's centre sits this far down the crop: a little above the middle, leaving headroom for hair
# above dlib's box (which runs from the eyebrows to the chin) and room for the neck below.
FACE_CENTRE_Y = 0.45


def face_crop(size: tuple[int, int], face: Box, face_share: float) -> Box:
    """Square whose side makes the face box `face_share` of it, shifted (never padded) to stay inside the photo;
    if the photo is too narrow for that, the side shrinks to the photo's shorter side."""
    width, height = size
    face_side = max(face[2] - face[0], face[3] - face[1])
    side = min(round(face_side / face_share), width, height)
    centre_x = (face[0] + face[2]) / 2
    centre_y = (face[1] + face[3]) / 2
    left = _clamp(round(centre_x - side / 2), 0, width - side)
    top = _clamp(round(centre_y - side * FACE_CENTRE_Y), 0, height - side)
    return left, top, left + side, top + side


def center_crop(size: tuple[int, int]) -> Box:
    """The largest centred square."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def upscale_needed(crop: Box, resolution: int) -> float:
    """How much the crop must be enlarged to reach `resolution` (below 1 means it is shrunk)."""
    return resolution / max(1, crop[2] - crop[0])


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
