"""Pure PIL functions: open any photo (EXIF, modes, bombs, HEIC), resize, sharpness and perceptual hashing."""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.config import MAX_PIXELS
from sdlora.errors import UsageError, printable

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
    quantization: float = 1.0  # mean JPEG luma quantization step (1: lossless formats); higher = more compressed


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
                quantization = _quantization(image)
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
    return Opened(image=rgb, size=full, scale=full[0] / rgb.width, quantization=quantization)


def _quantization(image: Image.Image) -> float:
    """Mean step of a JPEG's luma quantization table (about 1-3 at quality 95, 8 at 70, 16 at 50): how much
    the encoder threw away. Lossless formats give 1."""
    tables = getattr(image, "quantization", None) or {}
    table = tables.get(0)
    return float(numpy.mean(table)) if table else 1.0


def read_photo_bytes(path: Path, max_pixels: int) -> bytes:
    """The bytes of an image file, read whole only once its header says it is an image of at most `max_pixels`
    and its size is one such an image can have: a video, an archive or a huge file is refused (Skip) after
    reading a few KB, so a 2 GB video in a photo folder costs no memory. Special files (pipes, devices,
    dangling links, link loops) are refused without opening them."""
    _regular_file(Path(path), max_pixels)
    try:
        with open(path, "rb") as handle:
            _check_header(handle, max_pixels)  # reads only the header
            handle.seek(0)
            return handle.read()
    except OSError as exc:
        raise Skip("unreadable", f"It could not be read ({exc.strerror or exc}).") from None


def _regular_file(path: Path, max_pixels: int) -> os.stat_result:
    """The file's stat when it is a regular, non-empty file of a size an image within `max_pixels` can have;
    Skip otherwise (dangling links, link loops, pipes, devices: without opening them)."""
    try:
        info = path.stat()
    except OSError as exc:
        if path.is_symlink():
            what = "a symbolic link loop" if exc.errno == errno.ELOOP else "a dangling symbolic link"
            raise Skip("unreadable", f"It is {what} (to {printable(os.readlink(path))}), not a file.") from None
        raise Skip("unreadable", f"It could not be read ({exc.strerror or exc}).") from None
    if not stat.S_ISREG(info.st_mode):
        raise Skip("unreadable", f"It is {_special_kind(info.st_mode)}, not a regular file.")
    if info.st_size == 0:
        raise Skip("unreadable", "The file is empty (0 bytes).")
    limit = max_file_bytes(max_pixels)
    if info.st_size > limit:
        raise Skip(
            "too_large",
            f"The file is {info.st_size / 1e6:.0f} MB, more than any photo within prep.max_pixels needs "
            f"({limit / 1e6:.0f} MB); it was not read.",
        )
    return info


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image of `max_pixels` can be: uncompressed 16-bit RGBA (8 bytes a pixel), plus
    room for metadata and thumbnails."""
    return max_pixels * 8 + 64 * 1024 * 1024


def _check_header(handle, max_pixels: int) -> None:
    """Identify the image from its header (Pillow reads the pixels only on load); Skip if it is none."""
    register_heif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as image:
                width, height = image.size
        except UnidentifiedImageError:
            raise Skip("not_an_image", "Pillow does not recognise it as an image.") from None
        except Image.DecompressionBombError as exc:
            raise Skip("too_large", f"Pillow refused it as a decompression bomb ({exc}).") from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            raise Skip("unreadable", f"Its header could not be read ({exc}); the file may be corrupt.") from None
    if width * height > max_pixels:
        raise Skip(
            "too_large",
            f"It claims {width}x{height} pixels, over the limit of {max_pixels} "
            "(a decompression bomb or a huge scan); raise prep.max_pixels if it is real.",
        )


def _special_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def check_images(paths: list[Path], what: str = "", max_pixels: int = MAX_PIXELS) -> None:
    """Before the slow part: every file exists, is a regular file and has an image header within `max_pixels`
    (a few KB read per file; the pixels are decoded later). The first bad one is a UsageError naming it."""
    for path in paths:
        where = printable(f"{what} {path}" if what else str(path))
        if not os.path.lexists(path):
            raise UsageError(f"{where}: no such file")
        try:
            _header_only(Path(path), max_pixels)
        except Skip as skip:
            raise UsageError(f"{where}: not a usable image: {skip.message} Remove it or replace it.") from None


def _header_only(path: Path, max_pixels: int) -> None:
    _regular_file(path, max_pixels)
    try:
        with open(path, "rb") as handle:
            _check_header(handle, max_pixels)
    except OSError as exc:
        raise Skip("unreadable", f"It could not be read ({exc.strerror or exc}).") from None


def read_image(path: Path, what: str = "", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The one opener of every image sdlora reads outside prep's folder scan (datasets, eval's images and
    references, --init-image, --keep-face): 8-bit RGB, upright per EXIF, any format prep reads (HEIC too), with
    prep's decompression-bomb limit and bounded reads. A file that can't be used is a UsageError naming it
    (`what`: the option)."""
    path = Path(path)
    where = printable(f"{what} {path}" if what else str(path))
    if not os.path.lexists(path):
        raise UsageError(f"{where}: no such file")
    try:
        return open_photo(read_photo_bytes(path, max_pixels), max_pixels).image
    except Skip as skip:
        raise UsageError(f"{where}: not a usable image: {skip.message} Remove it or replace it with a photo.") from None


def _rotated_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation, read from the header without decoding pixels."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit and float scaled (not clipped), alpha flattened onto neutral grey,
    CMYK, palette and grayscale converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = numpy.nan_to_num(numpy.asarray(image, dtype=numpy.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = pixels.max() if pixels.size else 0.0
        # 16-bit files use 0..65535; 'I'/'F' images from 8-bit sources stay in 0..255; float images ('F',
        # e.g. 32-bit TIFFs from editors and scientific tools) usually use 0..1.
        top = 65535.0 if peak > 255 else 1.0 if image.mode == "F" and peak <= 1.0 else 255.0
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


def noise_level(image: Image.Image) -> float:
    """Standard deviation of the pixel noise, in grey levels, robust to edges and texture: the median absolute
    response to a 3x3 kernel that cancels smooth gradients (Immerkaer's), scaled for Gaussian noise. Unlike
    the Laplacian's variance, speckle and grain raise it while sharp edges barely move the median."""
    grey = numpy.asarray(image.convert("L"), dtype=numpy.float64)
    if min(grey.shape) < 3:
        return 0.0
    residual = (
        grey[:-2, :-2] - 2 * grey[:-2, 1:-1] + grey[:-2, 2:]
        - 2 * grey[1:-1, :-2] + 4 * grey[1:-1, 1:-1] - 2 * grey[1:-1, 2:]
        + grey[2:, :-2] - 2 * grey[2:, 1:-1] + grey[2:, 2:]
    )  # fmt: skip
    # For Gaussian noise of std s the residual has std 6 s; median |x| = 0.6745 std.
    return float(numpy.median(numpy.abs(residual)) / (0.6745 * 6))


def perceptual_hash(image: Image.Image) -> str:
    """64-bit pHash as hex; near-duplicates (re-encodes, resizes) differ in a few bits."""
    import imagehash

    return str(imagehash.phash(image))


def hash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex hashes from perceptual_hash."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")
