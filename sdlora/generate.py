"""Generate images from a base model plus LoRA adapters: seeds, batching, schedulers, grids, metadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

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
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's sampler for `name`, keeping the model's noise schedule and prediction_type."""
    import diffusers

    if name not in SCHEDULERS:
        from sdlora.errors import UsageError

        raise UsageError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    class_name, extra, _ = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    # from_config carries over betas, timestep_spacing and prediction_type (epsilon vs v) from the model's own
    # scheduler; the extras only pick the solver variant.
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def a1111_sampler_name(name: str) -> str:
    return SCHEDULERS[name][2]


def render_images(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    cfg: float,
    scheduler: str,
    width: int,
    height: int,
    negative: str = "",
    batch_size: int = 4,
    call_kwargs: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Render image i from prompts[i] with `torch.Generator(device).manual_seed(seeds[i])`, in batches.

    Each image has its own generator, so an image does not depend on the batch it was made in (up to the
    float rounding of batched kernels). Works for SD 1.x/2.x and SDXL pipelines (and their img2img/inpaint
    variants through `call_kwargs`, e.g. {"image": init, "strength": 0.6}). `on_batch(done, total)` is called
    after each batch.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    set_scheduler(pipe, scheduler)
    device = pipe._execution_device
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device).manual_seed(seed) for seed in seeds[chunk]]
        batch_prompts = prompts[chunk]
        with torch.inference_mode():
            out = pipe(
                prompt=batch_prompts,
                negative_prompt=[negative] * len(batch_prompts),
                num_inference_steps=steps,
                guidance_scale=cfg,
                width=width,
                height=height,
                generator=generators,
                output_type="pil",
                **(call_kwargs or {}),
            )
        images.extend(out.images)
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
