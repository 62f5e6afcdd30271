"""The decoded x0 prediction every K denoising steps of a pipeline call: the frames of a filmstrip."""

from __future__ import annotations

from typing import Any

from PIL import Image


class Previews:
    """Decoded x0 predictions every K steps of one pipeline call, per image.

    Pipelines hand `callback_on_step_end` the latents but not the x0 prediction the scheduler computed, so the
    scheduler's `step` is wrapped for the call to keep it: Euler, Euler a and DDIM return it
    (pred_original_sample); DPM-Solver++ and UniPC keep it as their latest model output.
    """

    def __init__(self, pipe: Any, every: int) -> None:
        self.pipe, self.every = pipe, every
        self.x0: Any = None
        self.frames: list[list[Image.Image]] = []  # [frame][image]
        self._scheduler = pipe.scheduler
        original = self._scheduler.step

        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.x0 = _x0_of(self._scheduler, out)
            return out

        self._scheduler.step = step  # an instance attribute: `detach` removes it

    def __call__(self, pipe: Any, i: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if self.x0 is not None and ((i + 1) % self.every == 0 or i + 1 == pipe.num_timesteps):
            self.frames.append(decode_latents(pipe, self.x0))
        return tensors

    def detach(self) -> None:
        self._scheduler.__dict__.pop("step", None)

    def per_image(self) -> list[list[Image.Image]]:
        return [list(frames) for frames in zip(*self.frames, strict=True)]


def _x0_of(scheduler: Any, out: Any) -> Any:
    if isinstance(out, tuple):
        if len(out) > 1:
            return out[1]
    elif getattr(out, "pred_original_sample", None) is not None:
        return out.pred_original_sample
    outputs = getattr(scheduler, "model_outputs", None)  # DPM-Solver++ / UniPC: x0 predictions, newest last
    return outputs[-1] if outputs and outputs[-1] is not None else None


def decode_latents(pipe: Any, latents: Any) -> list[Image.Image]:
    """(B, 4, H/8, W/8) latents -> B PIL images through the pipeline's VAE."""
    import torch

    vae = pipe.vae
    with torch.inference_mode():
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        pixels = vae.decode(scaled, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")
