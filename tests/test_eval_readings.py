"""Issue 28: every number of the eval report says what it means and what good looks like, in one place; the toy
face model counts every head as a face; the identity plot has no empty panel; train says its precision in words."""

from __future__ import annotations

import html
import random

import numpy
import pytest
from PIL import Image, ImageFilter

from sdlora.demo.toy import SUBJECT
from sdlora.evaluation.checkpoints import plot_identity
from sdlora.evaluation.metrics import READINGS, ImageScore, Summary, build_reference, reading, score_images
from sdlora.evaluation.report import EvalResult, print_table, render_html
from sdlora.faces import toyworld as world
from sdlora.faces.backends import face_backend


def _result(threshold: float = 1 / 6) -> EvalResult:
    scores = [
        ImageScore(image="0.png", faces=1, distance=0.0, similarity=1.0, recognised=True),
        ImageScore(image="1.png", faces=1, distance=1.0, similarity=0.0, recognised=False),
        ImageScore(image="2.png", faces=0),
    ]
    summary = Summary(images=3, images_with_face=2, face_rate=2 / 3, identity=0.5, identity_distance=0.5,
                      recognised_rate=1 / 3, diversity=0.4, face_spread=1.0, memorised_rate=0.0, bleed=None,
                      other_faces=0, prompt_fidelity=None)  # fmt: skip
    return EvalResult(face_model="toy", threshold=threshold, reference=[], reference_faces=0, summary=summary,
                      images=scores)  # fmt: skip


def test_every_summary_number_has_a_meaning_and_a_good_value():
    assert set(READINGS) == set(Summary.model_fields)
    for key in READINGS:
        meaning, good = reading(key, 0.6)
        assert meaning and good and "{" not in meaning + good, key


def test_terminal_table_reads_each_number(capsys):
    from rich.console import Console

    print_table(_result(), Console(width=400, force_terminal=False))
    out = capsys.readouterr().out
    assert "0.166667" not in out and "0.5 = threshold" not in out
    assert "two faces are the same person under distance 0.167" in out
    for key in READINGS:
        meaning, good = reading(key, 1 / 6)
        assert f" {key} " in out and meaning in out and good in out, key
    assert "0.667 (2/3)" in out and "0.333 (1/3)" in out  # shares say of what


def test_html_report_reads_each_number():
    page = render_html(_result(), ["images/000.png", "images/001.png", "images/002.png"], [])
    assert "0.166667" not in page and "<th>good</th>" in page
    for key in READINGS:
        meaning, good = reading(key, 1 / 6)
        assert f"<th>{key}</th>" in page and html.escape(meaning) in page and html.escape(good) in page, key


def test_toy_face_model_counts_an_unreadable_head_as_a_face():
    """face_rate was 0.5 on demo images that all showed a face: the toy model called every head it couldn't read
    cleanly 'no face'. Such a head is a face now, never recognised (the decoder's exact share is unchanged)."""
    backend = face_backend("toy")
    rng = random.Random(3)
    clean = [world.render(SUBJECT, rng) for _ in range(3)]
    blurred = clean[0].filter(ImageFilter.GaussianBlur(2))
    assert world.read(blurred).problem == "eyes unclear"  # a head, read unclearly
    noise = Image.fromarray(numpy.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=numpy.uint8))
    reference = build_reference(clean, ["a", "b", "c"], backend)
    images = [*clean[1:], blurred, noise]
    scores, summary = score_images(images, ["0", "1", "2", "3"], reference, backend, backend.threshold)
    assert [s.faces for s in scores] == [1, 1, 1, 0]
    assert [s.recognised for s in scores] == [True, True, False, False]
    assert summary.face_rate == pytest.approx(3 / 4) and summary.recognised_rate == pytest.approx(2 / 4)
    assert scores[2].similarity == 0.0 and summary.identity == pytest.approx(2 / 3)


def test_identity_plot_has_no_empty_panel(tmp_path):
    rows = [{"step": s, "identity": 0.5, "recognised_rate": 0.4, "diversity": 0.3, "bleed": None} for s in (1, 2)]
    with Image.open(plot_identity(rows, tmp_path / "identity.png")) as image:
        assert image.size == (700, 3 * 220)  # three panels of 2.2 in at 100 dpi: no panel for the unmeasured bleed
    rows[1]["bleed"] = 0.0
    with Image.open(plot_identity(rows, tmp_path / "identity.png")) as image:
        assert image.size == (700, 4 * 220)
