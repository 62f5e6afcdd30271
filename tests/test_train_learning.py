"""Does training learn? On 4 real-photo crops, the trigger prompt's denoising loss at fixed noise and timesteps
drops clearly after training, and both saved files reproduce the drop after reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app

STEPS = 40


def denoising_loss(pipe, dataset: Path) -> float:
    """Mean epsilon MSE over the subject images x 4 fixed timesteps x 2 fixed noises, prompted with the trigger."""
    from sdlora import families, objectives
    from sdlora.train.batches import encode_latents
    from sdlora.train.data import list_images, load_pixels

    pixels = torch.stack([load_pixels(p, 64) for p in list_images(dataset)])
    alphas = pipe.scheduler.alphas_cumprod.float()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        latents = encode_latents(pipe.vae, pixels, families.get("sd1"))
        ids = pipe.tokenizer(["a photo of sks person"], padding="max_length", max_length=77, return_tensors="pt")
        text = pipe.text_encoder(ids.input_ids)[0].expand(len(latents), -1, -1)
        losses = []
        for t in (150, 400, 650, 900):
            for _ in range(2):
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.full((len(latents),), t)
                noisy = objectives.add_noise(latents, noise, timesteps, alphas)
                pred = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
                losses.append(objectives.per_sample_loss(pred, noise).mean().item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_training_lowers_the_subject_loss_and_files_keep_it(tmp_path, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    data = subject_set(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["train", str(data), str(out), "--base", str(tiny_sd1), "--steps", str(STEPS), "--resolution", "64"]
        + ["--rank", "8", "--alpha", "8", "--lr", "3e-2", "--batch-size", "2", "--sample-every", "0"]
        + ["--checkpoint-every", "0", "--set", "lora.targets='all'", "--set", "train.log_every=20", *plain([])],
    )
    assert result.exit_code == 0, result.output

    def pipe(lora: Path | None):
        p = StableDiffusionPipeline.from_pretrained(str(tiny_sd1))
        if lora is not None:
            p.load_lora_weights(str(lora))
        return p

    before = denoising_loss(pipe(None), data)
    after = denoising_loss(pipe(out), data)
    after_kohya = denoising_loss(pipe(out / "out.safetensors"), data)
    print(f"subject loss: base {before:.4f}, diffusers LoRA {after:.4f}, kohya LoRA {after_kohya:.4f}")
    # A LoRA on a tiny randomly initialised UNet can only move its loss so far (measured: 1.094 -> 1.035, and
    # 1.026 with --lr 1e-2); a broken loop, target or save leaves it within noise of the base (< 0.1%).
    assert after < 0.97 * before
    assert abs(after_kohya - after) < 1e-3 * before
