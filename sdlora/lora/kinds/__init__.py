"""Adapter kinds (lora.kind), one table row each (KINDS): the peft config that trains it, how its layers are
written into kohya/LyCORIS keys and read back, how a file or a layer tells which kind it holds, and which family
formats can hold it. A new kind is one file here and one row in KINDS; nothing else compares kind names.

Per kohya module `NAME` (ComfyUI 0.3.64, comfy/weight_adapter/lora.py, lokr.py and base.py), the LyCORIS keys:
dora.py and lokr.py say theirs; plain LoRA is kohya's own (`lora_down`/`lora_up`/`alpha`, sdlora.lora.kohya).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.lora.kinds import dora, lokr, lora

if TYPE_CHECKING:
    import torch

Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind: its row of the table."""

    name: str  # lora.kind, and `sdlora.adapter` in file metadata
    # (rank, alpha, dropout, targets) -> peft config; LoKr's also takes factor= (lora.lokr_factor).
    peft_config: Callable[..., Any]
    holds: Callable[[Any, str], bool]  # whether a peft layer holds adapter `name` of this kind
    is_config: Callable[[Any], bool]  # whether a peft config trains this kind
    key_fragments: tuple[str, ...]  # tensor-key fragments that mark a file of this kind (kohya or peft names)
    # The kohya/LyCORIS writer of one layer (suffix -> tensor); None: kohya's own LoRA keys (sdlora.lora.kohya),
    # which can also fuse several layers into one module (Flux's q, k, v -> qkv).
    module_tensors: Callable[[Any, str], Tensors] | None = None
    # The reader: one module's tensors -> peft state entries of a layer holding the adapter (shapes checked).
    peft_keys: Callable[[Mapping[str, Any], Any, str], Tensors] | None = None
    # A peft config to load a file of ours: (settings, target regex) from the module tensors and stored configs.
    load_config: Callable[[Mapping[str, Any], str], Any] | None = None
    # (modules' tensors, the stored peft config of the model or None) -> the settings load_config takes.
    settings: Callable[[Mapping[str, Mapping[str, Any]], Any], Mapping[str, Any] | None] | None = None
    network_args: dict[str, str] | None = None  # LyCORIS's ss_network_args; None: kohya's networks.lora
    json_config: bool = False  # its peft config holds enums and sets: written through jsonable()
    extra_suffixes: tuple[str, ...] = ()  # kohya key suffixes it adds

    @property
    def diffusers_reads(self) -> bool:
        """diffusers' load_lora_weights reads it (plain LoRA); other kinds load through peft (sdlora.lora.files)."""
        return self.module_tensors is None

    @property
    def fuses(self) -> bool:
        """Whether one kohya module can hold several layers of it: the families that fuse layers in their kohya
        format (Flux.1's qkv) take only such kinds on those layers (sdlora.lora.kohya.refuse_fused)."""
        return self.module_tensors is None


KINDS: dict[str, AdapterKind] = {
    "lora": AdapterKind(
        name="lora",
        peft_config=lora.peft_config,
        holds=lora.holds,
        is_config=lora.is_config,
        key_fragments=(),
    ),
    "dora": AdapterKind(
        name="dora",
        peft_config=dora.peft_config,
        holds=dora.holds,
        is_config=dora.is_config,
        key_fragments=dora.KEY_FRAGMENTS,
        module_tensors=dora.module_tensors,
        peft_keys=dora.peft_keys,
        load_config=dora.load_config,
        settings=dora.settings,
        network_args={"algo": "lora", "dora_wd": "True", "wd_on_output": "True"},
        extra_suffixes=(".dora_scale",),
    ),
    "lokr": AdapterKind(
        name="lokr",
        peft_config=lokr.peft_config,
        holds=lokr.holds,
        is_config=lokr.is_config,
        key_fragments=lokr.KEY_FRAGMENTS,
        module_tensors=lokr.module_tensors,
        peft_keys=lokr.peft_keys,
        load_config=lokr.load_config,
        settings=lokr.settings,
        network_args={"algo": "lokr"},
        json_config=True,
        extra_suffixes=tuple(f".{part}" for part in lokr.PARTS),
    ),
}
PLAIN = KINDS["lora"]
# Which kind a layer, config or file holds: the most specific first (a DoRA layer is also a peft LoRA layer).
_SPECIFIC_FIRST = ("lokr", "dora", "lora")


def layer_kind(layer: Any, adapter: str = "default") -> str | None:
    """The kind of a peft layer holding `adapter`, else None."""
    return next((name for name in _SPECIFIC_FIRST if KINDS[name].holds(layer, adapter)), None)


def config_kind(config: Any) -> str:
    """The kind a peft config trains."""
    return next(name for name in _SPECIFIC_FIRST if KINDS[name].is_config(config))


def file_kind(keys: Any) -> str:
    """The adapter kind of a LoRA file's tensor keys (kohya or peft/diffusers names)."""
    keys = list(keys)
    for name in _SPECIFIC_FIRST:
        fragments = KINDS[name].key_fragments
        if any(fragment in key for key in keys for fragment in fragments):
            return name
    return PLAIN.name


def jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A peft config's to_dict() with sets as sorted lists and enums as their values (for JSON metadata)."""
    import enum

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, set | frozenset):
            return sorted(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return {key: plain(value) for key, value in config.items()}
