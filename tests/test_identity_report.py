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
