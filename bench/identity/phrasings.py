"""How often a benchmark run's LoRA draws its subject for prompts other than the benchmark's own: the class prompt
in the phrasing a method preserved ("a photo of person") against the one bleed is measured on ("a photo of a
person"), or any other.

    python -m bench.identity.phrasings OUT output+lr1e-3:1 plain+lr1e-3:1 [--step 800] [--seeds 32] \\
        [--prompt "a photo of a person" --prompt "a photo of person"]

OUT is a finished `python -m bench.identity` run (its restored base in OUT/base, each cell's LoRAs in
OUT/work/CELL-sK); each CELL:K renders every prompt at the benchmark's fixed seeds and prints, per prompt, the
share of images that are exactly subject K and the share that are a valid person.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.identity import base, grids, run
from sdlora.faces import toyworld as world

PROMPTS = ("a photo of a person", "a photo of person")


def shares(images: list[Path], subject: world.Identity) -> dict[str, float]:
    """{"subject": share of `images` the decoder reads as exactly `subject`, "valid": share it reads at all}."""
    from PIL import Image

    readings = [world.decode(Image.open(path)) for path in images]
    return {
        "subject": sum(r == subject for r in readings) / len(readings),
        "valid": sum(r is not None for r in readings) / len(readings),
    }


def measure(out: Path, cell: str, subject: int, prompts: tuple[str, ...], step: int, seeds: int) -> dict[str, Any]:
    runs = out / "work" / f"{cell}-s{subject}" / "lora"
    lora = run.checkpoint_files(runs).get(step, runs / f"step {step}")
    if not lora.is_file():
        raise SystemExit(f"error: {lora}: no such checkpoint; give a cell, subject and --step the run trained")
    folder = out / "base"
    config = run.make_config(folder, grids.combine(cell), grids.Scale(seeds=seeds), None)
    table = {f"p{i}": prompt for i, prompt in enumerate(prompts)}
    images = run.render_prompts(config, lora, out / "phrasings" / f"{cell}-s{subject}-{step}", tuple(table), table)
    identity = base.held_out_subjects(folder)[subject]
    return {table[key]: shares(paths, identity) for key, paths in images.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a finished benchmark run's --out")
    parser.add_argument("cells", nargs="+", help="CELL:SUBJECT, e.g. output+lr1e-3:1")
    parser.add_argument("--step", type=int, default=800)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--prompt", action="append", help=f"a prompt to render (default: {' and '.join(PROMPTS)})")
    args = parser.parse_args(argv)
    for item in args.cells:
        cell, _, subject = item.rpartition(":")
        if not cell or not subject.isdigit():
            parser.error(f"{item!r}: give CELL:SUBJECT, e.g. output+lr1e-3:1")
        found = measure(args.out, cell, int(subject), tuple(args.prompt or PROMPTS), args.step, args.seeds)
        print(
            cell,
            f"subject {subject}:",
            "; ".join(f"{p!r} {s['subject']:.0%} the subject ({s['valid']:.0%} valid)" for p, s in found.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
