"""`sdlora demo`: prep -> train -> generate -> eval end to end on a built-in photo set, through the library functions.

With no `--base` it builds a tiny randomly initialised SD 1.x model, so it runs in a few minutes on a CPU with no
network: every stage is real, but a random model draws noise. With `--base` pointing at a real model (on a GPU)
it is the real thing at 512 px.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import Config, load
from sdlora.errors import UsageError

TINY_RESOLUTION = 64
DEMO_PROMPTS = ["a photo of {trigger}", "a photo of {trigger} on the moon, cinematic lighting"]


@dataclass(frozen=True)
class DemoResult:
    photos: Path
    base: Path | str
    dataset: Path
    lora: Path
    images: Path
    eval_json: Path
    eval_report: Path
    tiny: bool
    prep_summary: str


def demo_config(
    base: str, tiny: bool, steps: int | None, lora: Path, overwrite: bool = False, sets: list[str] | None = None
) -> Config:
    """The demo's settings for every stage: small and quick on the tiny model, sensible defaults on a real one."""
    resolution = TINY_RESOLUTION if tiny else 512
    steps = steps or (40 if tiny else 400)
    options = {
        "model.base": base,
        "prep.overwrite": overwrite,
        "train.overwrite": overwrite,
        "generate.loras": [str(lora)],
        "prep.resolution": resolution,
        "train.resolution": resolution,
        "train.steps": steps,
        "train.checkpoint_every": steps,
        "train.sample_every": steps,
        "train.sample_steps": 4 if tiny else 25,
        "train.learning_rate": 1e-3 if tiny else 1e-4,
        "generate.prompts": DEMO_PROMPTS,
        "generate.n": 2,
        "generate.batch_size": 2,
        "generate.steps": 4 if tiny else 30,
        "generate.size": f"{resolution}x{resolution}",
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
    """Run the whole pipeline into `out_dir`: photos/, base-model/ (tiny), dataset/, lora/, images/, eval/."""
    from sdlora.demo.photos import write_demo_photos
    from sdlora.evaluation.run import evaluate
    from sdlora.generate import generate
    from sdlora.prep.run import prep
    from sdlora.train import train

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UsageError(f"{out_dir}: not empty; choose a new folder or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = base is None
    photos = out_dir / "photos"
    write_demo_photos(photos)
    say(
        f"[1/5] photo set: {len(list(photos.iterdir()))} photos of one person (with a duplicate, a blurry shot "
        f"and one without a face) in {photos}"
    )
    if tiny:
        from sdlora.families.sd import SD1
        from sdlora.testing import save_tiny_pipeline

        base = str(save_tiny_pipeline(SD1.name, out_dir / "base-model"))
        say(f"      base model: a tiny randomly initialised SD 1.x in {base} (its images are noise)")
    dataset, lora, images = out_dir / "dataset", out_dir / "lora", out_dir / "images"
    cfg = demo_config(base, tiny, steps, lora, overwrite, sets)

    report = prep(photos, dataset, cfg)
    say(f"[2/5] prep: {report.summary().splitlines()[0]} -> {dataset} (see contact_sheet.jpg, report.json)")

    result = train(cfg, dataset, lora)
    say(f"[3/5] train: {result.steps} steps -> {result.lora_file} and {result.kohya_file}")

    paths = generate(cfg, images)
    say(f"[4/5] generate: {len(paths)} images -> {images}")

    eval_json, eval_report = out_dir / "eval.json", out_dir / "eval-report"
    evaluate(cfg, reference=dataset, images=images, json_path=eval_json, report_dir=eval_report)
    say(f"[5/5] eval: identity scores -> {eval_json}, {eval_report / 'index.html'}")
    if tiny:
        say(
            "note: the tiny model has random weights, so its images are noise and no face is found in them; "
            "the demo proves the pipeline. Run `sdlora demo OUT --base MODEL` on a GPU for the real thing."
        )
    return DemoResult(photos, base, dataset, lora, images, eval_json, eval_report, tiny, report.summary())
