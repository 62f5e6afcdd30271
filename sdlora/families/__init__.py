"""Model families: everything that differs between SD 1.x, SD 2.x, SDXL, Flux.1, Z-Image and FLUX.2 [klein] behind one
Protocol (grouped by concern), and the registry that tells a family from a loaded pipeline, a checkpoint file's
keys or a LoRA file.

The training loop, the render path, the LoRA writers and the loaders ask the family object and never name a
family. A family is a plain object (no base class) in its own package, `sdlora/families/<name>/` (the family
object, its key names, metadata, single files, latent space and tiny pipeline), found in REGISTRY by its `name`:
a new family is one package and one line in `_registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

# A batch of conditioning is a flat dict of tensors with the batch first, so that it can be cached, indexed and
# concatenated without knowing the family; the family's `predict` turns it into the denoiser's arguments.
Conditioning = dict[str, Any]


class Detection(Protocol):
    """Telling the family and its variant from a loaded pipeline, a checkpoint's keys or a LoRA file's metadata."""

    kohya_versions: tuple[str, ...]  # prefixes of `ss_base_model_version` values of this family's LoRA files
    modelspec_prefix: str  # prefix of `modelspec.architecture` values of this family's LoRA files

    def claims(self, pipe: Any) -> bool:
        """True when the loaded pipeline is of this family (read from its config, never its name)."""

    def claims_checkpoint(self, keys: set[str]) -> bool:
        """True when an original-format single-file checkpoint with these tensor keys is of this family."""

    def variant(self, pipe: Any) -> str:
        """The loaded base's variant within the family ("dev"/"schnell" for Flux.1), or ""."""

    def is_distilled(self, pipe: Any) -> bool:
        """True for a guidance/step-distilled checkpoint that is an inference target, not a training base (Z-Image
        Turbo): training on it directly is refused unless model.allow_distilled or model.training_adapter. Read from
        its configs, never its name; `pipe` may be the pre-flight's stand-in (sdlora.models.peek_base: the denoiser
        on the meta device, the scheduler, `config` = model_index.json), so read configs only."""

    def undistilled_base(self, pipe: Any) -> str:
        """The hub id of the undistilled checkpoint to train on instead of a distilled `pipe` (Z-Image Turbo:
        "Tongyi-MAI/Z-Image"), for the refusal's message; "" where there is none."""

    def prediction_type(self, pipe: Any) -> str:
        """What the denoiser predicts: "epsilon", "v_prediction" (read from the scheduler) or "flow"."""

    def inpainting_kind(self, pipe: Any) -> str | None:
        """A few words naming what makes the loaded base an inpainting model ("9-channel UNet"), or None."""

    def cross_attention_widths(self, pipe: Any) -> set[int]:
        """Widths of the text features the loaded denoiser's cross-attention takes (LoRA shape checks)."""


class TextConditioning(Protocol):
    """The text encoders: which there are, which train, how prompts become the denoiser's conditioning."""

    text_encoders: tuple[str, ...]  # pipeline attributes; tokenizer of "text_encoder_2" is "tokenizer_2"
    trainable_text_encoders: tuple[str, ...]  # those that get LoRA with lora.train_text_encoder (Flux: not T5)
    text_width: int  # width of the real models' text features (cross-attention input): LoRA shape checks
    # Pivotal tuning: (text encoder attribute, key of its vectors in an embedding file as A1111/ComfyUI read it) for
    # each CLIP encoder that gets the new trigger tokens ("clip_l", "clip_g", SD 2.x's "clip_h"); () for none.
    embedding_keys: tuple[tuple[str, str], ...]

    def sequence_length(self, pipe: Any, configured: int | None) -> int | None:
        """T5 tokens per prompt (`model.max_sequence_length`, else the family's default); None without T5."""

    def encode_prompts(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        prompts: list[str],
        max_sequence_length: int | None = None,
    ) -> Conditioning:
        """The pipeline's own text conditioning of `prompts` (gradients flow; a None encoder of a staged family is
        left out; `max_sequence_length`: T5 tokens)."""

    def encode_with_pictures(self, pipe: Any, encoder: Any, prompts: list[str], pictures: list[Any]) -> Conditioning:
        """An edit model's conditioning of each prompt with its one input image (PIL), as its pipeline `pipe` (its
        class and processor; `encoder`: its frozen text encoder) encodes them at inference: edit training's
        captions with their control images. A UsageError for families without edit_training."""

    def text_encoder_targets(self) -> list[str]:
        """LoRA target module names of the text encoders."""


