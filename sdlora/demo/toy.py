"""The demo's toy person: a held-out subject of the toy world (sdlora/demo/world.py), rendered as "photos", trained
on the packaged toy base (sdlora/demo/base.py) and scored by the world's exact decoder.

The real built-in photos cannot be learned on a CPU in minutes, but a toy person can: the toy base draws people of
its world, has never seen this one, and the decoder says exactly whether an image is them. So the LoRA's images
can be counted: the share that is exactly the subject, before (the base) and after (the LoRA).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdlora import fsutil
from sdlora.config import Config, load
from sdlora.demo.base import SUBJECTS
from sdlora.faces import toyworld as world

SUBJECT = SUBJECTS[0]
PHOTOS = 12
PROMPT = "a photo of {trigger}"
STEPS = 300
CHECKPOINTS = 3  # identity scored (toy face model) at every STEPS / CHECKPOINTS steps
# The demo's time (<= 90 s on a quiet 2-core CPU) goes to training and renders: class images, the identity scoring at
# each checkpoint, the base | LoRA images. 64 class images, as the identity benchmark trained its defaults with
# (`sdlora train`'s 100 add 36 renders), one image per scoring prompt (13 per checkpoint), 24 seeds each side.
CLASS_IMAGES = 64
EVAL_N = 1
SEEDS = 24  # images of PROMPT per model, base and LoRA at the same seeds
SEED = 1000
BATCH = 32  # renders per batch: training's too (class images, scoring)
ZOOM = 2  # compare.png shows the 64 px images at twice their size


@dataclass(frozen=True)
class Pair:
    """The images of one prompt at the same seeds from the base and from the LoRA."""

    prompt: str
    base: list[Path]
    lora: list[Path]


@dataclass(frozen=True)
class Share:
    """What the decoder reads in a model's images: how many are exactly the subject (all six attributes, in a
    valid person), and the share of the six attributes its best guess gets right, over all images."""

    exact: int
    valid: int
    total: int
    agreement: float

    def __str__(self) -> str:
        return f"{100 * self.exact / self.total:.0f}% ({self.exact}/{self.total})"

    @property
    def attributes(self) -> str:
        return f"{100 * self.agreement:.0f}%"


def subject_photo_names() -> list[str]:
    return [f"{i:04d}.png" for i in range(PHOTOS)]


def write_subject_photos(folder: Path, seed: int = 11) -> Path:
    """PHOTOS jittered renders of SUBJECT (no two alike) as a photo folder, replaced whole and marked as the
    demo's (the demo checked that an earlier one was)."""
    rng = random.Random(seed)
    fsutil.claim(folder, "demo", lock_now=False)
    with fsutil.atomic_dir(folder) as tmp:
        for name in subject_photo_names():
            world.render(SUBJECT, rng).save(tmp / name)
    return folder


