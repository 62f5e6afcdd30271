"""The identity benchmark: real `sdlora` prep -> train -> generate in the toy world, scored by the decoder.

For each held-out subject and each setting of the grid: render photos of the subject, `prep` them
(--crop center: renders have no dlib face), `train` a LoRA with checkpoints, `generate` a fixed set of
seeds per prompt from the base and from every checkpoint, and decode every image. Prints a table, writes
results.json and curves.png.

This module runs the benchmark (inputs, the real commands, the runner, the table and plot, the CLI); the cells and
prompts it runs are in grids.py, the metrics in scoring.py.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.identity import base, edits, picks
from bench.identity import captions as caption_study
from bench.identity.grids import (
    GRIDS,
    PROMPTS,
    REDUCED,
    TOKENS,
    Scale,
    Setting,
    combine,
    prompts,
    prompts_for,
    trigger_of,
)
from bench.identity.scoring import mean_known, score
from sdlora.faces import toyworld as world

# ----------------------------------------------------------------------------------------------- inputs


def write_renders(identities: list[world.Identity], folder: Path, seed: int) -> Path:
    """One PNG per identity in `identities` (jittered renders), as a user's photo folder."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, identity in enumerate(identities):
        world.render(identity, rng).save(folder / f"{i:04d}.png")
    return folder


def class_renders(subject: world.Identity, count: int, folder: Path, seed: int, captions: str = "") -> Path:
    """Prior-preservation class images: renders of other identities (never the subject), captioned by sdlora's
    class prompt, or by an IMG.txt: "attributes" ("a photo of a person with red hair and ..."), "article" (no words)."""
    rng = random.Random(seed)
    others = [i for i in world.all_identities() if i != subject]
    chosen = rng.sample(others, count)
    write_renders(chosen, folder, seed + 1)
    for i, identity in enumerate(chosen if captions else []):
        words = " and ".join(identity.caption_words()) if captions == "attributes" else ""
        (folder / f"{i:04d}.txt").write_text(f"{base.CLASS_PROMPT} {words}".strip())
    return folder


def make_config(base_dir: Path, setting: Setting, scale: Scale, class_dir: Path | None, seed: int = 0):
    """The sdlora config of one run: 64 px renders, LoRA settings of `setting`, checkpoints of `scale`."""
    from math import gcd

    from sdlora.config import load

    every = 0
    for step in scale.checkpoints:
        every = gcd(every, step)
    options = {
        "model.base": str(base_dir),
        "prep.crop": "center",
        "prep.resolution": world.SIZE,
        "prep.min_images": 3,
        "prep.blur_ratio": 0.0,  # flat-colour renders: sharpness is no signal
        "prep.duplicate_distance": 0,  # jittered renders of one identity hash alike, yet are distinct photos
        "prep.workers": 1,
        "prep.token": TOKENS[base.is_flow(base_dir)],
        "lora.rank": setting.rank,
        "lora.alpha": float(setting.rank),
        "lora.train_text_encoder": setting.text_encoder,
        "train.resolution": world.SIZE,
        "train.steps": max(scale.checkpoints),
        "train.checkpoint_every": every,
        "train.keep_checkpoints": 100,
        "train.sample_every": 0,
        "train.batch_size": scale.batch_size,
        "train.learning_rate": setting.lr,
        "train.text_encoder_learning_rate": setting.lr / 3,
        "train.seed": seed,
        "train.pivotal": False,  # each setting on top of the plain LoRA (a method's own options turn it on)
        "train.preservation": "none",
        "train.class_dir": str(class_dir) if setting.prior else None,
        "train.num_class_images": scale.class_images,
        "generate.n": scale.seeds,
        "generate.batch_size": scale.seeds,
        "generate.steps": scale.sample_steps,
        # the UNet base's samples were most often valid with DDIM (20 steps: 17%); a flow base samples with Euler
        "generate.scheduler": "flow_euler" if base.is_flow(base_dir) else "ddim",
        "generate.cfg": scale.cfg,
        "generate.size": f"{world.SIZE}x{world.SIZE}",
        "generate.seed": 1000,
    }
    if base.is_flow(base_dir):  # the DiT base samples and trains with shift 3, which sdlora reads as Z-Image-Turbo's:
        options["model.allow_distilled"] = True  # it is trained from scratch at that shift, not distilled
    options.update(dict(setting.options))
    return load(None, options)


