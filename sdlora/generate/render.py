"""The one render path of every command (generate, eval, sample grids, class images, identity scoring): samplers,
the shared sampling settings, per-image seeded batched rendering, and grids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdlora.errors import UsageError
from sdlora.generate.previews import Previews

if TYPE_CHECKING:
    from sdlora.config import Config, GenerateConfig, ModelConfig
    from sdlora.families import Family
    from sdlora.lora.files import Lora

# Our sampler names -> (diffusers scheduler class, extra config, A1111's sampler name).
SCHEDULERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}, "Euler"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "unipc": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}, "UniPC"),
    # Flow-matching bases (Flux.1): Euler on the model's own (size-dependent, shifted) sigmas.
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}, "Euler"),
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's sampler for `name`, keeping the model's noise schedule and prediction_type."""
    import diffusers

    from sdlora import families

    if name not in SCHEDULERS:
        raise UsageError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    family = families.detect(pipe)
    if name not in family.samplers:
        raise UsageError(
            f"--scheduler {name}: not a sampler for {family.label} bases; choose {', '.join(family.samplers)}"
        )
    class_name, extra, _ = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    # from_config carries over betas, timestep_spacing and prediction_type (epsilon vs v) from the model's own
    # scheduler; the extras only pick the solver variant.
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def for_family(sampling: Sampling, family: Family, pipe: Any) -> Sampling:
    """Settings made from a config that never saw the base (eval, identity scoring during training) with the
    family's own sampler, and its guidance and steps where they are still the config's defaults; unchanged when
    the sampler already suits the family."""
    from sdlora.config import GenerateConfig

    if sampling.scheduler in family.samplers:
        return sampling
    defaults, fields = family.generate_defaults(pipe), GenerateConfig.model_fields
    changes: dict[str, Any] = {"scheduler": family.samplers[0]}
    for key in ("cfg", "steps"):
        if f"generate.{key}" in defaults and getattr(sampling, key) == fields[key].default:
            changes[key] = defaults[f"generate.{key}"]
    return sampling.but(**changes)


def check_sampler(name: str, family: Family) -> None:
    """An explicitly chosen sampler must suit the base's family."""
    if name not in family.samplers:
        raise UsageError(
            f"--scheduler {name}: not a sampler for {family.label} bases; choose {', '.join(family.samplers)}"
        )


def check_negative(negative: str, family: Family) -> None:
    """A negative prompt for a family whose pipeline takes none (its CFG runs against the empty prompt) is refused
    before any model loads, rather than dropped."""
    if not negative:
        return
    import inspect

    import diffusers

    pipeline = getattr(diffusers, family.single_file_pipeline)
    if "negative_prompt" not in inspect.signature(pipeline.__call__).parameters:
        raise UsageError(
            f"--negative: {family.label} pipelines take no negative prompt (their CFG uses the empty one); leave "
            "generate.negative empty"
        )


def a1111_sampler_name(name: str) -> str:
    return SCHEDULERS[name][2]


@dataclass(frozen=True)
class Sampling:
    """The settings every render shares (generate, eval, sample grids, class images, identity scoring)."""

    steps: int
    cfg: float
    scheduler: str
    width: int
    height: int
    negative: str = ""
    batch_size: int = 4
    max_sequence_length: int | None = None  # T5 tokens (Flux); None: the family's default for the base

    @classmethod
    def of(cls, g: GenerateConfig) -> Sampling:
        """`sdlora generate`'s and `sdlora eval`'s settings."""
        width, height = g.width_height
        return cls(g.steps, g.cfg, g.scheduler, width, height, g.negative, g.batch_size)

    @classmethod
    def for_training(cls, config: Config) -> Sampling:
        """Renders during training (sample grids, identity scoring, class images): the generate settings at the
        training resolution with `train.sample_steps` (and with `train.sample_like = "comfyui"` a sampler that
        ComfyUI has too)."""
        from sdlora.comfyui.workflow import REPRODUCIBLE_DEFAULT, reproducible

        g, tc = config.generate, config.train
        like_comfyui = tc.sample_like == "comfyui" and not reproducible(g.scheduler)
        return cls(
            tc.sample_steps,
            g.cfg,
            REPRODUCIBLE_DEFAULT if like_comfyui else g.scheduler,
            tc.resolution,
            tc.resolution,
            g.negative,
            g.batch_size,
            config.model.max_sequence_length,
        )

    def but(self, **changes: Any) -> Sampling:
        return replace(self, **changes)


