"""Load a base model (hub id, local diffusers folder, single-file checkpoint) and tell its family; the one
precision rule of the commands that render.

The family is read from the model itself (sdlora.families: its config, or a checkpoint's keys), never from its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.errors import SdloraError, UsageError

if TYPE_CHECKING:
    from sdlora.config import ModelConfig
    from sdlora.families import Family

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass(frozen=True)
class ModelInfo:
    """What training and generation need to know about a base model."""

    family: str  # a name in sdlora.families.REGISTRY
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    vae_scale_factor: int  # pixels per latent pixel (8 for every real SD model)
    variant: str = ""  # within the family: "dev" / "schnell" for Flux.1

    @property
    def spec(self) -> Family:
        """The family object: everything that differs between families."""
        from sdlora import families

        return families.get(self.family)

    @property
    def kohya_base_version(self) -> str:
        """kohya's `ss_base_model_version` value."""
        return self.spec.kohya_base_version(self.prediction_type, self.variant)

    @property
    def modelspec_architecture(self) -> str:
        """The `modelspec.architecture` value of a LoRA for this base."""
        return self.spec.modelspec_architecture(self.prediction_type, self.variant)


def model_info(pipe: Any) -> ModelInfo:
    from sdlora import families

    family = families.detect(pipe)
    return ModelInfo(
        family=family.name,
        prediction_type=family.prediction_type(pipe),
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
        variant=family.variant(pipe),
    )


def device_facts() -> tuple[bool, bool]:
    """(CUDA available, bf16 supported on it)."""
    import torch

    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


def device() -> str:
    """Where every command runs its models: the GPU when there is one."""
    return "cuda" if device_facts()[0] else "cpu"


def inference_dtype() -> Any:
    """The one precision rule of every command that renders (generate, eval): fp32 on the CPU (half precision is
    slower there), bf16 on GPUs that have it, else fp16."""
    import torch

    cuda, bf16 = device_facts()
    if not cuda:
        return torch.float32
    return torch.bfloat16 if bf16 else torch.float16


def load_base(model: ModelConfig, torch_dtype: Any = None, without: Sequence[str] = ()) -> Any:
    """The pipeline of the config's base model (with its VAE and single-file settings), for every command;
    `without`: components left out (None in the pipeline; training loads frozen text encoders one at a time with
    `load_text_encoder`)."""
    return load_pipeline(
        model.base or "",
        allow_pickle=model.allow_pickle,
        torch_dtype=torch_dtype,
        vae=model.vae,
        single_file_config=model.single_file_config,
        quantize=model.quantize,
        without=without,
    )


def components_root(model: ModelConfig) -> str:
    """Where the base's components live as a diffusers pipeline: the folder or hub id, or for a single file
    model.single_file_config (the file's own text encoders, if any, are not read: sdlora.families.flux.single_file)."""
    base = model.base or ""
    if Path(base).expanduser().is_file():
        if not model.single_file_config:
            raise UsageError(
                f"{base}: name the diffusers folder of its text encoders: --set model.single_file_config=DIR"
            )
        return model.single_file_config
    return str(Path(base).expanduser()) if Path(base).expanduser().is_dir() else base