class Denoising(Protocol):
    """The trained network: its inputs, its objective, its LoRA targets and the latent space it works in."""

    denoiser: str  # pipeline attribute of the trained network ("unet"); also its key in checkpoints and LoRA files
    denoiser_label: str  # for people: "UNet"
    size_multiple: int  # training and image sides must be multiples of this (Flux: 16, for its 2x2 packing)
    # Frozen text encoders load one at a time, only to be cached, and the VAE stays in CPU RAM (sdlora.train.staging);
    # such a family's pipeline renders from the cached conditioning (Rendering.render_from_cache).
    stage_frozen: bool
    # `predict` reads a control image's latents (cond["control"], (B, C, h, w)): edit training (train.control_dir).
    edit_training: bool

    def predict(
        self,
        model: Any,
        noisy: Any,
        timesteps: Any,
        cond: Conditioning,
        micro_conditioning: Any,
        guidance: float | None = None,
    ) -> Any:
        """The denoiser's prediction for (B, C, H, W) `noisy` latents at `timesteps` (`micro_conditioning`: SDXL's
        (B, 6) sizes and crops; `guidance`: a guidance-distilled model's value; others ignore them)."""

    def objective(self, scheduler: Any, device: Any, sampling: str = "auto", shift: float | None = None) -> Any:
        """The training objective (sdlora.objectives) for this scheduler, train.timestep_sampling and _shift."""

    def denoiser_targets(self, targets: str) -> list[str] | str:
        """LoRA targets for `lora.targets` ('attention'/'all'; 'cross_attention' reaches UNet families only:
        sdlora.lora.peft.check_exportable refuses it for the others): peft's name suffixes, or one regex of whole
        paths."""

    def normalize_latents(self, vae: Any, latents: Any) -> Any:
        """(B, C, h, w) VAE posterior latents -> the denoiser's latent space (SD: scaled; Flux: shifted, scaled)."""

    def denormalize_latents(self, vae: Any, latents: Any) -> Any:
        """The inverse of normalize_latents: the denoiser's latents -> what `vae.decode` takes."""


class Files(Protocol):
    """What the family's files say and hold: kohya names and metadata, ComfyUI's diffusers file, single files."""

    single_file_pipeline: str  # diffusers pipeline class that reads this family's original-format checkpoints
    # The family whose tensor names this family's single files use, told apart by model.single_file_config
    # (Qwen-Image-Edit's transformer file: "qwenimage"); "" for its own.
    checkpoint_of: str
    kohya_implementation: str  # kohya's `modelspec.implementation`
    comfyui_diffusers_file: bool  # diffusers file written for ComfyUI too (lora.peft.save_diffusers for_comfyui)
    # The adapter kinds (lora.kind) its LoRA files can hold; None: every kind of sdlora.lora.kinds.KINDS.
    adapter_kinds: tuple[str, ...] | None
    # Its UIs read DoRA and LoKr under SimpleTuner's LyCORIS names (`lycoris_` + the denoiser's diffusers module
    # path, one layer each: ComfyUI puts q, k and v into its fused qkv rows itself), which NAME.safetensors then
    # uses for them (sdlora.lora.kohya.denoiser_naming); False: kohya's names (kohya_namer) for every kind.
    lycoris_names: bool

    def kohya_base_version(self, prediction_type: str, variant: str = "") -> str:
        """kohya's `ss_base_model_version`."""

    def modelspec_architecture(self, prediction_type: str, variant: str = "") -> str:
        """The SAI model spec's `modelspec.architecture` of a LoRA for this family."""

    def kohya_metadata(self, info: Any, train: Any, max_sequence_length: int | None) -> dict[str, str]:
        """The family's own kohya metadata of a LoRA trained on `info` (ModelInfo) with `train` (Flux: ss_*)."""

    def kohya_namer(self, denoiser: Any) -> Callable[[str], tuple[str, int, int]]:
        """Denoiser module path -> (kohya module path, part, parts); parts > 1: several layers fused in one module."""

    def kohya_encoder_prefixes(self, encoders: Sequence[Any]) -> list[str]:
        """The kohya key prefix of each text encoder given (`lora_te_`, or `lora_te1_`/`lora_te2_`)."""

    def ui_lora_state(self, denoiser: Any, text_encoders: Sequence[Any], adapter: str, dtype: Any) -> dict | None:
        """The tensors of the UIs' plain-LoRA file (NAME.safetensors) where the family's UIs read no kohya names
        (Z-Image: ComfyUI's `diffusion_model.` + diffusers names, alpha/rank baked in), or None: kohya's. (DoRA and
        LoKr: lycoris_names.)"""

    def load_single_file(self, path: Any, config: str | None, kwargs: dict[str, Any]) -> Any:
        """The pipeline of an original-format file diffusers can't build alone (`config`: model.single_file_config),
        or None: diffusers' from_single_file reads it."""

    def save_single_file(self, pipe: Any, path: Any) -> None:
        """Write the loaded pipeline as one original-format checkpoint, as people download them (tests)."""


