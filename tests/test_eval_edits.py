"""Issue 32: editability beside identity and bleed: edit prompts judged by the toy decoder (scripted renders with
known attributes) or by CLIP with face recognition, None without a judge; carried by eval's table, JSON and report,
training's identity.png and the web app's identity curve."""

from __future__ import annotations

import html
import json
import random

import numpy
import pytest
from PIL import Image

from sdlora.demo.toy import SUBJECT
from sdlora.evaluation import edits
from sdlora.evaluation.checkpoints import plot_identity
from sdlora.evaluation.metrics import build_reference, score_images
from sdlora.evaluation.prompts import EDIT_PROMPTS, STANDARD_PROMPTS, default_templates
from sdlora.evaluation.report import EvalResult, print_table, render_html
from sdlora.faces import toyworld as world
from sdlora.faces.backends import face_backend

TRIGGER = "sks person"


def _as(**changes) -> world.Identity:
    return world.Identity(**(SUBJECT.as_dict() | changes))


# (prompt, what the scripted image shows, the verdict): SUBJECT is tan, red long hair, green eyes, no glasses, mint.
CASES = [
    ("a photo of sks person", SUBJECT, None),  # no edit asked: scored for identity
    ("a photo of sks person with glasses", _as(glasses=True), True),  # the change, on the person
    ("a photo of sks person with glasses", _as(glasses=True, skin="pale"), False),  # the change, person lost
    ("a photo of sks person with glasses", SUBJECT, False),  # the person, without the change
    ("a photo of sks person with red hair", SUBJECT, None),  # what the subject already has: no edit of them
    ("a photo of sks person with blonde hair", _as(hair="blonde"), True),
    ("a photo of sks person with blonde hair", _as(hair="blonde", glasses=True), False),  # a second change
    ("a photo of sks person with glasses and with blonde hair", _as(glasses=True), None),  # two changes: no edit
]


@pytest.fixture(scope="module")
def toy_scored():
    rng = random.Random(0)
    backend = face_backend("toy")
    reference = build_reference([world.render(SUBJECT, rng) for _ in range(3)], ["a", "b", "c"], backend)
    images = [world.render(shown, rng) for _, shown, _ in CASES]
    prompts = [prompt for prompt, _, _ in CASES]
    scores, summary = score_images(images, [f"{i}.png" for i in range(len(images))], reference, backend, 1 / 6,
                                   prompts=prompts)  # fmt: skip
    return backend, scores, summary


def test_toy_editability_counts_the_asked_change_on_the_person_only(toy_scored):
    backend, scores, summary = toy_scored
    assert [s.edited for s in scores] == [verdict for _, _, verdict in CASES]
    assert [s.edit for s in scores][1:4] == ["with glasses"] * 3 and scores[0].edit is None and scores[7].edit is None
    found = edits.summarise(scores, edits.judge_of(backend, clip=False))
    assert found is not None and found.judge == "attributes"
    assert (found.edited, found.images) == (2, 5) and found.editability == pytest.approx(0.4)
    assert found.by_edit == pytest.approx({"with glasses": 1 / 3, "with blonde hair": 1 / 2})
    # Identity is over the images that ask no edit (the person with glasses is another person to the decoder): the
    # first and the last (two changes asked is no one-change edit; the glasses make it not the person).
    assert summary.images == 2 and summary.recognised_rate == 0.5 and summary.identity == pytest.approx(0.75)


def test_clip_judges_real_faces_and_nothing_judges_without_it():
    """A face model that cannot read the change (dlib, insightface): an edit image counts when the face is the
    subject's and CLIP prefers the prompt to it without the change; without CLIP nothing is judged."""
    from sdlora.evaluation.clip import edit_preferences
    from sdlora.evaluation.metrics import Reference
    from sdlora.faces.backends import FoundFace

    images = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(4)]
    at = {id(image): float(x) for image, x in zip(images, [0.0, 0.0, 0.0, 2.0], strict=True)}  # the last: a stranger

    class Dlibish:  # faces read from a table; the subject is at 0
        name, threshold = "dlibish", 0.5

        def faces(self, image):
            return [FoundFace((0, 0, 8, 8), numpy.array([at[id(image)]]))]

        def distance(self, a, b):
            return float(abs(a - b).sum())

    class Clip:  # prefers "glasses" wherever the image is not the first
        def score(self, pictures, texts):
            return [0.3 if "glasses" in t and p is not images[1] else 0.2 for p, t in zip(pictures, texts, strict=True)]

    prompts = ["a photo of sks person"] + ["a photo of sks person with glasses, natural light"] * 3
    texts = [p.replace("sks person", "a person") for p in prompts]
    assert edits.without(texts[1], edits.find(prompts[1])) == "a photo of a person, natural light"
    preferences = edit_preferences(Clip(), images, texts, prompts)
    assert preferences == [None, False, True, True]
    reference = Reference([numpy.array([0.0])])
    scores, summary = score_images(images, list("abcd"), reference, Dlibish(), 0.5, prompts=prompts,
                                   preferences=preferences)  # fmt: skip
    # CLIP sees no change / the person with the change / the change on a stranger.
    assert [s.edited for s in scores] == [None, False, True, False] and summary.images == 1
    found = edits.summarise(scores, edits.judge_of(Dlibish(), clip=True))
    assert found is not None and found.judge == "clip" and (found.edited, found.images) == (1, 3)
    unjudged, _ = score_images(images, list("abcd"), reference, Dlibish(), 0.5, prompts=prompts)
    assert [s.edited for s in unjudged] == [None] * 4 and edits.judge_of(Dlibish(), clip=False) is None
    assert edits.summarise(unjudged, None) is None
    assert "--clip" in edits.note(unjudged, None, "dlib")
    # Edit prompts are rendered only where they can be judged.
    assert default_templates("dlib", None) == list(STANDARD_PROMPTS)
    assert (
        default_templates("dlib", "openai/clip")
        == default_templates("toy", None)
        == [
            *STANDARD_PROMPTS,
            *EDIT_PROMPTS,
        ]
    )
    assert all(edits.find(t.format(trigger=TRIGGER)) is None for t in STANDARD_PROMPTS)
    assert all(edits.find(t.format(trigger=TRIGGER)) is not None for t in EDIT_PROMPTS)


