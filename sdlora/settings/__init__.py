"""Every setting of the config, by section (prep, model, lora, train, generate, eval): its type, default, bounds,
what it does and what its special values mean, and the checks within one section. `sdlora.config` puts the sections
together into `Config`, loads and saves it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdlora.settings.base import (
    DEFAULT_CAPTIONER,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_RESOLUTION,
    MAX_SEED,
    MAX_STEPS,
    Section,
    _multiple_of_8,
    parse_size,
)
from sdlora.settings.train import TrainConfig

__all__ = [
    "DEFAULT_CAPTIONER",
    "MAX_IMAGES",
    "MAX_PIXELS",
    "MAX_RESOLUTION",
    "MAX_SEED",
    "MAX_STEPS",
    "EvalConfig",
    "GenerateConfig",
    "LoraConfig",
    "ModelConfig",
    "PrepConfig",
    "Section",
    "TrainConfig",
    "parse_size",
]


class PrepConfig(Section):
    """`sdlora prep`: photos -> face-centred training set."""

    token: str = Field("sks", description="Rare token that names the person in captions and prompts.")
    class_word: str = Field("person", description="Class noun after the token: person, man, woman, ...")
    resolution: int = Field(512, ge=64, le=MAX_RESOLUTION, description="Side of the square output crops, in pixels.")
    crop: Literal["face", "center"] = Field(
        "face",
        description="face: square centred on the detected face; center: the centre square, no face needed.",
    )
    min_images: int = Field(3, ge=1, description="Fail (exit 1) when fewer photos than this survive.")
    caption_template: str = Field(
        "a photo of {token} {class_word}", description="Caption for photos without a .txt sidecar."
    )
    buckets: bool = Field(False, description="SDXL aspect-ratio buckets instead of square crops.")
    face_share: float = Field(0.45, gt=0.05, lt=1.0, description="Width of the face box as a share of the crop's side.")
    max_upscale: float = Field(2.0, ge=1.0, description="Never upscale a crop more than this; smaller is too_small.")
    blur_ratio: float = Field(
        0.35,
        ge=0.0,
        lt=1.0,
        description="Blurry when sharpness < this share of the set's median (0 disables).",
    )
    duplicate_distance: int = Field(
        6, ge=0, le=64, description="Perceptual-hash Hamming distance at or under which two photos are duplicates."
    )
    other_person_distance: float = Field(
        0.6,
        gt=0.0,
        description="Face-embedding distance from the set's identity above which a face is someone else.",
    )
    max_pixels: int = Field(
        MAX_PIXELS,
        gt=0,
        le=10 * MAX_PIXELS,
        description="Refuse images with more pixels than this (decompression bombs).",
    )
    workers: int = Field(0, ge=0, le=256, description="Parallel worker processes; 0 means one per CPU core.")
    overwrite: bool = Field(False, description="Replace the contents of a non-empty OUT_DIR.")
    # Captions (issue 31): sdlora/prep/captioning.py, policy.py, captioner.py.
    captions: Literal["template", "vlm", "keep"] = Field(
        "template",
        description="template: caption_template for photos without a .txt sidecar (a sidecar is kept); vlm: a "
        "vision-language model describes each crop and caption_policy decides what the caption names (sidecars and "
        "captions edited in OUT_DIR are kept); keep: every photo's own IMG.txt (a kept photo without one is an error).",
    )
    captioner: str = Field(
        DEFAULT_CAPTIONER,
        description="With captions = vlm: hub id or local folder of a vision-language model transformers loads "
        "natively (AutoModelForImageTextToText, no remote code), e.g. Qwen/Qwen2.5-VL-3B-Instruct.",
    )
    caption_policy: Literal["variable", "full"] = Field(
        "variable",
        description="variable: name what varies across the set (clothing, setting, pose, glasses on some photos) and "
        "leave out person features constant over the set (identity, learned by the trigger); full: name everything.",
    )
    caption_constant_share: float = Field(
        0.75, gt=0.5, le=1.0, description="A person feature in at least this share of photos is constant (identity)."
    )
    caption_batch_size: int = Field(4, ge=1, le=256, description="Photos per captioner call.")
    caption_max_tokens: int = Field(256, ge=8, le=4096, description="Longest answer the captioner may give, in tokens.")
    caption_cache: str | None = Field(
        None, description="Folder of cached captioner answers; unset: ~/.cache/sdlora/captions."
    )

    _check_resolution = field_validator("resolution")(_multiple_of_8)


class ModelConfig(Section):
    """Where the base model comes from."""

    base: str | None = Field(
        None, description="Hub id, local diffusers folder, or single-file .safetensors checkpoint."
    )
    single_file_config: str | None = Field(
        None,
        description="A local diffusers folder or hub id of the same architecture, used to load a single-file "
        "--base offline (its configs and tokenizers; the weights come from the file).",
    )
    vae: str | None = Field(None, description="Replacement VAE (hub id, folder or file), e.g. an fp16-fixed SDXL VAE.")
    allow_pickle: bool = Field(
        False, description="Allow .ckpt/.pt/.bin files, which are pickles that can run code when loaded."
    )
    max_sequence_length: int | None = Field(
        None,
        gt=0,
        le=512,
        description="T5 tokens per prompt on bases with a T5 text encoder (Flux.1); unset: 512 for FLUX.1-dev, "
        "256 for FLUX.1-schnell.",
    )
    quantize: Literal["none", "nf4", "int8", "fp8"] = Field(
        "none",
        description="Load the frozen denoiser quantized (the LoRA stays fp32): nf4 (4-bit) or int8 with "
        "bitsandbytes (QLoRA, CUDA only), fp8 (float8 e4m3 weights with per-row scales, torchao: the fp8 extra; "
        "computed in the training's precision), or none.",
    )
    allow_distilled: bool = Field(
        False,
        description="Train directly on a distilled checkpoint (Z-Image-Turbo), which is refused otherwise: trained "
        "directly, distilled models give grain or no effect. Better: train on the undistilled base and render on the "
        "distilled one, or set model.training_adapter.",
    )
    training_adapter: str | None = Field(
        None,
        description="A de-distillation LoRA (a .safetensors file, a folder holding one, or a hub id; diffusers' or "
        "the family's ComfyUI form) added to the frozen base at strength 1 while training, so that a distilled "
        "checkpoint trains like its base; samples and identity scoring leave it out (they show the distilled model "
        "+ your LoRA) and it is never written into your LoRA files. Unset: none.",
    )


class LoraConfig(Section):
    """The LoRA adapters: where they go and how big they are."""

    rank: int = Field(16, gt=0, le=1024, description="LoRA rank (inner dimension).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: Literal["attention", "all", "cross_attention"] = Field(
        "attention",
        description="attention: to_q/to_k/to_v/to_out.0; all: also feed-forward and transformer projections; "
        "cross_attention: only the key and value projections that read the prompt (Custom Diffusion's choice; "
        "UNet bases: SD 1.x/2.x, SDXL).",
    )
    train_text_encoder: bool = Field(False, description="Also train LoRA on the text encoder(s).")
    kind: Literal["lora", "dora", "lokr"] = Field(
        "lora",
        description="Adapter type (peft): lora, plain low-rank; dora, LoRA plus a learned magnitude per output "
        "channel (DoRA); lokr, a Kronecker product of two small factors (LoKr, rank = the factorised part's rank). "
        "A family whose kohya format can't hold a kind refuses it before training.",
    )
    lokr_factor: int = Field(
        -1,
        description="LoKr's Kronecker factor (LyCORIS's factor, e.g. 4, 8, 16): each layer's width splits into factor "
        "x width/factor (a smaller factor: more parameters); -1: near its square root, peft's default. Only with "
        "kind = lokr.",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> LoraConfig:
        if self.kind == "lokr" and self.dropout:
            raise ValueError("kind 'lokr' has no input dropout (peft's LoKr drops ranks or modules); set dropout = 0")
        if self.lokr_factor != -1 and self.lokr_factor < 2:
            raise ValueError(f"lora.lokr_factor = {self.lokr_factor}: use -1 (the default factorisation) or 2 and up")
        if self.lokr_factor != -1 and self.kind != "lokr":
            raise ValueError(
                f"lora.lokr_factor = {self.lokr_factor} applies to kind 'lokr' only, not {self.kind!r}; set "
                "lora.kind = 'lokr' or drop lokr_factor"
            )
        return self


class GenerateConfig(Section):
    """`sdlora generate`: sampling settings."""

    loras: list[str] = Field(default_factory=list, description="LoRA paths, each optionally PATH:SCALE.")
    prompts: list[str] = Field(default_factory=list, description="Prompts; {trigger} becomes the LoRA's trigger.")
    negative: str = Field("", description="Negative prompt.")
    n: int = Field(4, gt=0, le=MAX_IMAGES, description="Images per prompt.")
    batch_size: int = Field(4, gt=0, le=1024, description="Images per pipeline call.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Image i uses seed + i, so one image can be remade alone.")
    steps: int = Field(
        30, gt=0, le=1000, description="Denoising steps (at most 1000; Flux.1 bases: 28 for dev, 4 for schnell)."
    )
    cfg: float = Field(
        7.0, ge=0, description="Classifier-free guidance scale (FLUX.1-dev: its distilled guidance, default 3.5)."
    )
    scheduler: Literal["dpmpp_2m_karras", "euler_a", "euler", "ddim", "unipc", "flow_euler"] = Field(
        "dpmpp_2m_karras", description="Sampler (flow_euler: flow-matching Euler, the default on Flux.1 bases)."
    )
    size: str = Field("512x512", description="WIDTHxHEIGHT, each divisible by 8.")
    fuse: bool = Field(False, description="Fuse LoRAs into the weights (same speed as the base model).")
    compare: bool = Field(False, description="Also render the base model at the same seeds, side by side.")
    keep_face: Path | None = Field(None, description="Keep this photo's face and repaint the rest.")
    init_image: Path | None = Field(None, description="img2img from this photo.")
    strength: float = Field(0.6, gt=0, le=1, description="img2img strength: 1 ignores the init image.")
    save_steps: int = Field(0, ge=0, description="Filmstrip of the x0 prediction every K steps; 0 disables.")
    refiner: str | None = Field(None, description="SDXL refiner model for an img2img pass.")
    reference: list[Path] = Field(
        default_factory=list,
        description="Reference photos an edit model keeps the person from (1-3), or one prepped dataset folder whose "
        "best faces (manifest.jsonl) are picked; written back as the photos used.",
    )
    # The hosted image-edit API (`generate --engine openai`, which alone switches uploads on; its key is never a
    # setting). It is sent the reference photos (up to 16; a prepped dataset: its 3 best faces).
    api_model: str = Field("gpt-image-1", min_length=1, description="--engine openai: the image-edit model.")
    api_base_url: str | None = Field(
        None, description="--engine openai: server URL ending in /v1; unset: $OPENAI_BASE_URL, else OpenAI's."
    )

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _one_source_image(self) -> GenerateConfig:
        if self.keep_face and self.init_image:
            raise ValueError("can't give both keep_face and init_image; choose one")
        if self.reference and (self.keep_face or self.init_image):
            raise ValueError("can't give reference with keep_face or init_image; choose one")
        return self

    @property
    def width_height(self) -> tuple[int, int]:
        return parse_size(self.size)


class EvalConfig(Section):
    """`sdlora eval` and identity scoring during training."""

    face_model: Literal["dlib", "insightface", "toy"] = Field(
        "dlib",
        description="Face-embedding backend: dlib (offline default) or insightface (ArcFace; its pretrained "
        "weights are for non-commercial use only, and must already be on disk).",
    )
    threshold: float | None = Field(
        None, gt=0, description="Same-person face distance; unset: the face model's own (0.6 for dlib and ArcFace)."
    )
    n: int = Field(4, gt=0, le=MAX_IMAGES, description="Images per evaluation prompt.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="First seed of the evaluation images.")
    clip: str | None = Field(
        None,
        description="CLIP model (hub id or folder) for prompt fidelity; skipped if unset. With dlib or insightface "
        "it also judges the edit prompts (editability), in eval and in scoring during training (on the CPU).",
    )
    min_diversity: float = Field(
        0.1,
        ge=0,
        description="Best checkpoint must have at least this diversity (mean pairwise pHash distance; "
        "near-duplicates are under 0.1, unrelated photos ~0.5; 0 disables).",
    )
    max_bleed: float = Field(1.0, ge=0, le=1, description="Best checkpoint must have at most this bleed.")
