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

from sdlora.hub import looks_local, resolve
from sdlora.quantization import check_quantize, quantization_config
from sdlora.weights import PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES, _check_folder_weights, check_safetensors

__all__ = ["PICKLE_SUFFIXES", "SINGLE_FILE_SUFFIXES", "check_safetensors", "resolve"]  # imported from here too


@dataclass(frozen=True)
class ModelInfo:
    """What training and generation need to know about a base model."""

    family: str  # a name in sdlora.families.REGISTRY
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    vae_scale_factor: int  # pixels per latent pixel (8 for every real SD model)
    variant: str = ""  # within the family: "dev" / "schnell" for Flux.1
    distilled: bool = False  # an inference target (Z-Image Turbo), not a training base: Family.is_distilled

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
        vae_scale_factor=vae_scale_factor(pipe.vae),
        variant=family.variant(pipe),
        distilled=family.is_distilled(pipe),
    )


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent pixel: 2 per down block of an image VAE, 2 per spatial downsampling of a video VAE used
    for images (Qwen-Image's: one frame, `temperal_downsample` lists its stages)."""
    config = vae.config
    if "block_out_channels" in config:
        return 2 ** (len(config.block_out_channels) - 1)
    return 2 ** len(config.temperal_downsample)


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
        return resolve(model.single_file_config)
    return resolve(base)


def load_component(model: ModelConfig, name: str, torch_dtype: Any = None) -> Any:
    """One component of the base (pipeline attribute `name`: a text encoder, a tokenizer), loaded alone from its
    subfolder with the class model_index.json names: what `from_pretrained` of the whole pipeline would load."""
    from sdlora import families

    root = components_root(model)
    # Qwen-Image-Edit's processor needs torchvision: sdlora's stand-in where it is missing (families.stand_ins).
    stand_in = families.stand_ins(root, {}).get(name) if name == "processor" else None
    if stand_in is not None:
        return stand_in
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
    return peek_base(model)[0]


def peek_base(model: ModelConfig) -> tuple[Family, Any]:
    """The family of the config's base and a stand-in of its pipeline that holds no weights, for the family's
    questions about the checkpoint before anything loads (`is_distilled`): the denoiser built on the meta device,
    the scheduler built from its config and `config` (model_index.json). A single file's family comes from its
    tensor keys and its stand-in from model.single_file_config, whose configs it loads with (empty without)."""
    from types import SimpleNamespace

    base = model.base or ""
    path = Path(base).expanduser()
    if path.is_file():
        config = model.single_file_config
        if not config:
            return _checkpoint_family(path), SimpleNamespace()
        family, stand_in = _folder_peek(resolve(config), config)
        return _of_config(_checkpoint_family(path), family), stand_in
    return _folder_peek(resolve(base), base)  # resolve before the heavy imports: a wrong --base fails in a second


def _folder_family(root: str, base: str) -> Family:
    return _folder_peek(root, base)[0]


def _folder_peek(root: str, base: str) -> tuple[Family, Any]:
    """The family of a diffusers folder or hub id, from its denoiser's config built on the meta device, and the
    weightless stand-in of its pipeline (peek_base)."""
    from types import SimpleNamespace

    import torch
    from diffusers import DiffusionPipeline
    from diffusers.configuration_utils import FrozenDict

    from sdlora import families

    path = Path(base).expanduser()
    try:
        index = DiffusionPipeline.load_config(root)
        parts: dict[str, Any] = {"config": FrozenDict(index)}  # as a loaded pipeline's `config`
        for name in sorted({f.denoiser for f in families.REGISTRY.values()} & set(index)):
            cls = _component_class(root, name)
            with torch.device("meta"):
                parts[name] = cls.from_config(cls.load_config(root, subfolder=name))
        if isinstance(index.get("scheduler"), list) and index["scheduler"][1]:
            cls = _component_class(root, "scheduler")
            parts["scheduler"] = cls.from_config(cls.load_config(root, subfolder="scheduler"))
        stand_in = SimpleNamespace(**parts)
        return families.detect(stand_in), stand_in
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


def check_base(base: str | None, allow_pickle: bool, single_file_config: str | None = None, hub: bool = True) -> None:
    """Cheap checks before anything heavy loads: given, exists if it looks local, not a pickle unless allowed, a
    hub id cached or on the hub (`hub=False`: not asked yet); for a single-file base, `single_file_config` (if it
    looks local) is a diffusers folder."""
    if not base:
        raise UsageError("--base is required: a hub id, a local diffusers folder or a .safetensors file")
    path = Path(base).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UsageError(
            f"{base}: {path.suffix} files are pickles that can run code when loaded; "
            "convert it to .safetensors, or pass --allow-pickle if you trust its source"
        )
    if not path.exists() and (hub or looks_local(base)):
        resolve(base)  # a hub id: cached, or the hub has it; else the real reason, in a second
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
    int8 (the denoiser, with bitsandbytes), fp8 (the denoiser's Linear weights, with torchao: sdlora.fp8).
    `without`: components not loaded (None in the pipeline).
    """
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    check_base(base, allow_pickle, single_file_config)
    check_quantize(quantize, device_facts()[0])
    from sdlora import families, fp8

    fp8.import_quietly()  # diffusers imports torchao (if installed) while loading, with CUDA-kernel warnings on CPU
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
            pipe = _single_file_pipeline(path, single_file_config, kwargs)
        else:
            root = resolve(base)
            pipe = DiffusionPipeline.from_pretrained(root, **families.stand_ins(root, kwargs), **kwargs)
        if vae:
            pipe.vae = load_vae(vae, torch_dtype=torch_dtype, allow_pickle=allow_pickle)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SdloraError(f"could not load base model {base!r}: {first} ({hint})") from exc
    try:
        family = families.detect(pipe)
    except ValueError:
        raise UsageError(f"{base}: {type(pipe).__name__} is not a pipeline of a supported model family") from None
    if quantize == "fp8":
        fp8.quantize(getattr(pipe, family.denoiser))
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


def _single_file_pipeline(path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
    """_from_single_file, with diffusers' failures to map this file onto `config` said in one line."""
    from sdlora.errors import printable

    if not config:
        return _from_single_file(path, None, kwargs)
    try:
        return _from_single_file(path, resolve(config), kwargs)
    except (TypeError, KeyError, RuntimeError, AttributeError, IndexError) as exc:
        # diffusers maps the file's tensors onto the config's modules without checking that they match.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(
            f"{printable(path)}: does not fit model.single_file_config {printable(config)} ({type(exc).__name__}: "
            f"{first}); give a diffusers folder or hub id with the architecture of this file"
        ) from exc


def _from_single_file(path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
    """The pipeline of an original-format (LDM/SGM) checkpoint, with the configs and tokenizers of `config`."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    family = _checkpoint_family(path)
    if config and _known_checkpoint_family(path) is not None:
        family = _check_same_family(path, family, config)
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


def _of_config(family: Family, other: Family) -> Family:
    """The family of a single file whose keys say `family`, given with a config of family `other`: `other` where
    its files carry `family`'s names (a Qwen-Image-Edit transformer file), else `family`."""
    return other if other.checkpoint_of == family.name else family


def _check_same_family(path: Path, family: Family, config: str) -> Family:
    """A single file's keys and its model.single_file_config must be one family (or the config's family's files
    carry the keys' family's names: _of_config): diffusers maps one onto the other with no check and fails deep
    inside (an SD 1.x file with a Flux.1 config raised a TypeError). Returns the family."""
    from sdlora.errors import printable

    other = _folder_family(config, config)
    family = _of_config(family, other)
    if other.name != family.name:
        raise UsageError(
            f"{printable(path)}: the checkpoint is {family.label}, but model.single_file_config {printable(config)} "
            f"is {other.label}; give a diffusers folder or hub id of the same family ({family.label})"
        )
    return family


def load_vae(vae: str, *, torch_dtype: Any = None, allow_pickle: bool = False) -> Any:
    from diffusers import AutoencoderKL

    check_base(vae, allow_pickle)
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}  # diffusers 0.42: `dtype`
    path = Path(vae).expanduser()
    if path.is_file():
        return AutoencoderKL.from_single_file(str(path), **kwargs)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(resolve(vae), subfolder=subfolder, **kwargs)


def _checkpoint_family(path: Path) -> Family:
    """The family of an original-format checkpoint, from its tensor keys (a pickle's keys can't be read without
    unpickling it: those are SD 1.x/2.x, as SDXL ships as .safetensors)."""
    from sdlora.families.sd import SD1

    return _known_checkpoint_family(path) or SD1  # unknown keys: diffusers says what is missing


def _known_checkpoint_family(path: Path) -> Family | None:
    """The family a .safetensors checkpoint's keys show, or None (a pickle, or keys of no family)."""
    from safetensors import safe_open

    from sdlora import families

    if path.suffix.lower() != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    return families.detect_checkpoint(keys)
