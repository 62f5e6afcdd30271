"""The identity benchmark's methods grid: combinations of methods (`--combine`) merge their switches and settings."""

from __future__ import annotations

import pytest

from bench.identity import run


def test_combine_merges_switches_and_settings():
    both = run.combine("class_images+timestep_high")
    assert both.name == "class_images+timestep_high" and both.prior and not both.text_encoder
    assert dict(both.options) == {"train.timestep_bias": "high"}
    three = run.combine("masked+prior+text_encoder+pivotal")
    assert three.text_encoder and not three.prior
    assert dict(three.options) == {
        "train.masked_loss": True,
        "train.mask_prior_weight": 1.0,
        "train.pivotal": True,
        "train.pivotal_learning_rate": 3e-3,
    }
    plain = {m.name: m for m in run.METHODS}["plain"]
    assert (both.rank, both.lr) == (plain.rank, plain.lr)  # the plain LoRA's rank and lr, as every method cell


def test_combine_refuses_unknown_and_conflicting_methods(monkeypatch):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run.combine("plain+nope")
    methods = [*run.METHODS, run._method("timestep_low", train__timestep_bias="low")]
    monkeypatch.setattr(run, "METHODS", methods)
    with pytest.raises(ValueError, match="set train.timestep_bias differently"):
        run.combine("timestep_high+timestep_low")
    with pytest.raises(SystemExit):  # the command line says it in one line (argparse's error), before any work
        run.main(["--grid", "methods", "--combine", "plain+nope", "--base", "/nonexistent"])