# ----------------------------------------------------------------------------------------------- the real commands


def prep_subject(subject: world.Identity, work: Path, config: Any, scale: Scale, seed: int, captions: str = "") -> Path:
    """The subject's photos through `sdlora prep`; with a caption variant, varied photos with those captions; with a
    named lever (captions.NAMED...), the subject's own photos with those."""
    from sdlora.prep.run import prep

    same = captions not in caption_study.VARIANTS  # the subject's own photos; the caption study's vary
    identities = [subject] * scale.photos if same else caption_study.photo_set(subject, scale.photos)
    photos = write_renders(identities, work / "photos", seed)
    if captions:
        texts, decisions = caption_study.captions(captions, identities, prompts(trigger_of(config))["identity"])
        caption_study.write_sidecars(photos, texts)
        (work / "captions.json").write_text(json.dumps({"captions": texts, "decisions": decisions}, indent=1))
    prep(photos, work / "dataset", config, progress=False)
    if config.train.masked_loss:  # renders have no dlib face: masks from the renderer's known face and hair
        from bench.identity.masks import write_masks

        write_masks(work / "dataset", subject)
    return work / "dataset"


def train_lora(config: Any, dataset: Path, out: Path) -> dict[int, Path]:
    """`sdlora train`; returns {step: diffusers LoRA file} of every checkpoint."""
    from sdlora.train import train

    train(config, dataset, out)
    return checkpoint_files(out)


def checkpoint_files(out: Path) -> dict[int, Path]:
    """{step: diffusers LoRA file} of every checkpoint a training run into `out` saved."""
    from sdlora.lora.peft import DIFFUSERS_FILE
    from sdlora.train import checkpoint

    return {checkpoint.read_step(c): c / DIFFUSERS_FILE for c in checkpoint.list_checkpoints(out)}


def render_prompts(
    config: Any,
    lora: Path | None,
    out: Path,
    keys: tuple[str, ...] = tuple(PROMPTS),
    table: dict[str, str] = PROMPTS,
    first: int = 0,
    scale: float = 1.0,
) -> dict[str, list[Path]]:
    """`sdlora generate` of the prompts `keys` of `table` (default: all of PROMPTS) at the config's fixed seeds;
    {prompt key: image paths}. Prompt-major with seeds from generate.seed on: the first prompt's images do not
    depend on the others being rendered after them; `first` prompts' seeds are skipped (to render the later
    prompts of a longer list alone, at the seeds they have in it); `scale`, the LoRA's strength."""
    from sdlora.generate import generate

    prompts = [table[key] for key in keys]
    seed = config.generate.seed + first * config.generate.n
    loras = [f"{lora}:{scale:g}" if scale != 1 else str(lora)] if lora else []
    update = {"prompts": prompts, "loras": loras, "seed": seed}
    g = config.generate.model_copy(update=update)
    paths = generate(config.model_copy(update={"generate": g}), out)
    pngs = sorted(p for p in paths if p.suffix == ".png" and p.stem[:4].isdigit())
    n = config.generate.n
    return {key: pngs[i * n : (i + 1) * n] for i, key in enumerate(keys)}


# ----------------------------------------------------------------------------------------------- the grid


