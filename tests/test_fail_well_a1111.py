"""Issue 17, A1111/civitai interop: with `--lora` a train OUT_DIR, the PNG's `<lora:NAME:w>` tag names the kohya
file the user copies into A1111/Forge (its stem, not the folder's name) and `Lora hashes` holds that file's A1111
hash (SHA-256 of the bytes after the safetensors header, first 12 hex digits). Read back with sd-parsers, a real
PNG-metadata reader."""

from __future__ import annotations

import hashlib
import struct

import pytest
from generate_helpers import parse_parameters
from PIL import Image
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app


def a1111_hash(path) -> str:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + length :]).hexdigest()[:12]


@pytest.mark.slow
def test_lora_tag_and_hash_name_the_kohya_file(tiny_sd1, tmp_path):
    data = subject_set(tmp_path / "data")
    out = tmp_path / "run-2026"
    train = ["train", str(data), str(out), "--base", str(tiny_sd1), "--steps", "2", "--resolution", "64",
             "--rank", "4", "--name", "anna_v1", "--sample-every", "0", "--checkpoint-every", "0",
             "--eval-every", "0"]  # fmt: skip
    result = CliRunner().invoke(app, plain(train))
    assert result.exit_code == 0, result.output
    kohya = out / "anna_v1.safetensors"
    assert kohya.is_file()
    images = tmp_path / "images"
    generate = ["generate", "--base", str(tiny_sd1), "--lora", f"{out}:0.7", "--prompt", "a photo of sks person",
                "--n", "1", "--steps", "2", "--size", "64x64", "--out", str(images)]  # fmt: skip
    result = CliRunner().invoke(app, generate)
    assert result.exit_code == 0, result.output
    parameters = Image.open(images / "0000-42.png").text["parameters"]
    prompt, _, settings = parse_parameters(parameters)
    assert prompt == "a photo of sks person <lora:anna_v1:0.7>"
    assert settings["Lora hashes"] == f'"anna_v1: {a1111_hash(kohya)}"'
    assert a1111_hash(kohya) != a1111_hash(out / "pytorch_lora_weights.safetensors")

    import sd_parsers  # a real PNG-metadata reader (the test extra installs it)

    info = sd_parsers.ParserManager().parse(Image.open(images / "0000-42.png"))
    assert info.generator.value == "AUTOMATIC1111"
    assert info.full_prompt == "a photo of sks person <lora:anna_v1:0.7>"
