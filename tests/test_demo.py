"""`sdlora demo` end to end on the CPU: the README's first command must keep working."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.demo.photos import demo_photos

runner = CliRunner()


def test_demo_photo_set_is_deterministic_and_upright():
    first, second = demo_photos(), demo_photos()
    assert first == second
    import io

    from PIL import ImageOps

    stored = Image.open(io.BytesIO(first["IMG_0004.jpg"]))
    upright = ImageOps.exif_transpose(stored)
    assert stored.size == (520, 792) and upright.size == (792, 520)  # stored sideways, shown landscape


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(out), "--steps", "4"])
    assert result.exit_code == 0, result.output
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in result.output
    assert "noise" in result.output  # says honestly that tiny random weights draw noise

    report = json.loads((out / "dataset" / "report.json").read_text())
    reasons = {entry["file"].split("/")[-1]: entry.get("reason") for entry in report["files"]}
    assert reasons["IMG_0010.jpg"] == "no_face"
    assert reasons["IMG_0008.jpg"] == "duplicate" or reasons["IMG_0001.jpg"] == "duplicate"
    kept = (out / "dataset" / "manifest.jsonl").read_text().splitlines()
    assert len(kept) >= 5
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora" / "lora.safetensors").is_file()
    pngs = sorted(p.name for p in (out / "images").glob("0*.png"))
    assert len(pngs) == 4  # 2 prompts x n=2
    summary = json.loads((out / "eval.json").read_text())
    assert "face_rate" in json.dumps(summary)
    assert (out / "eval-report" / "index.html").is_file()


def test_demo_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["demo", str(tmp_path)])
    assert result.exit_code == 2
    assert "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
