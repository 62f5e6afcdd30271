"""Every setting of the config, by section (prep, model, lora, train, generate, eval): its type, default, bounds,
what it does and what its special values mean, and the checks within one section. `sdlora.config` puts the sections
together into `Config`, loads and saves it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Images with more pixels than this are refused as decompression bombs or huge scans (prep.max_pixels).
MAX_PIXELS = 120_000_000

# Upper bounds of the numbers that would otherwise reach torch or numpy and fail there (or exhaust memory).
MAX_RESOLUTION = 4096  # px: SDXL trains at 1024; 4096 is already 16x its memory
MAX_SEED = 2**32 - 1  # A1111's range; torch takes 64-bit seeds, but seed + i must stay in range
MAX_STEPS = 10_000_000
MAX_IMAGES = 100_000  # images per prompt, class images, batch sizes
# prep's default vision-language captioner (why this one: sdlora/prep/captioner.py).
DEFAULT_CAPTIONER = "HuggingFaceTB/SmolVLM-Instruct"


class Section(BaseModel):
    # allow_inf_nan=False: every float setting is finite (`--lr inf` and `nan` are refused here, not in torch).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be divisible by 8 (got {value}); try {max(8, value // 8 * 8)}")
    return value


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
    targets: Literal["attention", "all"] = Field(
        "attention",
        description="attention: to_q/to_k/to_v/to_out.0; all: also feed-forward and transformer projections.",
    )
    train_text_encoder: bool = Field(False, description="Also train LoRA on the text encoder(s).")
    kind: Literal["lora", "dora", "lokr"] = Field(
        "lora",
        description="Adapter type (peft): lora, plain low-rank; dora, LoRA plus a learned magnitude per output "
        "channel (DoRA); lokr, a Kronecker product of two small factors (LoKr, rank = the factorised part's rank). "
        "A family whose kohya format can't hold a kind refuses it before training.",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> LoraConfig:
        if self.kind == "lokr" and self.dropout:
            raise ValueError("kind 'lokr' has no input dropout (peft's LoKr drops ranks or modules); set dropout = 0")
        return self


class TrainConfig(Section):
    """`sdlora train`: the optimisation and its outputs."""

    name: str | None = Field(None, description="Name of the kohya-format file; default: the OUT_DIR folder name.")
    steps: int = Field(800, gt=0, le=MAX_STEPS, description="Optimisation steps.")
    resolution: int = Field(512, ge=64, le=MAX_RESOLUTION, description="Training resolution in pixels.")
    batch_size: int = Field(1, gt=0, le=1024, description="Images per device per micro-batch.")
    grad_accum: int = Field(1, gt=0, le=MAX_IMAGES, description="Micro-batches accumulated per optimisation step.")
    learning_rate: float = Field(1e-4, gt=0, le=10, description="UNet LoRA learning rate (Prodigy: use 1.0).")
    text_encoder_learning_rate: float = Field(5e-5, gt=0, le=10, description="Text-encoder LoRA learning rate.")
    text_encoder_2_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10,
        description="SDXL's second text-encoder LoRA learning rate; unset: text_encoder_learning_rate.",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on GPUs that support it, else fp16."
    )
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = Field("adamw", description="Optimizer.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients at this norm; 0 disables clipping.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    checkpoint_every: int = Field(200, ge=0, description="Save a resumable checkpoint every N steps; 0 disables.")
    keep_checkpoints: int = Field(3, ge=1, description="Keep only the newest N checkpoints.")
    resume: str | None = Field(None, description="'latest' or a checkpoint folder to continue from.")
    overwrite: bool = Field(False, description="Replace a different run already in OUT_DIR.")
    class_prompt: str | None = Field(None, description="Prior preservation: generate class images from this prompt.")
    num_class_images: int = Field(
        100, gt=0, le=MAX_IMAGES, description="How many class images prior preservation uses."
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the prior-preservation loss.")
    class_dir: Path | None = Field(None, description="Prior preservation: a folder of ready class images.")
    sample_every: int = Field(200, ge=0, description="Render sample grids every N steps; 0 disables.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["a photo of {trigger}", "a portrait of {trigger}, oil painting"],
        description="Prompts of the sample grids; {trigger} becomes the trigger phrase.",
    )
    sample_steps: int = Field(20, gt=0, le=1000, description="Denoising steps of each sample.")
    sample_like: Literal["sdlora", "comfyui"] = Field(
        "sdlora",
        description=(
            "Sampler of training's renders (sample grids, identity scoring, class images): 'sdlora' "
            "generate.scheduler; 'comfyui' only a sampler "
            "ComfyUI has on the same sigmas (generate.scheduler if it is one, else DPM++ 2M Karras, or the "
            "flow-matching Euler of a flow family), so that NAME.comfyui.json renders what the grids show."
        ),
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of data order, noise and LoRA init.")
    log_every: int = Field(
        10,
        gt=0,
        description="Log loss/lr to metrics.jsonl and the progress bar every N steps (each log syncs the GPU).",
    )
    min_snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting gamma (5.0 is usual); off when unset."
    )
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (0.05-0.1 helps dark/bright images).")
    flip: bool = Field(False, description="Random horizontal flips (faces are not symmetric: off by default).")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="Share of steps trained with an empty caption.")
    cache_latents: bool = Field(True, description="Encode each image with the VAE once, not every step.")
    compile: bool = Field(False, description="torch.compile the UNet (slow start, faster steps on GPU).")
    eval_every: int | None = Field(
        None,
        ge=0,
        description="Score identity every N steps and at the last (best step kept in OUT_DIR/best); default: at "
        "each checkpoint of a prep dataset; 0 disables.",
    )
    offload: bool = Field(False, description="Move text encoders and VAE to the CPU once their outputs are cached.")
    offload_blocks: int = Field(
        0,
        le=1000,
        description="Keep the last N transformer blocks of the frozen denoiser in CPU RAM, each brought to the GPU "
        "only while it runs (forward and backward; overlapped with compute on CUDA): less GPU memory, slower steps. "
        "Needs gradient_checkpointing; 0 disables.",
    )
    guidance: float = Field(
        1.0,
        ge=0,
        description="Distilled-guidance value fed to a guidance-distilled base's guidance embedding while training "
        "(FLUX.1-dev; 1.0 as kohya, FluxGym and ai-toolkit train); ignored by other bases.",
    )
    timestep_sampling: Literal["auto", "uniform", "sigmoid", "logit_normal", "shift"] = Field(
        "auto",
        description="How a flow-matching base's training sigmas are drawn: uniform U(0,1); sigmoid of N(0,1); "
        "logit_normal (the same, on diffusers' 1000-step grid); shift (sigmoid, then the flow shift "
        "train.timestep_shift); auto: shift for Flux.1, uniform DDPM timesteps for SD/SDXL (which take only "
        "uniform).",
    )
    timestep_shift: float = Field(
        3.1582, gt=0, description="Discrete flow shift of timestep_sampling='shift' (kohya's recommended 3.1582)."
    )
    resolutions: list[int] = Field(
        default_factory=list,
        description="Train at several sizes in one run (e.g. [512, 768, 1024]): each image is cached at each size "
        "and each micro-batch is of one size; empty: train.resolution only.",
    )
    preservation: Literal["auto", "none", "class_images", "output"] = Field(
        "auto",
        description="Keep the LoRA from turning every person into the subject (bleed): none; class_images "
        "(DreamBooth prior preservation on class images, train.class_prompt/class_dir; giving either implies it); "
        "output (differential output preservation: on the subject's own noisy latent, the LoRA's prediction for "
        "the caption without the trigger token is pulled to the base model's, adapters off; no class images); "
        "auto (the identity benchmark's recommendation): class_images with pivotal tuning, else output.",
    )
    preservation_weight: float = Field(
        1.0, ge=0, description="Weight of the output-preservation loss (preservation = 'output')."
    )
    masked_loss: bool = Field(
        False,
        description="Weight the per-pixel loss by prep's face-and-hair masks (masks/NNNN.png in the manifest), "
        "at latent resolution, floored at train.mask_floor and divided by the weight map's mean.",
    )
    mask_floor: float = Field(
        0.1, ge=0, le=1, description="Smallest loss weight of the masked loss (the background still trains a little)."
    )
    mask_prior_weight: float = Field(
        0.0,
        ge=0,
        description="Masked prior: outside the mask, pull the LoRA's prediction to the adapter-disabled one with "
        "this weight; 0 disables. Needs masked_loss.",
    )
    timestep_bias: Literal["none", "high", "low"] = Field(
        "none",
        description="Skew the training timesteps: high (towards noise, where identity is set) or low (towards "
        "detail): a uniform draw u becomes u^(1/(1+s)) (or its mirror), i.e. Beta(1+s, 1), s = "
        "timestep_bias_strength; on flow-matching bases applied to the timestep_sampling scheme's sigmas.",
    )
    timestep_bias_strength: float = Field(
        1.0, ge=0, le=100, description="s of timestep_bias: 0 no skew, 1 density 2u (mean 2/3 with 'high')."
    )
    pivotal: bool | None = Field(
        None,
        description="Pivotal tuning: new tokens stand for the trigger word in the CLIP text encoders, and only their "
        "embedding rows train (beside the LoRA) for the first train.pivotal_fraction of the steps; written as "
        "NAME_emb.safetensors (A1111/ComfyUI: write NAME_emb / embedding:NAME_emb in prompts) and inside the "
        "diffusers file. Unset (the identity benchmark's recommendation): on where the base's text encoders take "
        "new tokens (SD 1.x, 2.x, SDXL) and a caption names the trigger word; off for Flux.1.",
    )
    pivotal_tokens: int = Field(
        2, ge=1, le=16, description="New tokens for the trigger word (<s0><s1>...), each starting as the class word."
    )
    pivotal_learning_rate: float = Field(3e-4, gt=0, le=10, description="Learning rate of the new tokens' rows.")
    pivotal_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the steps in which the new tokens train; then they are frozen."
    )

    _check_resolution = field_validator("resolution")(_multiple_of_8)

    control_dir: Path | None = Field(
        None,
        description="Edit models: control images, each named as its dataset image (else manifest.jsonl's `control`); "
        "unset and none in the manifest: the edit model trains text-to-image.",
    )

    @field_validator("resolutions")
    @classmethod
    def _check_resolutions(cls, values: list[int]) -> list[int]:
        for value in values:
            if value < 64:
                raise ValueError(f"each resolution must be at least 64 (got {value})")
            _multiple_of_8(value)
        return values

    @field_validator("offload_blocks")
    @classmethod
    def _check_offload_blocks(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"--offload-blocks {value}: must be 0 (off) or a number of blocks")
        return value

    @model_validator(mode="after")
    def _one_prior_source(self) -> TrainConfig:
        if self.class_prompt and self.class_dir:
            raise ValueError("can't give both class_prompt and class_dir; choose one")
        return self

    @model_validator(mode="before")
    @classmethod
    def _class_options_imply_class_images(cls, data: Any) -> Any:
        """--class-prompt/--class-dir (as before there was train.preservation) mean preservation = class_images;
        with preservation = output they are a usage error."""
        if not isinstance(data, dict) or not (data.get("class_prompt") or data.get("class_dir")):
            return data
        if data.get("preservation") == "output":
            given = "class_prompt" if data.get("class_prompt") else "class_dir"
            raise ValueError(f"preservation = 'output' needs no class images; remove {given} or choose class_images")
        return {**data, "preservation": "class_images"}

    @model_validator(mode="after")
    def _mask_prior_needs_masks(self) -> TrainConfig:
        if self.mask_prior_weight and not self.masked_loss:
            raise ValueError("mask_prior_weight needs masked_loss = true (it uses the same masks)")
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
    clip: str | None = Field(None, description="CLIP model (hub id or folder) for prompt fidelity; skipped if unset.")
    min_diversity: float = Field(
        0.1,
        ge=0,
        description="Best checkpoint must have at least this diversity (mean pairwise pHash distance; "
        "near-duplicates are under 0.1, unrelated photos ~0.5; 0 disables).",
    )
    max_bleed: float = Field(1.0, ge=0, le=1, description="Best checkpoint must have at most this bleed.")


def parse_size(value: str) -> tuple[int, int]:
    """'512x768' -> (512, 768), each side divisible by 8."""
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 512x512 (got {value!r})") from None
    for side in (width, height):
        if side <= 0 or side % 8 or side > MAX_RESOLUTION:
            raise ValueError(
                f"each side of size must be a positive multiple of 8, at most {MAX_RESOLUTION} (got {value!r})"
            )
    return width, height
