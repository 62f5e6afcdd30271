"""Real photos shipped with scikit-image and matplotlib, made small (dlib's CNN costs ~0.3 s per image)."""

from __future__ import annotations

from PIL import Image, ImageOps

SIDE = 256


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = Image.open(handle).convert("RGB")
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def lfw_face(index: int) -> Image.Image:
    """An LFW face (25x25 grey) upscaled to 150 px and padded, so the detector sees a whole head."""
    from skimage import data

    pixels = (data.lfw_subset()[index] * 255).astype("uint8")
    face = Image.fromarray(pixels).convert("RGB").resize((150, 150), Image.Resampling.BICUBIC)
    return ImageOps.expand(face, 75, fill=(128, 128, 128))


def coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee()).resize((200, 133))


def same_person_variants() -> dict[str, Image.Image]:
    """The astronaut cropped, flipped and recoloured: all the same person as the reference."""
    base = astronaut()
    return {
        "crop": base.crop((40, 0, 200, 160)),
        "flip": ImageOps.mirror(base),
        "grey": ImageOps.grayscale(base).convert("RGB"),
        "warm": Image.merge("RGB", (base.getchannel("R").point(lambda v: min(255, int(v * 1.2))),) + base.split()[1:]),
    }


def composite(left: Image.Image, right: Image.Image, side: int = 200) -> Image.Image:
    """Two photos side by side: a two-face group picture."""
    canvas = Image.new("RGB", (2 * side, side), (128, 128, 128))
    canvas.paste(ImageOps.fit(left, (side, side)), (0, 0))
    canvas.paste(ImageOps.fit(right, (side, side)), (side, 0))
    return canvas
