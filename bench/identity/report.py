"""The identity benchmark's report over subjects: means with standard errors, the goal's and the bar's checks,
curves per method, the frontier of identity against editability.

    python -m bench.identity.report RESULTS.json [RESULTS.json ...] --out DIR

reads the rows of one or more `results.json` (a methods grid and a run of combinations, say: the base rows must
agree) and writes `DIR/report.md` (the averaged table with standard errors and a "goal" and a "bar" column, the
per-subject table, issue 18's goal's check, issue 32's bar's check with the binding constraint when no cell
reaches it, and the frontier's table), the same as `DIR/report.html` with both images under it,
`DIR/methods.png` (one panel per setting: exact identity, bleed, class validity and editability against steps)
and `DIR/frontier.png` (every trained cell at step <= 800: exact identity against editability, ±1 SE, the
Pareto cells joined and labelled, the bar's corner dotted).

Standard errors: every share is a count out of the run's seeds (64 images per prompt and subject), so a subject's
share p has the binomial error sqrt(p (1 - p) / n); the mean of k subjects' shares has sqrt(sum p_i (1 - p_i) / n) / k.
It is the error of the images drawn, not of the choice of subjects (which the per-subject table shows).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

# Issue 18's goal, averaged over the subjects: exact identity >= 40%, bleed <= 5%, class-prompt validity no more
# than 5 points under the base's.
GOAL_EXACT, GOAL_BLEED, GOAL_CLASS_DROP = 0.40, 0.05, 0.05
SHARES = ("exact", "validity", "bleed", "class_validity", "fidelity")
# Issue 32's bar, averaged over the subjects: exact identity >= 90% at step <= 800, bleed <= 2%, class validity no
# more than 5 points under the base's (a drop, as for the goal: a class prompt that draws the subject raises it,
# which the bleed bound catches), editability >= 60%.
BAR_EXACT, BAR_BLEED, BAR_CLASS_DROP, BAR_EDITABILITY, BAR_STEPS = 0.90, 0.02, 0.05, 0.60, 800
_ULP = 1e-9  # a mean on a bound counts, though float sums miss it by an ulp: (0.95 + 0.85) / 2 < 0.9
# Shares that results written before they existed lack (their cells show "-"): editability (bench/identity/edits.py)
LATER_SHARES = ("editability",)


@dataclass(frozen=True)
class Cell:
    """One (setting, step) averaged over its subjects."""

    setting: str
    step: int
    subjects: tuple[int, ...]
    mean: dict[str, float]  # share or accuracy -> mean over subjects
    se: dict[str, float]  # share -> standard error of that mean
    class_drop: float  # the base's class validity minus this cell's (positive: fewer valid "a photo of a person")

    def meets(self) -> bool:
        return (
            self.mean["exact"] >= GOAL_EXACT and self.mean["bleed"] <= GOAL_BLEED and self.class_drop <= GOAL_CLASS_DROP
        )

    def bar_gaps(self) -> dict[str, float]:
        """The bar's four bounds -> how far past it this cell is, as a share (<= 0: met; nan: not measured)."""
        return {
            "exact identity": BAR_EXACT - self.mean["exact"],
            "bleed": self.mean["bleed"] - BAR_BLEED,
            "class validity": self.class_drop - BAR_CLASS_DROP,
            "editability": BAR_EDITABILITY - self.mean["editability"],
        }

    def meets_bar(self) -> bool:
        """Issue 32's bar: every bound met at step <= 800 (a cell without editability, nan, cannot meet it)."""
        return self.step <= BAR_STEPS and all(gap <= _ULP for gap in self.bar_gaps().values())

    def breaks(self) -> list[str]:
        """The bar's bleed and class-validity bounds this cell misses (the frontier marks them)."""
        gaps = self.bar_gaps()
        return [bound for bound in ("bleed", "class validity") if gaps[bound] > _ULP]


