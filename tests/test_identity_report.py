"""The identity benchmark's report: means and binomial standard errors over subjects, the goal's check, merging."""

from __future__ import annotations

import json
import math

import pytest

from bench.identity import report


def _row(subject, setting, step, exact, bleed, class_validity, validity=0.5, fidelity=0.0):
    return {
        "subject": subject,
        "setting": setting,
        "step": step,
        "exact": exact,
        "validity": validity,
        "bleed": bleed,
        "class_validity": class_validity,
        "fidelity": fidelity,
        "attribute_accuracy": 0.9,
        "soft_agreement": 0.8,
    }


def _results(path, rows, seeds=64):
    path.write_text(json.dumps({"scale": {"seeds": seeds}, "rows": rows}))
    return path


BASE = [_row(s, "base", 0, 0.0, 0.0, 0.5) for s in (0, 1)]


def test_cells_average_subjects_with_binomial_errors_and_the_class_drop():
    rows = BASE + [_row(0, "a", 100, 0.5, 0.1, 0.4), _row(1, "a", 100, 0.3, 0.0, 0.5), _row(0, "a", 200, 0.6, 0, 0.5)]
    cells = {(c.setting, c.step): c for c in report.cells(rows, seeds=64)}
    a = cells["a", 100]
    assert a.mean["exact"] == pytest.approx(0.4) and a.subjects == (0, 1)
    assert a.se["exact"] == pytest.approx(math.sqrt((0.25 + 0.21) / 64) / 2)
    assert a.class_drop == pytest.approx(0.05)  # base 50% valid, the cell 45%
    assert ("a", 200) not in cells  # subject 1 never reached step 200: no mean of one subject beside two
    assert a.meets()  # 40% exact, 5% bleed, 5 points of class validity: on every bound, which counts


def test_goal_names_the_cells_that_reach_it_or_the_binding_constraint():
    hit = BASE + [_row(s, "good", 800, 0.45, 0.03, 0.48) for s in (0, 1)]
    text = report.goal(report.cells(hit, 64))
    assert text.startswith("Reached by 1 cell(s): good at 800")
    miss = BASE + [_row(s, "clean", 800, 0.30, 0.02, 0.5) for s in (0, 1)]
    miss += [_row(s, "bleeds", 800, 0.60, 0.25, 0.5) for s in (0, 1)]
    miss += [_row(s, "drops", 800, 0.50, 0.0, 0.3) for s in (0, 1)]  # class validity 20 points under the base's
    text = report.goal(report.cells(miss, 64))
    assert "No cell reaches the goal" in text
    assert "the most exact is clean at step 800" in text and "10 points short" in text
    # "drops" bleeds least but loses 20 points of class validity (15 past its bound); "bleeds" is 20 past its own
    assert "the nearest is drops at step 800" in text and "bleed -5 points" in text and "validity +15 points" in text


def test_report_merges_files_and_refuses_another_base(tmp_path):
    grid = _results(tmp_path / "grid.json", BASE + [_row(s, "plain", 100, 0.2, 0.1, 0.5) for s in (0, 1)])
    more = _results(tmp_path / "more.json", BASE + [_row(s, "plain+x", 100, 0.3, 0.0, 0.5) for s in (0, 1)])
    text = report.report([grid, more], tmp_path / "out")
    assert "| plain | 100 | 20 ± 4% |" in text and "| plain+x | 100 | 30 ± 4% |" in text
    assert (tmp_path / "out" / "report.md").read_text().strip() == text.strip()
    assert (tmp_path / "out" / "methods.png").stat().st_size > 0
    other = _results(tmp_path / "other.json", [_row(0, "base", 0, 0.1, 0.0, 0.5)])
    with pytest.raises(ValueError, match="base rows differ"):
        report.load_rows([grid, other])
    with pytest.raises(ValueError, match="different seed counts"):
        report.load_rows([grid, _results(tmp_path / "few.json", BASE, seeds=8)])


