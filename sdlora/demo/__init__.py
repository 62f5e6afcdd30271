"""`sdlora demo`: prep -> train -> generate -> eval end to end, through the library functions, offline.

With no `--base` it runs on the CPU in a few minutes and shows a person being learned: `prep` runs on the built-in
real photos (face crops, a reason for every photo dropped), and training, generation and scoring run in the toy
world on its packaged base (sdlora/demo/toy.py): a held-out toy person rendered as "photos", scored by the world's
exact decoder behind the face-model interface (eval.face_model = "toy"), so the identity curve, `best/` and the
base-vs-LoRA comparison are real numbers. With `--base` pointing at a real model (on a GPU) it is the real thing
at 512 px on the built-in photos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora import fsutil
from sdlora.config import Config, load
from sdlora.errors import UsageError

if TYPE_CHECKING:
    from sdlora.demo.toy import Share

DEMO_PROMPTS = ["a photo of {trigger}", "a photo of {trigger} on the moon, cinematic lighting"]
# What the demo writes in OUT_DIR and the command whose marker each folder gets: `--overwrite` replaces these (and
# compare.png, eval.json) in a folder an earlier demo made, and only where their markers say sdlora wrote them.
TOY_FOLDERS = {
    "photos": "demo",
    "prep": "prep",
    "toy-base": "demo",
    "toy-photos": "demo",
    "dataset": "prep",
    "lora": "train",
    "images-base": "generate",
    "images": "generate",
    "eval-report": "eval",
}
REAL_FOLDERS = {"photos": "demo", "dataset": "prep", "lora": "train", "images": "generate", "eval-report": "eval"}
# The built-in photos' faces are ~93 px wide: 256 px crops of them need no more than prep's 2x enlargement.
PHOTO_RESOLUTION = 256


@dataclass(frozen=True)
class DemoResult:
    photos: Path
    base: Path | str
    dataset: Path  # what was trained on: the toy person's prep output, or the photos' with --base
    lora: Path
    images: Path
    eval_json: Path
    eval_report: Path
    toy: bool
    prep_summary: str  # prep of the built-in photos
    command: str = ""  # a `sdlora generate` command line that renders more images with the LoRA
    compare: Path | None = None  # toy: base | LoRA at the same seeds
    base_share: Share | None = None  # toy: what the decoder reads in the base's images, and in the LoRA's
    lora_share: Share | None = None


def demo_config(
    base: str, steps: int | None, lora: Path, overwrite: bool = False, sets: list[str] | None = None
) -> Config:
    """The demo's settings for every stage on a real base model (`--base`): 512 px training, images at the base's
    own size, sensible defaults."""
    steps = steps or 400
    options = {
        "model.base": base,
        "prep.overwrite": overwrite,
        "train.overwrite": overwrite,
        "generate.loras": [str(lora)],
        "prep.resolution": 512,
        "train.resolution": 512,
        "train.steps": steps,
        "train.checkpoint_every": steps,
        "train.sample_every": steps,
        "train.sample_steps": 25,
        "train.learning_rate": 1e-4,
        "generate.prompts": DEMO_PROMPTS,
        "generate.n": 2,
        "generate.batch_size": 2,
        "generate.steps": 30,  # generate.size unset: the base's own (512 px SD 1.x, 1024 px SDXL and Flux)
        "eval.n": 1,
    }
    return load(None, options, sets or [])


def demo(
    out_dir: Path,
    *,
    base: str | None = None,
    steps: int | None = None,
    overwrite: bool = False,
    sets: list[str] | None = None,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole pipeline into `out_dir`: photos/ and their prep, then the toy person (no `base`) or the
    photos themselves (`base`) through train, generate and eval."""
    from sdlora.demo.photos import write_demo_photos

    out_dir = Path(out_dir)
    check_out_dir(out_dir, TOY_FOLDERS if base is None else REAL_FOLDERS, overwrite)
    with fsutil.lock(out_dir, "demo"):
        if fsutil.read_marker(out_dir) is None:
            fsutil.write_marker(out_dir, fsutil.new_marker("demo"))
        photos = out_dir / "photos"
        say(
            f"[1/5] photo set: {len(write_demo_photos(photos))} photos of one person (with a duplicate, a blurry shot "
            f"and one without a face) in {photos}"
        )
        if base is None:
            result = _toy_demo(out_dir, photos, steps, overwrite, sets or [], say)
        else:
            result = _real_demo(out_dir, photos, base, steps, overwrite, sets or [], say)
    say(f"next: more images of the person (run it again and they come beside these):\n  {result.command}")
    return result