def load_rows(files: list[Path]) -> tuple[list[dict], int]:
    """Every row of `files` (base rows once per subject; two files' base rows must agree) and the seeds per prompt."""
    rows, base, seeds = [], {}, set()
    for file in files:
        results = json.loads(Path(file).read_text())
        seeds.add(results["scale"]["seeds"])
        for row in results["rows"]:
            if row["setting"] != "base":
                rows.append(row)
            elif base.setdefault(row["subject"], row)["exact"] != row["exact"]:
                raise ValueError(f"{file}: its base rows differ from the other files' (another base or scale)")
    if len(seeds) != 1:
        raise ValueError(f"the files were run at different seed counts: {sorted(seeds)}")
    return list(base.values()) + rows, seeds.pop()


def cells(rows: list[dict], seeds: int) -> list[Cell]:
    """Every (setting, step) of `rows` averaged over the subjects it has, the base first; rows of a setting are
    kept only at the steps every one of its subjects reached."""
    base = {r["subject"]: r for r in rows if r["setting"] == "base"}
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        subjects = tuple(sorted({r["subject"] for r in mine}))
        for step in sorted({r["step"] for r in mine}):
            members = [r for r in mine if r["step"] == step]
            if len(members) != len(subjects):
                continue
            mean = {k: _mean([m[k] for m in members]) for k in (*SHARES, "attribute_accuracy", "soft_agreement")}
            se = {k: math.sqrt(sum(m[k] * (1 - m[k]) for m in members) / seeds) / len(members) for k in SHARES}
            for k in LATER_SHARES:  # a mean and its error only where every subject has the share
                values = [m.get(k) for m in members]
                known = None not in values
                mean[k] = _mean(values) if known else float("nan")
                se[k] = math.sqrt(sum(v * (1 - v) for v in values) / seeds) / len(values) if known else float("nan")
            base_class = _mean([base[m["subject"]]["class_validity"] for m in members])
            out.append(Cell(setting, step, subjects, mean, se, base_class - mean["class_validity"]))
    return out


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")


def _pct(value: float, se: float | None = None) -> str:
    if math.isnan(value):
        return "-"
    return f"{100 * value:.0f}%" if se is None else f"{100 * value:.0f} ± {100 * se:.0f}%"


def averaged_table(all_cells: list[Cell]) -> str:
    head = "| setting | step | exact | attributes | validity | bleed | editability | class validity (vs base) |"
    lines = [head + " fidelity | goal | bar |", "|" + "---|" * 11]
    for c in all_cells:
        drop = f"{_pct(c.mean['class_validity'], c.se['class_validity'])} ({100 * -c.class_drop:+.0f})"
        lines.append(
            f"| {c.setting} | {c.step} | {_pct(c.mean['exact'], c.se['exact'])} | {_pct(c.mean['attribute_accuracy'])}"
            f" | {_pct(c.mean['validity'], c.se['validity'])} | {_pct(c.mean['bleed'], c.se['bleed'])}"
            f" | {_pct(c.mean['editability'], c.se['editability'])} | {drop}"
            f" | {_pct(c.mean['fidelity'], c.se['fidelity'])} | {'yes' if c.meets() else ''} | {_bar_mark(c)} |"
        )
    return "\n".join(lines)


def _bar_mark(c: Cell) -> str:
    if c.meets_bar():
        return "yes"
    return "-" if math.isnan(c.mean["editability"]) else ""


