"""Flux training's memory staging: the pipeline loads without its frozen text encoders, each then loads alone,
encodes what training needs and is freed before the next (never two resident); sample grids render from the
cached conditioning, pixel-identical to the pipeline's own encoding; with CLIP-L trained only T5 loads apart."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families, models
from sdlora.cli import app
from sdlora.config import Config, load

runner = CliRunner()


def watch_encoders(monkeypatch) -> tuple[list[str], list[weakref.ref], list[tuple[str, ...]]]:
    """Record every text-encoder load (each must find the ones before it freed) and every load_base's `without`."""
    loads, alive, bases = [], [], []
    original_load, original_base = models.load_text_encoder, models.load_base

    def load_text_encoder(model, name, torch_dtype=None):
        gc.collect()
        resident = [ref() for ref in alive if ref() is not None]
        assert not resident, f"{name} loads while {type(resident[0]).__name__} is still in memory"
        encoder = original_load(model, name, torch_dtype)
        loads.append(name)
        alive.append(weakref.ref(encoder))
        return encoder

    def load_base(model, torch_dtype=None, without=()):
        gc.collect()
        resident = [ref() for ref in alive if ref() is not None]
        assert not resident, f"the denoiser loads while {type(resident[0]).__name__} is still in memory"
        without_names = tuple(without)
        bases.append(without_names)
        loads.append("base")
        pipe = original_base(model, torch_dtype, without=without_names)
        assert all(getattr(pipe, name) is None for name in without_names)
        return pipe

    monkeypatch.setattr(models, "load_text_encoder", load_text_encoder)
    monkeypatch.setattr(models, "load_base", load_base)
    return loads, alive, bases


@pytest.mark.slow
def test_encoders_load_one_at_a_time_and_the_grid_is_the_pipelines_own(tiny_models, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from sdlora.generate.render import Sampling, make_grid, render_images
    from sdlora.train import outputs

    loads, alive, without = watch_encoders(monkeypatch)
    at_render = []
    original_render = outputs.render_samples

    def render_samples(run, step):
        gc.collect()
        at_render.append([ref() is not None for ref in alive])
        original_render(run, step)

    monkeypatch.setattr(outputs, "render_samples", render_samples)
    base, data, out = tiny_models["flux"], subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(base), "--steps", "2", "--resolution", "64", "--rank", "4"]
    args += ["--lr", "1e-3", "--checkpoint-every", "0", "--sample-every", "2", "--set", "train.sample_steps=3"]
    args += ["--set", "train.eval_every=0", "--set", "train.sample_prompts=['a photo of {trigger}', 'a cat']"]
    result = runner.invoke(app, plain(args))
    assert result.exit_code == 0, result.output
    assert without == [("text_encoder", "text_encoder_2")]  # the pipeline loaded without both
    # each once, before the transformer (never beside it), and the sample grid did not bring them back
    assert loads == ["text_encoder", "text_encoder_2", "base"]
    assert at_render == [[False, False]]  # and neither is in memory while the grid renders
    # The grid equals a render by a fresh pipeline with every encoder, encoding the prompts itself.
    pipe = FluxPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    config = Config.model_validate_json((out / "config.json").read_text())
    sampling = Sampling.for_training(families.with_defaults(config, families.get("flux"), pipe))
    images = render_images(pipe, ["a photo of sks person", "a cat"], [42, 42], sampling)
    grid = np.asarray(Image.open(out / "samples" / "step-000002.png").convert("RGB"))
    assert grid.std() > 0 and np.array_equal(np.asarray(make_grid(images, cols=2)), grid)


@pytest.mark.slow
def test_with_clip_trained_only_t5_loads_apart_and_clip_encodes_live(tiny_models, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from diffusers import FluxPipeline

    from sdlora.train import Plan, staging
    from sdlora.train.data import Example

    loads, _, without = watch_encoders(monkeypatch)
    sets = ["lora.train_text_encoder=true", "train.eval_every=0", "train.sample_prompts=['a photo of {trigger}']"]
    config = load(options={"model.base": str(tiny_models["flux"])}, sets=sets)
    example = Example(tmp_path / "a.png", "a photo of sks person")
    plan = Plan(tmp_path, tmp_path, [example], "sks person", "no", None, "x")
    cached = staging.encode_first(config, plan, Accelerator(cpu=True), torch.float32)
    pipe = staging.load_base(config, torch.float32)
    assert loads == ["text_encoder_2", "base"] and without == [("text_encoder_2",)]
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is None
    captions = staging.use(pipe, families.get("flux"), cached)
    assert set(captions["cond"]) == {"encoder_hidden_states"}
    assert set(captions["prompts"]) == {"a photo of sks person", ""}
    full = FluxPipeline.from_pretrained(str(tiny_models["flux"]), local_files_only=True)
    with torch.no_grad():
        ours = pipe.encode_prompt(prompt=["a photo of sks person"], device=torch.device("cpu"))
        theirs = full.encode_prompt(prompt=["a photo of sks person"], device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(Exception, match="was not cached"):
        pipe.encode_prompt(prompt=["an uncached prompt"])


def test_explicit_settings_win_over_the_family_defaults_even_at_the_sd_default(tmp_path):
    """generate.steps 30 and cfg 7 equal the config's defaults, yet are the user's (an option, a TOML file):
    Flux's 28 and 3.5 must not replace them; the scheduler, not given, still becomes Flux's."""
    flux = families.get("flux")
    given = load(options={"generate.steps": 30, "generate.cfg": 7.0})
    resolved = families.with_defaults(given, flux, _dev_pipe())
    assert (resolved.generate.steps, resolved.generate.cfg, resolved.generate.scheduler) == (30, 7.0, "flow_euler")
    toml = tmp_path / "c.toml"
    toml.write_text("[generate]\nsteps = 30\n")
    assert families.with_defaults(load(toml), flux, _dev_pipe()).generate.steps == 30
    assert families.with_defaults(load(sets=["generate.cfg=7.0"]), flux, _dev_pipe()).generate.cfg == 7.0
    assert families.with_defaults(load(), flux, _dev_pipe()).generate.steps == 28


@pytest.mark.slow
def test_explicit_steps_and_cfg_win_through_the_cli(tiny_models, tmp_path):
    import json

    out = tmp_path / "gen"
    args = ["generate", "--base", str(tiny_models["flux"]), "--prompt", "a cat", "--n", "1", "--size", "32x32"]
    result = runner.invoke(app, [*args, "--steps", "30", "--cfg", "7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "0000-42.json").read_text())
    assert (record["steps"], record["cfg"], record["scheduler"]) == (30, 7.0, "flow_euler")
    assert "Steps: 30" in record["parameters"] and "Distilled CFG Scale: 7.0" in record["parameters"]


def _dev_pipe():
    from types import SimpleNamespace

    return SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=True)))


def test_flux_buckets_are_multiples_of_16():
    from sdlora.prep.crops import buckets
    from sdlora.train.data import Example, train_size

    for resolution in range(256, 1537, 16):
        sizes = buckets(resolution)
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in sizes), (resolution, sizes)
        for shape in ((1200, 800), (800, 1200), (1000, 1000), (1920, 1080)):
            w, h = train_size(Example(Path("x.png"), "", size=shape), resolution)
            assert w % 16 == 0 and h % 16 == 0
