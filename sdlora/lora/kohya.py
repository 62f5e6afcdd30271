"""Kohya-format LoRA files (what A1111, ComfyUI, Forge and civitai load): key names, metadata, save and read.

A kohya file names each LoRA module `lora_unet_<path>` / `lora_te_<path>` (SDXL: `lora_te1_`, `lora_te2_`) with
the dots of the module path replaced by `_`, and stores `.lora_down.weight` (peft's lora_A), `.lora_up.weight`
(peft's lora_B) and `.alpha` (so that the weight change is up @ down * alpha / rank). Two naming traps:
- SD 1.x/2.x UNets use diffusers module paths, but SDXL UNets use the original (SGM) ones
  (`input_blocks.4.1...`, `middle_block.1...`, `output_blocks...`), because kohya trains SDXL on the SGM UNet.
- Text encoders use the transformers-4 CLIP path (`text_model.encoder.layers.0...`); transformers 5's
  CLIPTextModel dropped the `text_model.` level, and readers silently skip names without it.
Where a family's UIs read them (Z-Image, FLUX.2, Qwen-Image), DoRA and LoKr take SimpleTuner's LyCORIS names instead,
`lycoris_<diffusers path>`, one layer each (denoiser_naming).
"""

from __future__ import annotations

import datetime
import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError, UsageError
from sdlora.families.clip_keys import text_encoder_path
from sdlora.fsutil import atomic_path
from sdlora.lora.kinds import KINDS, jsonable, layer_kind

if TYPE_CHECKING:
    import torch

    from sdlora.families import Family
    from sdlora.models import ModelInfo

# A family's kohya naming: denoiser module path -> (kohya module path, part, parts).
Namer = Callable[[str], tuple[str, int, int]]
UNET_PREFIX = "lora_unet_"
# SimpleTuner's LyCORIS names: `lycoris_` + the denoiser's diffusers module path with "_" for ".". ComfyUI reads them
# for Z-Image, FLUX.2 and Qwen-Image (comfy/lora.py model_lora_keys_unet), q, k and v put into its fused qkv rows.
LYCORIS_PREFIX = "lycoris_"
KEY_PREFIXES = (UNET_PREFIX, LYCORIS_PREFIX, "lora_te_", "lora_te1_", "lora_te2_")
UI_PREFIXES = ("diffusion_model.",)  # a family's own UI names where its UIs read no kohya ones (ui_lora_state)
KEY_SUFFIXES = (
    ".lora_down.weight",
    ".lora_up.weight",
    ".alpha",
    *(s for k in KINDS.values() for s in k.extra_suffixes),
)


def kohya_state_dict(
    denoiser: Any,
    text_encoders: Sequence[Any],
    family: Family | str,
    adapter: str = "default",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Kohya-format tensors of the peft LoRA, DoRA or LoKr layers named `adapter` in `denoiser` and
    `text_encoders` (DoRA and LoKr in LyCORIS keys: sdlora.lora.lycoris).

    `text_encoders`: [] (denoiser only), or the family's encoders that carry LoRA (on SDXL either one alone is
    named right: the one with a text projection is te2); encoders without LoRA layers add nothing. The family names
    the modules, and may fuse several layers into one kohya module. Weights are stored in `dtype` (default fp16,
    what UIs expect; fp32 keeps the file exact), alphas in fp32 so that alpha/rank is never rounded.
    """
    import torch

    from sdlora import families

    family = families.get(family) if isinstance(family, str) else family
    dtype = torch.float16 if dtype is None else dtype
    names, namer = denoiser_naming(family, denoiser, adapter_kind(denoiser, adapter))
    own = family.ui_lora_state(denoiser, text_encoders, adapter, dtype) if names == UNET_PREFIX else None
    if own is not None:  # Z-Image's and Qwen-Image's plain LoRA: ComfyUI's names, not kohya's
        return own
    state: dict[str, torch.Tensor] = {}
    _add_modules(state, denoiser, names, namer, adapter, dtype)
    for encoder, prefix in zip(text_encoders, family.kohya_encoder_prefixes(text_encoders), strict=True):
        _add_modules(state, encoder, prefix, lambda path: (text_encoder_path(path), 0, 1), adapter, dtype)
    if not state:
        raise SdloraError(
            f"no LoRA layers named {adapter!r} in the {family.denoiser} or text encoders: nothing to save"
        )
    return state


def denoiser_naming(family: Family, denoiser: Any, kind: str | None) -> tuple[str, Namer]:
    """The key prefix and namer of the denoiser's modules holding adapters of `kind` in NAME.safetensors: SimpleTuner's
    LyCORIS names, one layer each, for a kind that can't fuse layers where the family's UIs read those
    (Family.lycoris_names); kohya's names (family.kohya_namer) otherwise."""
    if family.lycoris_names and kind is not None and not KINDS[kind].fuses:
        return LYCORIS_PREFIX, lambda path: (path, 0, 1)
    return UNET_PREFIX, family.kohya_namer(denoiser)


