"""Where to crop: a square (or an SDXL bucket's shape) around the face or the centre, in source pixels."""

from __future__ import annotations

import math

Box = tuple[int, int, int, int]  # (left, top, right, bottom)

# The face box's centre sits this far down the crop: a little above the middle, leaving headroom for hair
# above the face box (which runs from the eyebrows to the chin) and room for the neck below.
FACE_CENTRE_Y = 0.45
# SDXL's training buckets at 1024 px (width, height), landscape half; the portrait half is the same transposed.
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640))
BUCKET_STEP = 32  # px: SDXL's UNet halves the 1/8-size latents twice, so sides stay multiples of 32


def face_crop(size: tuple[int, int], face: Box, face_share: float, aspect: float = 1.0) -> Box:
    """A width/height = `aspect` region with the area of a square whose side makes the face `face_share` of it,
    shifted (never padded) to stay inside the photo; shrunk, keeping its shape, if the photo is too small."""
    width, height = size
    side = max(face[2] - face[0], face[3] - face[1]) / face_share
    region_w, region_h = _fit(side * math.sqrt(aspect), side / math.sqrt(aspect), width, height)
    centre_x = (face[0] + face[2]) / 2
    centre_y = (face[1] + face[3]) / 2
    left = _clamp(round(centre_x - region_w / 2), 0, width - region_w)
    top = _clamp(round(centre_y - region_h * FACE_CENTRE_Y), 0, height - region_h)
    return left, top, left + region_w, top + region_h


def center_crop(size: tuple[int, int], aspect: float = 1.0) -> Box:
    """The largest centred region with width/height = `aspect`."""
    width, height = size
    region_w, region_h = _fit(width, width / aspect, width, height)
    left, top = (width - region_w) // 2, (height - region_h) // 2
    return left, top, left + region_w, top + region_h


def buckets(resolution: int) -> list[tuple[int, int]]:
    """SDXL's bucket sizes scaled to `resolution` (1024 gives SDXL's own list), square first."""
    sizes: list[tuple[int, int]] = []
    for width, height in SDXL_BUCKETS:
        for w, h in ((width, height), (height, width)):
            size = (_step(w * resolution / 1024), _step(h * resolution / 1024))
            if size not in sizes:
                sizes.append(size)
    return sizes


def nearest_bucket(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The bucket whose shape is closest to the photo's (by log aspect ratio; ties to the earlier, squarer one)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets(resolution), key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def upscale_needed(crop: Box, out_width: int) -> float:
    """How much the crop must be enlarged to reach `out_width` (below 1 means it is shrunk)."""
    return out_width / max(1, crop[2] - crop[0])


def _fit(region_w: float, region_h: float, width: int, height: int) -> tuple[int, int]:
    """(w, h) scaled down, keeping its shape, to fit inside width x height; whole pixels."""
    scale = min(1.0, width / region_w, height / region_h)
    return min(width, round(region_w * scale)), min(height, round(region_h * scale))


def _step(value: float) -> int:
    return max(BUCKET_STEP, round(value / BUCKET_STEP) * BUCKET_STEP)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
