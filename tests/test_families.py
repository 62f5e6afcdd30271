"""The family contract, for every family in sdlora.families.REGISTRY: detection from a pipeline, a single-file
checkpoint and a LoRA file; prompt encoding equal to the pipeline's own; a short `sdlora train` whose diffusers file
reloads pixel-identically and whose kohya file loads in diffusers with the same denoiser output."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app
from sdlora.config import Config
from sdlora.testing import write_single_file

NAMES = list(families.REGISTRY)
STEPS, SAMPLE_STEPS = 2, 3


def load(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tiny_models, tmp_path_factory):
    """A 2-step run of `sdlora train` (text encoders trained too) on the family's tiny model."""
    name = request.param
    root = tmp_path_factory.mktemp(f"contract-{name}")
    data, out = subject_set(root / "data"), root / "out"
    args = ["train", str(data), str(out), "--base", str(tiny_models[name]), "--steps", str(STEPS)]
    args += ["--resolution", "64", "--rank", "4", "--alpha", "8", "--lr", "1e-3", "--train-text-encoder"]
    args += ["--sample-every", str(STEPS), "--checkpoint-every", "0", "--name", "person"]
    args += ["--set", f"train.sample_steps={SAMPLE_STEPS}", "--set", "train.sample_prompts=['a photo of {trigger}']"]
    args = plain(args)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return families.get(name), tiny_models[name], out


@pytest.mark.parametrize("name", NAMES)
def test_detected_from_the_pipeline_and_a_single_file(name, tiny_models, tmp_path):
    family = families.get(name)
    assert families.detect(load(tiny_models[name])) is family
    path = write_single_file(tiny_models[name], tmp_path / f"{name}.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert families.detect_checkpoint(keys) is family
    assert families.detect_checkpoint({"lora_unet_x.lora_down.weight"}) is None


@pytest.mark.parametrize("name", NAMES)
def test_prompt_encoding_equals_the_pipelines_own(name, tiny_models):
    family, pipe = families.get(name), load(tiny_models[name])
    prompts = ["a photo of sks person", "a cat"]
    with torch.no_grad():
        ours = family.encode_prompts(families.tokenizers(pipe, family), families.encoders(pipe, family), prompts)
        kwargs = {"do_classifier_free_guidance": False, "device": torch.device("cpu"), "num_images_per_prompt": 1}
        accepted = inspect.signature(pipe.encode_prompt).parameters
        theirs = pipe.encode_prompt(prompts, **{k: v for k, v in kwargs.items() if k in accepted})
    tensors = [t for t in theirs if isinstance(t, torch.Tensor)]
    for key, value in ours.items():
        assert any(t.shape == value.shape and torch.equal(t, value) for t in tensors), f"{name}: {key} differs"


@pytest.mark.slow
def test_trained_files_say_their_family_and_reload_pixel_identically(trained):
    from sdlora.generate.render import Sampling, make_grid, render_images

    family, base, out = trained
    diffusers_file, kohya_file = out / "pytorch_lora_weights.safetensors", out / "person.safetensors"
    for path in (diffusers_file, kohya_file):
        with safe_open(str(path), framework="pt") as handle:
            assert families.detect_lora(handle.metadata()) == family.name
    pipe = load(base)
    pipe.load_lora_weights(str(out))
    # The sample grid's settings as the run resolved them (a family may have its own sampler and guidance).
    config = Config.model_validate_json((out / "config.json").read_text())
    sampling = Sampling.for_training(families.with_defaults(config, family, pipe))
    assert (sampling.steps, sampling.width, sampling.height) == (SAMPLE_STEPS, 64, 64)
    assert sampling.scheduler in family.samplers
    images = render_images(pipe, ["a photo of sks person"], [42], sampling)
    sample = np.asarray(Image.open(out / "samples" / f"step-{STEPS:06d}.png").convert("RGB"))
    assert sample.std() > 0
    assert np.array_equal(np.asarray(make_grid(images, cols=1)), sample)


@pytest.mark.slow
def test_kohya_file_loads_in_diffusers_with_the_same_denoiser_output(trained):
    family, base, out = trained
    outputs = []
    for path in (out / "pytorch_lora_weights.safetensors", out / "person.safetensors"):
        pipe = load(base)
        pipe.load_lora_weights(str(path))
        generator = torch.Generator().manual_seed(0)
        noisy = torch.randn(1, 4, 8, 8, generator=generator)
        with torch.no_grad():
            cond = family.encode_prompts(families.tokenizers(pipe, family), families.encoders(pipe, family), ["x"])
            micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            outputs.append(family.predict(getattr(pipe, family.denoiser), noisy, torch.tensor([500]), cond, micro))
    base_pipe = load(base)
    with torch.no_grad():
        cond = family.encode_prompts(
            families.tokenizers(base_pipe, family), families.encoders(base_pipe, family), ["x"]
        )
        plain = family.predict(getattr(base_pipe, family.denoiser), noisy, torch.tensor([500]), cond, micro)
    assert (outputs[0] - outputs[1]).abs().max() < 1e-4
    assert (outputs[0] - plain).abs().max() > 1e-4, "the LoRA must change the output for this check to mean anything"
