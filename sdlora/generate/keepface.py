"""Keep a photo's real face and repaint the rest: face mask from landmarks, photo fitting, feathered composite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

JAW = slice(0, 17)  # dlib 68-point order: jaw outline, ear to ear through the chin
BROWS = slice(17, 27)  # both eyebrows, left to right
NOSE_BRIDGE_TOP, NOSE_TIP = 27, 33
# The forehead is about as tall as brow-to-nose-tip; raise the brows by this share of that distance.
FOREHEAD = 0.9
# Gaussian feather radius as a share of the face width: wide enough to hide the seam, small enough to keep a core.
FEATHER = 0.06


def load_photo(path: Path, option: str) -> Image.Image:
    """An RGB photo, upright per its EXIF orientation; a clear error when it is missing or not an image."""
    from sdlora.prep.images import read_image

    return read_image(path, option)


def fit(image: Image.Image, width: int, height: int) -> tuple[Image.Image, float, tuple[float, float]]:
    """Scale `image` to cover width x height and crop the centre; returns it with the scale and crop offset,
    so that points map as (x, y) * scale - offset."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height)), scale, (float(left), float(top))


def face_outline(landmarks: np.ndarray) -> np.ndarray:
    """(N, 2) polygon from chin to forehead: the jaw outline, then the brows raised over the forehead."""
    jaw = landmarks[JAW]
    brow_to_nose = float(np.linalg.norm(landmarks[NOSE_TIP] - landmarks[NOSE_BRIDGE_TOP]))
    # "Up" is from the nose tip towards the top of the nose bridge, so tilted faces get a tilted forehead.
    up = landmarks[NOSE_BRIDGE_TOP] - landmarks[NOSE_TIP]
    up = up / (np.linalg.norm(up) + 1e-6)
    brows = landmarks[BROWS][::-1] + up * FOREHEAD * brow_to_nose  # right to left, closing the polygon
    return np.concatenate([jaw, brows]).astype(np.float32)


def face_mask(landmarks: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Feathered 'L' mask of the face (255 = the photo's face, 0 = repaint), `size` = (width, height)."""
    outline = face_outline(landmarks)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([tuple(map(float, point)) for point in outline], fill=255)
    face_width = float(outline[:, 0].max() - outline[:, 0].min())
    radius = max(1.0, FEATHER * face_width)
    # Erode first so the feather falls inside the outline: the repainted area never shows through at the edge,
    # and the core (255 after blurring) is exactly the photo's face.
    eroded = mask.filter(ImageFilter.MinFilter(_odd(radius)))
    return eroded.filter(ImageFilter.GaussianBlur(radius / 2))


def composite(photo: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """photo where mask is 255, generated where it is 0, blended in between (as inpainting UIs do)."""
    return Image.composite(photo, generated.convert("RGB").resize(photo.size), mask)


def prepare(photo: Image.Image, landmarks: np.ndarray, width: int, height: int) -> tuple[Image.Image, Image.Image]:
    """The photo fitted to the output size and its face mask (landmarks given in the original photo's pixels)."""
    fitted, scale, offset = fit(photo, width, height)
    points = landmarks * scale - np.asarray(offset, dtype=np.float32)
    return fitted, face_mask(points, (width, height))


def _odd(radius: float) -> int:
    size = max(3, int(round(radius)))
    return size if size % 2 else size + 1