class Rendering(Protocol):
    """Making images: samplers, defaults, refiner, previews of the denoising, rendering from cached text."""

    samplers: tuple[str, ...]  # names in sdlora.generate.render.SCHEDULERS that can sample this family
    guidance_label: str | None  # A1111/Forge's name of a distilled guidance value in PNG parameters, or None
    supports_refiner: bool  # an SDXL-style img2img refiner pass
    vae_fp32: bool  # the stock VAE overflows in half precision and must run in fp32
    # The diffusers pipeline class that renders from a photo (--init-image, with the whole image masked, and
    # --keep-face) where diffusers' AutoPipelineForImage2Image/ForInpainting have none for the family; None: theirs.
    photo_pipeline: str | None
    # The family's pipelines that take reference photos as `image=` (an edit model's, a multi-reference input) and
    # how many each takes at most: generate --reference (sdlora.families.references); () for none.
    reference_pipelines: tuple[tuple[str, int], ...]

    def text_to_image(self, pipe: Any) -> Any:
        """The pipeline that renders from text alone: `pipe` itself, or, where the loaded pipeline needs a reference
        image (an edit model's), a text-to-image pipeline sharing its weights."""

    def generate_defaults(self, pipe: Any) -> dict[str, Any]:
        """Dotted settings ("generate.steps": 28) replacing the config's defaults for this base when unset."""

    def preview_latents(self, pipe: Any, latents: Any, width: int, height: int) -> Any:
        """A pipeline call's latents (Flux: packed) of a (width, height) image -> the input of `pipe.vae.decode`."""

    def x0_prediction(self, scheduler: Any, model_output: Any, timestep: Any, sample: Any, out: Any) -> Any:
        """The x0 prediction of the scheduler step that just gave `out` from `model_output` at `sample`, or None."""

    def render_from_cache(self, pipe: Any, rows: dict[str, Conditioning]) -> None:
        """Make a `stage_frozen` family's `pipe` encode prompts from cached conditioning rows ({prompt: cond})."""

    def comfyui_parts(self, pipe: Any, base: str, width: int, height: int, cfg: float) -> Any:
        """ComfyUI's built-in nodes that load `base` (model.base) as a ComfyUI models folder holds it and sample it
        as sdlora's render of `pipe` does at this size and guidance_scale (sdlora.families.comfyui.ComfyParts)."""


class Family(Detection, TextConditioning, Denoising, Files, Rendering, Protocol):
    """What the rest of sdlora needs to know about one model family (one package in sdlora/families/)."""

    name: str  # "sd1" | "sd2" | "sdxl" | "flux" | "zimage" | "klein": LoRA metadata (`sdlora.family`), messages, tests
    label: str  # for people: "SD 1.x"

    def tiny_pipeline(self, seed: int) -> Any:
        """A tiny randomly initialised pipeline of this family, built from configs (tests and the demo)."""


