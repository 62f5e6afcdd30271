"""The toy world: procedural people drawn from six discrete attributes, and the rule-based decoder that reads them back.

It is where `sdlora demo` (on its built-in toy base) and the identity benchmark (`bench/identity`) both live: the
decoder is exact on clean renders, so whether a LoRA learned a person is a count, not an opinion. It lives among
the face models because its decoder is one (`--face-model toy`, faces/backends.py); it needs nothing of sdlora.

An identity is one value per attribute (4 x 4 x 3 x 3 x 2 x 4 = 1,152 identities). `render` draws one at 64 px
with random jitter of position, scale and brightness, so no two renders are identical. `decode` reads the
attributes back from an image, or says it is not a valid person (None); `read` always guesses (nearest
prototypes, no validity checks) for weak models whose samples are blurry.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass

import numpy
from PIL import Image

SIZE = 64
# Prototype colours (RGB). Each attribute's colours are far apart from each other; the decoder tells hair from
# skin by position, so a hair colour may be near a skin tone.
SKIN = {"pale": (250, 222, 196), "tan": (222, 172, 128), "brown": (160, 108, 72), "dark": (96, 62, 40)}
HAIR = {"black": (22, 22, 22), "blonde": (242, 214, 70), "red": (196, 48, 28), "blue": (40, 80, 200)}
STYLES = ("short", "long", "tall")
EYES = {"blue": (30, 110, 240), "green": (30, 170, 50), "brown": (110, 55, 15)}
BACKGROUND = {"sky": (150, 196, 236), "mint": (168, 226, 176), "lilac": (206, 170, 226), "grey": (190, 190, 190)}
FRAME = (10, 10, 10)
MOUTH = (150, 40, 50)
ATTRIBUTES = ("skin", "hair", "style", "eyes", "glasses", "background")
# Each attribute's values in code order (attribute_codes: a value's code is its index here).
VALUES = {
    "skin": list(SKIN),
    "hair": list(HAIR),
    "style": list(STYLES),
    "eyes": list(EYES),
    "glasses": [False, True],
    "background": list(BACKGROUND),
}


@dataclass(frozen=True)
class Identity:
    skin: str
    hair: str
    style: str
    eyes: str
    glasses: bool
    background: str

    def as_dict(self) -> dict:
        return asdict(self)

    def caption_words(self) -> list[str]:
        """Attribute phrases a caption may carry ("with glasses", "with red hair", ...)."""
        words = [f"with {self.hair} hair", f"with {self.style} hair", f"with {self.eyes} eyes", f"{self.skin} skin"]
        return words + (["with glasses"] if self.glasses else [])


def all_identities() -> list[Identity]:
    """Every identity of the world, in a fixed order."""
    values = itertools.product(SKIN, HAIR, STYLES, EYES, (False, True), BACKGROUND)
    return [Identity(*v) for v in values]


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def render(identity: Identity, rng: random.Random, jitter: bool = True) -> Image.Image:
    """One 64 px render of `identity`; `rng` draws the jitter (position +-4 px, scale +-10%, brightness +-10%)."""
    dx, dy = (rng.uniform(-4, 4), rng.uniform(-4, 4)) if jitter else (0.0, 0.0)
    scale = rng.uniform(0.9, 1.1) if jitter else 1.0
    bright = rng.uniform(0.9, 1.1) if jitter else 1.0
    r = 14.0 * scale  # head half-width in pixels
    cx, cy = SIZE / 2 + dx, SIZE / 2 + 3 + dy
    yy, xx = numpy.mgrid[0:SIZE, 0:SIZE].astype(numpy.float32) + 0.5
    img = numpy.empty((SIZE, SIZE, 3), numpy.float32)
    img[:] = BACKGROUND[identity.background]
    hair = HAIR[identity.hair]
    if identity.style == "long":  # curtains of hair beside the face, down past the chin
        sides = (abs(xx - cx) <= 1.3 * r) & (yy >= cy - 0.9 * r) & (yy <= cy + 1.45 * r)
        img[sides] = hair
    if identity.style == "tall":  # a puff of hair well above the head
        img[_ellipse(yy, xx, cy - 1.25 * r, cx, 0.65 * r, 0.95 * r)] = hair
    head = _ellipse(yy, xx, cy, cx, 1.2 * r, r)
    img[head] = SKIN[identity.skin]
    img[head & (yy <= cy - 0.55 * r)] = hair  # the cap every style has
    for side in (-1, 1):
        ex, ey = cx + side * 0.42 * r, cy - 0.1 * r
        if identity.glasses:
            ring = _ellipse(yy, xx, ey, ex, 0.38 * r, 0.38 * r) & ~_ellipse(yy, xx, ey, ex, 0.22 * r, 0.22 * r)
            img[ring] = FRAME
        img[_ellipse(yy, xx, ey, ex, 0.2 * r, 0.2 * r)] = EYES[identity.eyes]
    if identity.glasses:
        img[(abs(xx - cx) <= 0.1 * r) & (abs(yy - (cy - 0.1 * r)) <= 0.06 * r + 0.5)] = FRAME
    img[(abs(xx - cx) <= 0.3 * r) & (abs(yy - (cy + 0.6 * r)) <= 0.07 * r + 0.5)] = MOUTH
    img = numpy.clip(img * bright, 0, 255).round().astype(numpy.uint8)
    return Image.fromarray(img, "RGB")


# ----------------------------------------------------------------------------------------------- decoding


def _nearest(colour: numpy.ndarray, table: dict) -> tuple[str, float]:
    """The name of the prototype nearest `colour` and its distance (RGB units)."""
    names = list(table)
    dists = [float(numpy.linalg.norm(colour - numpy.asarray(table[n], numpy.float32))) for n in names]
    best = int(numpy.argmin(dists))
    return names[best], dists[best]


def _region(img: numpy.ndarray, mask: numpy.ndarray) -> numpy.ndarray:
    """(N, 3) pixels of `img` under `mask`."""
    return img[mask]


def _share_near(pixels: numpy.ndarray, colour, tol: float) -> float:
    if len(pixels) == 0:
        return 0.0
    return float((numpy.linalg.norm(pixels - numpy.asarray(colour, numpy.float32), axis=1) <= tol).mean())


@dataclass(frozen=True)
class Reading:
    """What the decoder saw: the nearest-prototype guess of each attribute, and why (if) it is not valid."""

    identity: Identity
    problem: str | None  # None: a valid person
    box: tuple[int, int, int, int] = (0, 0, SIZE, SIZE)  # the head as found (left, top, right, bottom), 64 px frame

    @property
    def valid(self) -> bool:
        return self.problem is None


def read(image: Image.Image) -> Reading:
    """Best guess of every attribute, with the first reason the image is not a clean person (or None)."""
    img = numpy.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), numpy.float32)
    problems: list[str] = []
    # Background from the four corners: each must be flat and all must agree.
    corners = [img[:6, :6], img[:6, -6:], img[-6:, :6], img[-6:, -6:]]
    means = numpy.stack([c.reshape(-1, 3).mean(0) for c in corners])
    spread = max(float(c.reshape(-1, 3).std(0).max()) for c in corners)
    if spread > 18 or float(numpy.ptp(means, axis=0).max()) > 30:
        problems.append("background not flat")
    bg_mean = numpy.median(means, axis=0)
    # Brightness: the render scaled every colour by one factor; undo it with the background's ratio.
    chroma = {n: numpy.asarray(c, numpy.float32) / sum(c) for n, c in BACKGROUND.items()}
    background, _ = _nearest(bg_mean / max(bg_mean.sum(), 1.0), chroma)
    bright = float(bg_mean.sum() / sum(BACKGROUND[background]))
    if not 0.8 <= bright <= 1.2:
        problems.append("brightness out of range")
    img = img / max(bright, 1e-3)
    # The face: the skin tone with the most pixels near it; its extent gives the head's centre and size.
    centre = img[8:56, 8:56].reshape(-1, 3)
    counts = {n: _share_near(centre, c, 32) for n, c in SKIN.items()}
    skin = max(counts, key=counts.get)
    dist = numpy.linalg.norm(img - numpy.asarray(SKIN[skin], numpy.float32), axis=2)
    ys, xs = numpy.nonzero(dist <= 32)
    if len(xs) < 120:
        # No face: read every attribute where an unjittered render has it, so blurry samples of weak models
        # still get a best guess (never valid).
        problems.insert(0, "no face")
        r, cx, cy = 14.0, SIZE / 2, SIZE / 2 + 3
    else:
        left, right = numpy.percentile(xs, [2, 98])
        chin = float(numpy.percentile(ys, 98))
        r = (right - left + 1) / 2
        cx = (left + right + 1) / 2
        cy = chin + 1 - 1.2 * r
    if not 10 <= r <= 18:
        problems.append(f"face width {2 * r:.0f} px")
    yy, xx = numpy.mgrid[0:SIZE, 0:SIZE].astype(numpy.float32) + 0.5
    inside = numpy.count_nonzero(_ellipse(yy, xx, cy, cx, 1.2 * r, r) & (dist <= 32))
    if len(xs) and inside / len(xs) < 0.85:
        problems.append("skin outside the head")
    # Hair colour: the cap at the top of the head.
    cap = _ellipse(yy, xx, cy, cx, 1.2 * r, r) & (yy <= cy - 0.75 * r) & (abs(xx - cx) <= 0.5 * r)
    cap_pixels = _region(img, cap)
    hair, hair_dist = _nearest(numpy.median(cap_pixels, axis=0) if len(cap_pixels) else numpy.zeros(3), HAIR)
    if hair_dist > 60:
        problems.append("hair colour unclear")
    # Hair style: hair beside the chin (long) or high above the head (tall).
    beside = (abs(abs(xx - cx) - 1.15 * r) <= 0.1 * r) & (yy >= cy + 0.5 * r) & (yy <= cy + 1.1 * r)
    above = (abs(xx - cx) <= 0.5 * r) & (yy >= cy - 1.7 * r) & (yy <= cy - 1.4 * r)
    long_share = _share_near(_region(img, beside), HAIR[hair], 60)
    tall_share = _share_near(_region(img, above), HAIR[hair], 60)
    style = "long" if long_share >= 0.5 else "tall" if tall_share >= 0.5 else "short"
    if (long_share >= 0.5 and tall_share >= 0.5) or 0.2 < long_share < 0.5 or 0.2 < tall_share < 0.5:
        problems.append("hair style unclear")
    # Eyes: the iris centres; glasses: the dark frame around them and the bridge between.
    eye_pixels, frame_pixels = [], []
    for side in (-1, 1):
        ex, ey = cx + side * 0.42 * r, cy - 0.1 * r
        eye_pixels.append(_region(img, _ellipse(yy, xx, ey, ex, 0.12 * r, 0.12 * r)))
        ring = _ellipse(yy, xx, ey, ex, 0.33 * r, 0.33 * r) & ~_ellipse(yy, xx, ey, ex, 0.27 * r, 0.27 * r)
        frame_pixels.append(_region(img, ring & (abs(yy - ey) >= 0.2 * r)))  # above/below: clear of long hair
    guesses = [_nearest(numpy.median(p, axis=0) if len(p) else numpy.zeros(3), EYES) for p in eye_pixels]
    eyes = guesses[0][0] if guesses[0][1] <= guesses[1][1] else guesses[1][0]
    if guesses[0][0] != guesses[1][0] or max(g[1] for g in guesses) > 80:
        problems.append("eyes unclear")
    dark = _share_near(numpy.concatenate(frame_pixels), FRAME, 70)
    glasses = dark >= 0.5
    if 0.2 < dark < 0.5:
        problems.append("glasses unclear")
    identity = Identity(skin, hair, style, eyes, bool(glasses), background)
    box = (int(cx - r), int(cy - 1.2 * r), int(math.ceil(cx + r)), int(math.ceil(cy + 1.2 * r)))
    return Reading(identity, problems[0] if problems else None, box)


def decode(image: Image.Image) -> Identity | None:
    """The identity in `image`, or None when it is not a valid person of this world."""
    reading = read(image)
    return reading.identity if reading.valid else None


def attribute_codes(identity: Identity) -> numpy.ndarray:
    """(6,) int: the index of each attribute's value in its table (ATTRIBUTES order), the toy face embedding."""
    return numpy.array([VALUES[a].index(getattr(identity, a)) for a in ATTRIBUTES], numpy.int64)


