"""Soft face-and-hair masks of the crops (train.masked_loss): the outline of the 68 landmarks and the head above
it (forehead and hair, which the landmarks stop short of), dilated and feathered, in the crop's own pixels.

Pure: landmarks and boxes in, an 8-bit greyscale image out (255 = face, 0 = background); same input, same bytes.
"""

from __future__ import annotations

import io

import numpy
from PIL import Image, ImageDraw, ImageFilter

# Shares of the face's width (the landmarks' horizontal extent): how far the mask grows past the outline (so
# the jaw line and ears are well inside it) and the Gaussian feather's sigma (the soft edge, mostly outside).
DILATE = 0.12
FEATHER = 0.06
# The head above the landmarks (forehead and hair): an ellipse as wide as HEAD_WIDTH x the face, from the chin up
# to HAIR_TOP face heights (chin to eyebrows) above the eyebrows.
HEAD_WIDTH = 1.45
HAIR_TOP = 0.7
# dlib's 68 points: the jaw line, then the eyebrows (17-26); jaw followed by the brows reversed is the outline.
JAW, BROWS = range(0, 17), range(17, 27)


def to_crop(points: numpy.ndarray, crop: tuple[int, int, int, int], out_size: tuple[int, int]) -> numpy.ndarray:
    """Points (N, 2) in source pixels -> the output image's pixels of the crop `crop` resized to `out_size`."""
    scale = numpy.array([out_size[0] / (crop[2] - crop[0]), out_size[1] / (crop[3] - crop[1])], numpy.float64)
    return (numpy.asarray(points, numpy.float64) - numpy.array(crop[:2], numpy.float64)) * scale


def face_mask(landmarks: numpy.ndarray, size: tuple[int, int]) -> Image.Image:
    """The mask ("L", `size` = (width, height)) of a face whose 68 landmarks (68, 2) are in that image's pixels."""
    points = numpy.asarray(landmarks, numpy.float64)
    left, top = (float(v) for v in points.min(axis=0))
    right, chin = (float(v) for v in points.max(axis=0))
    width, height = right - left, chin - top
    outline = [(float(points[i, 0]), float(points[i, 1])) for i in [*JAW, *reversed(BROWS)]]
    centre = (left + right) / 2
    head = (centre - HEAD_WIDTH * width / 2, top - HAIR_TOP * height, centre + HEAD_WIDTH * width / 2, chin)
    return soften([outline], [head], size, width)


def soften(
    polygons: list[list[tuple[float, float]]],
    ellipses: list[tuple[float, float, float, float]],
    size: tuple[int, int],
    face_width: float,
) -> Image.Image:
    """The union of `polygons` and `ellipses` (left, top, right, bottom), grown by DILATE x `face_width` (a
    thick outline with round joints, enlarged ellipses) and feathered by FEATHER x `face_width`."""
    face_width = float(face_width)
    grow = max(1.0, DILATE * face_width)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        draw.polygon(polygon, fill=255)
        draw.line([*polygon, polygon[0]], fill=255, width=round(2 * grow), joint="curve")
        for x, y in polygon:  # round ends where the outline closes
            draw.ellipse((x - grow, y - grow, x + grow, y + grow), fill=255)
    for box in ellipses:
        draw.ellipse((box[0] - grow, box[1] - grow, box[2] + grow, box[3] + grow), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(max(0.5, FEATHER * face_width)))


def png(mask: Image.Image) -> bytes:
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG", compress_level=3)  # no timestamp: same mask, same bytes
    return buffer.getvalue()