def run_subject(
    base_dir: Path,
    subject: world.Identity,
    setting: Setting,
    scale: Scale,
    work: Path,
    keys: tuple[str, ...] | None = None,
) -> list[dict]:
    """Prep, train and score one (subject, setting) on the prompts `keys` (default: all, edits included): one row
    per checkpoint."""
    captioned = setting.class_captions  # each class image with an IMG.txt (its attributes, or the article's prompt)
    classes = class_renders(subject, scale.class_images, work / "class", 7, captioned) if setting.prior else None
    config = make_config(base_dir, setting, scale, classes)
    table_ = prompts_for(subject, trigger_of(config))
    keys = tuple(table_) if keys is None else keys
    dataset = prep_subject(subject, work, config, scale, seed=11, captions=setting.captions)
    started = time.time()
    files = train_lora(config, dataset, work / "lora")
    train_s = time.time() - started
    rows = []
    for step, lora in sorted(files.items()):
        if step not in scale.checkpoints:
            continue
        images = render_prompts(config, lora, work / f"images-{step}", keys, table_, scale=setting.lora_scale)
        metrics = score(images, subject)
        row = {"setting": setting.name, **asdict(setting), "step": step, "train_s": round(train_s), **metrics}
        row["options"] = dict(setting.options)
        rows.append(row)
    return rows


def base_rows(
    base_dir: Path,
    subjects: dict[int, world.Identity],
    scale: Scale,
    work: Path,
    keys: tuple[str, ...] | None = None,
) -> list[dict]:
    """Step 0: the base model alone, scored against each subject ({subject number: identity}; same seeds and
    prompts as the subject's runs). The shared prompts are rendered once; each subject's edits after them, at the
    seeds they have in a run (into base-images/edits-sN)."""
    config = make_config(base_dir, REDUCED[0], scale, None)
    trigger = trigger_of(config)
    shared = tuple(k for k in PROMPTS if keys is None or k in keys)
    paths = render_prompts(config, None, work / "base-images", shared, prompts(trigger))
    rows = []
    for i, s in subjects.items():
        mine = [k for k in edits.prompts(s, trigger) if keys is None or k in keys]
        folder = work / "base-images" / f"edits-s{i}"
        table_ = prompts_for(s, trigger)
        extra = render_prompts(config, None, folder, tuple(mine), table_, len(PROMPTS)) if mine else {}
        rows.append({"subject": i, "setting": "base", "step": 0, **score(paths | extra, s)})
    return rows


# The smoke test's cell (tests/test_identity_bench.py): cheap, and the benchmark measured a clear gain for it.
SMOKE = Setting(prior=False, text_encoder=False, rank=16, lr=3e-3)
SMOKE_STEP = 100


def smoke(
    base_dir: Path,
    work: Path,
    lr: float = SMOKE.lr,
    seeds: int = 64,
    keys: tuple[str, ...] = ("identity",),
    steps: int = SMOKE_STEP,
    sample_steps: int = Scale.sample_steps,
) -> tuple[dict, dict]:
    """Subject 0's base row and its LoRA's row after `steps` steps of the SMOKE setting (at `lr`), on the prompts
    `keys`: by default the identity prompt alone (the smoke test reads its soft agreement; the images are the ones a
    full row renders first); keys=None for every metric, edits included. The DiT base's smoke test takes fewer
    steps, seeds and sampling steps (tests/test_identity_dit.py).

    python -c "from bench.identity import run; print(run.smoke(BASE, WORK, lr=1e-7))"   (a LoRA that learns nothing)
    """
    scale = Scale(seeds=seeds, sample_steps=sample_steps, checkpoints=(steps,))
    subject = base.SUBJECTS[0]
    (before,) = base_rows(base_dir, {0: subject}, scale, work / "base-run", keys)
    setting = Setting(SMOKE.prior, SMOKE.text_encoder, SMOKE.rank, lr)
    (after,) = run_subject(base_dir, subject, setting, scale, work / "lora-run", keys)
    return before, after


