"""Config: precedence, unknown keys with suggestions, cross-field checks, examples, saving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdlora import config
from sdlora.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_defaults_are_valid():
    cfg = config.load()
    assert cfg.train.steps == 800 and cfg.lora.rank == 16 and cfg.prep.token == "sks"


def test_precedence_defaults_toml_options_set(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nsteps = 10\nseed = 3\nlearning_rate = 2e-4\n")
    cfg = config.load(toml, {"train.steps": 20, "train.seed": None}, ["train.learning_rate=5e-4"])
    assert cfg.train.steps == 20  # option beats TOML
    assert cfg.train.seed == 3  # None means "option not given": TOML stays
    assert cfg.train.learning_rate == 5e-4  # --set beats both
    assert cfg.train.batch_size == 1  # default


def test_unknown_key_names_closest(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlerning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'train.lerning_rate'; did you mean 'train.learning_rate'"):
        config.load(toml)


def test_unknown_section_and_bad_set():
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        config.load(sets=["trian.steps=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(sets=["steps"])


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.resolution=500"], "divisible by 8"),
        (["prep.resolution=100"], "divisible by 8"),
        (["lora.rank=0"], "lora.rank"),
        (["train.learning_rate=-1"], "train.learning_rate"),
        (["generate.size='500x512'"], "multiple of 8"),
        (["train.class_prompt='a person'", "train.class_dir='x'"], "choose one"),
    ],
)
def test_cross_field_rules(sets, message):
    with pytest.raises(ConfigError, match=message):
        config.load(sets=sets)


def test_frozen():
    cfg = config.load()
    with pytest.raises(ValidationError):
        cfg.train.steps = 5  # type: ignore[misc]


def test_save_roundtrip(tmp_path):
    cfg = config.load(sets=["train.steps=7", "generate.prompts=['a', 'b']"])
    config.save(cfg, tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["train"]["steps"] == 7 and data["generate"]["prompts"] == ["a", "b"]
    assert config.Config.model_validate(data) == cfg


def test_given_only_settings_are_left_out_unless_set(tmp_path):
    """A run's files keep a family's defaultable settings (Z-Image's train.timestep_shift) only where given, so the
    family's own value applies again when config.toml is read back at a resume (it stored the config's 3.1582, and
    a resume with --config trained on with that instead of Z-Image's 6)."""
    given_only = ["generate", "train.timestep_shift"]
    unset = config.load(sets=["train.steps=7"])
    text = config.to_toml(unset, given_only=given_only)
    assert "timestep_shift" not in text and "steps = 7" in text
    back = config.Config.model_validate(config.tomllib.loads(text))
    assert "timestep_shift" not in back.train.model_fields_set
    given = config.load(sets=["train.timestep_shift=4.0"])
    config.save(given, tmp_path / "config.json", given_only=given_only)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["timestep_shift"] == 4.0


def test_invalid_toml_names_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        config.load(bad)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    config.load(path)


def test_examples_exist():
    names = {p.name for p in EXAMPLES.iterdir()}
    assert {"person_sd15.toml", "person_sdxl.toml"} <= names
    prompts = [line for line in (EXAMPLES / "prompts.txt").read_text().splitlines() if line.strip()]
    assert prompts and all("{trigger}" in p for p in prompts if not p.startswith("#"))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_list_every_setting(path):
    text = path.read_text()
    for section, field in config.Config.model_fields.items():
        assert f"[{section}]" in text
        for name in field.annotation.model_fields:
            assert re.search(rf"^#? ?{name} =", text, re.M), f"{path.name} lacks {section}.{name}"
