"""A small "phone photo set" of one real person, made from sample photos that ship with our dependencies.

scikit-image ships `data.astronaut()` (Eileen Collins, public domain, one clear face) and `data.coffee()` (no
person). The set mimics what people have on their phones: varied framings, an EXIF-rotated JPEG, colour and
exposure changes, a grayscale shot, a near-duplicate, a blurry shot and a photo with no face, so that every
stage of `prep` has something to do.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from sdlora import fsutil
from sdlora.errors import UsageError

EXIF_ORIENTATION = 0x0112


def _jpeg(image: Image.Image, quality: int = 92, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def demo_photos() -> dict[str, bytes]:
    """File name -> encoded bytes of the demo photo set (deterministic)."""
    from skimage import data

    person = Image.fromarray(data.astronaut())  # 512x512 RGB
    wide = ImageOps.expand(person, border=(96, 32, 96, 32), fill=(40, 44, 52))  # a looser framing, 704x576
    off_centre = ImageOps.expand(person.crop((0, 0, 512, 440)), border=(260, 40, 20, 40), fill=(180, 190, 205))
    warm = ImageEnhance.Brightness(ImageEnhance.Color(ImageOps.mirror(person)).enhance(1.5)).enhance(0.85)
    photos = {
        "IMG_0001.jpg": _jpeg(person),
        "IMG_0002.jpg": _jpeg(wide),
        "IMG_0003.jpg": _jpeg(person.crop((40, 0, 472, 432)).resize((640, 640), Image.Resampling.LANCZOS)),
        # Stored sideways with an EXIF orientation tag, as phones do: prep must turn it upright.
        "IMG_0004.jpg": _jpeg(off_centre.transpose(Image.Transpose.ROTATE_90), orientation=6),
        "IMG_0005.jpg": _jpeg(warm.crop((0, 0, 512, 460))),
        "IMG_0006.png": _png(ImageOps.grayscale(person.crop((60, 0, 420, 360)).resize((540, 540)))),
        "IMG_0007.jpg": _jpeg(ImageEnhance.Contrast(ImageOps.mirror(wide)).enhance(1.3)),
        # A re-encoded copy of IMG_0001: a near-duplicate that prep drops.
        "IMG_0008.jpg": _jpeg(person, quality=70),
        # Out of focus: sharpness far below the rest of the set, the face still visible.
        "IMG_0009.jpg": _jpeg(person.crop((20, 10, 500, 490)).filter(ImageFilter.GaussianBlur(2.5))),
        # No person at all.
        "IMG_0010.jpg": _jpeg(Image.fromarray(data.coffee())),
    }
    return photos


def write_demo_photos(folder: Path) -> list[Path]:
    """Write the demo photo set as `folder` (new, empty or an earlier set's: replaced whole, never half-written,
    marked as the demo's) and return the paths. A folder of anyone else's photos is refused."""
    folder = Path(folder)
    photos = demo_photos()
    if fsutil.contents(folder) and (fsutil.owner(folder) != "demo" or set(fsutil.contents(folder)) - set(photos)):
        raise UsageError(
            f"{folder}: holds {fsutil.describe(folder)}; the demo writes its photos only into a new folder"
        )
    fsutil.claim(folder, "demo", lock_now=False)
    with fsutil.atomic_dir(folder) as tmp:
        for name, payload in photos.items():
            (tmp / name).write_bytes(payload)
    return [folder / name for name in photos]