def vae_check(base_dir: Path, count: int = 200, seed: int = 5) -> dict[str, float]:
    """Share of jittered renders decoded exactly before and after the base's VAE round trip (encode, decode)."""
    import numpy
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    vae = AutoencoderKL.from_pretrained(base_dir / "vae").eval()
    rng = random.Random(seed)
    identities = [rng.choice(world.all_identities()) for _ in range(count)]
    renders = [world.render(i, rng) for i in identities]
    batch = torch.from_numpy(numpy.stack([numpy.asarray(r, numpy.float32) for r in renders])).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = vae.decode(vae.encode(batch / 127.5 - 1).latent_dist.mean).sample
    arrays = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    recon = [world.decode(Image.fromarray(a)) for a in arrays]
    return {
        "clean_exact": sum(world.decode(r) == i for r, i in zip(renders, identities, strict=True)) / count,
        "reconstruction_exact": sum(r == i for r, i in zip(recon, identities, strict=True)) / count,
        "reconstruction_valid": sum(r is not None for r in recon) / count,
    }


def table(rows: list[dict]) -> str:
    """Markdown table, one line per (setting, step), averaged over subjects."""
    keys = ["exact", "attribute_accuracy", "validity", "bleed", "editability", "class_validity", "fidelity"]
    keys += ["glasses_rate"]
    keys += ["soft_agreement", "class_soft_agreement"]
    if any(row.get("captions") in caption_study.VARIANTS for row in rows):  # the caption study: person metrics first
        keys = list(caption_study.METRICS)
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["step"]), []).append(row)
    lines = ["| setting | step | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for (setting, step), members in groups.items():
        cells = []
        for key in keys:
            values = [m[key] for m in members if m.get(key) is not None]  # older results: no editability
            cells.append(f"{100 * sum(values) / len(values):.0f}%" if values else "-")
        lines.append(f"| {setting} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Identity (exact), bleed and validity against steps, one line per setting (mean over subjects)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("exact", "exact identity"), ("attribute_accuracy", "attribute accuracy"), ("bleed", "bleed"))
    panels += (("editability", "editability (one change asked)"), ("validity", "validity (trigger)"))
    panels += (("class_validity", "validity (class)"), ("fidelity", "fidelity (glasses)"))
    fig, axes = plt.subplots(2, 4, figsize=(17, 6.5))
    base_mean = {k: mean_known([r.get(k) for r in rows if r["setting"] == "base"]) for k, _ in panels}
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["setting"] != "base"):
            steps = sorted({r["step"] for r in rows if r["setting"] == setting})
            ys = [mean_known([r.get(key) for r in rows if r["setting"] == setting and r["step"] == s]) for s in steps]
            ax.plot([0, *steps], [base_mean[key], *ys], marker="o", label=setting)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "sdlora" / "identity-bench")
    parser.add_argument("--grid", choices=tuple(GRIDS), default="default")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (2 cores: 2)")
    parser.add_argument("--subjects", type=int, help="the first N held-out subjects (default: all the base's)")
    parser.add_argument("--only-subject", type=int, help="run this subject (0-based) alone")
    parser.add_argument("--steps", type=int, nargs="+", default=list(Scale.checkpoints))
    parser.add_argument("--seeds", type=int, default=Scale.seeds)
    parser.add_argument("--sample-steps", type=int, default=Scale.sample_steps, help="sampling steps per image")
    parser.add_argument(
        "--base", type=Path, help="a base folder, or a packaged base file (restored into OUT/base); default: built"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core box)")
    parser.add_argument("--rank", type=int, help="only the grid's settings of this rank")
    parser.add_argument("--lr", type=float, help="only the grid's settings of this learning rate")
    parser.add_argument("--only", nargs="+", help="only the grid's settings of these names (e.g. plain masked)")
    parser.add_argument("--base-only", action="store_true", help="measure the base alone (VAE, validity), no LoRA")
    parser.add_argument(
        "--by-setting", action="store_true", help="every subject of a setting before the next (a cut run: whole cells)"
    )
    parser.add_argument(
        "--combine", nargs="+", default=[], help="also these combinations of methods (e.g. class_images+output)"
    )
    args = parser.parse_args(argv)
    settings = [
        s
        for s in GRIDS[args.grid]
        if args.rank in (None, s.rank)
        and (args.lr is None or math.isclose(s.lr, args.lr))
        and (not args.only or s.name in args.only)
    ]
    try:
        settings += [combine(label) for label in args.combine]
    except ValueError as error:
        parser.error(f"--combine: {error}")
    if not settings:
        parser.error(f"no setting of the {args.grid} grid has rank {args.rank} and lr {args.lr}")
    import torch

    torch.set_num_threads(args.threads)
    scale = Scale(checkpoints=tuple(args.steps), seeds=args.seeds, sample_steps=args.sample_steps)
    base_dir = base_folder(args.base, args.out / "base") if args.base else base.ensure_base()
    unseen = base.held_out_subjects(base_dir)
    numbers = range(args.subjects or len(unseen)) if args.only_subject is None else [args.only_subject]
    if max(numbers) >= len(unseen):
        parser.error(f"{base_dir} holds out {len(unseen)} subjects (0 to {len(unseen) - 1}): choose among them")
    subjects = {k: unseen[k] for k in numbers}  # keyed by the subject's own number, also with --only-subject
    args.out.mkdir(parents=True, exist_ok=True)
    checks = vae_check(base_dir)
    rows = base_rows(base_dir, subjects, scale, args.out / "work")
    checks["class_validity"] = rows[0]["class_validity"]  # the base's own samples of "a photo of a person"
    checks["base_dir"] = str(base_dir)
    if (base_dir / "identity_base.json").is_file():  # how the base was built (spec, device, continuations)
        checks["base_record"] = json.loads((base_dir / "identity_base.json").read_text())
    print(f"base {base_dir}: {checks}", flush=True)
    cells = [] if args.base_only else run_order(subjects, settings, args.by_setting)
    write_results(args.out, scale, checks, rows)
    with _pool(args.jobs, args.threads) as pool:
        futures = [
            pool.submit(run_subject, base_dir, s, setting, scale, args.out / "work" / f"{_slug(setting)}-s{i}")
            for i, s, setting in cells
        ]
        for (index, _, setting), future in zip(cells, futures, strict=True):
            for row in future.result():
                rows.append({"subject": index, **row})
            print(f"{setting.name} subject {index}: {rows[-1]}", flush=True)
            write_results(args.out, scale, checks, rows)
    print(table(rows))
    picked = picks.agreement(rows, scale.seeds)
    for pick in picked:
        print(f"{pick['setting']} s{pick['subject']}: pick_best {pick['picked']}, measured best {pick['measured']}")
    print(picks.rate_line(picked))


