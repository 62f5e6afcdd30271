"""One photo, on its own: decode, find the face, crop, measure. Runs in worker processes; no decisions across photos."""

from __future__ import annotations

import functools
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy
from PIL import Image

from sdlora.errors import printable
from sdlora.faces.dlib import DlibFaces
from sdlora.prep import crops, images, masks

# Faces are detected on a copy whose longer side is at most this: HOG with one 2x upsampling then finds faces
# down to ~40 px (a face that small would be face_too_small anyway) in ~0.3 s, whatever the camera's resolution.
DETECT_SIDE = 1024
# A second face at least this share of the largest face's width makes the photo ambiguous (multiple_faces);
# smaller faces are people in the background.
COMPARABLE_FACE = 0.5
THUMB = 160  # px, longer side of the contact-sheet thumbnails


@dataclass(frozen=True)
class Settings:
    """What the workers need from the [prep] config (small and picklable)."""

    crop: str
    resolution: int
    face_share: float
    max_upscale: float
    max_pixels: int
    fast: bool = True  # decode JPEGs at reduced size (Pillow draft) where the crop allows
    buckets: bool = False  # SDXL aspect-ratio buckets instead of squares


@dataclass(frozen=True)
class Photo:
    """What one photo gave: a skip reason, or a candidate crop with the measurements set-level checks need."""

    name: str
    sha256: str
    reason: str | None = None  # None: a candidate
    message: str = ""
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation
    face_box: crops.Box | None = None
    crop_box: crops.Box | None = None
    out_size: tuple[int, int] | None = None  # (width, height) of the output image
    sharpness: float = 0.0
    phash: str = ""
    embedding: numpy.ndarray | None = None  # (128,) identity descriptor
    png: bytes = b""  # the output crop, PNG-encoded
    mask: bytes = b""  # its soft face-and-hair mask (prep.masks), PNG-encoded; b"" when no face was found
    thumb: Image.Image | None = None
    # What tells the original among near-duplicates (prep.run._duplicates): re-encodes are more compressed,
    # edited copies noisier or smaller.
    noise: float = 0.0  # noise_level of the detection decode, grey levels
    quantization: float = 1.0  # mean JPEG luma quantization step; 1 for lossless formats
    file_bytes: int = 0


@functools.lru_cache(maxsize=1)
def detector() -> DlibFaces:
    """One DlibFaces per process: loading its four models takes about a second."""
    return DlibFaces()


def examine(path: Path, settings: Settings) -> Photo:
    """Everything prep learns from one photo alone; a bad photo gives a skip reason, never an exception."""
    name = printable(path.name)
    try:
        data = images.read_photo_bytes(path, settings.max_pixels)  # the header first: no video read whole
    except images.Skip as skip:
        return Photo(name, "", skip.reason, skip.message)
    sha = hashlib.sha256(data).hexdigest()
    thumb = None
    try:
        first = images.open_photo(data, settings.max_pixels, DETECT_SIDE if settings.fast else 0)
        working = images.downscale(first.image, DETECT_SIDE)
        thumb = _thumbnail(working)
        return _candidate(name, sha, data, first, working, settings)
    except images.Skip as skip:
        return Photo(name, sha, skip.reason, skip.message, thumb=thumb)
    except Exception as exc:  # noqa: BLE001 - decoders of odd files raise anything; one photo never stops a run
        message = f"It could not be processed ({type(exc).__name__}: {exc}); the file may be corrupt."
        return Photo(name, sha, "unreadable", message, thumb=thumb)


