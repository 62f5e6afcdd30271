"""Identity metrics on real photos: same vs different people, faceless images, bleed, JSON, report, plot, best step."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from PIL import Image, ImageOps

from sdlora.errors import UsageError
from sdlora.evaluation import metrics
from sdlora.evaluation.checkpoints import pick_best, plot_identity
from sdlora.evaluation.report import EvalResult, render_html, write_report
from sdlora.faces.backends import DlibBackend
from tests import eval_photos as photos


@pytest.fixture(scope="module")
def backend() -> DlibBackend:
    return DlibBackend()


@pytest.fixture(scope="module")
def reference(backend) -> metrics.Reference:
    images = [photos.astronaut(), photos.coffee()]  # the coffee cup has no face: noted, not fatal
    return metrics.build_reference(images, ["astronaut.png", "coffee.png"], backend)


@pytest.fixture(scope="module")
def scored(backend, reference):
    same = photos.same_person_variants()
    others = {"hopper": photos.grace_hopper(), "lfw1": photos.lfw_face(1), "lfw2": photos.lfw_face(2)}
    faceless = {"coffee": photos.coffee(), "blank": Image.new("RGB", (96, 96), (120, 120, 120))}
    named = {**same, **others, **faceless}
    scores, summary = metrics.score_images(
        list(named.values()), list(named), reference, backend, 0.6, prompts=[f"p {k}" for k in named]
    )
    return {s.image: s for s in scores}, summary, list(named.values())


def test_reference_keeps_faces_and_notes_faceless(reference):
    assert len(reference.embeddings) == 1 and reference.embeddings[0].shape == (128,)
    assert reference.faceless == ["coffee.png"]
    assert len(reference.hashes) == 2


def test_same_person_is_recognised_and_strangers_are_not(scored):
    by_name, summary, _ = scored
    for name in ("crop", "flip", "grey", "warm"):
        assert by_name[name].recognised, (name, by_name[name].distance)
        assert by_name[name].distance < 0.3 and by_name[name].similarity > 0.7
    for name in ("hopper", "lfw1", "lfw2"):
        assert not by_name[name].recognised, (name, by_name[name].distance)
        assert by_name[name].distance > 0.6 and by_name[name].similarity < 0.5
    # The worst same-person score is still better than the best stranger.
    assert max(by_name[n].distance for n in ("crop", "flip", "grey", "warm")) < min(
        by_name[n].distance for n in ("hopper", "lfw1", "lfw2")
    )
    assert summary.recognised_rate == pytest.approx(4 / 9)


def test_images_without_faces_are_counted(scored):
    by_name, summary, _ = scored
    for name in ("coffee", "blank"):
        assert by_name[name].faces == 0 and by_name[name].distance is None and not by_name[name].recognised
    assert summary.images == 9 and summary.images_with_face == 7
    assert summary.face_rate == pytest.approx(7 / 9)
    sims = [s.similarity for s in by_name.values() if s.similarity is not None]
    assert summary.identity == pytest.approx(sum(sims) / 7)
    assert summary.bleed is None and summary.other_faces == 0  # no image had a second face


def test_diversity_spread_and_copies(scored, backend, reference):
    _, summary, images = scored
    assert 0.2 < summary.diversity < 0.7  # different photos
    assert summary.face_spread > 0.2
    # The "warm" variant and the reference astronaut hash alike: a near-copy of a reference photo.
    assert summary.memorised_rate > 0
    copies = [photos.astronaut()] * 3
    _, same = metrics.score_images(copies, ["a", "b", "c"], reference, backend, 0.6)
    assert same.diversity == 0.0 and same.face_spread == 0.0 and same.memorised_rate == 1.0


def test_bleed_of_two_face_composites(backend, reference):
    astro = photos.astronaut()
    subject = astro.crop((30, 0, 230, 200))
    with_stranger = photos.composite(subject, photos.grace_hopper())
    with_copy = photos.composite(subject, ImageOps.mirror(astro).crop((26, 0, 226, 200)))
    scores, summary = metrics.score_images([with_stranger, with_copy], ["stranger", "copy"], reference, backend, 0.6)
    stranger, copy = scores
    assert stranger.faces == 2 and stranger.other_faces == 1 and stranger.other_matches == 0
    assert stranger.subject_box[0] < 200  # the subject face is the one on the left, not the larger stranger
    assert copy.faces == 2 and copy.other_faces == 1 and copy.other_matches == 1
    # One of the two other faces carries the subject's identity.
    assert summary.bleed == 0.5 and summary.other_faces == 2
    _, alone = metrics.score_images([with_stranger], ["stranger"], reference, backend, 0.6)
    assert alone.bleed == 0.0


def test_similarity_scale():
    assert metrics.similarity(0.6, 0.6) == 0.5
    assert metrics.similarity(0.0, 0.6) == 1.0
    assert metrics.similarity(2.0, 0.6) == 0.0


def _result(scored) -> EvalResult:
    by_name, summary, _ = scored
    return EvalResult(
        face_model="dlib",
        threshold=0.6,
        reference=["astronaut.png", "coffee.png"],
        reference_faces=1,
        summary=summary,
        images=list(by_name.values()),
        notes=["a note <with> markup"],
    )


SUMMARY_KEYS = {
    "images",
    "images_with_face",
    "face_rate",
    "identity",
    "identity_distance",
    "recognised_rate",
    "diversity",
    "face_spread",
    "memorised_rate",
    "bleed",
    "other_faces",
    "prompt_fidelity",
}
IMAGE_KEYS = {
    "image",
    "prompt",
    "seed",
    "faces",
    "subject_box",
    "distance",
    "similarity",
    "recognised",
    "other_faces",
    "other_matches",
    "reference_hash_distance",
    "prompt_fidelity",
}


def test_json_schema(scored):
    data = json.loads(_result(scored).to_json())
    assert data["schema"] == "sdlora.eval/1"
    assert set(data) == {
        "schema",
        "face_model",
        "threshold",
        "reference",
        "reference_faces",
        "lora",
        "trigger",
        "summary",
        "images",
        "notes",
    }
    assert set(data["summary"]) == SUMMARY_KEYS
    assert len(data["images"]) == 9 and all(set(image) == IMAGE_KEYS for image in data["images"])
    assert data["summary"]["face_rate"] == pytest.approx(7 / 9)
    assert EvalResult.model_validate(data).summary.images == 9  # round-trips through the schema


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_report_renders(scored, tmp_path):
    _, _, images = scored
    result = _result(scored)
    references = [photos.astronaut(), photos.coffee()]
    index = write_report(result, images, references, tmp_path / "report")
    parser = _Images()
    parser.feed(index.read_text(encoding="utf-8"))
    assert len(parser.srcs) == 9 + 2
    for src in parser.srcs:
        assert (index.parent / src).is_file(), src
        Image.open(index.parent / src).verify()
    text = " ".join(parser.text)
    assert "a note <with> markup" in text  # escaped in the HTML, intact once parsed
    assert f"{result.summary.face_rate:.3f}" in text and "p hopper" in text
    assert json.loads((index.parent / "result.json").read_text())["summary"]["images"] == 9
    assert not list(tmp_path.glob(".report*"))  # no temporary folder left behind
    # A second run replaces the report; a folder that is not a report is never overwritten.
    write_report(result.model_copy(update={"images": result.images[:1]}), images[:1], references, tmp_path / "report")
    assert len(list((tmp_path / "report" / "images").iterdir())) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="not an sdlora report"):
        write_report(result, images, references, tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


def test_render_html_escapes_prompts(scored):
    result = _result(scored)
    result.images[0].prompt = '<script>alert("x")</script>'
    page = render_html(result, [f"images/{i:03d}.png" for i in range(9)], [])
    assert "<script>" not in page and "&lt;script&gt;" in page


ROWS = [
    {"step": 100, "identity": 0.55, "recognised_rate": 0.5, "diversity": 0.35, "bleed": 0.0},
    {"step": 200, "identity": 0.70, "recognised_rate": 0.8, "diversity": 0.30, "bleed": 0.1},
    # Burnt: the best identity, but every image is the same picture.
    {"step": 300, "identity": 0.85, "recognised_rate": 1.0, "diversity": 0.04, "bleed": 0.0},
]


def test_pick_best_skips_a_burnt_checkpoint():
    step, why = pick_best(ROWS, min_diversity=0.1, max_bleed=1.0)
    assert step == 200
    assert "step 200" in why and "300" in why and "failed the floors" in why
    assert pick_best(ROWS, min_diversity=0.0, max_bleed=1.0)[0] == 300  # floors off: best identity wins


def test_pick_best_bleed_floor_and_fallbacks():
    assert pick_best(ROWS, min_diversity=0.1, max_bleed=0.05)[0] == 100
    step, why = pick_best(ROWS, min_diversity=0.9, max_bleed=1.0)
    assert step == 300 and "no step met" in why
    tie = [dict(ROWS[0], step=400, recognised_rate=0.9), ROWS[0]]
    assert pick_best(tie, 0.0, 1.0)[0] == 400  # same identity: higher recognised_rate wins
    faceless = [{"step": 50, "identity": None}, {"step": 150, "identity": None}]
    step, why = pick_best(faceless, 0.1, 1.0)
    assert step == 150 and "no faces" in why


def test_pick_best_ranks_recognised_rate_first_with_a_one_standard_error_band():
    def row(step: int, identity: float, recognised: int, images: int | None = 64) -> dict:
        return {"step": step, "identity": identity, "recognised_rate": recognised / 64, "images": images}

    # Identity saturates while recognition still climbs (the benchmark's pivotal + class images, subject 0): the
    # old rule, best identity first, kept step 800 (47 of 64 recognised) over 1500 (57 of 64), 4 SE apart.
    saturated = [row(400, 0.964, 40), row(800, 0.997, 47), row(1500, 0.989, 57)]
    step, why = pick_best(saturated, 0.0, 1.0)
    assert step == 1500 and "recognised rate first" in why and "89% ± 4%" in why
    # Within one SE of the best rate (35 vs 37 of 64: 2 images, SE 3.96) identity decides ...
    close = [row(100, 0.9, 35), row(200, 0.7, 37)]
    assert pick_best(close, 0.0, 1.0)[0] == 100
    assert pick_best([row(100, 0.9, 32), row(200, 0.7, 37)], 0.0, 1.0)[0] == 200  # 5 images: beyond it
    # ... without the image count there is no band; with nothing recognised, identity alone decides.
    assert pick_best([dict(r, images=None) for r in close], 0.0, 1.0)[0] == 200
    assert pick_best([row(100, 0.5, 0), row(200, 0.6, 0), row(300, 0.55, 0)], 0.0, 1.0)[0] == 200


def test_pick_best_moves_only_to_the_newest_step_and_stays_in_the_band():
    """What sdlora train relies on: over any prefix of the rows the choice is the previous one or the newest step
    (best/ holds only the kept step's files), and it is always within one SE of the best recognised rate."""
    import random

    rng = random.Random(7)
    for _ in range(300):
        images = rng.choice([10, 40, 64])
        rows = [
            {
                "step": 100 * (i + 1),
                "identity": None if rng.random() < 0.1 else rng.random(),  # None: no face at that step
                "recognised_rate": rng.randint(0, images) / images,
                "images": images,
                "diversity": rng.choice([0.05, 0.3, 0.4]),
                "bleed": rng.choice([None, 0.0, 0.2]),
            }
            for i in range(rng.randint(1, 8))
        ]
        chosen = None
        for end in range(1, len(rows) + 1):
            step = pick_best(rows[:end], 0.1, 0.1)[0]
            assert chosen is None or step in (chosen, rows[end - 1]["step"]), rows[:end]
            chosen = step
        pool = [r for r in rows if r["identity"] is not None and (r["diversity"] >= 0.1 and (r["bleed"] or 0) <= 0.1)]
        pool = pool or [r for r in rows if r["identity"] is not None]
        if pool:
            top = max(r["recognised_rate"] for r in pool)
            kept = next(r for r in rows if r["step"] == chosen)
            assert kept in pool and top - kept["recognised_rate"] <= (top * (1 - top) / images) ** 0.5 + 1e-12


def test_plot_identity_writes_png(tmp_path):
    rows = ROWS + [{"step": 400, "identity": None, "recognised_rate": 0.0, "diversity": 0.2, "bleed": None}]
    path = plot_identity(rows, tmp_path / "identity.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 400
    assert [p.name for p in tmp_path.iterdir()] == ["identity.png"]


class _FakeBackend:
    """Any object with faces/distance/threshold/name is a backend: faces are read from a dict per image."""

    name = "fake"
    threshold = 0.5

    def __init__(self, faces_by_image):
        self._faces = faces_by_image

    def faces(self, image):
        return self._faces[id(image)]

    def distance(self, a, b):
        return float(abs(a - b).sum())


def test_definitions_with_a_fake_backend():
    import numpy

    from sdlora.faces.backends import FoundFace

    def face(x, value):
        return FoundFace(box=(x, 0, x + 10, 10), embedding=numpy.array([value]))

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    faces = {
        id(images[0]): [face(0, 5.0), face(20, 0.1)],  # a larger stranger, then the subject
        id(images[1]): [face(0, 0.2), face(20, 0.25), face(40, 3.0)],  # subject, a copy of them, a stranger
        id(images[2]): [],
    }
    backend = _FakeBackend(faces)
    reference = metrics.Reference(embeddings=[numpy.array([0.0]), numpy.array([0.2])])
    scores, summary = metrics.score_images(images, ["a", "b", "c"], reference, backend, backend.threshold)
    first, second, third = scores
    assert first.subject_box == (20, 0, 30, 10) and first.distance == pytest.approx(0.1)  # median of 0.1, 0.1
    assert first.other_faces == 1 and first.other_matches == 0
    assert second.distance == pytest.approx(0.1) and second.other_faces == 2 and second.other_matches == 1
    assert third.faces == 0
    assert summary.bleed == pytest.approx(1 / 3) and summary.other_faces == 3
    assert summary.face_rate == pytest.approx(2 / 3) and summary.recognised_rate == pytest.approx(2 / 3)
    assert summary.identity == pytest.approx(metrics.similarity(0.1, 0.5)) == pytest.approx(0.9)
    assert summary.face_spread == pytest.approx(0.1)  # |0.1 - 0.2|: the two subject faces
