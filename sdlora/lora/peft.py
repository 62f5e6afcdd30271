"""Attach LoRA adapters with peft; save them in diffusers format (with adapter metadata) and as raw training state."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.errors import SdloraError, UsageError
from sdlora.fsutil import atomic_path
from sdlora.lora.kinds import KINDS, config_kind, jsonable

if TYPE_CHECKING:
    from sdlora.families import Family

DIFFUSERS_FILE = layout.DIFFUSERS_LORA


def lora_config(
    rank: int, alpha: float, dropout: float, targets: list[str] | str, kind: str = "lora", lokr_factor: int = -1
):
    """peft's config of one adapter of `kind` (sdlora.config.LoraConfig.kind; its row of sdlora.lora.kinds);
    `lokr_factor` other than -1 only with kind lokr (the config refuses it with another)."""
    factor = {} if lokr_factor == -1 else {"factor": lokr_factor}
    return KINDS[kind].peft_config(rank, alpha, dropout, targets, **factor)


def attach(
    model: Any,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str] | str,
    kind: str = "lora",
    lokr_factor: int = -1,
) -> None:
    """Add the 'default' adapter of `kind` to `model` (a diffusers UNet or a transformers text encoder), in place."""
    import warnings

    with warnings.catch_warnings():
        # On a --quantize fp8 base peft warns once per layer that it can't merge into torchao weights: training
        # never merges (and generate refuses --fuse with fp8).
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning)
        model.add_adapter(lora_config(rank, alpha, dropout, targets, kind, lokr_factor))


def adapter_kind(model: Any, adapter: str = "default") -> str:
    """The kind of `model`'s adapter (a key of sdlora.lora.kinds.KINDS)."""
    return config_kind(model.peft_config[adapter])


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_metadata(model: Any) -> dict[str, Any]:
    """peft's config of the adapter (rank, alpha, targets): without it alpha != rank reloads at the wrong scale."""
    config = model.peft_config["default"].to_dict()
    # A LoKr config holds an enum and a set that json can't write; a LoRA config stays as diffusers expects it.
    return jsonable(config) if KINDS[adapter_kind(model)].json_config else config


def peft_state(model: Any) -> dict[str, Any]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_diffusers(
    path: Path,
    pipeline_cls: Any,
    models: dict[str, Any],
    header: dict[str, str],
    for_comfyui: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write `path` with diffusers' save_lora_weights (+ adapter metadata), then add our `header` keys to the
    safetensors metadata beside diffusers' own; atomic. `models`: the adapted models by pipeline attribute
    (denoiser first: "unet" or "transformer", then "text_encoder", ...), which name save_lora_weights' arguments.

    `for_comfyui`: also readable by ComfyUI, which reads Flux's diffusers keys: each layer's alpha as a `.alpha`
    tensor instead of the adapter metadata (ComfyUI scales by alpha / rank only with them, by 1 otherwise;
    diffusers takes one or the other and reads both to the same model), and text-encoder keys under the
    transformers-4 CLIP path (`text_encoder.text_model.encoder...`: ComfyUI knows only that one, diffusers both).
    `extra`: more tensors for the file (pivotal tuning's embeddings, under keys diffusers' loader skips)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdlora.families.clip_keys import text_encoder_path

    # peft's own key names (lora_A/lora_B), not convert_state_dict_to_diffusers: that renames only the attention
    # layers to the old `lora.down` style and the resulting mix reloads without them.
    kwargs: dict[str, Any] = {}
    alphas: dict[str, Any] = {}
    for name, model in models.items():
        kwargs[f"{name}_lora_layers"] = peft_state(model)
        if for_comfyui and name.startswith("text_encoder"):
            kwargs[f"{name}_lora_layers"] = {text_encoder_path(k): v for k, v in kwargs[f"{name}_lora_layers"].items()}
        if for_comfyui:
            alpha = float(adapter_metadata(model)["lora_alpha"])
            for key in kwargs[f"{name}_lora_layers"]:
                if key.endswith(".lora_A.weight"):
                    alphas[f"{name}.{key.removesuffix('.lora_A.weight')}.alpha"] = torch.tensor(alpha)
        else:
            kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(model)
    kind = adapter_kind(next(iter(models.values())))
    if not KINDS[kind].diffusers_reads:  # DoRA and LoKr files are read back through peft (load_file_adapters)
        header = {**header, "sdlora.adapter": kind}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        pipeline_cls.save_lora_weights(tmp, weight_name=DIFFUSERS_FILE, **kwargs)
        written = Path(tmp) / DIFFUSERS_FILE
        with safe_open(str(written), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(written)) | alphas | (extra or {})
    metadata.update(header)
    with atomic_path(path) as tmp_path:
        save_file(tensors, str(tmp_path), metadata=metadata)


def read_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def adapter_metadata_of(path: Path) -> dict[str, Any]:
    """The adapter configs diffusers stored in `path`, by model: {'unet': {'r': 4, ...}, 'text_encoder': ...}."""
    raw = read_header(path).get("lora_adapter_metadata")
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in (json.loads(raw) if raw else {}).items():  # stored flat: "unet.r", "text_encoder.r"
        model, _, setting = key.partition(".")
        grouped.setdefault(model, {})[setting] = value
    return grouped


def save_state(path: Path, models: dict[str, Any]) -> None:
    """Exact fp32 LoRA tensors of each model ('unet', 'text_encoder'), for resuming; atomic."""
    from safetensors.torch import save_file

    tensors = {
        f"{name}::{key}": value.detach().contiguous()
        for name, m in models.items()
        for key, value in peft_state(m).items()
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp))