def adapter_kind(model: Any, adapter: str = "default") -> str | None:
    """The kind of the first layer of `model` holding `adapter` (sdlora trains one kind per run), else None."""
    return next((kind for _, _, kind in adapter_layers(model, adapter)), None)


def _add_modules(state: dict, model: Any, prefix: str, namer: Namer, adapter: str, dtype: torch.dtype) -> None:
    import torch

    fused: dict[str, dict[int, Part]] = {}
    parts_of: dict[str, int] = {}
    for path, layer, kind in adapter_layers(model, adapter):
        module, part, parts = namer(_unwrapped(path))
        name = prefix + module.replace(".", "_")
        writer = KINDS[kind].module_tensors
        if writer is not None:  # DoRA and LoKr: LyCORIS keys, one layer per module
            if parts > 1:
                raise SdloraError(fused_message(kind, name, parts))
            for suffix, tensor in writer(layer, adapter).items():
                state[f"{name}.{suffix}"] = tensor if suffix == "alpha" else tensor.to(dtype).contiguous()
            continue
        # Copies: the state must not change when training goes on after a checkpoint.
        down = layer.lora_A[adapter].weight.detach().to("cpu", copy=True)  # (rank, in) or (rank, in, kh, kw)
        up = layer.lora_B[adapter].weight.detach().to("cpu", copy=True)  # (out, rank) or (out, rank, 1, 1)
        # peft scales by alpha / r (or alpha / sqrt(r) with rsLoRA); readers scale by alpha / rank,
        # so store the alpha that gives peft's scaling.
        alpha = float(layer.scaling[adapter]) * layer.r[adapter]
        if parts > 1:
            fused.setdefault(name, {})[part] = Part(down, up, alpha)
            parts_of[name] = parts
            continue
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    for name, members in fused.items():
        if sorted(members) != list(range(parts_of[name])):
            raise SdloraError(
                f"{name}: kohya's format fuses {parts_of[name]} layers into this module, but only parts "
                f"{sorted(members)} have LoRA layers; target all of them or none"
            )
        down, up, alpha = fuse_parts([members[i] for i in range(parts_of[name])])
        state[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


@dataclass(frozen=True)
class Part:
    """One layer's LoRA: down (r, in), up (out, r) and the alpha that gives its scale alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def fuse_parts(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA module for layers whose outputs a fused layer concatenates (Flux's q, k, v -> qkv): the down
    weights stacked (sum r, in), the up weights block-diagonal (sum out, sum r), and an alpha such that
    up @ down * alpha / rank equals the stacked weight changes of the parts. Parts with other scales than the
    first get the ratio folded into their up weights."""
    import torch

    rank = sum(part.down.shape[0] for part in parts)
    scale = parts[0].alpha / parts[0].down.shape[0]
    ups = [part.up * ((part.alpha / part.down.shape[0]) / scale) for part in parts]
    if any(part.down.ndim != 2 for part in parts):
        raise SdloraError("only linear layers can be fused into one kohya module")
    return torch.cat([part.down for part in parts]), torch.block_diag(*ups), scale * rank


def _unwrapped(path: str) -> str:
    """Drop the levels DDP (`module.`) and torch.compile (`_orig_mod.`) add around a model."""
    while path.startswith(("module.", "_orig_mod.")):
        path = path.split(".", 1)[1]
    return path


def fused_message(kind: str, name: str, parts: int) -> str:
    return (
        f"{name}: kohya's format fuses {parts} layers into this module, and {kind} adapters of several layers don't "
        'combine into one module\'s keys; use lora.kind = "lora" for this family'
    )


def refuse_fused(kind: str, model: Any, family: Family, config: Any) -> None:
    """Before training: a DoRA or LoKr adapter on layers that the family's kohya format fuses into one module
    (Flux's q, k, v -> qkv) can't be written; one-line UsageError naming the combination. Families whose UIs read
    LyCORIS names (denoiser_naming) write each layer alone."""
    if KINDS[kind].fuses:
        return
    from peft.tuners.tuners_utils import check_target_module_exists

    _, namer = denoiser_naming(family, model, kind)
    for path, _ in model.named_modules():
        if not path or not check_target_module_exists(config, path):
            continue
        try:
            module, _, parts = namer(_unwrapped(path))
        except (KeyError, SdloraError):
            continue
        if parts > 1:
            raise UsageError(
                f"--adapter {kind}: {family.label}'s kohya format fuses {parts} layers into {module} (e.g. q, k and v "
                f"-> qkv), and {kind} adapters of several layers don't combine into one module; use --adapter lora"
            )


def adapter_layers(model: Any, adapter: str = "default") -> Iterator[tuple[str, Any, str]]:
    """(module path, peft layer, 'lora' | 'dora' | 'lokr') of every layer of `model` that holds `adapter`."""
    for path, module in model.named_modules():
        kind = layer_kind(module, adapter)
        if kind is None:
            continue
        if getattr(module, "lora_bias", {}).get(adapter):  # (peft's LoRA and DoRA layers have the flag)
            raise SdloraError(f"{path}: LoRA biases have no kohya-format equivalent here")
        yield path, module, kind
    # Embedding LoRAs live in other attributes; kohya's format has no place for them.
    for path, module in model.named_modules():
        if adapter in getattr(module, "lora_embedding_A", {}):
            raise SdloraError(f"{path}: embedding LoRA layers have no kohya-format equivalent")


def lora_layers(model: Any, adapter: str = "default") -> Iterator[tuple[str, Any]]:
    """(module path, peft LoRA layer) of every plain LoRA layer of `model` that holds `adapter`; a DoRA layer is
    an error here (its kohya keys need more than up @ down: adapter_layers gives every kind)."""
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter) or module.lora_bias.get(adapter):
            raise SdloraError(f"{path}: DoRA and LoRA biases need more than up @ down; read them with adapter_layers")
        yield path, module
    # Embedding LoRAs live in other attributes; kohya's format has no place for them.
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_embedding_A", {}):
            raise SdloraError(f"{path}: embedding LoRA layers have no kohya-format equivalent")


