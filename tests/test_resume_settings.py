"""A resume compares the run's settings with the saved ones; a setting an earlier version did not write is what
that version did (its default, or for the recommended person settings the plain LoRA), so adding a setting never
locks old runs out of --resume, and an old run resumed today trains on as it began."""

import json

import pytest

from sdlora.config import Config
from sdlora.errors import UsageError
from sdlora.train import checkpoint


def _settled(**train) -> dict:
    """A run's settings as the pre-flight settles them (sdlora.train.recommended)."""
    config = Config().model_dump(mode="json")
    config["train"].update({"pivotal": True, "preservation": "class_images", "class_prompt": "a photo of person"})
    config["train"].update(train)
    return config


def _saved_run(tmp_path, drop: str | None = None, **train):
    stored = _settled(**train)
    if drop:
        stored["train"].pop(drop)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(stored))
    return tmp_path


def test_a_setting_missing_from_an_older_run_counts_as_its_default(tmp_path):
    out = _saved_run(tmp_path, drop="timestep_bias")
    checkpoint.check_out_dir(out, _settled(), resume="latest", overwrite=False)
    with pytest.raises(UsageError, match=r"train\.timestep_bias"):
        checkpoint.check_out_dir(out, _settled(timestep_bias="high"), resume="latest", overwrite=False)


def test_a_recommended_setting_missing_from_an_older_run_counts_as_the_plain_lora(tmp_path):
    """Runs saved before pivotal tuning and preservation existed trained without them, whatever today's defaults."""
    for key, earlier, today in (("pivotal", False, True), ("preservation", "none", "class_images")):
        out = _saved_run(tmp_path / key, drop=key, **{"pivotal": False, "preservation": "none", "class_prompt": None})
        plain = _settled(pivotal=False, preservation="none", class_prompt=None)
        checkpoint.check_out_dir(out, plain, resume="latest", overwrite=False)
        with pytest.raises(UsageError, match=rf"train\.{key}"):
            checkpoint.check_out_dir(out, {**plain, "train": {**plain["train"], key: today}}, "latest", False)
        assert earlier != today


def test_a_setting_missing_from_an_older_run_still_differs_from_a_non_default(tmp_path):
    out = _saved_run(tmp_path, drop="preservation")
    with pytest.raises(UsageError, match=r"train\.preservation"):
        checkpoint.check_out_dir(out, _settled(preservation="output"), resume="latest", overwrite=False)


def test_a_changed_setting_is_refused(tmp_path):
    out = _saved_run(tmp_path)
    config = _settled()
    config["lora"]["rank"] = 4
    with pytest.raises(UsageError, match=r"lora\.rank"):
        checkpoint.check_out_dir(out, config, resume="latest", overwrite=False)


def test_a_saved_config_that_is_not_a_table_is_one_usage_error(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"config\.json: unreadable \(not a table of settings\); pass --overwrite"):
        checkpoint.check_out_dir(tmp_path, _settled(), resume="latest", overwrite=False)


def test_lokr_factor_is_part_of_the_run(tmp_path):
    """lora.lokr_factor sets the factors' shapes: a resume may not change it; a run saved before the setting
    existed trained at peft's default factorisation (-1)."""
    older = _settled()
    older["lora"].pop("lokr_factor")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(older))
    checkpoint.check_out_dir(tmp_path / "old", _settled(), resume="latest", overwrite=False)
    lokr = _settled()
    lokr["lora"].update(kind="lokr", lokr_factor=4)
    (tmp_path / "lokr").mkdir()
    (tmp_path / "lokr" / "config.json").write_text(json.dumps(lokr))
    with pytest.raises(UsageError, match=r"lora\.lokr_factor"):
        checkpoint.check_out_dir(
            tmp_path / "lokr", {**lokr, "lora": {**lokr["lora"], "lokr_factor": 8}}, "latest", False
        )
