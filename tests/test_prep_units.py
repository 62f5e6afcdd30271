"""The pure parts of prep: decoding (modes, EXIF, draft, limits), crop geometry, captions, sharpness, fast path."""

from __future__ import annotations

import io

import numpy
import prep_photos
import pytest
from PIL import Image, ImageFilter

from sdlora.errors import UsageError
from sdlora.faces.dlib import face_distance
from sdlora.prep import captions, crops, images
from sdlora.prep.examine import Settings, examine


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (numpy.arange(256, dtype=numpy.uint16) * 257).reshape(16, 16)  # 0..65535
    opened = images.open_photo(_encode(Image.fromarray(ramp), "PNG"), max_pixels=10**6)
    assert opened.image.mode == "RGB"
    grey = numpy.asarray(opened.image)[..., 0].ravel()
    assert grey[0] == 0 and grey[-1] == 255 and grey[128] == 128  # clipping would make most of it 255


def test_alpha_is_flattened_onto_grey():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    opened = images.open_photo(_encode(rgba, "PNG"), max_pixels=10**6)
    assert opened.image.getpixel((0, 0)) == images.BACKGROUND


def test_cmyk_and_palette_become_rgb():
    colour = Image.new("RGB", (8, 8), (200, 40, 40))
    for data in (_encode(colour.convert("CMYK"), "JPEG"), _encode(colour.convert("P"), "GIF")):
        pixel = images.open_photo(data, max_pixels=10**6).image.getpixel((0, 0))
        assert abs(pixel[0] - 200) < 12 and pixel[1] < 60 and pixel[2] < 60


def test_exif_orientation_is_applied():
    upright = Image.new("RGB", (60, 40), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 30, 40))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: view by rotating 90 degrees clockwise
    opened = images.open_photo(_encode(upright.rotate(90, expand=True), "JPEG", exif=exif), max_pixels=10**6)
    assert opened.size == (60, 40) == opened.image.size
    assert opened.image.getpixel((5, 20))[0] > 200 and opened.image.getpixel((55, 20))[0] < 50