def toy_config(base_dir: Path, steps: int | None, lora: Path, overwrite: bool, sets: list[str]) -> Config:
    """The settings of the toy run: the identity benchmark's (64 px renders, prep --crop center, DDIM 20 steps,
    CFG 4, rank 16), identity scored by the toy face model at each checkpoint."""
    steps = steps or STEPS
    every = -(-steps // CHECKPOINTS)
    options = {
        "model.base": str(base_dir),
        "prep.overwrite": overwrite,
        "prep.crop": "center",  # renders have no face dlib would find
        "prep.resolution": world.SIZE,
        "prep.min_images": 3,
        "prep.blur_ratio": 0.0,  # flat-colour renders: sharpness is no signal
        "prep.duplicate_distance": 0,  # jittered renders of one person hash alike, yet are distinct photos
        "prep.workers": 1,
        "lora.rank": 16,
        "lora.alpha": 16.0,
        "train.overwrite": overwrite,
        "train.resolution": world.SIZE,
        "train.steps": steps,
        "train.checkpoint_every": every,
        "train.sample_every": every,  # sample grids in lora/samples/ at each checkpoint
        "train.sample_steps": 20,  # the identity scoring's renders, as generate's
        "train.batch_size": 4,
        "train.learning_rate": 3e-3,  # the toy's learning rate (the benchmark's); real models train at ~1e-4
        "train.seed": 0,
        # train.pivotal and train.preservation unset: the recommended person settings, as `sdlora train` (pivotal
        # tuning with class images rendered from the base, CLASS_IMAGES of them); the new tokens at the toy's rate.
        "train.pivotal_learning_rate": 3e-3,
        "train.num_class_images": CLASS_IMAGES,
        "eval.face_model": "toy",
        "eval.n": EVAL_N,
        "generate.loras": [str(lora)],
        "generate.prompts": [PROMPT],
        "generate.n": SEEDS,
        "generate.batch_size": BATCH,
        "generate.steps": 20,
        "generate.scheduler": "ddim",
        "generate.cfg": 4.0,
        "generate.size": f"{world.SIZE}x{world.SIZE}",
        "generate.seed": SEED,
    }
    return load(None, options, sets)


def generate_options(config: Config) -> list[str]:
    """`sdlora generate`'s options for more images like the demo's (the toy base's own 64 px is the default size)."""
    g = config.generate
    return ["--n", "8", "--steps", str(g.steps), "--scheduler", g.scheduler, "--cfg", f"{g.cfg:g}"]


def base_and_lora(config: Config, base_dir: Path, lora_dir: Path, overwrite: bool = False) -> Pair:
    """`sdlora generate` of PROMPT (the trigger written out) at SEEDS seeds: once with no LoRA into `base_dir`, once
    with the config's LoRA into `lora_dir` (with `overwrite`, an earlier demo's images there are replaced)."""
    from sdlora.generate import generate
    from sdlora.prep.captions import trigger_phrase

    prompt = PROMPT.format(trigger=trigger_phrase(config.prep.token, config.prep.class_word))
    g = config.generate.model_copy(update={"prompts": [prompt]})
    runs = []
    for folder, loras in ((base_dir, []), (lora_dir, g.loras)):
        run = config.model_copy(update={"generate": g.model_copy(update={"loras": loras})})
        paths = generate(run, folder, overwrite=overwrite)
        runs.append([p for p in paths if p.suffix == ".png"])
    return Pair(prompt, *runs)


def save_compare(pair: Pair, path: Path) -> Path:
    from sdlora.fsutil import atomic_path

    with atomic_path(path) as tmp:
        compare_sheet(pair.base, pair.lora).save(tmp, format="PNG")
    return path


def exact_share(paths: list[Path]) -> Share:
    """The decoder's reading of `paths` against SUBJECT."""
    readings = [world.read(Image.open(p)) for p in paths]
    exact = sum(r.valid and r.identity == SUBJECT for r in readings)
    agreement = sum(world.agreement(r.identity, SUBJECT) for r in readings) / len(readings)
    return Share(exact, sum(r.valid for r in readings), len(readings), agreement)


def compare_sheet(base: list[Path], lora: list[Path], cols: int = 8) -> Image.Image:
    """Base | LoRA at the same seeds: two grids side by side (image i of each at the same place), the subject's
    clean render and each side's exact-identity share above them; a green frame marks an exact match."""
    cell = world.SIZE * ZOOM
    rows = -(-len(base) // cols)
    gap, head = cell // 2, cell + 28
    sheet = Image.new("RGB", (2 * cols * cell + gap, head + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=16)
    sheet.paste(_zoom(world.render(SUBJECT, random.Random(0), jitter=False)), (0, 0))
    draw.text((cell + 12, 12), f"the toy person to learn: {describe(SUBJECT)}", fill="black", font=font)
    for side, (label, paths) in enumerate((("base model", base), ("with the LoRA", lora))):
        share = exact_share(paths)
        text = f"{label}: {share} exactly the person (framed green), {share.attributes} of the attributes"
        draw.text((side * (cols * cell + gap) + 4, cell + 6), text, fill="black", font=font)
        left = side * (cols * cell + gap)
        for i, path in enumerate(paths):
            x, y = left + (i % cols) * cell, head + (i // cols) * cell
            image = Image.open(path)
            sheet.paste(_zoom(image), (x, y))
            if world.decode(image) == SUBJECT:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=(0, 200, 0), width=3)
    return sheet


def _zoom(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((world.SIZE * ZOOM, world.SIZE * ZOOM), Image.NEAREST)


def describe(identity: world.Identity) -> str:
    """'tan skin, long red hair, green eyes, no glasses, mint background'."""
    glasses = "glasses" if identity.glasses else "no glasses"
    return (
        f"{identity.skin} skin, {identity.style} {identity.hair} hair, {identity.eyes} eyes, {glasses}, "
        f"{identity.background} background"
    )
