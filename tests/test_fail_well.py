"""Issue 17: every failure is one clear line. The CLI's error boundary, out-of-range and non-finite settings,
allow_pickle only from the command line, and the messages that used to mislead."""

from __future__ import annotations

import errno
import json

import pytest
from typer.testing import CliRunner

from sdlora import config as config_module
from sdlora.cli import app
from sdlora.errors import ConfigError, Interrupted, printable

runner = CliRunner()


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def fail_with(monkeypatch, exc: BaseException):
    def boom(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr(config_module, "to_toml", boom)
    return runner.invoke(app, ["config"])


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.png"), "/data/out/x.png: no space left"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "/ro/out: the file system is read-only"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
        (OSError(errno.EBUSY, "Device or resource busy", "/out"), "/out: device or resource busy"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/out"), "/f/out: a part of the path is a file"),
        (MemoryError(), "out of memory (RAM)"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text (byte 0xff"),
        (json.JSONDecodeError("Expecting value", "x", 0), "not valid JSON (Expecting value at line 1)"),
    ],
)
def test_os_decode_and_memory_errors_are_one_line(monkeypatch, exc, words):
    line = one_error_line(fail_with(monkeypatch, exc), 1)
    assert words in line and ";" in line  # what happened; what to do


def test_library_errors_are_one_line(monkeypatch, tmp_path):
    from PIL import Image, UnidentifiedImageError
    from safetensors import SafetensorError

    line = one_error_line(fail_with(monkeypatch, SafetensorError("Error while deserializing header")), 1)
    assert "not a valid .safetensors file" in line and "download or copy it again" in line
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    try:
        Image.open(bad)
    except UnidentifiedImageError as exc:
        line = one_error_line(fail_with(monkeypatch, exc), 1)
    assert str(bad) in line and "not an image" in line


def test_a_full_disk_inside_pillow_is_not_a_damaged_image(monkeypatch, tmp_path):
    from PIL import Image

    class Full:
        name = str(tmp_path / "grid.png")

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    def save(*_args, **_kwargs):
        Image.new("RGB", (8, 8)).save(Full(), format="PNG")

    monkeypatch.setattr(config_module, "to_toml", save)
    line = one_error_line(runner.invoke(app, ["config"]), 1)
    assert "no space left on the device" in line


def test_unexpected_errors_are_one_line_and_traceback_with_debug(monkeypatch):
    line = one_error_line(fail_with(monkeypatch, TypeError("boom")), 1)
    assert "unexpected TypeError: boom" in line and "bug" in line
    result = runner.invoke(app, ["--debug", "config"])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_an_interrupt_is_not_printed_as_an_error(monkeypatch):
    result = fail_with(monkeypatch, Interrupted("stopped after step 10; checkpoint saved. Resume with: x", 2))
    assert result.exit_code == 130
    assert result.stderr.strip() == "stopped after step 10; checkpoint saved. Resume with: x"


def test_usage_error_keeps_exit_2(monkeypatch):
    assert one_error_line(fail_with(monkeypatch, ConfigError("x: bad")), 2) == "error: x: bad"


@pytest.mark.parametrize(
    "sets",
    [
        ["train.learning_rate=inf"],
        ["train.learning_rate=nan"],
        ["generate.cfg=nan"],
        ["lora.alpha=inf"],
        ["eval.threshold=inf"],
        ["train.resolution=100000"],
        ["prep.resolution=65536"],
        ["train.seed=-1"],
        ["generate.seed=1180591620717411303424"],
        ["generate.steps=1000000"],
        ["generate.size='99992x64'"],
        ["prep.workers=100000"],
        ["prep.duplicate_distance=65"],
        ["generate.n=1000000000"],
        ["lora.rank=100000"],
    ],
)
def test_out_of_range_and_non_finite_numbers_are_refused(sets):
    args = ["config"] + [part for item in sets for part in ("--set", item)]
    line = one_error_line(runner.invoke(app, args), 2)
    assert sets[0].split("=")[0] in line


def test_lr_inf_on_the_command_line_is_refused(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path), str(tmp_path / "out"), "--lr", "inf"])
    assert "train.learning_rate" in one_error_line(result, 2)


def test_allow_pickle_only_from_the_command_line(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nallow_pickle = true\n")
    line = one_error_line(runner.invoke(app, ["config", "--config", str(toml)]), 2)
    assert "c.toml: model.allow_pickle may only be given on the command line" in line
    line = one_error_line(runner.invoke(app, ["config", "--set", "model.allow_pickle=true"]), 2)
    assert "--set model.allow_pickle=true" in line
    toml.write_text("[model]\nallow_pickle = false\n")  # saying no is fine (the examples do)
    assert runner.invoke(app, ["config", "--config", str(toml)]).exit_code == 0
    allowed = config_module.load(None, {"model.allow_pickle": True})
    assert allowed.model.allow_pickle
    # What a run writes for --config to read back never allows pickles by itself.
    assert "allow_pickle = false" in config_module.to_toml(allowed)


def test_printable_escapes_undecodable_bytes_and_control_characters():
    assert printable("IMG_\udcff\x07\u202e.jpg") == "IMG_\\xff\\x07\\u202e.jpg"
    assert printable("Äpfel 照片 👩‍👩‍👧.jpg") == "Äpfel 照片 👩‍👩‍👧.jpg"
    printable("x\udcff").encode("utf-8")  # never raises


def test_config_file_not_utf8(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_bytes(b"[train]\nname = '\xff'\n")
    assert "c.toml" in one_error_line(runner.invoke(app, ["config", "--config", str(toml)]), 2)


def test_train_refuses_a_damaged_dataset_image_and_a_read_only_out_dir_before_loading(tmp_path, monkeypatch):
    """train's pre-flight reads every dataset image's header and checks OUT_DIR before any model loads."""
    import os

    from train_utils import subject_set

    data = subject_set(tmp_path / "data")
    (data / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and a torn body
    monkeypatch.setattr("sdlora.models.load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    args = ["train", str(data), str(tmp_path / "out"), "--base", str(base)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "img1.png" in result.output and "not a usable image" in result.output
    (data / "img1.png").unlink()
    (data / "img1.txt").unlink()
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a file in the path instead
            (tmp_path / "plain").write_text("x")
            out, expect = tmp_path / "plain" / "out", "not a folder"
        else:
            out, expect = locked / "out", "no permission"
        result = runner.invoke(app, ["train", str(data), str(out), "--base", str(base)])
        assert result.exit_code == 2 and expect in result.output and "OUT_DIR" in result.output, result.output
    finally:
        os.chmod(locked, 0o700)
