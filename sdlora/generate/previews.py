"""The decoded x0 prediction every K denoising steps of a pipeline call: the frames of a filmstrip."""

from __future__ import annotations

from typing import Any

from PIL import Image


class Previews:
    """Decoded x0 predictions every K steps of one pipeline call, per image.

    Pipelines hand `callback_on_step_end` the latents but not the x0 prediction, so the scheduler's `step` is
    wrapped for the call to keep it; the family says how to read it (Euler, Euler a and DDIM return it, DPM-Solver++
    and UniPC keep it as their latest model output; a flow model's is x_t - sigma v) and how to decode it.
    """

    def __init__(self, pipe: Any, every: int, width: int = 0, height: int = 0) -> None:
        from sdlora import families

        self.pipe, self.every, self.size = pipe, every, (width, height)
        self.family = families.detect(pipe)
        self.x0: Any = None
        self.frames: list[list[Image.Image]] = []  # [frame][image]
        self._scheduler = pipe.scheduler
        original = self._scheduler.step

        def step(model_output: Any, timestep: Any, sample: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(model_output, timestep, sample, *args, **kwargs)
            self.x0 = self.family.x0_prediction(self._scheduler, model_output, timestep, sample, out)
            return out

        self._scheduler.step = step  # an instance attribute: `detach` removes it

    def __call__(self, pipe: Any, i: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if self.x0 is not None and ((i + 1) % self.every == 0 or i + 1 == pipe.num_timesteps):
            self.frames.append(decode_latents(pipe, self.family.preview_latents(pipe, self.x0, *self.size)))
        return tensors

    def detach(self) -> None:
        self._scheduler.__dict__.pop("step", None)

    def per_image(self) -> list[list[Image.Image]]:
        return [list(frames) for frames in zip(*self.frames, strict=True)]


def decode_latents(pipe: Any, scaled: Any) -> list[Image.Image]:
    """(B, C, H/8, W/8) VAE-space latents (the family's `preview_latents`) -> B PIL images through the VAE."""
    import torch

    with torch.inference_mode():
        pixels = pipe.vae.decode(scaled, return_dict=False)[0]
    if pixels.ndim == 5:  # a video VAE's one frame (Qwen-Image's): (B, 3, 1, H, W)
        pixels = pixels[:, :, 0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")