def pipeline_class(pipe: Any) -> str | None:
    """The pipeline class: model_index.json's `_class_name` (the pre-flight's stand-in) or the loaded one's type."""
    config = getattr(pipe, "config", None)
    name = config.get("_class_name") if isinstance(config, Mapping) else None
    if name:
        return name
    return None if type(pipe).__name__ == "SimpleNamespace" else type(pipe).__name__


def _registry() -> dict[str, Family]:
    from sdlora.families.flux import FLUX
    from sdlora.families.klein import KLEIN
    from sdlora.families.qwenedit import QWENEDIT
    from sdlora.families.qwenimage import QWENIMAGE
    from sdlora.families.sd import SD1, SD2
    from sdlora.families.sdxl import SDXL
    from sdlora.families.zimage import ZIMAGE

    # Order matters for detection: the most specific family first, SD 1.x last.
    families: list[Family] = [QWENEDIT, QWENIMAGE, ZIMAGE, KLEIN, FLUX, SDXL, SD2, SD1]
    return {family.name: family for family in families}


REGISTRY: Mapping[str, Family] = _registry()
NAMES = tuple(REGISTRY)


def get(name: str) -> Family:
    """The family called `name`; a ValueError names the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(NAMES)}") from None


def detect(pipe: Any) -> Family:
    """The family of a loaded pipeline."""
    for family in REGISTRY.values():
        if family.claims(pipe):
            return family
    raise ValueError(f"{type(pipe).__name__} is not a pipeline of a known family ({', '.join(NAMES)})")


def detect_checkpoint(keys: Iterable[str]) -> Family | None:
    """The family of an original-format single-file checkpoint, from its tensor keys; None if unknown."""
    keys = set(keys)
    return next((family for family in REGISTRY.values() if family.claims_checkpoint(keys)), None)


def detect_lora(metadata: Mapping[str, str]) -> str | None:
    """The family name a LoRA file was made for, from our own metadata, else kohya's, else modelspec's (a foreign
    architecture's own name when it is none of ours); None when the metadata says nothing."""
    if metadata.get("sdlora.family"):
        return metadata["sdlora.family"]
    version = metadata.get("ss_base_model_version", "")
    if version:
        return next((f.name for f in REGISTRY.values() if version.startswith(f.kohya_versions)), version)
    architecture = metadata.get("modelspec.architecture", "")
    if architecture:
        found = (f.name for f in REGISTRY.values() if architecture.startswith(f.modelspec_prefix))
        return next(found, architecture.split("/")[0])
    return None


def with_defaults(config: Any, family: Family, pipe: Any) -> Any:
    """`config` (sdlora.config.Config) with the family's own defaults for the loaded base (Flux: 28 steps, guidance
    3.5, flow-matching Euler) in the settings nobody set (pydantic's `model_fields_set`: a TOML file, an option or
    --set sets one, even to the config's default value, and then it wins); the same object when there are none."""
    changes: dict[str, dict[str, Any]] = {}
    for dotted, value in family.generate_defaults(pipe).items():
        section, _, key = dotted.partition(".")
        if key not in getattr(config, section).model_fields_set:
            changes.setdefault(section, {})[key] = value
    if not changes:
        return config
    update = {name: getattr(config, name).model_copy(update=values) for name, values in changes.items()}
    return config.model_copy(update=update)


def references(family: Family, pipe: Any) -> int:
    """How many reference photos the loaded (or peeked) pipeline takes as `image=`; 0 for none."""
    return dict(family.reference_pipelines).get(pipeline_class(pipe) or "", 0)


def stand_ins(root: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Components of the diffusers folder `root` that sdlora supplies where the library's own can't load here
    (Qwen-Image-Edit's Qwen2VLProcessor needs torchvision), as from_pretrained arguments; those `given` aside."""
    from sdlora.families.qwenedit.processor import load_kwargs

    return {name: part for name, part in load_kwargs(root).items() if name not in given}


def tokenizers(pipe: Any, family: Family) -> list[Any]:
    """The tokenizer of each of the family's text encoders."""
    return [getattr(pipe, name.replace("text_encoder", "tokenizer")) for name in family.text_encoders]


def encoders(pipe: Any, family: Family) -> list[Any]:
    return [getattr(pipe, name) for name in family.text_encoders]
