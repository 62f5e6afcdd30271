"""Images/s of `sdlora generate`'s render path against a plain diffusers pipeline with the same LoRA.

    PYTHONPATH=$PWD python bench/generate.py --model tiny --json bench-generate.json

One pipeline (random weights, see _models.py) and one LoRA file (written by sdlora.lora.peft.save_diffusers, with
random non-zero weights so the adapter really computes). Variants, each timed with the same prompt, scheduler,
steps, CFG, size and batch:

- `diffusers-base`: `pipe(...)` with no LoRA (what --fuse should match);
- `diffusers+lora`: `pipe.load_lora_weights(file)` then `pipe(...)`;
- `sdlora`: `sdlora.lora.files.load_loras` + `sdlora.generate.render_images` (what `sdlora generate` runs);
- `sdlora --fuse`: the same after `fuse_lora`, as `sdlora generate --fuse` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import build_pipeline, native_resolution  # noqa: E402

PROMPT = "a photo of sks person, portrait"


def make_lora(model: str, path: Path, rank: int) -> Path:
    """A diffusers-format LoRA for `model` with random weights (B is not zero: the adapter changes the output)."""
    import torch

    from sdlora.families.sd import unet_targets
    from sdlora.lora import peft

    pipe = build_pipeline(model, seed=1)
    peft.attach(pipe.unet, rank, rank, 0.0, unet_targets("attention"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft.trainable_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    peft.save_diffusers(path, type(pipe), {"unet": pipe.unet}, {"sdlora.trigger_phrase": "sks person"})
    return path


def plain_call(pipe: Any, opts: argparse.Namespace, scheduler: Any) -> None:
    """What a diffusers user writes: the pipeline's own call with one seeded generator."""
    import torch

    pipe.scheduler = scheduler
    with torch.inference_mode():
        pipe(
            prompt=[PROMPT] * opts.batch,
            num_inference_steps=opts.steps,
            guidance_scale=opts.cfg,
            width=opts.resolution,
            height=opts.resolution,
            generator=torch.Generator().manual_seed(0),
        )


def sdlora_call(pipe: Any, opts: argparse.Namespace) -> None:
    from sdlora.generate.render import Sampling, render_images

    size = opts.resolution
    sampling = Sampling(opts.steps, opts.cfg, opts.scheduler, size, size, batch_size=opts.batch)
    render_images(pipe, [PROMPT] * opts.batch, list(range(opts.batch)), sampling)


def timed(fn, repeats: int, warmup: int) -> list[float]:
    seconds = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure(opts: argparse.Namespace, lora_file: Path) -> list[dict]:
    from sdlora.generate.render import set_scheduler
    from sdlora.lora.files import load_loras, parse_lora

    pipe = build_pipeline(opts.model)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, opts.scheduler)  # the plain calls get the very scheduler sdlora's path builds
    scheduler = pipe.scheduler
    results = {}
    results["diffusers-base"] = timed(lambda: plain_call(pipe, opts, scheduler), opts.repeats, opts.warmup)
    pipe.load_lora_weights(str(lora_file), adapter_name="plain")
    results["diffusers+lora"] = timed(lambda: plain_call(pipe, opts, scheduler), opts.repeats, opts.warmup)
    pipe.unload_lora_weights()
    names = load_loras(pipe, [parse_lora(str(lora_file))])
    results["sdlora"] = timed(lambda: sdlora_call(pipe, opts), opts.repeats, opts.warmup)
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    results["sdlora --fuse"] = timed(lambda: sdlora_call(pipe, opts), opts.repeats, opts.warmup)
    rows = []
    for variant, seconds in results.items():
        median = statistics.median(seconds[opts.warmup :])
        rows.append(
            {
                "variant": variant,
                "seconds": [round(s, 4) for s in seconds],
                "median_s": median,
                "images_per_s": opts.batch / median,
            }
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--resolution", type=int, help="default: the model's native size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--scheduler", default="dpmpp_2m_karras")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    opts.resolution = opts.resolution or native_resolution(opts.model)
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        lora_file = make_lora(opts.model, Path(tmp) / "peft.safetensors", opts.rank)
        rows = measure(opts, lora_file)
    result = {
        "model": opts.model,
        "resolution": opts.resolution,
        "steps": opts.steps,
        "cfg": opts.cfg,
        "scheduler": opts.scheduler,
        "batch": opts.batch,
        "rank": opts.rank,
        "repeats": opts.repeats,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "variants": rows,
    }
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))
    print(
        f"{opts.model} {opts.resolution}px, {opts.steps} steps {opts.scheduler}, cfg {opts.cfg}, batch {opts.batch}; "
        f"median of {opts.repeats}; load {load_before:.2f} -> {result['load_average_after']:.2f}"
    )
    base = rows[0]["median_s"]
    print(f"{'variant':16} {'s/call':>8} {'images/s':>9} {'vs base':>8}")
    for r in rows:
        print(f"{r['variant']:16} {r['median_s']:8.3f} {r['images_per_s']:9.3f} {base / r['median_s']:7.2f}x")


if __name__ == "__main__":
    main()