def check_out_dir(out_dir: Path, folders: dict[str, str], overwrite: bool) -> None:
    """OUT_DIR is new or empty, or (with `overwrite`) an earlier demo's, where every folder the demo writes is
    missing, empty or written by the command it expects (its marker), and the demo's own hold only its files.
    Anything else is refused before anything is written: --overwrite replaces only what sdlora wrote."""
    from sdlora.demo.base import CONFIGS, FILES
    from sdlora.demo.photos import demo_photos
    from sdlora.demo.toy import subject_photo_names

    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: is a file; choose a new folder")
    if not fsutil.contents(out_dir):
        return
    if not overwrite:
        raise UsageError(f"{out_dir}: not empty; choose a new folder or pass --overwrite")
    if fsutil.owner(out_dir) != "demo":
        raise UsageError(
            f"{out_dir}: holds {fsutil.describe(out_dir)}; --overwrite reuses only a folder `sdlora demo` made: "
            "choose a new or empty folder"
        )
    base_files = {Path(path).parts[0] for path in (*CONFIGS.values(), *FILES.values())} | {"tokenizer"}
    own = {"photos": set(demo_photos()), "toy-photos": set(subject_photo_names()), "toy-base": base_files}
    for name, command in folders.items():
        folder = out_dir / name
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder}: a file where the demo writes a folder; move it away or choose a new folder")
        if not fsutil.contents(folder) and fsutil.read_marker(folder) is None:
            continue
        if fsutil.owner(folder) != command:
            raise UsageError(
                f"{folder}: holds {fsutil.describe(folder)}; --overwrite replaces only what sdlora wrote: move "
                "them out or choose a new folder"
            )
        foreign = sorted(set(fsutil.contents(folder)) - own[name]) if name in own else []
        if foreign:
            raise UsageError(
                f"{folder}: holds files the demo did not write ({', '.join(foreign[:3])}); move them out or choose a "
                "new folder"
            )


def _real_demo(
    out_dir: Path, photos: Path, base: str, steps: int | None, overwrite: bool, sets: list[str], say
) -> DemoResult:
    from sdlora.evaluation.run import evaluate
    from sdlora.generate import generate
    from sdlora.prep.run import prep
    from sdlora.train import train

    dataset, lora, images = out_dir / "dataset", out_dir / "lora", out_dir / "images"
    cfg = demo_config(base, steps, lora, overwrite, sets)
    report = prep(photos, dataset, cfg)
    say(f"[2/5] prep: {report.summary().splitlines()[0]} -> {dataset} (see contact_sheet.jpg, report.json)")
    result = train(cfg, dataset, lora)
    say(f"[3/5] train: {result.steps} steps -> {result.lora_file} and {result.kohya_file}")
    paths = generate(cfg, images, overwrite=overwrite)
    say(f"[4/5] generate: {len(paths)} images -> {images}")
    eval_json, eval_report = out_dir / "eval.json", out_dir / "eval-report"
    evaluate(cfg, reference=dataset, images=images, json_path=eval_json, report_dir=eval_report)
    say(f"[5/5] eval: identity scores -> {eval_json}, {eval_report / 'index.html'}")
    command = generate_command(base, lora, DEMO_PROMPTS[0], out_dir / "more-images", ["--n", "4"])
    return DemoResult(photos, base, dataset, lora, images, eval_json, eval_report, False, report.summary(), command)


