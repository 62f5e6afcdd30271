"""Pure PIL functions: open any photo (EXIF, modes, bombs, HEIC), resize, sharpness and perceptual hashing."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.config import MAX_PIXELS
from sdlora.errors import UsageError

# Transparent pixels are flattened onto this neutral grey, not black or white, so they don't bias exposure.
BACKGROUND = (128, 128, 128)


class Skip(Exception):
    """A photo that cannot be used: `reason` is machine-readable, the message is a sentence for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Opened:
    image: Image.Image  # 8-bit RGB, EXIF-rotated; maybe decoded at reduced size (see `scale`)
    size: tuple[int, int]  # (width, height) of the full photo after EXIF rotation
    scale: float  # full-size pixels per pixel of `image` (1.0 when decoded at full size)


def register_heif() -> None:
    """Teach Pillow to open HEIC/HEIF (phone photos); registering twice is harmless."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def open_photo(data: bytes, max_pixels: int, min_long_side: int = 0) -> Opened:
    """Decode a photo's bytes at full size (min_long_side 0) or, for JPEGs, at the smallest DCT scale whose longer
    side is still >= min_long_side (Pillow's draft: decoding a 12-MP JPEG at 1/4 scale is much faster). Raises Skip."""
    register_heif()
    if not data:
        raise Skip("unreadable", "The file is empty (0 bytes).")
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse by our own limit before decoding.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                full = _rotated_size(image)
                if full[0] * full[1] > max_pixels:
                    raise Skip(
                        "too_large",
                        f"It claims {full[0]}x{full[1]} pixels, over the limit of {max_pixels} "
                        "(a decompression bomb or a huge scan); raise prep.max_pixels if it is real.",
                    )
                if min_long_side and image.format == "JPEG":
                    # draft picks the largest reduction (1/2, 1/4, 1/8) that keeps both sides >= the request.
                    factor = min_long_side / max(image.size)
                    image.draft("RGB", (math.ceil(image.size[0] * factor), math.ceil(image.size[1] * factor)))
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a 12-MP upright photo
                rgb = to_rgb(image)
        except Skip:
            raise
        except UnidentifiedImageError:
            raise Skip("not_an_image", "Pillow does not recognise it as an image.") from None
        except Image.DecompressionBombError as exc:
            raise Skip("too_large", f"Pillow refused it as a decompression bomb ({exc}).") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise Skip(
                "unreadable", f"It could not be decoded ({exc}); the file may be truncated or corrupt."
            ) from None
    return Opened(image=rgb, size=full, scale=full[0] / rgb.width)


def read_image(path: Path, what: str = "", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The one opener of every image sdlora reads outside prep's folder scan (datasets, eval's images and
    references, --init-image, --keep-face): 8-bit RGB, upright per EXIF, any format prep reads (HEIC too), with
    prep's decompression-bomb limit. A file that can't be used is a UsageError naming it (`what`: the option)."""
    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        return open_photo(path.read_bytes(), max_pixels).image
    except Skip as skip:
        raise UsageError(f"{where}: not a usable image: {skip.message}") from None


def _rotated_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation, read from the header without decoding pixels."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and float scaled (not clipped), alpha flattened onto neutral grey,
    CMYK, palette and grayscale converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = numpy.asarray(image, dtype=numpy.float64)
        peak = pixels.max() if pixels.size else 0.0
        # 16-bit files use 0..65535; 'I'/'F' images from 8-bit sources stay in 0..255.
        top = 65535.0 if peak > 255 else 255.0
        image = Image.fromarray(numpy.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(numpy.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longer side at most `max_side` (never enlarged); a fixed filter keeps it repeatable."""
    factor = max_side / max(image.size)
    if factor >= 1:
        return image
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def sharpness(image: Image.Image, box: tuple[float, float, float, float] | None = None, side: int = 128) -> float:
    """Variance of the Laplacian of `box` (the face, or the whole image) resampled to side x side grey pixels:
    a fixed size makes photos of different resolutions comparable. Higher is sharper."""
    region = image.resize((side, side), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0).convert("L")
    grey = numpy.asarray(region, dtype=numpy.float64)
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


def perceptual_hash(image: Image.Image) -> str:
    """64-bit pHash as hex; near-duplicates (re-encodes, resizes) differ in a few bits."""
    import imagehash

    return str(imagehash.phash(image))


def hash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex hashes from perceptual_hash."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")