def test_editability_is_reported_beside_identity_and_bleed_and_older_results_show_a_dash(tmp_path):
    rows = [{**r, "editability": 0.1} for r in BASE]
    rows += [{**_row(s, "edits", 800, 0.5, 0.0, 0.5), "editability": e} for s, e in ((0, 0.6), (1, 0.2))]
    rows += [_row(s, "old", 800, 0.5, 0.0, 0.5) for s in (0, 1)]  # written before editability existed
    cells = {(c.setting, c.step): c for c in report.cells(rows, 64)}
    assert cells["edits", 800].mean["editability"] == pytest.approx(0.4)
    assert cells["edits", 800].se["editability"] == pytest.approx(math.sqrt((0.24 + 0.16) / 64) / 2)
    table = report.averaged_table(list(cells.values())).splitlines()
    assert table[0].split(" | ")[5:7] == ["bleed", "editability"]
    assert "| edits | 800 | 50 ± 4% | 90% | 50 ± 4% | 0 ± 0% | 40 ± 4% |" in table[3]
    assert "| old | 800 | 50 ± 4% | 90% | 50 ± 4% | 0 ± 0% | - |" in table[4]
    text = report.report([_results(tmp_path / "r.json", rows)], tmp_path / "out")
    assert "editability s0 | editability s1" in text
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>editability</th>" in page and "<td>40 ± 4%</td>" in page and "methods.png" in page


def _cell(setting, step, exact, bleed, class_validity, editability, subjects=(0, 1)):
    """One cell's rows: every argument but setting and step is one value per subject (or one for all)."""
    values = [v if isinstance(v, tuple) else (v,) * len(subjects) for v in (exact, bleed, class_validity, editability)]
    rows = []
    for i, s in enumerate(subjects):
        row = _row(s, setting, step, values[0][i], values[1][i], values[2][i])
        rows.append(row if values[3][i] is None else {**row, "editability": values[3][i]})
    return rows


EDIT_BASE = [{**r, "editability": 0.0} for r in BASE]


def test_the_bar_counts_each_bound_on_its_edge_never_past_step_800_nor_without_editability():
    # means on every bound: 90% exact, 2% bleed, class validity 5 points under the base's 50%, 60% editability;
    # (0.95 + 0.85) / 2 and 0.5 - 0.45 fall an ulp short in floats, which must still count
    edge = ((0.95, 0.85), (0.03, 0.01), (0.5, 0.4), (0.65, 0.55))
    rows = EDIT_BASE + _cell("edge", 800, *edge) + _cell("edge", 1500, *edge)
    rows += _cell("exact", 800, (0.95, 0.83), *edge[1:]) + _cell("bleed", 800, edge[0], (0.03, 0.02), *edge[2:])
    rows += _cell("class", 800, *edge[:2], (0.5, 0.38), edge[3]) + _cell("edits", 800, *edge[:3], (0.65, 0.53))
    rows += _cell("old", 800, *edge[:3], None)  # written before editability existed
    cells = {(c.setting, c.step): c for c in report.cells(rows, 64)}
    assert cells["edge", 800].meets_bar() and not cells["edge", 1500].meets_bar()
    for setting in ("exact", "bleed", "class", "edits", "old"):  # one point past a bound, or no editability
        assert not cells[setting, 800].meets_bar(), setting
    assert report.bar(list(cells.values())).startswith("Reached by 1 cell(s): edge at 800. Most exact: edge at step")
    table = report.averaged_table(list(cells.values())).splitlines()
    assert table[0].endswith("| goal | bar |")
    assert table[2].endswith("|  |  |") and table[3].endswith("| yes |") and table[4].endswith("|  |")  # base, edge
    assert table[-1].endswith("| - |")  # old: no editability, so the bar cannot be judged


