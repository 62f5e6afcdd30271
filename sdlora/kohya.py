"""Kohya-format LoRA files (what A1111, ComfyUI, Forge and civitai load): key names, metadata, save and read.

A kohya file names each LoRA module `lora_unet_<path>` / `lora_te_<path>` (SDXL: `lora_te1_`, `lora_te2_`) with
the dots of the module path replaced by `_`, and stores `.lora_down.weight` (peft's lora_A), `.lora_up.weight`
(peft's lora_B) and `.alpha` (so that the weight change is up @ down * alpha / rank). Two naming traps:
- SD 1.x/2.x UNets use diffusers module paths, but SDXL UNets use the original (SGM) ones
  (`input_blocks.4.1...`, `middle_block.1...`, `output_blocks...`), because kohya trains SDXL on the SGM UNet.
- Text encoders use the transformers-4 CLIP path (`text_model.encoder.layers.0...`); transformers 5's
  CLIPTextModel dropped the `text_model.` level, and readers silently skip names without it.
"""

from __future__ import annotations

import datetime
import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError, UsageError
from sdlora.fsutil import atomic_path

if TYPE_CHECKING:
    import torch

    from sdlora.models import ModelInfo

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}
KEY_PREFIXES = (UNET_PREFIX, "lora_te_", "lora_te1_", "lora_te2_")
KEY_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")