def _result(scores, summary, found) -> EvalResult:
    return EvalResult(face_model="toy", threshold=1 / 6, reference=[], reference_faces=3, summary=summary,
                      edits=found, images=scores)  # fmt: skip


def test_eval_table_json_and_report_carry_editability_only_where_measured(toy_scored, capsys):
    from rich.console import Console

    backend, scores, summary = toy_scored
    measured = _result(scores, summary, edits.summarise(scores, "attributes"))
    data = json.loads(measured.to_json())
    assert data["edits"]["editability"] == pytest.approx(0.4) and data["edits"]["images"] == 5
    assert [image.get("edited") for image in data["images"]] == [verdict for _, _, verdict in CASES]
    assert EvalResult.model_validate(data).edits.edited == 2  # round-trips through the schema
    page = render_html(measured, [f"images/{i}.png" for i in range(len(scores))], [])
    assert "<th>editability</th>" in page and html.escape("0.400 (2/5;") in page and "not edited" in page
    print_table(measured, Console(width=400, force_terminal=False))
    out = capsys.readouterr().out
    assert " editability " in out and "0.400 (2/5; with glasses 0.33, with blonde hair 0.50)" in out
    assert "edited" in out.splitlines()[2]  # the per-prompt table's column

    plain = [s.model_copy(update={"edit": None, "edited": None}) for s in scores]
    unmeasured = _result(plain, summary, None)
    data = json.loads(unmeasured.to_json())
    assert "edits" not in data and all("edit" not in image and "edited" not in image for image in data["images"])
    assert "editability" not in render_html(unmeasured, [f"images/{i}.png" for i in range(len(scores))], [])
    print_table(unmeasured, Console(width=400, force_terminal=False))
    out = capsys.readouterr().out
    assert "editab" not in out and "edited" not in out


def test_identity_plot_gets_an_editability_panel_only_when_measured(tmp_path):
    # Without editability: three panels (test_eval_readings.py::test_identity_plot_has_no_empty_panel).
    rows = [{"step": s, "identity": 0.5, "recognised_rate": 0.4, "diversity": 0.3, "bleed": None} for s in (1, 2)]
    rows[1]["editability"] = 0.25
    with Image.open(plot_identity(rows, tmp_path / "identity.png")) as image:
        assert image.size == (700, 4 * 220)


def test_the_web_app_identity_curve_and_eval_table_show_editability_when_measured(tmp_path):
    from sdlora.serve import plots, runs, studio

    folder = tmp_path / "run"
    folder.mkdir()
    lines = [
        {"step": 1, "loss": 0.5, "lr": 1e-4},
        {"step": 1, "eval": {"identity": 0.4, "recognised_rate": 0.2, "editability": 0.1}},
        {"step": 2, "eval": {"identity": 0.6, "recognised_rate": 0.5, "editability": 0.3}},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tail = runs.Tail()
    tail.update(folder)
    labels = plots.identity(tail.evals, 2).axes[0].get_legend_handles_labels()[1]
    assert labels == ["identity", "recognised_rate", "editability", "best step 2"]
    curve = next(line for line in plots.identity(tail.evals, 2).axes[0].lines if line.get_label() == "editability")
    assert list(curve.get_ydata()) == [0.1, 0.3]
    plain = [
        {"step": e["step"], "eval": {k: v for k, v in e["eval"].items() if k != "editability"}} for e in tail.evals
    ]
    assert "editability" not in plots.identity(plain, 2).axes[0].get_legend_handles_labels()[1]

    found = {"editability": 0.4, "images": 5, "edited": 2, "judge": "clip", "by_edit": {}}
    rows = studio.Evaluation({"identity": 0.6, "bleed": None}, [], "r", "j", threshold=0.6, edits=found).explained()
    keys = [row[0] for row in rows]
    assert keys[keys.index("bleed") + 1] == "editability" and rows[keys.index("editability")][1] == "0.400 (2/5)"
    assert "CLIP" in rows[keys.index("editability")][2]
    assert "editability" not in [row[0] for row in studio.Evaluation({}, [], "r", "j").explained()]
