"""The adapter kinds' table (sdlora.lora.kinds): one row per lora.kind, each telling its own configs, layers and
files apart from the others'."""

from __future__ import annotations

import typing

import pytest
import torch

from sdlora.config import LoraConfig
from sdlora.lora import kinds, kohya


def test_one_row_per_config_kind():
    assert set(kinds.KINDS) == set(typing.get_args(LoraConfig.model_fields["kind"].annotation))
    assert all(name == row.name for name, row in kinds.KINDS.items())


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_each_row_knows_its_own_config_layers_and_files(name):
    row = kinds.KINDS[name]
    config = row.peft_config(4, 4.0, 0.0, ["to_q"])
    assert kinds.config_kind(config) == name
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config, model)
    assert [kinds.layer_kind(m) for m in model.modules() if kinds.layer_kind(m)] == [name]
    keys = {"lora_unet_to_q.alpha"} | {f"lora_unet_to_q{suffix}" for suffix in row.extra_suffixes}
    assert kinds.file_kind(keys) == name
    assert row.diffusers_reads == (name == "lora") == row.fuses
    metadata = kohya.adapter_metadata(name, {"unet": {"r": 4}})
    assert (metadata.get("sdlora.adapter"), metadata.get("ss_network_module")) == (
        (None, None) if name == "lora" else (name, "lycoris.kohya")
    )
