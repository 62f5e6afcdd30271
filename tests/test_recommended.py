"""The recommended person settings (sdlora.train.recommended): an unset train.pivotal and train.preservation = "auto"
become pivotal tuning with class-image preservation where the base takes new tokens (SD 1.x/2.x/SDXL), output
preservation where it doesn't (Flux.1) or where class images can't be used (a bucketed dataset); a given setting
stays as given, and a resumed run keeps its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_utils import bucketed_set, subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.train.recommended import choose


@pytest.mark.parametrize(
    ("given", "takes_tokens", "names_trigger", "square", "expected"),
    [
        ((None, "auto"), True, True, True, (True, "class_images")),  # SD 1.x/2.x/SDXL: the benchmark's winner
        ((None, "auto"), False, True, True, (False, "output")),  # Flux.1: no new tokens
        ((None, "auto"), True, False, True, (False, "output")),  # no caption names the trigger word
        ((None, "auto"), True, True, False, (True, "output")),  # bucketed: class images are square
        ((False, "auto"), True, True, True, (False, "output")),  # --no-pivotal: class images alone held identity to 4%
        ((True, "auto"), True, True, True, (True, "class_images")),
        ((None, "none"), True, True, True, (True, "none")),
        ((None, "class_images"), False, True, True, (False, "class_images")),  # given: kept, even where not best
        ((False, "none"), True, True, True, (False, "none")),  # the plain LoRA
    ],
)
def test_choose(given, takes_tokens, names_trigger, square, expected):
    assert choose(*given, takes_tokens, names_trigger, square) == expected


def train(data: Path, out: Path, base: Path, *extra: str):
    args = ["train", str(data), str(out), "--base", str(base), "--steps", "2", "--resolution", "64", "--rank", "4"]
    args += ["--lr", "1e-3", "--checkpoint-every", "1", "--sample-every", "0", "--eval-every", "0", "--name", "me"]
    args += ["--num-class-images", "2", "--set", "train.sample_steps=2", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "config.json").read_text())["train"]


def test_unset_on_sd1_is_pivotal_tuning_with_class_images(tiny_sd1, tmp_path):
    output, saved = train(subject_set(tmp_path / "data"), tmp_path / "out", tiny_sd1)
    assert saved["pivotal"] is True and saved["preservation"] == "class_images"
    assert saved["class_prompt"] == "a photo of person"  # stored with the run, as --class-prompt would be
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 2
    assert (tmp_path / "out" / "me_emb.safetensors").is_file()  # the trigger tokens for A1111/ComfyUI
    line = "recommended person settings: pivotal tuning on, class-image preservation (2 class images"
    assert line in output and "--no-pivotal --preservation none trains a plain LoRA" in output


def test_unset_on_flux_is_output_preservation(tiny_models, tmp_path):
    output, saved = train(subject_set(tmp_path / "data"), tmp_path / "out", tiny_models["flux"])
    assert saved["pivotal"] is False and saved["preservation"] == "output" and saved["class_prompt"] is None
    assert not (tmp_path / "out" / "class_images").exists() and not (tmp_path / "out" / "me_emb.safetensors").exists()
    assert "pivotal tuning off (Flux.1 takes no new tokens), output preservation" in output


def test_unset_on_a_bucketed_dataset_is_pivotal_with_output_preservation(tiny_sd1, tmp_path):
    output, saved = train(bucketed_set(tmp_path / "data"), tmp_path / "out", tiny_sd1)
    assert saved["pivotal"] is True and saved["preservation"] == "output"
    assert "output preservation, as the dataset is bucketed and class images are square" in output


def test_given_settings_are_kept_and_a_resume_keeps_the_runs_own(tiny_sd1, tmp_path):
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    output, saved = train(data, out, tiny_sd1, "--no-pivotal", "--preservation", "none")
    assert saved["pivotal"] is False and saved["preservation"] == "none" and "recommended" not in output
    # A resume without the options (the command line an interrupted run prints) goes on as the run began.
    output, saved = train(data, out, tiny_sd1, "--resume", "latest", "--steps", "3")
    assert saved["pivotal"] is False and saved["preservation"] == "none" and "recommended" not in output
    assert not (out / "class_images").exists()
    # A run saved by an earlier version, without the settings: it trained plain, and resumes plain.
    config = json.loads((out / "config.json").read_text())
    for key in ("pivotal", "preservation"):
        del config["train"][key]
    (out / "config.json").write_text(json.dumps(config))
    output, saved = train(data, out, tiny_sd1, "--resume", "latest", "--steps", "4")
    assert saved["pivotal"] is False and saved["preservation"] == "none"
