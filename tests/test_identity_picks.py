"""bench/identity/picks.py: the checkpoint sdlora keeps against the measured best step, within one standard error."""

from __future__ import annotations

import json

import pytest

from bench.identity import picks


def rows(*cells: tuple[int, int, float, float], setting: str = "plain", subject: int = 0) -> list[dict]:
    """Results rows of one run: (step, exact images of 64, attribute accuracy, bleed)."""
    return [
        {"setting": setting, "subject": subject, "step": step, "exact": k / 64, "attribute_accuracy": acc, "bleed": b}
        for step, k, acc, b in cells
    ]


def taking(step: int):
    return lambda metrics, min_diversity, max_bleed: (step, f"scripted: step {step}")


def test_standard_error_and_the_sdlora_rows():
    assert picks.standard_error(0.5, 64) == pytest.approx(0.0625)
    assert picks.standard_error(0.0, 64) == 0.0
    row = {"step": 200, "exact": 0.25, "attribute_accuracy": 0.8, "bleed": 0.02, "validity": 0.4}
    assert picks.sdlora_row(row, 64) == {
        "step": 200,
        "images": 64,
        "face_rate": 0.4,
        "identity": 0.8,
        "recognised_rate": 0.25,
        "bleed": 0.02,
    }


def test_agreement_within_one_standard_error_of_the_best_step():
    run = rows((100, 32, 0.9, 0.0), (200, 35, 0.7, 0.0), (400, 37, 0.6, 0.0))
    best = picks.compare(run, 64, picker=taking(400))
    assert best["agree"] and best["measured"] == 400 and best["se"] == pytest.approx(0.0618, abs=1e-4)
    near = picks.compare(run, 64, picker=taking(200))  # 35 vs 37 of 64: 2 images, under one SE (3.96 images)
    assert near["agree"] and (near["exact_picked"], near["exact_best"]) == (35 / 64, 37 / 64)
    far = picks.compare(run, 64, picker=taking(100))  # 5 images behind
    assert not far["agree"] and far["picked"] == 100 and far["measured"] == 400
    # One image against none is just outside one SE (sqrt(1/64 * 63/64 / 64) = 0.99 images).
    assert not picks.compare(rows((100, 0, 0.6, 0.0), (200, 1, 0.5, 0.0)), 64, picker=taking(100))["agree"]
    assert picks.compare(rows((100, 0, 0.6, 0.0), (200, 0, 0.5, 0.0)), 64, picker=taking(200))["agree"]


def test_the_bleed_floor_applies_to_both_sides():
    run = rows((100, 20, 0.8, 0.0), (200, 40, 0.9, 0.2))
    over = picks.compare(run, 64, picker=taking(200))  # more exact identity, but over the bleed floor
    assert over["measured"] == 100 and not over["agree"] and not over["fallback"]
    assert picks.compare(run, 64, picker=taking(100))["agree"]
    assert not picks.compare(run, 64, max_bleed=0.5, picker=taking(100))["agree"]  # floor lifted: 200 is best
    # No step under the floor: both sides fall back to every step, and the record says so.
    none_under = rows((100, 20, 0.8, 0.1), (200, 40, 0.9, 0.2))
    record = picks.compare(none_under, 64, picker=taking(200))
    assert record["agree"] and record["fallback"] and record["measured"] == 200
    record = {"setting": "plain", "subject": 0, **picks.compare(none_under, 64, picker=taking(100))}
    assert not record["agree"] and "no step under the bleed floor" in picks.describe(record)


def test_table_over_results_files(tmp_path):
    base = [{"setting": "base", "subject": 0, "step": 0, "exact": 0.0, "attribute_accuracy": 0.4, "bleed": 0.0}]
    first = rows((100, 10, 0.9, 0.0), (200, 30, 0.8, 0.0))
    second = rows((100, 0, 0.5, 0.0), (200, 1, 0.6, 0.0), subject=1)
    file = tmp_path / "results.json"
    file.write_text(json.dumps({"scale": {"seeds": 64}, "rows": base + first + second}))
    records = picks.agreement(json.loads(file.read_text())["rows"], 64, picker=taking(100))
    assert [(r["subject"], r["agree"]) for r in records] == [(0, False), (1, False)]  # the base row is no run
    text, everything = picks.table([file], picker=taking(200))
    assert everything == picks.agreement(base + first + second, 64, picker=taking(200))
    assert f"| {file} | 2 | 2 | - |" in text
    text, everything = picks.table([file], picker=taking(100))
    assert "| 2 | 0 |" in text and "plain s0: picked 100 (exact 10/64, bleed 0%) vs best 200 (exact 30/64" in text
    assert picks.rate_line(everything).endswith("in 0 of 2 runs (0%)")
