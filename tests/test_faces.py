"""Face detection, landmarks and identity embeddings on real photos shipped in scikit-image and matplotlib."""

from __future__ import annotations

import numpy
import pytest
from PIL import Image, ImageOps

from sdlora.faces.dlib import DlibFaces, Face, face_distance


@pytest.fixture(scope="module")
def faces() -> DlibFaces:
    return DlibFaces()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        return image.convert("RGB")


def _centre(face: Face) -> tuple[float, float]:
    return (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2


def test_astronaut_has_one_face_where_it_is(faces, astronaut):
    # HOG also proposes two patches on her suit (scores ~0.1 and ~-0.15); the CNN must reject them.
    found = faces.detect(astronaut)
    assert len(found) == 1
    cx, cy = _centre(found[0])
    assert 200 < cx < 240 and 100 < cy < 140  # her face, measured by hand: centre ~(220, 121)
    assert 70 < found[0].width < 130
    assert found[0].score > 0.8
    assert found[0].landmarks.shape == (68, 2) and found[0].landmarks.dtype == numpy.float32
    # Landmark 30 is the nose tip: inside the box, near its centre.
    nose = found[0].landmarks[30]
    assert abs(nose[0] - cx) < 20 and abs(nose[1] - cy) < 25


def test_hog_alone_would_find_false_faces(astronaut):
    """Why the CNN confirms: at the threshold that keeps real faces, HOG also proposes patches of her suit."""
    import dlib

    from sdlora.faces.dlib import HOG_THRESHOLD

    grey = numpy.ascontiguousarray(numpy.asarray(astronaut.convert("L")))
    rects, scores, _ = dlib.get_frontal_face_detector().run(grey, 1, HOG_THRESHOLD)
    assert len(rects) >= 2
    assert sum(rect.top() > 250 for rect in rects) >= 1  # below her face (which ends at y~170): the suit


def test_no_person_no_face(faces):
    from skimage import data

    assert faces.detect(Image.fromarray(data.coffee())) == []
    assert faces.detect(Image.fromarray(data.chelsea())) == []


def test_two_people_largest_first(faces, astronaut, hopper):
    canvas = Image.new("RGB", (1100, 620), (128, 128, 128))
    canvas.paste(hopper.resize((430, 504)), (20, 40))  # Hopper larger than the astronaut
    canvas.paste(astronaut.resize((400, 400)), (660, 100))
    found = faces.detect(canvas)
    assert len(found) == 2
    assert _centre(found[0])[0] < 550 < _centre(found[1])[0]
    assert found[0].width > found[1].width


def test_identity_same_person_close_other_person_far(faces, astronaut, hopper):
    (a,) = faces.detect(astronaut)
    mirrored = ImageOps.mirror(astronaut).resize((400, 400))
    (m,) = faces.detect(mirrored)
    (h,) = faces.detect(hopper)
    ea, em, eh = faces.embed(astronaut, a), faces.embed(mirrored, m), faces.embed(hopper, h)
    assert ea.shape == (128,) and ea.dtype == numpy.float64
    assert face_distance(ea, em) < 0.45
    assert face_distance(ea, eh) > 0.6
    assert face_distance(ea, ea) == 0.0


def test_deterministic(faces, hopper):
    first, second = faces.detect(hopper), faces.detect(hopper)
    assert [f.box for f in first] == [f.box for f in second]
    assert numpy.array_equal(first[0].landmarks, second[0].landmarks)
    assert numpy.array_equal(faces.embed(hopper, first[0]), faces.embed(hopper, second[0]))


def test_grayscale_input_is_accepted(faces, astronaut):
    found = faces.detect(astronaut.convert("L"))
    assert len(found) == 1
