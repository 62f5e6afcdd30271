"""Does Flux training learn? On 4 real-photo crops, the flow-matching loss of the trigger prompt at fixed noise and
sigmas drops clearly after training, and both saved files reproduce the drop after reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app

STEPS = 40


def flow_loss(pipe, dataset: Path) -> float:
    """Mean velocity MSE over the subject images x 4 fixed sigmas x 2 fixed noises, prompted with the trigger."""
    from sdlora import families, objectives
    from sdlora.train.batches import encode_latents
    from sdlora.train.data import list_images, load_pixels

    family = families.get("flux")
    pixels = torch.stack([load_pixels(p, 64) for p in list_images(dataset)])
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        latents = encode_latents(pipe.vae, pixels, family)
        tokenizers, encoders = families.tokenizers(pipe, family), families.encoders(pipe, family)
        cond = family.encode_prompts(tokenizers, encoders, ["a photo of sks person"])
        cond = {key: value.expand(len(latents), *value.shape[1:]) for key, value in cond.items()}
        losses = []
        for sigma in (0.2, 0.45, 0.7, 0.95):
            for _ in range(2):
                noise = torch.randn(latents.shape, generator=generator)
                sigmas = torch.full((len(latents),), sigma)
                noisy = objectives.flow_noisy(latents, noise, sigmas)
                pred = family.predict(pipe.transformer, noisy, sigmas, cond, None, 1.0)
                goal = objectives.flow_target(latents, noise)
                losses.append(objectives.per_sample_loss(pred, goal).mean().item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_flux_training_lowers_the_subject_loss_and_files_keep_it(tmp_path):
    from diffusers import FluxPipeline

    from sdlora import testing

    base = testing.save_tiny_pipeline("flux", tmp_path / "flux")
    data = subject_set(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["train", str(data), str(out), "--base", str(base), "--steps", str(STEPS), "--resolution", "64"]
        + ["--rank", "8", "--alpha", "8", "--lr", "1e-2", "--batch-size", "2", "--sample-every", "0"]
        + ["--checkpoint-every", "0", "--set", "train.log_every=20", *plain([])],
    )
    assert result.exit_code == 0, result.output

    def pipe(lora: Path | None):
        p = FluxPipeline.from_pretrained(str(base))
        if lora is not None:
            p.load_lora_weights(str(lora))
        return p

    before = flow_loss(pipe(None), data)
    after = flow_loss(pipe(out), data)
    after_kohya = flow_loss(pipe(out / "out.safetensors"), data)
    print(f"subject flow loss: base {before:.4f}, diffusers LoRA {after:.4f}, kohya LoRA {after_kohya:.4f}")
    # Default targets (the double blocks' attention): diffusers' kohya reader splits single blocks' fused linear1
    # only at the real widths, so the tiny model's single blocks stay out of this file-to-file check.
    assert after < 0.9 * before
    assert abs(after_kohya - after) < 1e-3 * before
