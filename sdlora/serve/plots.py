"""The Runs page's curves (matplotlib, Agg): loss, learning rate, identity (and editability) with the best step
marked."""

from __future__ import annotations

from typing import Any


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 2.6), dpi=100, layout="constrained")
    axes = figure.subplots()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step", fontsize=9)
    axes.grid(alpha=0.3)
    return figure, axes


def curve(records: list[dict], key: str, title: str) -> Any:
    """`key` against step from metrics.jsonl's loss records (an empty plot saying 'no data yet' before any)."""
    figure, axes = _figure(title)
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
    else:
        axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes, color="grey")
    return figure


def identity(evals: list[dict], best: int | None) -> Any:
    """Identity (and recognised rate, and editability where it was measured) at each scored step; the best step
    (what best/ holds) as a line. A metric never measured gets no line (and no legend entry)."""
    figure, axes = _figure("identity (0.5 = same-person threshold)")
    steps = [e["step"] for e in evals]
    for key in ("identity", "recognised_rate", "editability"):
        values = [e["eval"].get(key) for e in evals]
        if any(v is not None for v in values):
            axes.plot(steps, [float("nan") if v is None else v for v in values], marker="o", label=key)
    if best is not None:
        axes.axvline(best, color="tab:green", linestyle="--", label=f"best step {best}")
    if not evals:
        axes.text(0.5, 0.5, "not scored yet", ha="center", va="center", transform=axes.transAxes, color="grey")
    elif all(e["eval"].get("identity") is None for e in evals):
        note = "no face found in the scored images yet"
        axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_ylim(0, 1)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return figure
