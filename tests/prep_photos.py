"""A folder of real photos for prep tests, built from packaged pictures, with what prep must decide for each file.

The subject is the astronaut of scikit-image's `data.astronaut()` (Eileen Collins); the "someone else" is Grace
Hopper (matplotlib's sample data). Each kept photo is a different framing of the astronaut (so none is a
perceptual-hash duplicate of another) saved in a different format or pixel mode.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy
from PIL import Image, ImageFilter, ImageOps

# file name -> expected status: "kept" or the skip reason.
EXPECTED = {
    "a_original.png": "kept",
    "b_mirror.jpg": "kept",
    "c_zoom.webp": "kept",
    "d_exif_rotated.jpg": "kept",
    "e_cmyk.jpg": "kept",
    "f_alpha.png": "kept",
    "g_16bit.png": "kept",
    "h_palette.gif": "kept",
    "i_phone.heic": "kept",
    "j_scan.tif": "kept",
    "k_reencoded.jpg": "duplicate",
    "l_blurred.jpg": "blurry",
    "m_hopper.jpg": "other_person",
    "n_two_people.png": "multiple_faces",
    "o_coffee.jpg": "no_face",
    "p_far_away.jpg": "face_too_small",
    "q_truncated.jpg": "unreadable",
    "r_empty.jpg": "unreadable",
    "s_text.jpg": "not_an_image",
    "t_tiny.png": "too_small",
    "u_bomb.png": "too_large",
    "v_notes.pdf": "not_an_image",
}
SIDECAR = ("b_mirror.txt", "an astronaut smiling in front of a flag")
HIDDEN = ".hidden.jpg"


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


def framing(left: int, top: int, side: int, out: int, mirror: bool = False, tint=(1.0, 1.0, 1.0)) -> Image.Image:
    """A square window of the astronaut photo, resized to `out` px: a different 'photo' of the same person."""
    image = astronaut().crop((left, top, left + side, top + side)).resize((out, out), Image.Resampling.LANCZOS)
    if mirror:
        image = ImageOps.mirror(image)
    pixels = numpy.asarray(image, dtype=numpy.float64) * numpy.array(tint)
    return Image.fromarray(numpy.clip(pixels, 0, 255).astype(numpy.uint8))


def build(folder: Path) -> Path:
    """Write every test photo into `folder` (created) and return it."""
    import pillow_heif

    folder.mkdir(parents=True, exist_ok=True)
    original = astronaut()
    original.save(folder / "a_original.png")
    framing(0, 0, 512, 560, mirror=True).save(folder / "b_mirror.jpg", quality=92)
    (folder / SIDECAR[0]).write_text(SIDECAR[1] + "\n", encoding="utf-8")
    framing(90, 10, 300, 480).save(folder / "c_zoom.webp", quality=92)
    # Stored on its side with EXIF orientation 6 ("rotate 90° clockwise to view"): upright only if EXIF is applied.
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = framing(20, 0, 400, 520, tint=(1.05, 1.0, 0.9)).crop((0, 0, 520, 460))  # 520x460 when viewed
    upright.rotate(90, expand=True).save(folder / "d_exif_rotated.jpg", quality=92, exif=exif)
    framing(60, 30, 380, 500, mirror=True).convert("CMYK").save(folder / "e_cmyk.jpg", quality=92)
    rgba = framing(0, 0, 440, 520, tint=(0.9, 1.0, 1.1)).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 420, 520, 520))  # a transparent band at the bottom
    rgba.putalpha(alpha)
    rgba.save(folder / "f_alpha.png")
    grey = numpy.asarray(framing(40, 0, 460, 540, mirror=True).convert("L"), dtype=numpy.uint16) * 257
    Image.fromarray(grey).save(folder / "g_16bit.png")  # mode I;16
    framing(100, 0, 340, 500).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(folder / "h_palette.gif")
    pillow_heif.from_pillow(framing(10, 20, 420, 480, mirror=True, tint=(1.0, 0.95, 1.05))).save(
        folder / "i_phone.heic", quality=90
    )
    framing(70, 0, 420, 500, tint=(0.95, 1.05, 1.0)).save(folder / "j_scan.tif")
    # The original again, slightly smaller and re-encoded: a near-duplicate, and the softer of the two.
    original.resize((470, 470), Image.Resampling.BILINEAR).save(folder / "k_reencoded.jpg", quality=80)
    framing(30, 0, 480, 520).filter(ImageFilter.GaussianBlur(3)).save(folder / "l_blurred.jpg", quality=92)
    hopper().resize((430, 504)).save(folder / "m_hopper.jpg", quality=92)
    _two_people().save(folder / "n_two_people.png")
    _coffee().save(folder / "o_coffee.jpg", quality=92)
    _far_away().save(folder / "p_far_away.jpg", quality=92)
    buffer = io.BytesIO()
    framing(0, 0, 512, 520, tint=(1.1, 1.0, 1.0)).save(buffer, "JPEG", quality=92)
    (folder / "q_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (folder / "r_empty.jpg").write_bytes(b"")
    (folder / "s_text.jpg").write_text("this is not a photo\n", encoding="utf-8")
    Image.new("RGB", (1, 1), (200, 150, 120)).save(folder / "t_tiny.png")
    (folder / "u_bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (folder / "v_notes.pdf").write_bytes(b"%PDF-1.4\n% not an image\n")
    framing(0, 0, 512, 500).save(folder / HIDDEN, quality=92)
    return folder


def _two_people() -> Image.Image:
    canvas = Image.new("RGB", (980, 600), (120, 120, 120))
    canvas.paste(hopper().resize((340, 400)), (20, 100))
    canvas.paste(astronaut().resize((580, 580)), (390, 10))
    return canvas


def _coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


def _far_away() -> Image.Image:
    """The astronaut small in a wide scene: a face about 45 px wide."""
    from skimage import data

    canvas = Image.fromarray(data.coffee()).resize((700, 460))
    canvas.paste(astronaut().resize((260, 260)), (380, 150))
    return canvas


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) claims width x height pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