def test_the_bar_names_the_binding_constraint_and_the_bound_most_cells_miss():
    rows = EDIT_BASE + _cell("sharp", 800, 0.95, 0.0, 0.5, 0.4) + _cell("sharper", 800, 0.92, 0.0, 0.5, 0.5)
    rows += _cell("loose", 400, 0.8, 0.0, 0.5, 0.7) + _cell("messy", 800, 0.5, 0.3, 0.5, 0.2)
    rows += _cell("late", 1500, 0.99, 0.0, 0.5, 0.9)  # past step 800: it does not count
    text = report.bar(report.cells(rows, 64))
    assert text.startswith("No cell reaches the bar. Exact identity binds: meeting the other three, the nearest is")
    assert "nearest is loose at step 400 (exact 80 ± " in text and "editability 70 ± 4%), 10.0 points short" in text
    assert "Editability binds: meeting the other three, the nearest is sharper at step 800" in text
    assert "No cell meets every bound but bleed or class validity." in text
    assert "Of 4 cells, missed: exact identity by 2; bleed by 1; class validity by 0; editability by 3." in text
    assert text.endswith("Missed by the most cells: editability.") and "late" not in text
    alone = report.bar(report.cells(EDIT_BASE + _cell("messy", 800, 0.5, 0.3, 0.5, 0.2), 64))
    assert "No bound binds alone: every cell misses two or more." in alone
    assert "missed: exact identity by 1, at best 40.0 points short (messy at 800); bleed by 1, at best 28.0" in alone
    assert "Missed by the most cells: exact identity and bleed and editability." in alone


FRONT = EDIT_BASE + _cell("a", 800, 0.9, 0.0, 0.5, 0.2) + _cell("b", 400, 0.6, 0.0, 0.5, 0.5)
FRONT += _cell("c", 200, 0.3, 0.0, 0.5, 0.8) + _cell("dominated", 800, 0.5, 0.0, 0.5, 0.4)
FRONT += _cell("same", 800, 0.6, 0.0, 0.5, 0.5)  # equal to b on both: neither beats the other
FRONT += _cell("worse", 800, 0.9, 0.0, 0.5, 0.1)  # as exact as a, less editable: a beats it
FRONT += _cell("bleeds", 800, 0.2, 0.3, 0.5, 0.9) + _cell("late", 1500, 0.99, 0.0, 0.5, 0.99)
FRONT += _cell("old", 800, 0.95, 0.0, 0.5, None)


def test_the_frontier_keeps_the_cells_no_other_beats_on_both_and_marks_the_bounds_they_break():
    front = report.frontier(report.cells(FRONT, 64))
    assert [(c.setting, c.step) for c in front] == [("bleeds", 800), ("c", 200), ("b", 400), ("same", 800), ("a", 800)]
    table = report.frontier_table(front).splitlines()
    assert table[2] == "| bleeds | 800 | 20 ± 4% | 90 ± 3% | 30 ± 4% | +0 | bleed |"
    assert table[-1] == "| a | 800 | 90 ± 3% | 20 ± 4% | 0 ± 0% | +0 |  |"


def test_the_report_draws_the_frontier_and_puts_both_images_in_the_page(tmp_path):
    import numpy as np
    from PIL import Image

    rows = EDIT_BASE + _cell("a", 800, 0.9, 0.0, 0.5, 0.2) + _cell("bleeds", 800, 0.2, 0.3, 0.5, 0.9)
    text = report.report([_results(tmp_path / "r.json", rows)], tmp_path / "out")
    assert "\n\nFrontier (exact identity against editability" in text and "\n| bleeds | 800 | 20 ± 4% |" in text
    pixels = np.asarray(Image.open(tmp_path / "out" / "frontier.png").convert("RGB"), dtype=int)
    for colour in ((31, 119, 180), (214, 39, 40)):  # matplotlib's C0 (cells within the bounds) and C3 (bleeds)
        assert (np.abs(pixels - colour).sum(axis=-1) < 30).any(), colour
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.endswith("<img src='methods.png' alt='curves per setting'><img src='frontier.png' alt='identity "
                         "against editability'></body></html>\n")  # fmt: skip
    one = report.html("x", [("methods.png", "curves per setting")])  # one image: the page as it always was
    assert one.endswith("<body><p>x</p><img src='methods.png' alt='curves per setting'></body></html>\n")
    old = report.frontier_text(report.cells(BASE + _cell("old", 800, 0.5, 0.0, 0.5, None), 64))
    assert old[0].endswith(": no trained cell at step <= 800 has editability (results written before it).")