def agreement(found: Identity, subject: Identity) -> float:
    """Share of the six attributes on which `found` matches `subject`."""
    return sum(getattr(found, a) == getattr(subject, a) for a in ATTRIBUTES) / len(ATTRIBUTES)


def face_shapes(identity: Identity, box: tuple[int, int, int, int]) -> tuple[list, list]:
    """Where `render` drew the face and hair of `identity` whose head the decoder found at `box` (Reading.box):
    (polygons [[(x, y), ...]], ellipses [(left, top, right, bottom)]) in the image's 64 px frame, as the
    face-weighted loss's masks want them (the benchmark softens them with sdlora.prep.masks.soften)."""
    r = (box[2] - box[0]) / 2
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    ellipses = [(cx - r, cy - 1.2 * r, cx + r, cy + 1.2 * r)]  # the head, with the hair cap every style has
    polygons = []
    if identity.style == "long":  # the curtains beside the face
        top, bottom, half = cy - 0.9 * r, cy + 1.45 * r, 1.3 * r
        polygons.append([(cx - half, top), (cx + half, top), (cx + half, bottom), (cx - half, bottom)])
    if identity.style == "tall":  # the puff above the head
        ellipses.append((cx - 0.95 * r, cy - 1.9 * r, cx + 0.95 * r, cy - 0.6 * r))
    return polygons, ellipses
