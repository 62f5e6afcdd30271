"""Issue 15, nothing lost while rendering: generate and eval --lora write each image as soon as it is decoded, so
Ctrl-C keeps what is done (and eval reuses it when run again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora.cli import app

pytestmark = pytest.mark.slow  # each loads and renders with the tiny model (~10-20 s)
runner = CliRunner()
FAST = ["--steps", "2", "--size", "64x64", "--set", "generate.scheduler='ddim'"]


def interrupt_on_call(monkeypatch, module: str, call: int) -> list[int]:
    """Make the render function that `module` uses raise KeyboardInterrupt (Ctrl-C) on its `call`-th call."""
    import sdlora.generate.render as render

    real, calls = render.render_images, []

    def render_images(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(f"{module}.render_images", render_images)
    return calls


def test_ctrl_c_keeps_the_images_generate_finished(tiny_sd1, tmp_path, monkeypatch):
    interrupt_on_call(monkeypatch, "sdlora.generate", 3)
    out = tmp_path / "out"
    args = ["generate", "--base", str(tiny_sd1), "--prompt", "a photo", "--n", "6", "--batch-size", "2", *FAST]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 130 and "kept the 4 image(s)" in result.output, result.output
    kept = sorted(p.name for p in out.glob("*.png"))
    assert kept == ["0000-42.png", "0001-43.png", "0002-44.png", "0003-45.png"]
    for name in kept:
        record = json.loads((out / name).with_suffix(".json").read_text())
        assert record["seed"] == int(name[5:7]) and record["prompt"] == "a photo"
    assert json.loads((out / ".sdlora.json").read_text())["command"] == "generate"
    assert not (out / ".sdlora.lock").exists()


def test_streamed_images_equal_the_old_all_at_once_render(tiny_sd1, tmp_path):
    """Batch by batch gives the same pixels as one render over every job (the golden test pins them too)."""
    import numpy as np
    from PIL import Image

    from sdlora.generate.render import Sampling, render_images
    from sdlora.models import inference_dtype

    out = tmp_path / "out"
    args = ["generate", "--base", str(tiny_sd1), "--prompt", "a photo", "--n", "3", "--batch-size", "2", *FAST]
    assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), torch_dtype=inference_dtype())
    pipe.set_progress_bar_config(disable=True)
    images = render_images(pipe, ["a photo"] * 3, [42, 43, 44], Sampling(2, 7.0, "ddim", 64, 64, "", 2))
    for i, image in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:04d}-{42 + i}.png")), np.asarray(image))


@pytest.fixture
def lora(tiny_sd1, tmp_path) -> Path:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "sdlora.trigger_phrase": "zwx person"})
    return path


def test_eval_lora_streams_its_renders_and_reuses_them(tiny_sd1, lora, tmp_path, monkeypatch):
    data = subject_set(tmp_path / "data", resolution=96)  # dlib finds the faces at 96 px
    report = tmp_path / "report"
    args = ["eval", "--reference", str(data), "--lora", str(lora), "--base", str(tiny_sd1), "--n", "1"]
    args += ["--report", str(report), "--set", "generate.batch_size=4", "--set", "generate.steps=2"]
    args += ["--set", "generate.size='64x64'", "--set", "generate.scheduler='ddim'"]
    calls = interrupt_on_call(monkeypatch, "sdlora.generate.render", 2)
    first = runner.invoke(app, args)
    assert first.exit_code == 130 and calls == [4, 4]
    assert sorted(p.name for p in (report / "images").glob("*.png")) == [f"{i:03d}.png" for i in range(4)]
    assert not (report / ".sdlora.lock").exists()
    calls.clear()
    monkeypatch.undo()
    calls = interrupt_on_call(monkeypatch, "sdlora.generate.render", 99)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert calls == [4, 2]  # the first 4 images were reused
    assert (report / "index.html").is_file() and len(list((report / "images").glob("*.png"))) == 10
    assert json.loads((report / ".sdlora.json").read_text())["command"] == "eval"