def _toy_demo(out_dir: Path, photos: Path, steps: int | None, overwrite: bool, sets: list[str], say) -> DemoResult:
    from sdlora.demo import toy
    from sdlora.demo.base import restore_packaged
    from sdlora.evaluation.run import evaluate
    from sdlora.prep.run import prep
    from sdlora.train import train

    photo_prep = out_dir / "prep"
    report = prep(
        photos, photo_prep, load(None, {"prep.overwrite": overwrite, "prep.resolution": PHOTO_RESOLUTION}, sets)
    )
    say(f"[2/5] prep: {report.summary().splitlines()[0]} -> {photo_prep} (see contact_sheet.jpg, report.json)")
    base = _restore(out_dir / "toy-base", restore_packaged)
    dataset, lora, images = out_dir / "dataset", out_dir / "lora", out_dir / "images"
    cfg = toy.toy_config(base, steps, lora, overwrite, sets)
    renders = toy.write_subject_photos(out_dir / "toy-photos")
    prep(renders, dataset, cfg, progress=False)
    say(
        f"      the person to learn: {toy.PHOTOS} renders of a toy person the toy base never saw "
        f"({toy.describe(toy.SUBJECT)}) in {renders}, prepped (--crop center) -> {dataset}"
    )
    say(f"      base model: the toy world's base (1.5M parameters, shipped in the package) in {base}")
    with _one_thread():
        result = train(cfg, dataset, lora)
        say(f"[3/5] train: {result.steps} steps -> {result.lora_file}; identity curve {lora / 'identity.png'}")
        pair = toy.base_and_lora(cfg, out_dir / "images-base", images, overwrite)
    compare = out_dir / "compare.png"
    toy.save_compare(pair, compare)
    say(f"[4/5] generate: {len(pair.lora)} seeds, base and LoRA -> {out_dir / 'images-base'}, {images}, {compare}")
    eval_json, eval_report = out_dir / "eval.json", out_dir / "eval-report"
    evaluate(cfg, reference=dataset, images=images, json_path=eval_json, report_dir=eval_report)
    shares = toy.exact_share(pair.base), toy.exact_share(pair.lora)
    say(
        f"[5/5] eval: images of {pair.prompt!r} that are exactly the toy person (the decoder): base {shares[0]} "
        f"-> LoRA {shares[1]}; attributes right: {shares[0].attributes} -> {shares[1].attributes}. "
        f"Scores: {eval_json}, {eval_report / 'index.html'}"
    )
    say(
        "note: training ran in a toy world so that a CPU learns a person in minutes; "
        "run `sdlora demo OUT --base MODEL` on a GPU to train on the photos themselves."
    )
    command = generate_command(base, lora, toy.PROMPT, out_dir / "more-images", toy.generate_options(cfg))
    result_args = (photos, base, dataset, lora, images, eval_json, eval_report, True, report.summary(), command)
    return DemoResult(*result_args, compare=compare, base_share=shares[0], lora_share=shares[1])


def generate_command(base: Path | str, lora: Path, prompt: str, out: Path, options: list[str]) -> str:
    """The `sdlora generate` command line that renders `prompt` with the demo's LoRA: at the base's own size (the
    default), a grid.png of its images."""
    import shlex

    words = ["sdlora", "generate", "--base", str(base), "--lora", str(lora), "--prompt", prompt, *options]
    return shlex.join([*words, "--out", str(out)])


def _restore(folder: Path, restore: Callable[[Path], Path]) -> Path:
    """The packaged base as a diffusers folder at `folder` (replaced whole, never half-written), marked as the demo's
    (check_out_dir saw that any earlier one was)."""
    fsutil.claim(folder, "demo", lock_now=False)
    with fsutil.atomic_dir(folder) as tmp:
        restore(tmp)
    return folder


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread while the toy model runs: it is launch-bound, and on a busy 2-core machine a second thread
    waits more than it computes (40 training steps: 12 s of CPU on one thread, 100 s on two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
