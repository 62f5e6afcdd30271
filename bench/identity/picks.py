"""sdlora's checkpoint choice (`pick_best`, what `sdlora train` keeps in best/) against the measured best step.

    python -m bench.identity.picks [RESULTS.json ...] [--max-bleed 0.05]

reads every run of the given results files (default: every `*results.json` under docs/identity-benchmark/) and
prints a table: per file its runs, how many agree, and each disagreement with its numbers; then the rate overall.

A run is one (setting, subject) of a results file: its checkpoints' rows. `pick_best` reads sdlora's face metrics,
for which the toy decoder's numbers stand in (`sdlora_row`):
- identity, the mean similarity over images with a face <- `attribute_accuracy`, the mean share of the six
  attributes read right over the valid images;
- recognised_rate, the share of all images recognised as the subject <- `exact`, the share of all images decoded
  as exactly the subject;
- bleed <- `bleed`, the share of "a photo of a person" decoded as the subject;
- images, how many images the step was scored on <- the images behind `exact`: seeds x 1 prompt;
- face_rate <- `validity`; diversity is not measured in the toy world, so the diversity floor is off (0).
The measured best step is the one with the most exact identity among the steps with bleed <= max_bleed (ties: the
earlier step); where no step is under that floor, among all steps, as `pick_best` falls back too (`fallback`).
The run agrees when the picked step is under the bleed floor as well (where any step is) and its exact share is
within one standard error of the best step's:

    p_best - p_picked <= sqrt(p_best (1 - p_best) / n),  n = seeds x prompts the share was read on (64 x 1)

(the binomial standard error of the best step's share). One image against none is always just outside it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdlora.evaluation.checkpoints import standard_error

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "identity-benchmark"
EXACT_PROMPTS = 1  # `exact` is read on one prompt, "a photo of sks person", at every seed
MAX_BLEED = 0.05
Picker = Callable[[list[dict[str, Any]], float, float], tuple[int, str]]


def sdlora_row(row: dict[str, Any], images: int) -> dict[str, Any]:
    """A results row as the sdlora metrics `pick_best` reads (see the module's docstring)."""
    return {
        "step": row["step"],
        "images": images,
        "face_rate": row.get("validity"),
        "identity": row.get("attribute_accuracy"),
        "recognised_rate": row["exact"],
        "bleed": row.get("bleed"),
    }


def compare(rows: list[dict[str, Any]], images: int, max_bleed: float = MAX_BLEED, picker: Picker | None = None):
    """One run's rows: the step `picker` (default: sdlora's pick_best) takes, the measured best step, and whether
    they agree within one standard error."""
    if picker is None:
        from sdlora.evaluation.checkpoints import pick_best as picker
    picked_step, why = picker([sdlora_row(r, images) for r in rows], 0.0, max_bleed)
    under = [r for r in rows if (r.get("bleed") or 0.0) <= max_bleed]
    pool = under or rows
    best = max(pool, key=lambda r: (r["exact"], -r["step"]))
    picked = next(r for r in rows if r["step"] == picked_step)
    se = standard_error(best["exact"], images)
    agree = picked in pool and best["exact"] - picked["exact"] <= se + 1e-12
    return {
        "picked": picked_step,
        "measured": best["step"],
        "agree": agree,
        "exact_picked": picked["exact"],
        "exact_best": best["exact"],
        "se": se,
        "images": images,
        "bleed_picked": picked.get("bleed"),
        "fallback": not under,
        "why": why,
    }


def agreement(rows: list[dict[str, Any]], seeds: int, max_bleed: float = MAX_BLEED, picker: Picker | None = None):
    """`compare` for every (setting, subject) run of a results file's rows (the base rows are no run)."""
    runs = dict.fromkeys((r["setting"], r["subject"]) for r in rows if r["setting"] != "base")
    out = []
    for setting, subject in runs:
        mine = sorted((r for r in rows if (r["setting"], r["subject"]) == (setting, subject)), key=lambda r: r["step"])
        record = compare(mine, seeds * EXACT_PROMPTS, max_bleed, picker)
        out.append({"setting": setting, "subject": subject, **record})
    return out


def rate_line(records: list[dict[str, Any]]) -> str:
    agree, runs = sum(r["agree"] for r in records), len(records)
    share = f" ({100 * agree / runs:.0f}%)" if records else ""
    return f"pick_best agrees with the measured best step within one standard error in {agree} of {runs} runs{share}"


def describe(record: dict[str, Any]) -> str:
    """A disagreement in one line: the picked step's numbers against the best step's."""
    n, bleed = record["images"], record["bleed_picked"]
    floor = ", no step under the bleed floor" if record["fallback"] else ""
    return (
        f"{record['setting']} s{record['subject']}: picked {record['picked']} (exact "
        f"{_count(record['exact_picked'], n)}, bleed {'-' if bleed is None else f'{100 * bleed:.0f}%'}) vs best "
        f"{record['measured']} (exact {_count(record['exact_best'], n)}, SE {record['se'] * n:.2f} images{floor})"
    )


def table(files: list[Path], max_bleed: float = MAX_BLEED, picker: Picker | None = None) -> tuple[str, list[dict]]:
    """The markdown table over `files` and every run's record."""
    lines = ["| results file | runs | agree | disagreements |", "|---|---|---|---|"]
    everything = []
    for file in files:
        results = json.loads(Path(file).read_text())
        records = agreement(results["rows"], results["scale"]["seeds"], max_bleed, picker)
        everything += records
        missed = "; ".join(describe(r) for r in records if not r["agree"]) or "-"
        lines.append(f"| {_name(Path(file))} | {len(records)} | {sum(r['agree'] for r in records)} | {missed} |")
    return "\n".join(lines), everything


def _name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def _count(share: float, images: int) -> str:
    return f"{round(share * images)}/{images}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="*", help=f"results files (default: every one under {RESULTS})")
    parser.add_argument("--max-bleed", type=float, default=MAX_BLEED, help="the bleed floor of both sides")
    args = parser.parse_args(argv)
    files = args.results or sorted(RESULTS.rglob("*results.json"))
    try:
        text, records = table(files, args.max_bleed)
    except (ValueError, OSError, KeyError) as error:
        parser.error(str(error))
    print(text)
    print(rate_line(records))


if __name__ == "__main__":
    main()
