"""Identity scoring during training: score one checkpoint, plot the metrics, pick the best checkpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.evaluation import edits
from sdlora.evaluation.metrics import Reference, score_images
from sdlora.faces.backends import FaceBackend
from sdlora.fsutil import atomic_path

if TYPE_CHECKING:
    from sdlora.generate.render import Sampling

PLOTTED = (
    ("identity", "identity (similarity)"),
    ("recognised_rate", "recognised rate"),
    ("diversity", "diversity (pHash spread)"),
    ("bleed", "bleed"),
    ("editability", "editability (one change asked)"),  # only where measured (evaluation/edits.py)
)


def score_checkpoint(
    pipe: Any,
    reference: Reference,
    backend: FaceBackend,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampling: Sampling,
    *,
    threshold: float | None = None,
    scorer: Any = None,
    clip_texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Render the fixed validation set with `pipe` (LoRA already loaded) and return the summary metrics, with
    "editability" where the edit prompts among `prompts` were judged (by the face model, or by `scorer`, a
    clip.ClipScorer reading `clip_texts`).

    `reference` comes from `build_reference` once per run; fixed prompts and seeds make steps comparable.
    """
    from sdlora.generate.render import render_images

    images = render_images(pipe, list(prompts), list(seeds), sampling)
    names = [f"{i:03d}.png" for i in range(len(images))]
    preferences = None
    if scorer is not None and clip_texts is not None:
        from sdlora.evaluation.clip import edit_preferences

        preferences = edit_preferences(scorer, images, list(clip_texts), list(prompts))
    scores, summary = score_images(
        images,
        names,
        reference,
        backend,
        threshold or backend.threshold,
        prompts=list(prompts),
        seeds=list(seeds),
        preferences=preferences,
    )
    found = edits.summarise(scores, edits.judge_of(backend, scorer is not None))
    return summary.model_dump() | ({"editability": found.editability} if found is not None else {})


def plot_identity(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Draw identity, recognised_rate, diversity, bleed and editability against `step` (metrics.jsonl rows) to
    `path`: a panel for each metric measured at some step."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    # A metric never measured (bleed without group prompts) gets no panel rather than an empty one.
    panels = [(key, label) for key, label in PLOTTED if any(row.get(key) is not None for row in rows)] or PLOTTED[:1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, (key, label) in zip(axes, panels, strict=True):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o")
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def pick_best(rows: Sequence[dict[str, Any]], min_diversity: float, max_bleed: float) -> tuple[int, str]:
    """The step to keep among those with diversity >= min_diversity and bleed <= max_bleed, and a sentence saying
    why: the best recognised rate, where steps within one standard error of the best rate count as tied and the
    best identity (then recognised rate, then the earlier step) wins among them.

    Recognised rate comes first because it is the share of ALL images that show the person; identity is a mean
    over the images with a face only, so a step that draws fewer faces, or fewer faces at all, can top it, and it
    saturates near its ceiling while the recognised rate still climbs. Differences in recognised rate under one
    standard error, sqrt(p (1 - p) / images) of the best rate p over the `images` the step was scored on, are
    noise: there the smoother identity decides (no `images`: no band). The steps are walked in order, as
    `sdlora train` sees them: the kept step changes only to a later one that is better recognised beyond the band,
    or is in the band with more identity, so the choice over any prefix of the rows is the previous choice or the
    newest step, and best/ always holds its files."""
    if not rows:
        raise ValueError("pick_best needs at least one metrics row")
    scored = sorted((row for row in rows if row.get("identity") is not None), key=lambda row: row["step"])
    if not scored:
        last = max(row["step"] for row in rows)
        return last, f"no faces were detected at any evaluated step; keeping the last step ({last})"
    eligible = [row for row in scored if _passes(row, min_diversity, max_bleed)]
    best, top = _walk(eligible or scored)
    band = f"recognised rate first, steps within one standard error of the best ({_band(top)}) tied on identity"
    facts = (
        f"identity {best['identity']:.3f}, recognised {100 * _recognised(best):.0f}%, "
        f"diversity {_fmt(best.get('diversity'))}, bleed {_fmt(best.get('bleed'))}"
    )
    floors = f"diversity >= {min_diversity:g} and bleed <= {max_bleed:g}"
    if not eligible:
        return best["step"], (
            f"step {best['step']} is the best ({band}; {facts}), but no step met {floors}: "
            "lower the floors or check the samples"
        )
    excluded = [row for row in scored if row not in eligible and _beats(row, best, top)]
    why = f"step {best['step']} is the best of the {len(eligible)} steps with {floors} ({band}; {facts})"
    if excluded:
        steps = ", ".join(str(row["step"]) for row in excluded)
        why += f"; step(s) {steps} scored higher identity but failed the floors"
    return best["step"], why


def _walk(pool: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the kept step, the best-recognised step) after walking `pool` in step order (see pick_best)."""
    kept = top = pool[0]
    for row in pool[1:]:
        if _recognised(row) > _recognised(top):
            top = row
        floor = _recognised(top) - _standard_error(top)
        if _recognised(kept) < floor:
            kept = top  # only a new best rate lifts the floor, so `top` is this row: its files are the ones at hand
        elif _recognised(row) >= floor and _likeness(row) > _likeness(kept):
            kept = row
    return kept, top


def _beats(row: dict[str, Any], kept: dict[str, Any], top: dict[str, Any]) -> bool:
    """Would `row` rank above the kept step (the band of the best rate `top`)?"""
    gap = _recognised(row) - _recognised(kept)
    return gap > _standard_error(top) or (abs(gap) <= _standard_error(top) and _likeness(row) > _likeness(kept))


def _recognised(row: dict[str, Any]) -> float:
    return row.get("recognised_rate") or 0.0


def _likeness(row: dict[str, Any]) -> tuple[float, float]:
    return row["identity"], _recognised(row)


def standard_error(share: float, images: int) -> float:
    """The binomial standard error of a share of `images` images."""
    return math.sqrt(share * (1 - share) / images)


def _standard_error(row: dict[str, Any]) -> float:
    """The binomial standard error of the row's recognised rate (0 when the row does not say how many images)."""
    images = row.get("images") or 0
    return standard_error(_recognised(row), images) if images > 0 else 0.0


def _band(top: dict[str, Any]) -> str:
    return f"{100 * _recognised(top):.0f}% ± {100 * _standard_error(top):.0f}%"


def _passes(row: dict[str, Any], min_diversity: float, max_bleed: float) -> bool:
    diversity, bleed = row.get("diversity"), row.get("bleed")
    diversity_ok = min_diversity <= 0 or (diversity is not None and diversity >= min_diversity)
    bleed_ok = bleed is None or bleed <= max_bleed  # None: no other faces were generated, nothing bled
    return diversity_ok and bleed_ok


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
