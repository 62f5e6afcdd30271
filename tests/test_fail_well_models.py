"""Issue 17 for models, LoRAs, prompts and eval's table: damaged files found by their header before anything
loads, the messages that misled, and prompts with square brackets."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from typer.testing import CliRunner

from sdlora import models
from sdlora.errors import UsageError
from sdlora.generate import read_prompts
from sdlora.lora.files import parse_lora

runner = CliRunner()


def _safetensors(path, tensors: int = 1, cut: int = 0):
    """A valid .safetensors file with `tensors` float32 tensors of 4 values, its last `cut` bytes missing."""
    header = {f"t{i}": {"dtype": "F32", "shape": [4], "data_offsets": [16 * i, 16 * (i + 1)]} for i in range(tensors)}
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * 16 * tensors
    path.write_bytes(data[: len(data) - cut])
    return path


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "the file is empty (0 bytes)"),
        (b"PK\x03\x04" + b"\0" * 100, "a pickle (PyTorch .ckpt/.bin) renamed .safetensors"),
        (b"\x80\x02}q\x00." + b"\0" * 100, "a pickle"),
        (b"\x12\x34" * 50, "not a .safetensors file, or truncated"),
        (struct.pack("<Q", 19) + b"{not json at all!!}", "its header is not valid JSON"),
        (struct.pack("<Q", 10**6) + b"{}", "not a .safetensors file, or truncated"),
    ],
)
def test_damaged_single_file_base_is_refused_by_its_header(tmp_path, content, words):
    base = tmp_path / "model.safetensors"
    base.write_bytes(content)
    with pytest.raises(UsageError, match="model.safetensors: ") as caught:
        models.check_base(str(base), allow_pickle=False)
    assert words in str(caught.value)


def test_partial_download_is_refused_by_its_header(tmp_path):
    base = _safetensors(tmp_path / "model.safetensors", tensors=3, cut=10)
    with pytest.raises(
        UsageError, match=r"truncated: (\d+) bytes, but its tensors need (\d+) \(a partial download\?\)"
    ):
        models.check_base(str(base), allow_pickle=False)
    models.check_base(str(_safetensors(tmp_path / "whole.safetensors", tensors=3)), allow_pickle=False)


def test_local_folder_with_truncated_weights_gets_no_hub_hint(tiny_sd1, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = runner.invoke(_app(), ["generate", "--base", str(folder), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{weights}: truncated" in result.stderr and "offline" not in result.stderr
    assert "no space" not in models._load_hint(folder, None) and "offline" not in models._load_hint(folder, None)


def test_folder_with_only_pickle_weights_needs_allow_pickle(tiny_sd1, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UsageError, match="vae/ holds only pickle weights"):
        models.check_base(str(folder), allow_pickle=False)
    models.check_base(str(folder), allow_pickle=True)


def test_lora_scale_that_is_not_a_number(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _safetensors(run / "pytorch_lora_weights.safetensors")
    for spec, words in [
        (f"{run}:abc", "the scale 'abc' after ':' is not a number"),
        (f"{run}:nan", "the scale must be a finite number"),
        (f"{run}:inf", "the scale must be a finite number"),
        (f"{tmp_path / 'missing'}", "no such file or folder"),
    ]:
        with pytest.raises(UsageError, match="--lora ") as caught:
            parse_lora(spec)
        assert words in str(caught.value), spec
    assert parse_lora(f"{run}:0.5").scale == 0.5
    odd = tmp_path / "odd:name"  # a ':' that is part of the path
    odd.mkdir()
    _safetensors(odd / "pytorch_lora_weights.safetensors")
    assert parse_lora(str(odd)).scale == 1.0


def test_empty_lora_files_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="empty.safetensors: the file is empty"):
        parse_lora(str(empty))
    none = _safetensors(tmp_path / "none.safetensors", tensors=0)
    with pytest.raises(UsageError, match="holds no tensors"):
        parse_lora(str(none))


def test_prompts_files_that_are_empty_special_or_not_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    comments = tmp_path / "comments.txt"
    comments.write_text("# only a comment\n\n")
    for path, words in [
        (empty, "the file is empty"),
        ("/dev/null", "not a regular file"),
        (tmp_path, "is a folder"),
        (latin, "not UTF-8 text"),
        (comments, "no prompts in it"),
        (tmp_path / "missing.txt", "no such file"),
    ]:
        with pytest.raises(UsageError, match="--prompts ") as caught:
            read_prompts(path)
        assert words in str(caught.value), path


def test_eval_table_keeps_square_brackets(capsys):
    from rich.console import Console

    from sdlora.evaluation.metrics import ImageScore, Summary
    from sdlora.evaluation.report import EvalResult, print_table

    prompts = ["a photo of [sks] person, [smiling:laughing:0.5]", "[/bold] unbalanced [red", "(masterpiece:1.2) [/]"]
    scores = [ImageScore(image=f"{i}.png", prompt=p, faces=0) for i, p in enumerate(prompts)]
    summary = Summary(images=3, images_with_face=0, face_rate=0.0, identity=None, identity_distance=None,
                      recognised_rate=0.0, diversity=None, face_spread=None, memorised_rate=None, bleed=None,
                      other_faces=0, prompt_fidelity=None)  # fmt: skip
    result = EvalResult(face_model="dlib", threshold=0.6, reference=[], reference_faces=0, summary=summary,
                        images=scores, notes=["[bold]not markup[/bold]"])  # fmt: skip
    console = Console(width=300, force_terminal=False)
    print_table(result, console)
    out = capsys.readouterr().out
    for prompt in prompts:
        assert prompt in out
    assert "[bold]not markup[/bold]" in out


def _app():
    from sdlora.cli import app

    return app


def test_single_file_with_a_config_of_another_family_is_one_line(tiny_models, tmp_path, monkeypatch):
    """Issue 28: an SD 1.x file with a Flux.1 model.single_file_config ended in 'this is a bug in sdlora'."""
    from sdlora.cli import app
    from sdlora.testing import write_single_file

    path = write_single_file(tiny_models["sd1"], tmp_path / "sd1.safetensors")
    flux = tiny_models["flux"]
    args = ["generate", "--base", str(path), "--set", f"model.single_file_config='{flux}'", "--prompt", "x"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--size", "64x64", "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert "bug in sdlora" not in result.output and result.stderr.count("\n") == 1, result.stderr
    assert f"{path}: the checkpoint is SD 1.x, but model.single_file_config {flux} is Flux.1" in result.stderr

    def mismatch(*args):  # what diffusers raises when a config's modules don't fit the file's tensors
        raise TypeError("unsupported operand type(s) for -: 'set' and 'list'")

    monkeypatch.setattr(models, "_from_single_file", mismatch)
    with pytest.raises(UsageError, match=f"{path}: does not fit model.single_file_config .*TypeError"):
        models.load_pipeline(str(path), single_file_config=str(tiny_models["sd1"]))
