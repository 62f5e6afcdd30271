"""Distilled checkpoints (Z-Image Turbo here; every family that says `is_distilled` gets the same): refused in the
pre-flight with the three routes unless --allow-distilled; model.training_adapter, a de-distillation LoRA active in
training steps, left out of samples and of every saved file, recorded in the LoRA metadata, restored at a resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app

runner = CliRunner()
STEPS = 2
ADAPTER_TARGETS = ["to_q", "to_v", "feed_forward.w1"]  # feed_forward: a module the person's LoRA never targets


def load(folder: Path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_output(pipe) -> torch.Tensor:
    family = families.get("zimage")
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = family.encode_prompts([pipe.tokenizer], [pipe.text_encoder], ["a photo of sks person"])
        return family.predict(pipe.transformer, noisy, torch.tensor([0.6]), cond, None)


@pytest.fixture(scope="module")
def turbo(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny Z-Image as Turbo (its folder with the distilled checkpoint's scheduler shift, 3), and a
    de-distillation LoRA for it in diffusers' format and in ComfyUI's (what sdlora writes as NAME.safetensors),
    made with peft on its transformer."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdlora.families.zimage.tiny import TURBO_SHIFT
    from sdlora.lora import kohya

    root = tmp_path_factory.mktemp("turbo")
    shutil.copytree(tiny_models["zimage"], root / "turbo")
    scheduler = root / "turbo" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": TURBO_SHIFT}))
    transformer = ZImageTransformer2DModel.from_pretrained(str(root / "turbo"), subfolder="transformer")
    torch.manual_seed(7)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=ADAPTER_TARGETS, init_lora_weights=False)
    transformer.add_adapter(config)
    ZImagePipeline.save_lora_weights(root / "adapter", transformer_lora_layers=get_peft_model_state_dict(transformer))
    comfy = kohya.kohya_state_dict(transformer, [], families.get("zimage"), dtype=torch.float32)
    kohya.save_kohya(root / "adapter_comfyui.safetensors", comfy, {})
    return {
        "base": root / "turbo",
        "adapter": root / "adapter" / "pytorch_lora_weights.safetensors",
        "comfyui": root / "adapter_comfyui.safetensors",
        "data": subject_set(root / "data"),
    }


def train_args(turbo: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["train", turbo["data"], out, "--base", turbo["base"], "--steps", STEPS, "--resolution", "64"]
    args += ["--rank", "4", "--lr", "1e-3", "--name", "person", "--preservation", "output", "--no-pivotal"]
    args += ["--sample-every", STEPS, "--checkpoint-every", "1", "--set", "train.eval_every=0"]
    args += ["--set", "train.sample_steps=2", "--set", "train.sample_prompts=['a photo of {trigger}']"]
    return plain([*args, *extra])


def test_a_distilled_base_is_refused_before_it_loads_with_the_three_routes(turbo, tmp_path, monkeypatch):
    from sdlora import models
    from sdlora.settings import ModelConfig

    loaded = []
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loaded.append(a))
    family, stand_in = models.peek_base(ModelConfig(base=str(turbo["base"])))
    assert family.is_distilled(stand_in) and family.undistilled_base(stand_in) == "Tongyi-MAI/Z-Image"
    result = runner.invoke(app, train_args(turbo, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "distilled Z-Image" in lines[0]
    for route in ("train on Tongyi-MAI/Z-Image", "model.training_adapter", "de-distilled checkpoint"):
        assert route in lines[0]
    assert "--allow-distilled" in lines[0] and loaded == [] and not (tmp_path / "out").exists()
    # A training adapter that is missing, or not a safetensors file, is refused as early, in one line.
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for bad in (tmp_path / "missing.safetensors", tmp_path / "broken.safetensors", "nobody/no-such-adapter"):
        sets = ["--set", f"model.training_adapter={bad}"]
        result = runner.invoke(app, train_args(turbo, tmp_path / "out", *sets))
        assert result.exit_code == 2 and result.output.startswith("error: model.training_adapter"), result.output
        assert len(result.output.strip().splitlines()) == 1 and loaded == []


def test_a_distilled_klein_is_refused_from_its_pipeline_config(tiny_models, tmp_path, monkeypatch):
    """klein's distilled checkpoints say so in model_index.json (`is_distilled`), never in their names."""
    from sdlora import models
    from sdlora.settings import ModelConfig

    base = tmp_path / "klein-4b"
    shutil.copytree(tiny_models["klein"], base)
    index = base / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": True}))
    family, stand_in = models.peek_base(ModelConfig(base=str(base)))
    assert family.name == "klein" and family.is_distilled(stand_in)
    loaded = []
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loaded.append(a))
    result = runner.invoke(app, train_args({"base": base, "data": subject_set(tmp_path / "data")}, tmp_path / "o"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "distilled FLUX.2 [klein]" in result.output and "model.training_adapter" in result.output
    assert loaded == [] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "flux", "zimage", "klein"])
def test_the_undistilled_bases_are_not_distilled_as_the_pre_flight_reads_them(name, tiny_models):
    """Z-Image (Base) and the families with no distilled checkpoint to refuse (FLUX.1-schnell trains as before)."""
    from sdlora import models
    from sdlora.settings import ModelConfig

    family, stand_in = models.peek_base(ModelConfig(base=str(tiny_models[name])))
    assert family.name == name and not family.is_distilled(stand_in)


