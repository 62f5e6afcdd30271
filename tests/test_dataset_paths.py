"""A dataset's paths stay inside its folder (prep.manifest.confined), for train's and eval's readers alike."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdlora.errors import UsageError
from sdlora.evaluation.run import load_reference
from sdlora.prep.manifest import confined
from sdlora.train.data import load_examples


def test_a_path_inside_is_returned(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "sub" / "a.png")  # a symlink within the folder is fine
    assert confined(tmp_path, "sub/a.png") == tmp_path / "sub" / "a.png"
    assert confined(tmp_path, "link.png") == tmp_path / "link.png"


@pytest.mark.parametrize("entry", ["/etc/passwd", "../secret.png", "sub/../../secret.png"])
def test_absolute_and_dotdot_are_refused(tmp_path, entry):
    with pytest.raises(UsageError, match="must be a path inside the dataset folder"):
        confined(tmp_path, entry)


def test_a_symlink_leading_out_is_refused_naming_the_manifest_entry(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "0000.png").symlink_to(outside)
    with pytest.raises(UsageError, match=r"data/0000.png: leads outside the dataset folder"):
        confined(dataset, "0000.png")
    (dataset / "manifest.jsonl").write_text("")
    with pytest.raises(UsageError, match=r"manifest.jsonl: entry '0000.png': leads outside"):
        confined(dataset, "0000.png")


def _manifest_line(image: str) -> str:
    entry = {
        "image": image,
        "caption": "a photo of sks person",
        "source": "photo.png",
        "source_sha256": "0" * 64,
        "source_size": [64, 64],
        "crop_box": [0, 0, 64, 64],
        "face_box": None,
        "sharpness": 1.0,
        "width": 64,
        "height": 64,
    }
    return json.dumps(entry) + "\n"


def test_train_and_eval_refuse_a_manifest_image_that_leads_out(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.png")
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "0000.png").symlink_to(tmp_path / "outside.png")
    (dataset / "manifest.jsonl").write_text(_manifest_line("0000.png"))
    with pytest.raises(UsageError, match="leads outside the dataset folder"):
        load_examples(dataset, "a photo")
    with pytest.raises(UsageError, match="leads outside the dataset folder"):
        load_reference(dataset)
