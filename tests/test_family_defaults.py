"""Each family folder records the person defaults sdlora trains it with, and the measurement that chose them, in its
DEFAULTS.md; the table there must say what `sdlora train` does when the user sets none of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdlora.config import load
from sdlora.families import REGISTRY
from sdlora.train import recommended

FOLDERS = Path(__file__).resolve().parents[1] / "sdlora" / "families"
ROW = re.compile(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]+)` \|", re.MULTILINE)


def recorded(name: str) -> dict[str, str]:
    """{dotted setting: value} of the table in the DEFAULTS.md of the family's folder (sd1 and sd2 share sd/)."""
    folder = type(REGISTRY[name]).__module__.split(".")[2]
    text = (FOLDERS / folder / "DEFAULTS.md").read_text(encoding="utf-8")
    return dict(ROW.findall(text))


def behaviour(name: str) -> dict[str, str]:
    """What an unset setting becomes for a person run of this family (captions naming the trigger, square crops):
    the pre-flight's recommendation for pivotal tuning and preservation, the config's defaults for the rest."""
    family, config = REGISTRY[name], load(None)
    takes_tokens = bool(family.embedding_keys)
    pivotal, preservation = recommended.choose(None, "auto", takes_tokens, names_trigger=True, square=True)
    kind = config.lora.kind
    assert family.adapter_kinds is None or kind in family.adapter_kinds
    return {
        "train.pivotal": str(pivotal).lower(),
        "train.preservation": preservation,
        "lora.kind": kind,
        "lora.rank": str(config.lora.rank),
        "train.timestep_sampling": config.train.timestep_sampling,
        "train.learning_rate": f"{config.train.learning_rate:g}",
    }


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_family_folder_records_the_defaults_it_trains_with(name):
    table = recorded(name)
    assert set(table) == set(behaviour(name)), f"{name}/DEFAULTS.md: its table names other settings"
    assert table == behaviour(name)
