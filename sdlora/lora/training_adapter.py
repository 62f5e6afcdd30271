"""The de-distillation "training adapter" (model.training_adapter): a LoRA that makes a distilled checkpoint (Z-Image
Turbo) train like its base. It is read by diffusers' own loader (diffusers-format or the family's ComfyUI form) into a
frozen peft adapter of its own beside the trained one: active at +1 in training steps, left out of samples and
identity scoring (they show the distilled model + the trained LoRA) and never in a saved file (those hold peft's
"default" adapter only).

Why a separate adapter and not a fused merge (W + BA folded into the base): the merge saves one small matmul per
layer and step, but in bf16/fp16 `W + BA - BA` is not W again, so samples would not be the distilled base + LoRA
exactly, and a quantized (nf4/int8) base can't be merged into at all. Switching a peft adapter off is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.errors import SdloraError, UsageError, printable

if TYPE_CHECKING:
    from sdlora.families import Family

NAME = "training_adapter"  # its peft adapter name; the trained LoRA is peft's "default"
TRAINED = "default"
OPTION = "model.training_adapter"


def local_file(source: str) -> Path | None:
    """The .safetensors file a local `source` names (the file, or a folder's diffusers file or only .safetensors
    file); None for a hub id. A missing or unreadable file is a one-line UsageError."""
    from sdlora.hub import looks_local
    from sdlora.weights import PICKLE_SUFFIXES, check_safetensors

    path = Path(source).expanduser()
    if not path.exists() and not looks_local(source):
        return None
    where = f"{OPTION} {printable(source)}"
    if not path.exists():
        raise UsageError(f"{where}: no such file or folder; give a de-distillation LoRA's .safetensors file or hub id")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        own = path / layout.DIFFUSERS_LORA
        if not own.is_file() and len(files) != 1:
            raise UsageError(f"{where}: expected {layout.DIFFUSERS_LORA} or one .safetensors file in the folder")
        path = own if own.is_file() else files[0]
    if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix.lower() != ".safetensors":
        raise UsageError(f"{where}: only .safetensors LoRA files are read (other formats are pickles)")
    header = check_safetensors(path, where)
    if not any(key != "__metadata__" for key in header):
        raise UsageError(f"{where}: the file holds no tensors; give a de-distillation LoRA")
    return path


def check(source: str | None) -> dict[str, str] | None:
    """Pre-flight: a local file readable as safetensors, or a hub id that is cached or on the hub; what the LoRA
    files will say about it (describe), or None when unset."""
    from sdlora.hub import resolve

    if not source:
        return None
    if local_file(source) is None:
        try:
            resolve(source, what="training adapter")
        except UsageError as exc:
            raise UsageError(f"{OPTION}: {exc}") from None
    return describe(source)


def describe(source: str) -> dict[str, str]:
    """What the LoRA files say about it: the path or hub id as given and, for a file, its sha256."""
    path = local_file(source)
    found = {"source": source}
    if path is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        found["sha256"] = digest.hexdigest()
    return found


def check_unchanged(checkpoint: Path | None, found: dict[str, str] | None) -> None:
    """At a resume, the training adapter file (`found`: describe's) must be the one the checkpoint trained with:
    its LoRA files' sdlora.training_adapter names the sha256 (a replaced file would change the run silently)."""
    import json

    from safetensors import safe_open

    lora = Path(checkpoint) / layout.DIFFUSERS_LORA if checkpoint is not None else None
    if lora is None or not found or "sha256" not in found or not lora.is_file():
        return
    with safe_open(str(lora), framework="pt") as handle:
        stored = json.loads((handle.metadata() or {}).get("sdlora.training_adapter", "{}")).get("sha256")
    if stored and stored != found["sha256"]:
        raise UsageError(
            f"{OPTION} {printable(found['source'])}: not the file {printable(checkpoint)} was trained with (its sha256 "
            f"is {found['sha256'][:12]}..., the checkpoint's {stored[:12]}...); resume with that file"
        )


def load(pipe: Any, family: Family, source: str) -> None:
    """Add the training adapter to the denoiser, frozen, with the pipeline's own load_lora_weights (its format
    conversions); any other component it reaches (a text encoder's keys) is left without it."""
    path = local_file(source)
    denoiser = getattr(pipe, family.denoiser)
    try:
        pipe.load_lora_weights(str(path or source), adapter_name=NAME)
    except (ValueError, KeyError, RuntimeError, OSError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdloraError(f"{OPTION} {printable(source)}: could not load it into the base: {first}") from exc
    for name, component in pipe.components.items():
        if name != family.denoiser and NAME in (getattr(component, "peft_config", None) or {}):
            component.delete_adapter(NAME)
    if NAME not in (getattr(denoiser, "peft_config", None) or {}):
        raise UsageError(
            f"{OPTION} {printable(source)}: holds no LoRA for the {family.label} {family.denoiser_label}; "
            "give a de-distillation LoRA made for this base"
        )
    freeze(denoiser)


def freeze(model: Any) -> None:
    for name, parameter in model.named_parameters():
        if f".{NAME}." in name:
            parameter.requires_grad_(False)


def activate(model: Any) -> None:
    """Both adapters compute in training steps: the trained one and the frozen training adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter([TRAINED, NAME])  # peft makes both trainable ...
    freeze(model)  # ... and the training adapter stays frozen


@contextlib.contextmanager
def with_active(modules: Sequence[Any], choose: Callable[[list[str]], list[str]]) -> Iterator[None]:
    """In every peft layer of `modules`, only the active adapters `choose` keeps compute (none: the base layer
    alone), then all as it was, trainable flags included (peft's set_adapter changes them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    was = [list(layer.active_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer, active in zip(layers, was, strict=True):
            layer.set_adapter(choose(active))
        yield
    finally:
        for layer, active in zip(layers, was, strict=True):
            layer.set_adapter(active)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def left_out(modules: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
    """The training adapter inactive (samples, identity scoring: the distilled base + the trained LoRA exactly)."""
    return with_active(modules, lambda active: [name for name in active if name != NAME])


def alone(modules: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
    """Every adapter but the training adapter inactive: the base the LoRA trains on (output preservation's and the
    masked prior's target), which with a training adapter is the de-distilled model."""
    return with_active(modules, lambda active: [name for name in active if name == NAME])