def run_order(subjects: dict[int, world.Identity], settings: list[Setting], by_setting: bool = False) -> list[tuple]:
    """The runs (subject number, subject, setting) in the order they start. Subjects outer: a run cut short still
    has every setting for the first subject; `by_setting`: every subject of the first settings (means over
    subjects)."""
    if by_setting:
        return [(i, s, setting) for setting in settings for i, s in subjects.items()]
    return [(i, s, setting) for i, s in subjects.items() for setting in settings]


def base_folder(path: Path, folder: Path) -> Path:
    """The base at `path`: a diffusers folder as it is, or a packaged base file (sdlora/demo/identity-base or
    identity-dit.safetensors: the UNet or the DiT base) restored into `folder`."""
    from sdlora.demo.base import restore

    return restore(path, folder) if path.is_file() and path.suffix == ".safetensors" else path


def _slug(setting: Setting) -> str:
    return setting.name.replace(" ", "_")


def _pool(jobs: int, threads: int):
    """Worker processes (spawned: no inherited torch state), each with `threads` torch threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_set_threads, initargs=(threads,)
    )


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def write_results(out: Path, scale: Scale, checks: dict, rows: list[dict]) -> None:
    """table.md, results.json and curves.png of the rows so far."""
    results = {"scale": asdict(scale), "base": checks, "rows": rows, "best_steps": picks.agreement(rows, scale.seeds)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(rows) + "\n")
    plot(rows, out / "curves.png")


if __name__ == "__main__":
    main()