def named_models(pipe: Any, family: Family) -> Iterator[tuple[str, Any, dict[str, str]]]:
    """(pipeline attribute, model, {kohya module name: module path}) of the denoiser and each trainable text
    encoder of a loaded pipeline: every linear and conv layer named as kohya_state_dict names it (fused layers
    left out)."""
    denoiser = getattr(pipe, family.denoiser)
    names = _kohya_names(denoiser, UNET_PREFIX, family.kohya_namer(denoiser))
    if family.lycoris_names:  # DoRA and LoKr files: LyCORIS names (denoiser_naming)
        names |= _kohya_names(denoiser, LYCORIS_PREFIX, lambda path: (path, 0, 1))
    yield family.denoiser, denoiser, names
    attrs = [name for name in family.trainable_text_encoders if getattr(pipe, name, None) is not None]
    encoders = [getattr(pipe, name) for name in attrs]
    for attr, encoder, prefix in zip(attrs, encoders, family.kohya_encoder_prefixes(encoders), strict=True):
        yield attr, encoder, _kohya_names(encoder, prefix, lambda path: (text_encoder_path(path), 0, 1))


def _kohya_names(model: Any, prefix: str, namer: Namer) -> dict[str, str]:
    import torch

    names: dict[str, str] = {}
    for path, module in model.named_modules():
        # Skip adapters' own layers (lora_A.default ...); a layer already wrapped by an adapter is its base_layer.
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or ".lora_" in path or ".lokr_" in path:
            continue
        path = _unwrapped(path.removesuffix(".base_layer"))
        try:
            module_path, _, parts = namer(path)
        except (KeyError, ValueError, IndexError, SdloraError):
            continue  # a layer kohya's naming has no name for never carries an adapter of ours
        if parts == 1:
            names[prefix + module_path.replace(".", "_")] = path
    return names


_MODELSPEC_PREDICTION = {"v_prediction": "v", "flow": "flow"}