def test_heic_with_orientation_is_upright_once():
    """pillow-heif applies the rotation itself and resets the tag; we must not rotate a second time."""
    images.register_heif()
    upright = Image.new("RGB", (60, 40), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    opened = images.open_photo(_encode(upright.rotate(90, expand=True), "HEIF", exif=exif.tobytes()), 10**6)
    assert opened.size == (60, 40) == opened.image.size
    assert opened.image.getpixel((5, 20))[0] > 200 and opened.image.getpixel((55, 20))[0] < 50


def test_our_pixel_limit_refuses_before_decoding():
    with pytest.raises(images.Skip) as caught:
        images.open_photo(_encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)
    assert caught.value.reason == "too_large" and "prep.max_pixels" in caught.value.message


def test_draft_decodes_big_jpegs_smaller():
    data = _encode(Image.new("RGB", (2400, 1600), (90, 120, 150)), "JPEG")
    full = images.open_photo(data, max_pixels=10**8)
    small = images.open_photo(data, max_pixels=10**8, min_long_side=700)
    assert full.size == small.size == (2400, 1600) and full.scale == 1.0
    assert small.image.size == (1200, 800) and small.scale == 2.0  # 1/4 would be 600 < 700


def test_sharpness_drops_with_blur():
    sharp = prep_photos.astronaut()
    blurred = sharp.filter(ImageFilter.GaussianBlur(3))
    # A 3-px blur of a 512-px photo falls under the default blur_ratio (0.35 of the sharp one).
    assert images.sharpness(blurred) < 0.35 * images.sharpness(sharp)


def test_hash_distance_small_for_reencode_large_for_other_photo():
    photo = prep_photos.astronaut()
    again = Image.open(io.BytesIO(_encode(photo.resize((400, 400)), "JPEG", quality=70)))
    assert images.hash_distance(images.perceptual_hash(photo), images.perceptual_hash(again)) <= 4
    assert images.hash_distance(images.perceptual_hash(photo), images.perceptual_hash(prep_photos.hopper())) > 16


def test_face_crop_has_the_share_and_headroom():
    left, top, right, bottom = crops.face_crop((2000, 2000), (900, 900, 1100, 1100), face_share=0.4)
    assert right - left == bottom - top == 500
    assert (left + right) / 2 == 1000
    assert top == 1000 - 0.45 * 500  # the face centre sits 45% down the crop


def test_face_crop_shifts_inside_never_pads():
    # A face in the top-left corner: the square slides to stay in the photo instead of padding.
    assert crops.face_crop((1000, 800), (0, 0, 100, 100), face_share=0.25) == (0, 0, 400, 400)
    # A face too large for the photo's width: the side shrinks to the shorter side.
    assert crops.face_crop((600, 900), (100, 300, 500, 700), face_share=0.45) == (0, 230, 600, 830)


def test_sdxl_buckets():
    assert crops.buckets(1024)[:3] == [(1024, 1024), (1152, 896), (896, 1152)]
    assert len(crops.buckets(1024)) == 9 and all(w % 32 == 0 and h % 32 == 0 for w, h in crops.buckets(768))
    assert crops.nearest_bucket((3000, 4000), 1024) == (896, 1152)  # a 3:4 phone portrait
    assert crops.nearest_bucket((4000, 3000), 1024) == (1152, 896)
    assert crops.nearest_bucket((1000, 1000), 1024) == (1024, 1024)


def test_face_crop_with_a_bucket_shape():
    left, top, right, bottom = crops.face_crop((3000, 4000), (1300, 1000, 1700, 1400), 0.45, aspect=832 / 1216)
    assert abs((right - left) / (bottom - top) - 832 / 1216) < 0.01
    assert abs((right - left) * (bottom - top) - (400 / 0.45) ** 2) < 0.01 * (400 / 0.45) ** 2  # the square's area
    assert abs((left + right) / 2 - 1500) <= 1 and left >= 0 and top >= 0 and bottom <= 4000
    # Too tall for the photo: shrunk keeping its shape, then shifted inside.
    box = crops.face_crop((1000, 600), (400, 100, 600, 300), 0.2, aspect=0.5)
    assert box == (350, 0, 650, 600)


def test_center_crop():
    assert crops.center_crop((640, 427)) == (106, 0, 533, 427)
    assert crops.center_crop((300, 500)) == (0, 100, 300, 400)
    assert crops.center_crop((1000, 1000), aspect=0.5) == (250, 0, 750, 1000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("photo of sks person at the beach", "photo of sks person at the beach"),
        ("a person  at the\nbeach", "a sks person at the beach"),
        ("a personal best", "sks person, a personal best"),
        ("", "sks person"),
    ],
)
def test_sidecar_caption_gets_the_trigger(text, expected):
    assert captions.with_trigger(text, "sks", "person") == expected


def test_caption_template_checks():
    assert captions.render_template("{token} {class_word}, portrait", "ohwx", "man") == "ohwx man, portrait"
    with pytest.raises(UsageError, match="only {token} and {class_word}"):
        captions.render_template("a photo of {name}", "sks", "person")
    with pytest.raises(UsageError, match="must contain"):
        captions.render_template("a photo of {class_word}", "sks", "person")


def test_fast_path_decides_like_full_decode(tmp_path):
    """A 6-MP JPEG: drafted decoding must find the same face and crop as decoding every pixel."""
    canvas = Image.new("RGB", (3000, 2000), (110, 120, 100))
    canvas.paste(prep_photos.astronaut().resize((1400, 1400), Image.Resampling.LANCZOS), (900, 300))
    path = tmp_path / "big.jpg"
    canvas.save(path, quality=90)
    settings = Settings("face", 512, 0.45, 2.0, 10**8, fast=True)
    fast = examine(path, settings)
    slow = examine(path, Settings("face", 512, 0.45, 2.0, 10**8, fast=False))
    assert fast.reason is None and slow.reason is None
    assert numpy.abs(numpy.subtract(fast.face_box, slow.face_box)).max() <= 8  # px of a 3000-px photo
    assert numpy.abs(numpy.subtract(fast.crop_box, slow.crop_box)).max() <= 16
    assert images.hash_distance(fast.phash, slow.phash) <= 2
    assert abs(fast.sharpness - slow.sharpness) < 0.1 * slow.sharpness
    assert fast.embedding is not None and face_distance(fast.embedding, slow.embedding) < 0.1