def subject_table(rows: list[dict]) -> str:
    """Exact identity, bleed, editability and class validity of every (setting, step), one column group per
    subject."""
    subjects = sorted({r["subject"] for r in rows})
    shown = ("exact", "bleed", "editability", "class_validity")
    cols = [f"{k.replace('_', ' ')} s{s}" for k in shown for s in subjects]
    lines = ["| setting | step | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    found = {(r["setting"], r["step"], r["subject"]): r for r in rows}
    for setting, step in dict.fromkeys((r["setting"], r["step"]) for r in rows):
        values = []
        for key in shown:
            for s in subjects:
                row = found.get((setting, step, s))
                values.append(_pct(row[key]) if row and row.get(key) is not None else "-")
        lines.append(f"| {setting} | {step} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def goal(all_cells: list[Cell]) -> str:
    """Which cells reach the goal; if none, which constraint binds and by how much."""
    trained = [c for c in all_cells if c.setting != "base"]
    hits = [c for c in trained if c.meets()]
    if hits:
        best = max(hits, key=lambda c: (c.mean["exact"], -c.step))
        names = ", ".join(f"{c.setting} at {c.step}" for c in hits)
        return f"Reached by {len(hits)} cell(s): {names}. Most exact: {_describe(best)}."
    clean = [c for c in trained if c.mean["bleed"] <= GOAL_BLEED and c.class_drop <= GOAL_CLASS_DROP]
    strong = [c for c in trained if c.mean["exact"] >= GOAL_EXACT]
    lines = ["No cell reaches the goal."]
    if clean:
        best = max(clean, key=lambda c: c.mean["exact"])
        short = 100 * (GOAL_EXACT - best.mean["exact"])
        lines.append(f"Within the bleed and class-validity bounds the most exact is {_describe(best)}: ")
        lines[-1] += f"{short:.0f} points short."
    if strong:  # the one nearest to both bounds: the smaller of its two overshoots
        best = min(strong, key=lambda c: max(c.mean["bleed"] - GOAL_BLEED, c.class_drop - GOAL_CLASS_DROP))
        lines.append(
            f"Among cells with exact >= 40% the nearest is {_describe(best)}: bleed "
            f"{100 * (best.mean['bleed'] - GOAL_BLEED):+.0f} points from its bound, class validity "
            f"{100 * (best.class_drop - GOAL_CLASS_DROP):+.0f} points from its bound."
        )
    return " ".join(lines)


def _describe(c: Cell, edits: bool = False) -> str:
    editability = f", editability {_pct(c.mean['editability'], c.se['editability'])}" if edits else ""
    return (
        f"{c.setting} at step {c.step} (exact {_pct(c.mean['exact'], c.se['exact'])}, bleed "
        f"{_pct(c.mean['bleed'], c.se['bleed'])}, class validity {100 * -c.class_drop:+.0f} points{editability})"
    )


def bar(all_cells: list[Cell]) -> str:
    """Which cells reach issue 32's bar; if none, which bound binds (`_binding`) and how many cells miss each
    bound. Only trained cells at step <= 800 count."""
    counted = _counted(all_cells)
    hits = [c for c in counted if c.meets_bar()]
    if hits:
        best = max(hits, key=lambda c: (c.mean["exact"], -c.step))
        names = ", ".join(f"{c.setting} at {c.step}" for c in hits)
        return f"Reached by {len(hits)} cell(s): {names}. Most exact: {_describe(best, edits=True)}."
    if not counted:
        return f"No trained cell at step <= {BAR_STEPS}."
    gaps = [(c, c.bar_gaps()) for c in counted]
    bounds = list(gaps[0][1])
    lines, parts, missed = ["No cell reaches the bar.", *_binding(gaps)], [], {}
    for bound in bounds:  # how many cells miss it, and the nearest any cell comes to it
        known = [(g[bound], c) for c, g in gaps if not math.isnan(g[bound])]
        missed[bound] = len(counted) - sum(gap <= _ULP for gap, _ in known)
        gap, c = min(known, key=lambda pair: pair[0], default=(math.nan, None))
        near = f", at best {100 * gap:.1f} points short ({c.setting} at {c.step})" if gap > _ULP else ""
        parts.append(f"{bound} by {missed[bound]}{near}")
    lines.append(f"Of {len(counted)} cells, missed: {'; '.join(parts)}.")
    lines.append(f"Missed by the most cells: {' and '.join(b for b in bounds if missed[b] == max(missed.values()))}.")
    unknown = sum(math.isnan(g["editability"]) for _, g in gaps)
    return " ".join(lines + ([f"{unknown} cell(s) have no editability."] if unknown else []))


def _binding(gaps: list[tuple[Cell, dict[str, float]]]) -> list[str]:
    """For each bound, the cell nearest to it among those meeting the other three: relax that bound alone by its
    shortfall and the cell reaches the bar, so the bound binds."""
    lines, unreached = [], []
    for bound in gaps[0][1]:
        near = [(c, g) for c, g in gaps if all(v <= _ULP for k, v in g.items() if k != bound) and g[bound] > _ULP]
        if not near:
            unreached.append(bound)
            continue
        c, g = min(near, key=lambda pair: pair[1][bound])
        lines.append(f"{bound.capitalize()} binds: meeting the other three, the nearest is {_describe(c, True)}, ")
        lines[-1] += f"{100 * g[bound]:.1f} points short."
    if len(unreached) == len(gaps[0][1]):
        return ["No bound binds alone: every cell misses two or more."]
    return lines + ([f"No cell meets every bound but {' or '.join(unreached)}."] if unreached else [])


def frontier(all_cells: list[Cell]) -> list[Cell]:
    """The Pareto set of exact identity against editability, by exact identity: the trained cells at step <= 800
    with editability that no other such cell dominates (at least as good on both, better on one; two cells equal
    on both are both kept).

    Cells that break the bleed or class-validity bound are in the pool, and marked where shown (`Cell.breaks`):
    the frontier is the trade-off between the two shares the bar asks most of, and on a base where most cells
    bleed a frontier of the clean ones alone would be empty or a point; the marks say which of its cells the bar
    could accept, and `bar()` says which bound binds."""
    pool = _pool(all_cells)
    return sorted(
        (c for c in pool if not any(_dominates(_point(o), _point(c)) for o in pool)),
        key=lambda c: (_point(c), c.setting, c.step),
    )


def _counted(all_cells: list[Cell]) -> list[Cell]:
    """The cells the bar judges: trained, at step <= 800."""
    return [c for c in all_cells if c.setting != "base" and c.step <= BAR_STEPS]


def _pool(all_cells: list[Cell]) -> list[Cell]:
    """The frontier's cells: those the bar judges that have editability."""
    return [c for c in _counted(all_cells) if not math.isnan(_point(c)[1])]


def _point(c: Cell) -> tuple[float, float]:
    return round(c.mean["exact"], 9), round(c.mean["editability"], 9)  # rounded: equal counts compare equal


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and a != b


def frontier_text(all_cells: list[Cell]) -> list[str]:
    """The report's frontier: its paragraph and its table, or a paragraph saying why there is none."""
    front = frontier(all_cells)
    head = (
        f"Frontier (exact identity against editability: the trained cells at step <= {BAR_STEPS} that no other "
        "cell beats on both; 'breaks' names a bar's bound on bleed or class validity the cell misses):"
    )
    if not front:
        return [f"{head} no trained cell at step <= {BAR_STEPS} has editability (results written before it)."]
    return [head, frontier_table(front)]


def frontier_table(front: list[Cell]) -> str:
    lines = ["| setting | step | exact | editability | bleed | class validity (vs base) | breaks |", "|" + "---|" * 7]
    for c in front:
        lines.append(
            f"| {c.setting} | {c.step} | {_pct(c.mean['exact'], c.se['exact'])}"
            f" | {_pct(c.mean['editability'], c.se['editability'])} | {_pct(c.mean['bleed'], c.se['bleed'])}"
            f" | {100 * -c.class_drop + 0.0:+.0f} | {', '.join(c.breaks())} |"  # + 0.0: no "-0" for an unchanged base
        )
    return "\n".join(lines)


def plot(all_cells: list[Cell], path: Path) -> None:
    """One panel per setting: exact identity, bleed and class validity (means, ±1 SE) against steps, from the
    base's values at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(c for c in all_cells if c.setting == "base")
    settings = list(dict.fromkeys(c.setting for c in all_cells if c.setting != "base"))
    columns = 4
    rows = -(-len(settings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.6 * rows), squeeze=False, sharey=True)
    for ax, setting in zip(axes.flat, settings, strict=False):
        mine = [base] + [c for c in all_cells if c.setting == setting]
        steps = [c.step for c in mine]
        curves = (("exact", "exact", "C0"), ("bleed", "bleed", "C3"), ("class_validity", "class valid", "C2"))
        curves += (("editability", "editability", "C1"),)
        for key, label, colour in curves:
            ys = [c.mean[key] for c in mine]
            if all(math.isnan(y) for y in ys):  # results from before the share existed
                continue
            ax.errorbar(steps, ys, yerr=[c.se[key] for c in mine], marker="o", ms=3, color=colour, label=label)
        ax.axhline(GOAL_EXACT, color="C0", lw=0.6, ls=":")
        ax.axhline(GOAL_BLEED, color="C3", lw=0.6, ls=":")
        ax.set_title(setting, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(settings) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    subjects = ", ".join(map(str, base.subjects))
    fig.suptitle(f"mean over subjects {subjects}; dotted: the goal's 40% exact and 5% bleed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_frontier(all_cells: list[Cell], path: Path) -> None:
    """Exact identity (x) against editability (y), ±1 SE, of every trained cell at step <= 800 with editability
    (hollow red: it breaks the bleed or class-validity bound), the frontier joined and labelled, the bar's corner
    (90% exact, 60% editability) dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = frontier(all_cells)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    fig.subplots_adjust(left=0.08, right=0.62, top=0.88)
    for c in _pool(all_cells):
        colour, x, y = "C3" if c.breaks() else "C0", c.mean["exact"], c.mean["editability"]
        fill = "none" if c.breaks() else colour
        ax.errorbar(x, y, xerr=c.se["exact"], yerr=c.se["editability"], fmt="o", ms=4, color=colour, mfc=fill, lw=0.6)
    if front:
        ax.plot([c.mean["exact"] for c in front], [c.mean["editability"] for c in front], color="k", lw=1)
        for i, c in enumerate(front, 1):  # numbers by the points, names in a key beside the axes: never overlapping
            ax.annotate(
                str(i), (c.mean["exact"], c.mean["editability"]), (3, 3), textcoords="offset points", fontsize=7
            )
        key = "\n".join(f"{i}  {c.setting} @{c.step}  {', '.join(c.breaks())}" for i, c in enumerate(front, 1))
        fig.text(0.64, 0.88, "frontier:\n" + key, va="top", fontsize=7)
    ax.axvline(BAR_EXACT, color="grey", lw=0.8, ls=":")
    ax.axhline(BAR_EDITABILITY, color="grey", lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="exact identity", ylabel="editability")
    ax.grid(alpha=0.3)
    ax.set_title(
        f"trained cells at step <= {BAR_STEPS} (±1 SE); hollow red: breaks bleed or class validity;\n"
        "line: the frontier; dotted: the bar's 90% exact and 60% editability",
        fontsize=8,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(files: list[Path], out: Path) -> str:
    rows, seeds = load_rows(files)
    all_cells = cells(rows, seeds)
    text = "\n\n".join(
        [
            f"Mean over subjects ± standard error ({seeds} images per prompt and subject; class validity's change from "
            "the base's in points)",
            averaged_table(all_cells),
            "Per subject",
            subject_table(rows),
            "Goal (exact >= 40%, bleed <= 5%, class validity at most 5 points under the base's): " + goal(all_cells),
            "Bar (exact >= 90% at step <= 800, bleed <= 2%, class validity at most 5 points under the base's, "
            "editability >= 60%): " + bar(all_cells),
            *frontier_text(all_cells),
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    plot(all_cells, out / "methods.png")
    plot_frontier(all_cells, out / "frontier.png")
    images = [("methods.png", "curves per setting"), ("frontier.png", "identity against editability")]
    (out / "report.html").write_text(html(text, images))
    return text


def html(text: str, images: list[tuple[str, str]]) -> str:
    """The report's markdown (paragraphs and pipe tables) as one HTML page, with the images ((file, alt text))
    under it in their order."""
    from html import escape

    parts = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if not lines[0].startswith("|"):
            parts.append(f"<p>{escape(block)}</p>")
            continue
        cells = [[escape(c.strip()) for c in line.strip("|").split("|")] for line in lines if "---|" not in line]
        head = "".join(f"<th>{c}</th>" for c in cells[0])
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    imgs = "".join(f"<img src='{escape(image)}' alt='{escape(alt)}'>" for image, alt in images)
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>identity benchmark</title><style>{style}</style>"
        f"</head><body>{''.join(parts)}{imgs}</body></html>\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of bench.identity runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        print(report(args.results, args.out))
    except (ValueError, OSError, KeyError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
