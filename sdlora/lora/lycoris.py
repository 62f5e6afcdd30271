"""Reading kohya/LyCORIS DoRA and LoKr files of ours back (what ComfyUI and A1111 read): a kohya file -> peft
adapters on a loaded pipeline. Each kind's keys, writer and reader are its row of sdlora.lora.kinds."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError
from sdlora.lora.kinds import KINDS, file_kind

if TYPE_CHECKING:
    import torch

    from sdlora.families import Family


def group_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Kohya keys `NAME.suffix` -> {NAME: {suffix: tensor}} (kohya module names hold no dots)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def adapter_config(kind: str, settings: Mapping[str, Any], paths: list[str]) -> Any:
    """A peft config for `kind` from stored settings (a peft config's to_dict), targeting exactly `paths`."""
    # One regular expression: peft matches a string target against whole module paths.
    target = "|".join(f"^{re.escape(path)}$" for path in paths)
    load_config = KINDS[kind].load_config
    assert load_config is not None, kind  # plain LoRA files load through diffusers
    return load_config(settings, target)


def load_kohya(pipe: Any, family: Family, path: Any, adapter_name: str) -> None:
    """A kohya-format DoRA or LoKr file of ours -> peft adapters called `adapter_name` on the pipeline's models.
    Module names are matched by naming every layer of the loaded base as the writer does (family.kohya_namer);
    DoRA's rank and alpha come from the tensors, LoKr's factorisation from the file's `sdlora.adapter_config`."""
    import json

    from sdlora.lora import kohya, peft

    state, metadata = kohya.read_kohya(path)
    kind = KINDS[file_kind(state)]
    assert kind.settings is not None and kind.peft_keys is not None, kind.name  # plain LoRA: diffusers reads it
    modules = group_modules(state)
    stored = json.loads(metadata.get("sdlora.adapter_config") or "{}")
    used: set[str] = set()
    for attr, model, names in kohya.named_models(pipe, family):
        mine = {name: modules[name] for name in names.keys() & modules.keys()}
        if not mine:
            continue
        settings = kind.settings(mine, stored.get(attr))
        if not settings:
            raise SdloraError(
                f"{path}: a LoKr file without sdlora's adapter config (made by another trainer); load it in "
                "ComfyUI or A1111"
            )
        config = adapter_config(kind.name, settings, [names[name] for name in mine])
        model.add_adapter(config, adapter_name=adapter_name)
        layers = dict(model.named_modules())
        peft_state = {
            f"{names[name]}.{suffix}": tensor
            for name, tensors in mine.items()
            for suffix, tensor in kind.peft_keys(tensors, layers[names[name]], adapter_name).items()
        }
        peft.set_loaded_state(model, peft_state, adapter_name)
        used |= mine.keys()
    unknown = sorted(modules.keys() - used)
    if unknown:
        raise SdloraError(f"{path}: module {unknown[0]} matches no layer of the base model ({len(unknown)} such)")