def test_the_training_adapter_loads_from_either_form_and_stays_on_for_the_base_output_preservation_sees(turbo):
    """diffusers' loader reads both files to the same adapter; adapters_off (output preservation's "base") keeps it
    on and turns the person's LoRA off."""
    from sdlora.lora import peft, training_adapter
    from sdlora.train.methods.adapters_off import adapters_off

    family, pipe = families.get("zimage"), load(turbo["base"])
    plain_output = transformer_output(pipe)
    outputs = []
    for form in ("adapter", "comfyui"):
        if outputs:
            pipe.delete_adapters(training_adapter.NAME)
        training_adapter.load(pipe, family, str(turbo[form]))
        outputs.append(transformer_output(pipe))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5 and (outputs[0] - plain_output).abs().max() > 1e-3
    assert not any(p.requires_grad for n, p in pipe.transformer.named_parameters() if training_adapter.NAME in n)
    peft.attach(pipe.transformer, 4, 4, 0.0, ["to_q", "to_k"])
    for layer in (pipe.transformer.layers[0].attention.to_q, pipe.transformer.layers[0].attention.to_k):
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    training_adapter.activate(pipe.transformer)
    both = transformer_output(pipe)
    assert (both - outputs[1]).abs().max() > 1e-3  # the person's LoRA is on too
    with adapters_off([pipe.transformer]):
        torch.testing.assert_close(transformer_output(pipe), outputs[1])  # the de-distilled model alone
    with training_adapter.left_out([pipe.transformer]):
        assert (transformer_output(pipe) - both).abs().max() > 1e-3
    torch.testing.assert_close(transformer_output(pipe), both)  # all as it was ...
    trainable = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # ... the training adapter frozen


@pytest.fixture(scope="module")
def runs(turbo, tmp_path_factory) -> dict[str, Path]:
    """Two runs on the distilled base: as it is (--allow-distilled) and with the training adapter."""
    root = tmp_path_factory.mktemp("distilled-runs")
    found = {}
    for name, extra in (
        ("allowed", ["--allow-distilled"]),
        ("adapted", ["--set", f"model.training_adapter={turbo['adapter']}"]),
    ):
        result = runner.invoke(app, train_args(turbo, root / name, *extra))
        assert result.exit_code == 0, result.output
        found[name] = root / name
    return found


@pytest.mark.slow
def test_the_adapter_trains_but_samples_show_the_distilled_base_with_the_saved_lora_alone(turbo, runs):
    from sdlora.config import Config
    from sdlora.generate.render import Sampling, make_grid, render_images
    from sdlora.lora import training_adapter

    allowed, adapted = (load_file(str(runs[n] / "pytorch_lora_weights.safetensors")) for n in ("allowed", "adapted"))
    assert allowed.keys() == adapted.keys()  # the same LoRA, from the same seed ...
    assert max((allowed[k] - adapted[k]).abs().max().item() for k in allowed) > 1e-5  # ... trained on another model
    out = runs["adapted"]
    for path in (out / "pytorch_lora_weights.safetensors", out / "person.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys, metadata = set(handle.keys()), handle.metadata()
        assert keys and not any("feed_forward" in k or training_adapter.NAME in k for k in keys), path
        assert json.loads(metadata["sdlora.trained_on"]) == {
            "base": str(turbo["base"]),
            "variant": "turbo",
            "distilled": True,
        }
        sha = hashlib.sha256(turbo["adapter"].read_bytes()).hexdigest()
        assert json.loads(metadata["sdlora.training_adapter"]) == {"source": str(turbo["adapter"]), "sha256": sha}
    state = load_file(str(out / "checkpoints" / f"step-{STEPS:06d}" / "lora_state.safetensors"))
    assert state and not any("feed_forward" in k or training_adapter.NAME in k for k in state)
    with safe_open(str(runs["allowed"] / "person.safetensors"), framework="pt") as handle:
        assert "sdlora.training_adapter" not in handle.metadata()
    # The sample grid: exactly what the distilled base renders with the saved LoRA alone, and not with the adapter.
    grid = np.asarray(Image.open(out / "samples" / f"step-{STEPS:06d}.png").convert("RGB"))
    pipe = load(turbo["base"])
    pipe.load_lora_weights(str(out), adapter_name="person")
    config = Config.model_validate_json((out / "config.json").read_text())
    sampling = Sampling.for_training(families.with_defaults(config, families.get("zimage"), pipe))
    alone = np.asarray(make_grid(render_images(pipe, ["a photo of sks person"], [42], sampling), cols=1))
    assert grid.std() > 0 and np.array_equal(alone, grid)
    pipe.load_lora_weights(str(turbo["adapter"]), adapter_name="dedistill")
    pipe.set_adapters(["person", "dedistill"])
    with_adapter = np.asarray(make_grid(render_images(pipe, ["a photo of sks person"], [42], sampling), cols=1))
    assert not np.array_equal(with_adapter, grid)


@pytest.mark.slow
def test_a_resume_with_the_training_adapter_equals_the_straight_run(turbo, runs, tmp_path):
    out, resumed = runs["adapted"], tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("pytorch_lora_weights.safetensors", "person.safetensors"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")
    shutil.rmtree(resumed / "samples")
    sets = ["--set", f"model.training_adapter={turbo['adapter']}", "--resume", "latest"]
    original = turbo["adapter"].read_bytes()
    try:  # another file at the adapter's path: refused before anything loads
        turbo["adapter"].write_bytes(turbo["comfyui"].read_bytes())
        result = runner.invoke(app, train_args(turbo, resumed, *sets))
        assert result.exit_code == 2 and "not the file" in result.output and "sha256" in result.output, result.output
    finally:
        turbo["adapter"].write_bytes(original)
    result = runner.invoke(app, train_args(turbo, resumed, *sets))
    assert result.exit_code == 0, result.output
    straight = load_file(str(out / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == again.keys()
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) <= 1e-6
    # Without the adapter, the run's settings differ: the resume is refused in one line.
    result = runner.invoke(app, train_args(turbo, resumed, "--allow-distilled", "--resume", "latest"))
    assert result.exit_code == 2 and "training_adapter" in result.output, result.output
