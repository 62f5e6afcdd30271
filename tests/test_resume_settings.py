"""A resume compares the run's settings with the saved ones; a setting an earlier version did not write is its
default (that version's behaviour), so adding a setting never locks old runs out of --resume."""

import json

import pytest

from sdlora.config import Config
from sdlora.errors import UsageError
from sdlora.train import checkpoint


def _saved_run(tmp_path, drop: str | None = None):
    stored = Config().model_dump(mode="json")
    if drop:
        stored["train"].pop(drop)
    (tmp_path / "config.json").write_text(json.dumps(stored))
    return tmp_path


def test_a_setting_missing_from_an_older_run_counts_as_its_default(tmp_path):
    out = _saved_run(tmp_path, drop="preservation")
    checkpoint.check_out_dir(out, Config().model_dump(mode="json"), resume="latest", overwrite=False)


def test_a_setting_missing_from_an_older_run_still_differs_from_a_non_default(tmp_path):
    out = _saved_run(tmp_path, drop="preservation")
    config = Config().model_dump(mode="json")
    config["train"]["preservation"] = "output"
    with pytest.raises(UsageError, match=r"train\.preservation"):
        checkpoint.check_out_dir(out, config, resume="latest", overwrite=False)


def test_a_changed_setting_is_refused(tmp_path):
    out = _saved_run(tmp_path)
    config = Config().model_dump(mode="json")
    config["lora"]["rank"] = 4
    with pytest.raises(UsageError, match=r"lora\.rank"):
        checkpoint.check_out_dir(out, config, resume="latest", overwrite=False)
