"""The [train] section: how a LoRA is trained (steps, rates, precision, likeness methods, checkpoints, samples,
identity scoring, memory savers), with its checks within the section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sdlora.settings.base import MAX_IMAGES, MAX_RESOLUTION, MAX_SEED, MAX_STEPS, Section, _multiple_of_8


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
    class_dir: Path | None = Field(
        None,
        description="Prior preservation: a folder of ready class images; an image's IMG.txt beside it is its caption "
        "(else the class prompt) and must not name the trigger word.",
    )
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