def _candidate(
    name: str, sha: str, data: bytes, first: images.Opened, working: Image.Image, settings: Settings
) -> Photo:
    size = first.size
    smallest = math.ceil(settings.resolution / settings.max_upscale)
    if min(size) < smallest:
        raise images.Skip(
            "too_small",
            f"It is only {size[0]}x{size[1]} px; a {settings.resolution} px crop needs a shorter side of at least "
            f"{smallest} px (prep.max_upscale {settings.max_upscale:g}).",
        )
    out_size = crops.nearest_bucket(size, settings.resolution) if settings.buckets else (settings.resolution,) * 2
    aspect = out_size[0] / out_size[1]
    face_box, embedding, landmarks = None, None, None
    if settings.crop == "face":
        face_box, embedding, landmarks = _the_face(working, size[0] / working.width)
        crop = crops.face_crop(size, face_box, settings.face_share, aspect)
    else:
        crop = crops.center_crop(size, aspect)
        landmarks = _any_face(working, size[0] / working.width)  # for the mask only; none is fine
    needed = crops.upscale_needed(crop, out_size[0])
    if needed > settings.max_upscale:
        limit = f"enlarging {needed:.1f}x (limit {settings.max_upscale:g}x)"
        if face_box is None:
            raise images.Skip("too_small", f"The centre crop would need {limit}.")
        width = face_box[2] - face_box[0]
        raise images.Skip("face_too_small", f"The face is only {width} px wide: its crop would need {limit}.")
    out = _render(data, first, crop, out_size, settings)
    return Photo(
        name=name,
        sha256=sha,
        size=size,
        face_box=face_box,
        crop_box=crop,
        out_size=out_size,
        sharpness=round(images.sharpness(out, _face_in_output(face_box, crop, out_size[0])), 4),
        phash=images.perceptual_hash(working),
        embedding=embedding,
        png=_png(out),
        mask=b""
        if landmarks is None
        else masks.png(masks.face_mask(masks.to_crop(landmarks, crop, out_size), out_size)),
        thumb=_thumbnail(out),
        noise=round(images.noise_level(working), 4),
        quantization=first.quantization,
        file_bytes=len(data),
    )


def _the_face(working: Image.Image, scale: float) -> tuple[crops.Box, numpy.ndarray, numpy.ndarray]:
    """The one face of the photo in full-size pixels, its identity descriptor and its 68 landmarks (68, 2) in
    full-size pixels; Skip otherwise."""
    faces = detector().detect(working)
    if not faces:
        raise images.Skip("no_face", "No face was found (the detector needs a roughly frontal face).")
    comparable = [face for face in faces if face.width >= COMPARABLE_FACE * faces[0].width]
    if len(comparable) > 1:
        raise images.Skip(
            "multiple_faces",
            f"{len(comparable)} faces of comparable size: it is unclear which person to learn. "
            "Crop the photo to the one person.",
        )
    face = faces[0]
    box = tuple(round(value * scale) for value in face.landmark_box)
    return box, detector().embed(working, face), face.landmarks * scale  # type: ignore[return-value]


def _any_face(working: Image.Image, scale: float) -> numpy.ndarray | None:
    """The largest face's 68 landmarks in full-size pixels (crop=center: only its mask uses them), or None."""
    faces = detector().detect(working)
    return faces[0].landmarks * scale if faces else None


def _render(
    data: bytes, first: images.Opened, crop: crops.Box, out_size: tuple[int, int], settings: Settings
) -> Image.Image:
    """The crop resampled to `out_size`, from a decode with at least that many pixels across the crop."""
    source = first
    crop_width = crop[2] - crop[0]
    if crop_width / first.scale < out_size[0]:
        # The detection decode is too coarse for this crop: decode again, only as finely as the crop needs.
        needed = math.ceil(max(first.size) * out_size[0] / crop_width)
        source = images.open_photo(data, settings.max_pixels, needed if settings.fast else 0)
    box = tuple(value / source.scale for value in crop)
    return source.image.resize(out_size, Image.Resampling.LANCZOS, box=box)  # type: ignore[arg-type]


def _face_in_output(face: crops.Box | None, crop: crops.Box, out_width: int) -> tuple[float, ...] | None:
    if face is None:
        return None
    scale = out_width / (crop[2] - crop[0])
    left, top, right, bottom = ((face[i] - crop[i % 2]) * scale for i in range(4))
    out_height = (crop[3] - crop[1]) * scale
    return max(0.0, left), max(0.0, top), min(out_width, right), min(out_height, bottom)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Pillow writes no timestamp: same pixels, same bytes. Level 3: 2.5x faster than the default 6, files ~8% larger.
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _thumbnail(image: Image.Image) -> Image.Image:
    thumb = image.copy()
    thumb.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    return thumb
