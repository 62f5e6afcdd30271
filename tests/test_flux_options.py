"""The settings Flux brought: --quantize (a clear error without CUDA, QLoRA on a GPU), train.resolutions (every
family: each image cached at each size, one size per micro-batch), timestep_sampling refused on DDPM bases,
train.guidance reaching the guidance embedding, and the kohya metadata of schnell."""

from __future__ import annotations

import pytest
import torch
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app

runner = CliRunner()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_quantize_without_cuda_is_one_clear_error_before_loading(tiny_sd1, tmp_path):
    data = subject_set(tmp_path / "data")
    result = runner.invoke(
        app, ["train", str(data), str(tmp_path / "out"), "--base", str(tiny_sd1), "--quantize", "nf4"]
    )
    assert result.exit_code == 2
    assert "--quantize nf4: bitsandbytes quantization in diffusers needs a CUDA GPU" in result.output
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--quantize", "int8",
                                 "--out", str(tmp_path / "gen")])  # fmt: skip
    assert result.exit_code == 2 and "needs a CUDA GPU" in result.output
    assert not (tmp_path / "gen").exists()


@pytest.mark.cuda
def test_nf4_flux_base_trains_and_saves_a_fp32_lora(tmp_path):
    from safetensors.torch import load_file

    from sdlora import testing

    base = testing.save_tiny_pipeline("flux", tmp_path / "flux")
    data = subject_set(tmp_path / "data")
    out = tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(base), "--steps", "3", "--resolution", "64", "--rank", "4"]
    args += ["--quantize", "nf4", "--sample-every", "3", "--checkpoint-every", "0", "--gradient-checkpointing"]
    result = runner.invoke(app, plain([*args, "--set", "train.sample_steps=2"]))
    assert result.exit_code == 0, result.output
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert state and all(v.dtype == torch.float32 for v in state.values())
    assert (out / "samples" / "step-000003.png").is_file()


@pytest.mark.slow
def test_resolutions_cache_each_image_at_each_size_one_size_per_micro_batch(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdlora import families
    from sdlora.train.batches import ImageSet
    from sdlora.train.data import DataOrder, load_examples

    examples = load_examples(subject_set(tmp_path / "data"), "a photo")
    vae = StableDiffusionPipeline.from_pretrained(str(tiny_sd1)).vae
    images = ImageSet(examples, [64, 96], False, vae, cache=True, family=families.get("sd1"))
    assert len(images.examples) == 8 and sorted(set(images.buckets)) == [(64, 64), (96, 96)]
    assert {tuple(latents.shape[-2:]) for latents in images.cached} == {(8, 8), (12, 12)}
    order = DataOrder(images.buckets, seed=0, flip=False, group=2)
    for k in range(8):
        assert len({images.buckets[i] for i, _ in order.batch(k)}) == 1
    data = subject_set(tmp_path / "data2")
    args = ["train", str(data), str(tmp_path / "out"), "--base", str(tiny_sd1), "--steps", "2", "--rank", "4"]
    args += ["--sample-every", "0", "--checkpoint-every", "0", "--set", "train.resolutions=[64, 96]"]
    result = runner.invoke(app, plain(args))
    assert result.exit_code == 0, result.output
    assert "8 images" not in result.output and "4 images" in result.output  # people count photos, not copies


def test_timestep_sampling_is_for_flow_bases(tiny_sd1, tmp_path):
    data = subject_set(tmp_path / "data")
    args = ["train", str(data), str(tmp_path / "out"), "--base", str(tiny_sd1), "--steps", "1"]
    result = runner.invoke(app, [*args, "--set", "train.timestep_sampling='shift'"])
    assert result.exit_code == 2 and "train.timestep_sampling 'shift' is for flow-matching bases" in result.output
    result = runner.invoke(app, [*args, "--set", "train.resolutions=[100]"])
    assert result.exit_code == 2 and "must be divisible by 8" in result.output


def test_guidance_reaches_the_embedding_only_on_dev(tmp_path):
    from sdlora.families.flux.tiny import tiny_flux_pipeline

    family = families.get("flux")
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"pooled_projections": torch.randn(1, 32), "encoder_hidden_states": torch.randn(1, 7, 32)}
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        dev = tiny_flux_pipeline(seed=0).transformer
        a, b = (family.predict(dev, noisy, sigma, cond, None, g) for g in (1.0, 3.5))
        assert (a - b).abs().max() > 1e-4
        schnell_pipe = tiny_flux_pipeline(seed=0, schnell=True)
        schnell = schnell_pipe.transformer
        c, d = (family.predict(schnell, noisy, sigma, cond, None, g) for g in (1.0, 3.5))
        assert torch.equal(c, d)
    assert family.variant(schnell_pipe) == "schnell"
    assert family.modelspec_architecture("flow", family.variant(schnell_pipe)) == "flux-1-schnell/lora"
    assert family.sequence_length(schnell_pipe, None) == 256
    assert family.generate_defaults(schnell_pipe)["generate.steps"] == 4


@pytest.mark.slow
def test_prior_preservation_min_snr_checkpointing_and_8bit_adamw_on_flux(tmp_path):
    """Class images rendered by the staged pipeline (every part back on the device for it), then training with
    the min-SNR-equivalent weights, gradient checkpointing and 8-bit AdamW."""
    from sdlora import testing

    base = testing.save_tiny_pipeline("flux", tmp_path / "flux")
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(base), "--steps", "2", "--resolution", "64", "--rank", "4"]
    args += ["--class-prompt", "a photo of a person", "--num-class-images", "2", "--sample-every", "0"]
    args += ["--checkpoint-every", "0", "--gradient-checkpointing", "--optimizer", "adamw8bit"]
    args += ["--set", "train.min_snr_gamma=5.0", "--set", "train.sample_steps=2", "--set", "train.log_every=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list((out / "class_images").glob("*.png"))) == 2
    assert "4 images + 2 class images" in result.output
    assert (out / "pytorch_lora_weights.safetensors").is_file()
