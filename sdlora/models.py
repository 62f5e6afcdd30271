"""Load a base model (hub id, local diffusers folder, single-file checkpoint) and tell its family.

The family is read from the model itself (pipeline class, UNet and scheduler config), never from its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdlora.errors import SdloraError, UsageError

Family = Literal["sd1", "sd2", "sdxl"]
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass(frozen=True)
class ModelInfo:
    """What training and generation need to know about a base model."""

    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"
    vae_scale_factor: int  # pixels per latent pixel (8 for every real SD model)

    @property
    def kohya_base_version(self) -> str:
        """kohya's `ss_base_model_version` value."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        if self.family == "sd2":
            return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"

    @property
    def modelspec_architecture(self) -> str:
        """The `modelspec.architecture` value of a LoRA for this base."""
        if self.family == "sdxl":
            return "stable-diffusion-xl-v1-base/lora"
        if self.family == "sd2":
            return (
                "stable-diffusion-v2-768-v/lora"
                if self.prediction_type == "v_prediction"
                else "stable-diffusion-v2-512/lora"
            )
        return "stable-diffusion-v1/lora"


def family_of(unet_config: Any) -> Family:
    """SDXL conditions on pooled text + time ids ("text_time"); SD 2.x uses linear projections in its transformers."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if getattr(unet_config, "use_linear_projection", False):
        return "sd2"
    return "sd1"


def model_info(pipe: Any) -> ModelInfo:
    return ModelInfo(
        family=family_of(pipe.unet.config),
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scale_factor=2 ** (len(pipe.vae.config.block_out_channels) - 1),
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
) -> Any:
    """The diffusers pipeline of `base`: a hub id, a local diffusers folder, or a single-file checkpoint.

    `single_file_config` (a diffusers folder or hub id of the same architecture) lets a single file load
    offline; without it diffusers fetches the architecture's configs from the hub.
    """
    from diffusers import DiffusionPipeline

    check_base(base, allow_pickle, single_file_config)
    path = Path(base).expanduser()
    kwargs: dict[str, Any] = {"dtype": torch_dtype} if torch_dtype is not None else {}  # diffusers 0.42: `dtype`
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
    if not hasattr(pipe, "unet"):
        raise UsageError(f"{base}: {type(pipe).__name__} is not a Stable Diffusion (UNet) pipeline")
    return pipe


def _load_hint(path: Path, single_file_config: str | None) -> str:
    """What to try when `path` fails to load."""
    if not path.is_file():
        return "offline? use a local diffusers folder or set HF_HOME"
    if single_file_config:
        return f"does model.single_file_config {single_file_config} have the architecture of this file?"
    # Without a config, diffusers fetches the configs (and tokenizers) of the architecture it guesses from the hub.
    return "offline? name a diffusers folder of the same architecture: --set model.single_file_config=DIR"


def _from_single_file(path: Path, config: str | None, kwargs: dict[str, Any]) -> Any:
    """The pipeline of an original-format (LDM/SGM) checkpoint, with the configs and tokenizers of `config`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    cls = StableDiffusionXLPipeline if _single_file_is_sdxl(path) else StableDiffusionPipeline
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


def _single_file_is_sdxl(path: Path) -> bool:
    """An original-format SDXL checkpoint has a second text encoder under `conditioner.embedders.1`."""
    if path.suffix.lower() != ".safetensors":
        return False  # pickles: assume SD 1.x/2.x; SDXL ships as .safetensors
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return any(key.startswith("conditioner.embedders.1.") for key in handle.keys())  # noqa: SIM118