def load_state(path: Path, models: dict[str, Any]) -> None:
    """Put the tensors written by `save_state` back into the models' adapters."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, model in models.items():
        prefix = f"{name}::"
        state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{path}: unexpected LoRA keys for {name}: {unexpected[:3]}")


def load_file_adapters(pipe: Any, path: Path, adapter_name: str) -> None:
    """A DoRA or LoKr file written by save_diffusers (peft keys under `unet.`, `text_encoder.`, ... and each model's
    adapter config in the metadata) -> adapters called `adapter_name` on the pipeline's models, through peft.
    (diffusers' load_lora_weights reads no LoKr keys, and transformers 5.23 drops DoRA magnitudes of text encoders.)"""
    from peft import PeftConfig
    from safetensors.torch import load_file

    configs = adapter_metadata_of(path)
    by_model: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, rest = key.partition(".")
        by_model.setdefault(name, {})[rest] = tensor
    for name, state in by_model.items():
        model = getattr(pipe, name, None)
        if model is None or name not in configs:
            raise SdloraError(f"{path}: keys of {name!r}, which the base has no adapter config or model for")
        add_loaded_adapter(model, PeftConfig.from_peft_type(**configs[name]), state, adapter_name)


def add_loaded_adapter(model: Any, config: Any, state: dict[str, Any], adapter_name: str) -> None:
    """Add an adapter from `config` to `model` and set its tensors from `state` (peft's saved key names); every
    adapter tensor must be in `state` and every key of `state` must land."""
    model.add_adapter(config, adapter_name=adapter_name)
    set_loaded_state(model, state, adapter_name)


def set_loaded_state(model: Any, state: dict[str, Any], adapter_name: str) -> None:
    """Set the tensors of `model`'s adapter `adapter_name` from `state`, all of them, each key landing."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [key for key in getattr(result, "missing_keys", []) if f".{adapter_name}" in key]
    unexpected = getattr(result, "unexpected_keys", [])
    if missing or unexpected:
        raise SdloraError(f"adapter tensors don't match the model: missing {missing[:2]}, unexpected {unexpected[:2]}")


def check_exportable(lora: Any, denoiser: Any, family: Family) -> None:
    """Before training: refuse an adapter kind (`lora`: sdlora.config.LoraConfig) that the family's kohya format
    can't hold on the denoiser's targets, in one line (sdlora.lora.kohya.refuse_fused)."""
    from sdlora.lora.kohya import refuse_fused

    if lora.targets == "cross_attention" and family.denoiser != "unet":
        raise UsageError(
            f"lora.targets = 'cross_attention': {family.label} has no cross-attention (its {family.denoiser} attends "
            "to the prompt and the image together); use 'attention' or 'all'"
        )
    targets = family.denoiser_targets(lora.targets)
    config = lora_config(lora.rank, lora.alpha, lora.dropout, targets, lora.kind, lora.lokr_factor)
    refuse_fused(lora.kind, denoiser, family, config)
