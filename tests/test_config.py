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