def render_images(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    sampling: Sampling,
    *,
    init_images: Sequence[Image.Image] | None = None,
    mask_images: Sequence[Image.Image] | None = None,
    call_kwargs: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    preview_every: int = 0,
    on_previews: Callable[[int, list[list[Image.Image]]], None] | None = None,
) -> list[Image.Image]:
    """Render image i from prompts[i] with `torch.Generator(device).manual_seed(seeds[i])`, in batches.

    Each image has its own generator, so an image does not depend on the batch it was made in (up to the
    float rounding of batched kernels). Works for SD 1.x/2.x and SDXL pipelines and their img2img/inpainting
    variants: `init_images`/`mask_images` (one per prompt) become `image`/`mask_image`, `call_kwargs` go to
    every call (e.g. {"strength": 0.6}). `on_batch(done, total)` runs after each batch. With
    `preview_every` K > 0, `on_previews(first_index, frames)` gets each image's decoded x0 predictions every
    K steps (and at the last step).
    """
    import inspect

    import torch

    from sdlora import families

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    family = families.detect(pipe)
    s = for_family(sampling, family, pipe)
    set_scheduler(pipe, s.scheduler)
    if init_images is None and "image" not in (call_kwargs or {}):
        pipe = family.text_to_image(pipe)  # an edit model's pipeline needs a reference image
    device = pipe._execution_device
    accepted = inspect.signature(pipe.__call__).parameters
    takes_size = "width" in accepted  # img2img pipelines take the image's
    # A pipeline without a negative prompt runs its CFG against the empty one: a different one can't be honoured.
    takes_negative = "negative_prompt" in accepted
    if s.negative and not takes_negative:
        check_negative(s.negative, family)  # the family's own pipeline; else this one (an img2img pipeline) alone
        raise UsageError(f"--negative: {type(pipe).__name__} takes no negative prompt; leave generate.negative empty")
    tokens = family.sequence_length(pipe, s.max_sequence_length)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), s.batch_size):
        chunk = slice(start, start + s.batch_size)
        kwargs: dict[str, Any] = dict(call_kwargs or {})
        if tokens is not None:
            kwargs["max_sequence_length"] = tokens
        if takes_size:
            kwargs.update(width=s.width, height=s.height)
        # True CFG (a second pass on the negative prompt) is `true_cfg_scale` where a pipeline takes both it and a
        # distilled guidance_scale (Qwen-Image's); a family with a guidance embedding (Flux.1) keeps guidance_scale.
        if "true_cfg_scale" in accepted and family.guidance_label is None:
            kwargs.update(true_cfg_scale=s.cfg, guidance_scale=None)
        else:
            kwargs["guidance_scale"] = s.cfg
        if init_images is not None:
            kwargs["image"] = list(init_images[chunk])
        if mask_images is not None:
            kwargs["mask_image"] = list(mask_images[chunk])
        previews = Previews(pipe, preview_every, s.width, s.height) if preview_every and on_previews else None
        if previews is not None:
            kwargs.update(callback_on_step_end=previews, callback_on_step_end_tensor_inputs=["latents"])
        batch_prompts = prompts[chunk]
        with torch.inference_mode():
            out = pipe(
                prompt=batch_prompts,
                **({"negative_prompt": [s.negative] * len(batch_prompts)} if takes_negative else {}),
                num_inference_steps=s.steps,
                generator=[torch.Generator(device).manual_seed(seed) for seed in seeds[chunk]],
                output_type="pil",
                **kwargs,
            )
        images.extend(out.images)
        if previews is not None and on_previews is not None:
            previews.detach()
            on_previews(start, previews.per_image())
        if on_batch is not None:
            on_batch(len(images), len(prompts))
    return images


def make_grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Tile `images` row by row, `cols` per row, in cells the size of the largest image (black background)."""
    if not images:
        raise ValueError("no images to put in a grid")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


def load_for_rendering(model: ModelConfig, loras: Sequence[Lora]) -> tuple[Any, Family, list[str]]:
    """The base pipeline on the device in the one inference precision, with every LoRA checked against its family
    and loaded as an adapter: what `generate` and `eval` render with. Returns (pipe, family, adapter names)."""
    from sdlora import families, models
    from sdlora.lora import embeddings
    from sdlora.lora.files import check_family, load_loras

    pipe = models.load_base(model, models.inference_dtype())
    family = families.detect(pipe)
    for lora in loras:  # every LoRA is checked before anything renders
        check_family(lora, family, pipe)
    pipe.to(models.device())
    adapters = load_loras(pipe, list(loras))
    embeddings.load_for_loras(pipe, family, list(loras))  # pivotal tuning's trigger tokens, found with the LoRA
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, adapters


def native_size(pipe: Any) -> tuple[int, int] | None:
    """(width, height) the base was made for, as diffusers' pipelines default to it: the pipeline's
    `default_sample_size` (SDXL, Flux, SD3 and later) or else its denoiser's `sample_size` (SD 1.x/2.x), in latent
    pixels (an int, or (height, width)), times `vae_scale_factor`; None where a pipeline has neither."""
    sample = getattr(pipe, "default_sample_size", None)
    for name in ("unet", "transformer"):
        denoiser = getattr(pipe, name, None)
        if sample is None and denoiser is not None:
            sample = getattr(denoiser.config, "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int):
        sample = (sample, sample)
    if not isinstance(factor, int) or not isinstance(sample, (tuple, list)) or len(sample) != 2:
        return None
    height, width = (int(side) * factor for side in sample)
    return width, height