def load_component(model: ModelConfig, name: str, torch_dtype: Any = None) -> Any:
    """One component of the base (pipeline attribute `name`: a text encoder, a tokenizer), loaded alone from its
    subfolder with the class model_index.json names: what `from_pretrained` of the whole pipeline would load."""
    root = components_root(model)
    try:
        kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}
        return _component_class(root, name).from_pretrained(root, subfolder=name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdloraError(f"could not load {name} of {root!r}: {first} (copy or download the model again)") from exc


def load_text_encoder(model: ModelConfig, name: str, torch_dtype: Any = None) -> Any:
    """One text encoder of the base, alone (load_component), frozen and in eval mode."""
    return load_component(model, name, torch_dtype).requires_grad_(False).eval()


def component_config(model: ModelConfig, name: str) -> Any:
    """The config of the base's component `name` (e.g. "transformer") as attributes, without its weights."""
    from types import SimpleNamespace

    return SimpleNamespace(
        **_component_class(components_root(model), name).load_config(components_root(model), subfolder=name)
    )


def _component_class(root: str, name: str) -> Any:
    """The class model_index.json of `root` names for component `name`."""
    import importlib

    from diffusers import DiffusionPipeline

    library, class_name = DiffusionPipeline.load_config(root)[name]
    return getattr(importlib.import_module(library), class_name)


def peek_family(model: ModelConfig) -> Family:
    """The family of the config's base without loading any weights: a single file's tensor keys, else the
    denoiser built on the meta device from the folder's (or hub id's) config and asked by each family's `claims`."""
    from types import SimpleNamespace

    import torch
    from diffusers import DiffusionPipeline

    from sdlora import families

    base = model.base or ""
    path = Path(base).expanduser()
    if path.is_file():
        return _checkpoint_family(path)
    root = str(path) if path.is_dir() else base
    try:
        denoisers = {}
        for name in sorted({f.denoiser for f in families.REGISTRY.values()} & set(DiffusionPipeline.load_config(root))):
            cls = _component_class(root, name)
            with torch.device("meta"):
                denoisers[name] = cls.from_config(cls.load_config(root, subfolder=name))
        return families.detect(SimpleNamespace(**denoisers))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdloraError(f"could not read base model {base!r}: {first} ({_load_hint(path, None)})") from exc


def check_sizes(model: ModelConfig, sizes: Sequence[tuple[str, int]]) -> None:
    """Pre-flight, before any weights load: every (option, side) is a multiple of the base family's
    `size_multiple` (Flux: 16, for its 2x2 patches of 8x latents). Sides that suit every family need no look."""
    from sdlora import families

    largest = max(family.size_multiple for family in families.REGISTRY.values())
    if all(side % largest == 0 for _, side in sizes):
        return
    family = peek_family(model)
    for option, side in sizes:
        if side % family.size_multiple:
            multiple = family.size_multiple
            raise UsageError(
                f"{option}: {family.label} takes sizes that are multiples of {multiple} ({side} is not); "
                f"try {max(multiple, side // multiple * multiple)}"
            )


# bitsandbytes through diffusers' PipelineQuantizationConfig: the denoiser only (QLoRA); the LoRA stays fp32.
QUANTIZE_BACKENDS = {
    "nf4": ("bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}),
    "int8": ("bitsandbytes_8bit", {"load_in_8bit": True}),
}


def check_quantize(quantize: str) -> None:
    """diffusers' bitsandbytes quantizer refuses to run without a CUDA GPU: say so before anything loads."""
    if quantize != "none" and not device_facts()[0]:
        raise UsageError(
            f"--quantize {quantize}: bitsandbytes quantization in diffusers needs a CUDA GPU and none is visible; "
            "use --quantize none on this machine"
        )


def quantization_config(quantize: str, torch_dtype: Any) -> Any:
    """The quantization config of `from_pretrained` for the denoiser ("transformer" or "unet"), or None."""
    if quantize == "none":
        return None
    import torch
    from diffusers import PipelineQuantizationConfig

    backend, kwargs = QUANTIZE_BACKENDS[quantize]
    if quantize == "nf4":
        kwargs = {**kwargs, "bnb_4bit_compute_dtype": torch_dtype or torch.bfloat16}
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=["transformer", "unet"]
    )


def check_base(base: str | None, allow_pickle: bool, single_file_config: str | None = None) -> None:
    """Cheap checks before anything heavy loads: given, exists if it looks local, not a pickle unless allowed;
    for a single-file base, `single_file_config` (if it looks local) is a diffusers folder."""
    if not base:
        raise UsageError("--base is required: a hub id, a local diffusers folder or a .safetensors file")
    path = Path(base).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UsageError(
            f"{base}: {path.suffix} files are pickles that can run code when loaded; "
            "convert it to .safetensors, or pass --allow-pickle if you trust its source"
        )
    looks_local = path.suffix.lower() in SINGLE_FILE_SUFFIXES or base.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.exists():
        raise UsageError(f"{base}: no such file or folder")
    if path.is_dir() and not any((path / name).is_file() for name in ("model_index.json", "config.json")):
        raise UsageError(f"{base}: not a diffusers folder (no model_index.json)")
    if path.is_dir():
        _check_folder_weights(path, base, allow_pickle)
    elif path.exists() and path.suffix.lower() == ".safetensors":
        check_safetensors(path, base)
    elif path.exists() and not path.is_file():
        raise UsageError(f"{base}: not a regular file or folder (a device, pipe or socket?); give a model file")
    if single_file_config and path.is_file():
        _check_single_file_config(single_file_config)


# Weight files of a diffusers folder's components (unet/, vae/, text_encoder/, ...).
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# A .safetensors header larger than this is not a real one (real headers are a few MB at most).
MAX_HEADER = 100 * 1024 * 1024
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_safetensors(path: Path, what: str) -> dict[str, Any]:
    """Read and check a .safetensors file's header without loading anything: not empty, not a pickle renamed,
    the header whole and valid JSON, every tensor's bytes present (a partial download fails here, in
    milliseconds, instead of deep inside the loader). Returns the header; `what` names the file in messages."""
    import json

    from sdlora.errors import printable

    where = printable(what)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if size == 0:
                raise UsageError(f"{where}: the file is empty (0 bytes); download or copy it again")
            if head.startswith(PICKLE_MAGIC):
                raise UsageError(
                    f"{where}: a pickle (PyTorch .ckpt/.bin) renamed .safetensors, not a safetensors file; "
                    "use the real .safetensors file, or convert this one"
                )
            if len(head) < 8 or length <= 1 or length > min(MAX_HEADER, size - 8):
                raise UsageError(
                    f"{where}: not a .safetensors file, or truncated ({size} bytes; its header claims {length}); "
                    "download or copy it again"
                )
            header = json.loads(handle.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UsageError(f"{where}: not a .safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{where}: not a .safetensors file (its header is not a JSON object)")
    ends = [v.get("data_offsets", [0, 0])[-1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + length + max((int(end) for end in ends if isinstance(end, int)), default=0)
    if need > size:
        raise UsageError(
            f"{where}: truncated: {size} bytes, but its tensors need {need} (a partial download?); "
            "download or copy it again"
        )
    return header


def _check_folder_weights(folder: Path, base: str, allow_pickle: bool) -> None:
    """A local diffusers folder: its components' .safetensors headers are whole, and a component whose only
    weights are pickles is refused unless allowed (diffusers would fall back to them silently)."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        weights = [p for p in component.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file()]
        safe = [p for p in weights if p.suffix.lower() == ".safetensors"]
        for file in safe:
            check_safetensors(file, str(file))
        if weights and not safe and not allow_pickle:
            raise UsageError(
                f"{base}: {component.name}/ holds only pickle weights ({weights[0].name}), which can run code when "
                "loaded; convert them to .safetensors, or pass --allow-pickle if you trust the source"
            )


def _check_single_file_config(value: str) -> None:
    """A local `model.single_file_config` must be a diffusers pipeline folder (a hub id is checked when loading)."""
    folder = Path(value).expanduser()
    if not (value.startswith((".", "/", "~")) or folder.exists()):
        return
    if not (folder / "model_index.json").is_file():
        raise UsageError(
            f"model.single_file_config {value}: not a diffusers pipeline folder (no model_index.json); "
            "give the folder or hub id of a model with the same architecture as --base"
        )


def load_pipeline(
    base: str,
    *,
    allow_pickle: bool = False,
    torch_dtype: Any = None,
    vae: str | None = None,
    single_file_config: str | None = None,
    quantize: str = "none",
    without: Sequence[str] = (),
) -> Any:
    """The diffusers pipeline of `base`: a hub id, a local diffusers folder, or a single-file checkpoint.

    `single_file_config` (a diffusers folder or hub id of the same architecture) lets a single file load
    offline; without it diffusers fetches the architecture's configs from the hub. `quantize`: none, nf4 or
    int8 (the denoiser, with bitsandbytes). `without`: components not loaded (None in the pipeline).
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    check_base(base, allow_pickle, single_file_config)
    check_quantize(quantize)
    if are_progress_bars_disabled():  # diffusers' "Loading pipeline components" bar follows the hub's setting
        diffusers_logging.disable_progress_bar()
    path = Path(base).expanduser()
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}  # diffusers 0.42: `dtype`
    quantized = quantization_config(quantize, torch_dtype)
    if quantized is not None:
        kwargs["quantization_config"] = quantized
    kwargs.update({name: None for name in without})  # diffusers leaves a component given as None unloaded
    hint = _load_hint(path, single_file_config)
    try:
        if path.is_file():
            pipe = _from_single_file(path, single_file_config, kwargs)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(path) if path.is_dir() else base, **kwargs)
        if vae:
            pipe.vae = load_vae(vae, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdloraError(f"could not load base model {base!r}: {first} ({hint})") from exc
    from sdlora import families

    try:
        families.detect(pipe)
    except ValueError:
        raise UsageError(f"{base}: {type(pipe).__name__} is not a pipeline of a supported model family") from None
    return pipe


def _load_hint(path: Path, single_file_config: str | None) -> str:
    """What to try when `path` fails to load."""
    if path.is_dir():
        return "the folder's files may be damaged or incomplete: copy or download the model again"
    if not path.is_file():
        return "offline? use a local diffusers folder or set HF_HOME"
    if single_file_config:
        return f"does model.single_file_config {single_file_config} have the architecture of this file?"
    # Without a config, diffusers fetches the configs (and tokenizers) of the architecture it guesses from the hub.
    return "offline? name a diffusers folder of the same architecture: --set model.single_file_config=DIR"


def _from_single_file(path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
    """The pipeline of an original-format (LDM/SGM) checkpoint, with the configs and tokenizers of `config`."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    family = _checkpoint_family(path)
    own = family.load_single_file(path, config, kwargs)  # families whose files diffusers can't read as a whole
    if own is not None:
        return own
    cls = getattr(diffusers, family.single_file_pipeline)
    try:
        return cls.from_single_file(str(path), **kwargs, **({"config": config} if config else {}))
    except SingleFileComponentError as exc:  # e.g. a LoRA or VAE file given as the base
        missing = str(exc.message).split(".")[0].removeprefix("Failed to load ")
        raise UsageError(
            f"{path}: not a full checkpoint (no {missing} weights in it; a LoRA or VAE file is not a base model)"
        ) from exc


def load_vae(vae: str, *, torch_dtype: Any = None, allow_pickle: bool = False) -> Any:
    from diffusers import AutoencoderKL

    check_base(vae, allow_pickle)
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}  # diffusers 0.42: `dtype`
    path = Path(vae).expanduser()
    if path.is_file():
        return AutoencoderKL.from_single_file(str(path), **kwargs)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(str(path) if path.is_dir() else vae, subfolder=subfolder, **kwargs)


def _checkpoint_family(path: Path) -> Family:
    """The family of an original-format checkpoint, from its tensor keys (a pickle's keys can't be read without
    unpickling it: those are SD 1.x/2.x, as SDXL ships as .safetensors)."""
    from safetensors import safe_open

    from sdlora import families
    from sdlora.families.sd import SD1

    if path.suffix.lower() != ".safetensors":
        return SD1
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    return families.detect_checkpoint(keys) or SD1  # unknown keys: diffusers says what is missing