# Inside a diffusers ResnetBlock2D -> inside an SGM ResBlock.
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the down/mid/up blocks.
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def kohya_state_dict(
    unet: Any,
    text_encoders: Sequence[Any],
    family: str,
    adapter: str = "default",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Kohya-format tensors of the peft LoRA layers named `adapter` in `unet` and `text_encoders`.

    `text_encoders` lists the encoders in pipeline order ([te] for SD 1.x/2.x, [te1, te2] for SDXL; [] or
    encoders without LoRA layers add nothing). Weights are stored in `dtype` (default fp16, what UIs expect;
    fp32 keeps the file exact), alphas in fp32 so that alpha/rank is never rounded.
    """
    import torch

    if family not in TEXT_ENCODER_PREFIXES:
        raise ValueError(f"family must be one of {sorted(TEXT_ENCODER_PREFIXES)}, not {family!r}")
    prefixes = TEXT_ENCODER_PREFIXES[family]
    if len(text_encoders) > len(prefixes):
        raise ValueError(f"{family} has {len(prefixes)} text encoder(s), got {len(text_encoders)}")
    dtype = torch.float16 if dtype is None else dtype
    rename_unet = _sgm_namer(unet.config) if family == "sdxl" else (lambda path: path)
    state: dict[str, torch.Tensor] = {}
    _add_modules(state, unet, UNET_PREFIX, rename_unet, adapter, dtype)
    for encoder, prefix in zip(text_encoders, prefixes[: len(text_encoders)], strict=True):
        _add_modules(state, encoder, prefix, text_encoder_path, adapter, dtype)
    if not state:
        raise SdloraError(f"no LoRA layers named {adapter!r} in the UNet or text encoders: nothing to save")
    return state


def _add_modules(state: dict, model: Any, prefix: str, rename: Any, adapter: str, dtype: torch.dtype) -> None:
    import torch

    for path, layer in lora_layers(model, adapter):
        name = prefix + rename(path).replace(".", "_")
        down = layer.lora_A[adapter].weight.detach()  # (rank, in) or (rank, in, kh, kw)
        up = layer.lora_B[adapter].weight.detach()  # (out, rank) or (out, rank, 1, 1)
        # peft scales by alpha / r (or alpha / sqrt(r) with rsLoRA); readers scale by alpha / rank,
        # so store the alpha that gives peft's scaling.
        alpha = float(layer.scaling[adapter]) * layer.r[adapter]
        state[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


def lora_layers(model: Any, adapter: str = "default") -> Iterator[tuple[str, Any]]:
    """(module path, peft LoRA layer) of every layer of `model` that holds `adapter`."""
    from peft.tuners.lora import LoraLayer

    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter) or module.lora_bias.get(adapter):
            raise SdloraError(f"{path}: DoRA and LoRA biases have no kohya-format equivalent here")
        yield path, module
    # Embedding LoRAs live in other attributes; kohya's format has no place for them.
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_embedding_A", {}):
            raise SdloraError(f"{path}: embedding LoRA layers have no kohya-format equivalent")


def text_encoder_path(path: str) -> str:
    """The transformers-4 CLIP module path every kohya reader expects (`text_model.encoder.layers.0...`).

    transformers 5's CLIPTextModel has no `text_model` level (`encoder.layers.0...`), while
    CLIPTextModelWithProjection still has it (`text_model.encoder...`, `text_projection`).
    """
    if path.startswith(("text_model.", "text_projection")):
        return path
    return f"text_model.{path}"


def _sgm_namer(config: Any) -> Any:
    """A function from a diffusers UNet module path to its SGM path, for this UNet's block layout."""
    per_block = config.layers_per_block
    if not isinstance(per_block, int):
        if len(set(per_block)) != 1:
            raise SdloraError(f"SDXL UNet with uneven layers_per_block {per_block} has no SGM naming")
        per_block = per_block[0]
    up_has_attention = ["CrossAttn" in kind for kind in config.up_block_types]
    return lambda path: sgm_path(path, per_block, up_has_attention)


def sgm_path(path: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str:
    """Map a diffusers UNet module path to the original SGM path.

    SGM numbers every layer of the UNet in one sequence: `input_blocks.0` is conv_in, then each down block
    has `layers_per_block` (resnet, attention) pairs and a downsampler; each up block has one layer more.
    Inside a layer, `.0` is the resnet and `.1` the attention (`.1`/`.2` the upsampler after it).
    """
    for diffusers_name, sgm_name in _SGM_TOP.items():
        if path == diffusers_name or path.startswith(diffusers_name + "."):
            return sgm_name + path[len(diffusers_name) :]
    parts = path.split(".")
    stride = layers_per_block + 1
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        slot = {"resnets": 2 * index, "attentions": 1}[kind]
        return ".".join(["middle_block", str(slot), *_inner(kind, rest)])
    if parts[0] not in ("down_blocks", "up_blocks"):
        raise SdloraError(f"UNet module {path!r} has no known SGM name")
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # diffusers' `conv` is SGM's `op`
            return ".".join(["input_blocks", str(1 + block * stride + layers_per_block), "0", "op", *rest[1:]])
        layer = 1 + block * stride + index
        return ".".join(["input_blocks", str(layer), _slot(kind), *_inner(kind, rest)])
    if kind == "upsamplers":
        slot = "2" if up_has_attention[block] else "1"
        return ".".join(["output_blocks", str(block * stride + layers_per_block), slot, *rest])
    return ".".join(["output_blocks", str(block * stride + index), _slot(kind), *_inner(kind, rest)])


def _slot(kind: str) -> str:
    return {"resnets": "0", "attentions": "1"}[kind]


def _inner(kind: str, rest: list[str]) -> list[str]:
    """Resnet submodules are renamed; attention (transformer) submodules keep their names in SGM."""
    if kind == "resnets" and rest:
        return [*_SGM_RESNET[rest[0]].split("."), *rest[1:]]
    return rest


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
    sdxl = info.family == "sdxl"
    metadata = {
        "ss_base_model_version": info.kohya_base_version,
        "ss_v2": str(info.family == "sd2"),
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
        # kohya marks SDXL LoRAs with Stability's implementation (SGM names) and SD 1.x/2.x ones with diffusers.
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": name,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at), tz=datetime.timezone.utc).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if info.prediction_type == "v_prediction" else "epsilon",
        "modelspec.trigger_phrase": trigger_phrase,
        # Our own keys (readers ignore unknown ones): kohya has no plain "text encoder trained" field.
        "sdlora.text_encoder_trained": str(bool(text_encoder_trained)),
    }
    for key, value in (extra or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"metadata value of {key!r} must be a string, not {type(value).__name__}")
        metadata[key] = value
    return metadata


def save_kohya(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `state` with `metadata` to `path` atomically; adds kohya's `sshs_model_hash` of the tensors."""
    from safetensors.torch import save, save_file

    if not is_kohya_state_dict(state):
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