def flow_metadata(info: ModelInfo, train: Any, max_sequence_length: int | None) -> dict[str, str]:
    """The family's own kohya metadata (Flux.1: `ss_guidance_scale`, `ss_timestep_sampling`, ...), so that readers
    and people see how the LoRA was trained; {} for families whose common keys say all."""
    from sdlora import families

    return families.get(info.family).kohya_metadata(info, train, max_sequence_length)


def build_metadata(
    info: ModelInfo,
    *,
    name: str,
    rank: int,
    alpha: float,
    steps: int,
    learning_rate: float,
    resolution: int,
    num_train_images: int,
    trigger_phrase: str,
    started_at: float,
    finished_at: float,
    text_encoder_trained: bool,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The string metadata kohya's sd-scripts writes (`ss_*`) and the SAI model spec (`modelspec.*`)."""
    from sdlora import families

    family = families.get(info.family)
    version = info.kohya_base_version
    metadata = {
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": name,
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(int(steps)),
        "ss_learning_rate": str(float(learning_rate)),
        "ss_unet_lr": str(float(learning_rate)),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(int(num_train_images)),
        "ss_training_started_at": str(float(started_at)),
        "ss_training_finished_at": str(float(finished_at)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": info.modelspec_architecture,
        "modelspec.implementation": family.kohya_implementation,
        "modelspec.title": name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at), tz=datetime.timezone.utc).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": _MODELSPEC_PREDICTION.get(info.prediction_type, "epsilon"),
        "modelspec.trigger_phrase": trigger_phrase,
        # Our own keys (readers ignore unknown ones): kohya has no plain "text encoder trained" field.
        "sdlora.text_encoder_trained": str(bool(text_encoder_trained)),
    }
    for key, value in (extra or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"metadata value of {key!r} must be a string, not {type(value).__name__}")
        metadata[key] = value
    return metadata


def adapter_metadata(kind: str, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """LyCORIS's network keys for a DoRA or LoKr file (`ss_network_module = lycoris.kohya`, `ss_network_args`) and
    our `sdlora.adapter`/`sdlora.adapter_config` (each model's peft config: how sdlora reads a LoKr file back);
    {} for plain LoRA, whose metadata stays kohya's."""
    import json

    args = KINDS[kind].network_args
    if args is None:
        return {}
    factors = {c.get("decompose_factor", -1) for c in configs.values()} - {-1}
    if factors:  # LyCORIS records a LoKr's factor among its network args (lora.lokr_factor: one per run)
        args = args | {"factor": str(max(factors))}
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps(args),
        "sdlora.adapter": kind,
        "sdlora.adapter_config": json.dumps({name: jsonable(c) for name, c in configs.items()}, sort_keys=True),
    }


def save_kohya(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `state` with `metadata` to `path` atomically; adds kohya's `sshs_model_hash` of the tensors."""
    from safetensors.torch import save, save_file

    if not is_kohya_state_dict(state) and not (state and all(k.startswith(UI_PREFIXES) for k in state)):
        bad = next((key for key in state if not _is_kohya_key(key)), "(empty)")
        raise SdloraError(f"{path}: {bad!r} is not a kohya LoRA key (lora_unet_/lora_te*_ ... .lora_down.weight)")
    bad_values = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad_values:
        raise SdloraError(f"{path}: safetensors metadata must be strings; not: {', '.join(bad_values)}")
    tensors = {key: tensor.contiguous() for key, tensor in state.items()}
    # The hash A1111 and kohya's tools use: sha256 of the tensor data, i.e. the file after its JSON header.
    data = save(tensors)
    header_size = struct.unpack("<Q", data[:8])[0]
    full = {**metadata, "sshs_model_hash": hashlib.sha256(data[8 + header_size :]).hexdigest()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=full)


def read_kohya(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a kohya-format `.safetensors` LoRA file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise SdloraError(f"{path}: not a readable .safetensors file ({exc})") from exc
    if not is_kohya_state_dict(state):
        raise SdloraError(f"{path}: not a kohya-format LoRA (keys like lora_unet_..., lora_te_...)")
    return state, metadata


def is_kohya_state_dict(keys: Iterable[str]) -> bool:
    """True when every key (and at least one) is a kohya LoRA key."""
    keys = list(keys)
    return bool(keys) and all(_is_kohya_key(key) for key in keys)


def _is_kohya_key(key: str) -> bool:
    return key.startswith(KEY_PREFIXES) and key.endswith(KEY_SUFFIXES) and "." in key
