"""`sdlora train` end to end on the tiny SD 1.x model: outputs, reload equality, kohya file, checkpoints, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app

STEPS = 6
SAMPLE_STEPS = 4


def run_cli(*args: str):
    return CliRunner().invoke(app, ["train", *plain(args)])


def train_args(data: Path, out: Path, base: Path, *extra: str) -> list[str]:
    return [
        str(data),
        str(out),
        "--base",
        str(base),
        "--steps",
        str(STEPS),
        "--resolution",
        "64",
        "--rank",
        "4",
        "--alpha",
        "8",  # alpha != rank: reloading at the wrong scale would show
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "2",
        "--sample-every",
        str(STEPS),
        "--set",
        "train.log_every=1",
        "--set",
        f"train.sample_steps={SAMPLE_STEPS}",
        "--set",
        "train.flip=true",
        "--set",
        "lora.targets='all'",
        "--name",
        "astro",
        *extra,
    ]


@pytest.fixture(scope="module")
def sd1_run(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("train-sd1")
    data = subject_set(root / "data")
    out = root / "out"
    result = run_cli(*train_args(data, out, tiny_sd1))
    assert result.exit_code == 0, result.output
    return {"data": data, "out": out, "base": tiny_sd1, "output": result.output}


def render(pipe):
    from sdlora.generate.render import Sampling, make_grid, render_images

    prompts = ["a photo of sks person", "a portrait of sks person, oil painting"]
    images = render_images(pipe, prompts, [42, 42], Sampling(SAMPLE_STEPS, 7.0, "dpmpp_2m_karras", 64, 64))
    return np.asarray(make_grid(images, cols=len(images))).astype(int)


def fresh_pipe(base: Path, lora: Path | None = None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def test_outputs_config_metrics_and_checkpoints(sd1_run):
    out = sd1_run["out"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "astro.safetensors").is_file()
    assert "effective batch 1 x 1 accumulation x 1 processes = 1" in sd1_run["output"]
    assert "= 1; fp32 (no mixed precision)" in sd1_run["output"] and "precision no" not in sd1_run["output"]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == STEPS and config["lora"]["alpha"] == 8.0
    assert config["train"]["resume"] is None and config["train"]["overwrite"] is False
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["lr"] == pytest.approx(1e-3) and r["seconds_per_step"] > 0 for r in records)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step-000003", "step-000006"]  # no temporary folder left behind
    for name in checkpoints:
        folder = out / "checkpoints" / name
        for file in ("pytorch_lora_weights.safetensors", "astro.safetensors", "optimizer.bin", "scheduler.bin"):
            assert (folder / file).is_file(), file
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == int(name[-6:])
        assert not list(folder.glob("model*.safetensors"))  # the frozen base is never copied into checkpoints
    assert (out / "samples" / f"step-{STEPS:06d}.png").is_file()
    assert not (out / "tensorboard").exists()  # tensorboard is not installed here


def test_diffusers_file_has_adapter_metadata_and_our_keys(sd1_run):
    from sdlora import __version__
    from sdlora.lora.peft import adapter_metadata_of, read_header

    path = sd1_run["out"] / "pytorch_lora_weights.safetensors"
    header = read_header(path)
    assert header["sdlora.trigger_phrase"] == "sks person"
    assert header["sdlora.family"] == "sd1"
    assert header["sdlora.version"] == __version__
    unet = adapter_metadata_of(path)["unet"]
    assert unet["r"] == 4 and unet["lora_alpha"] == 8
    assert {"to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"} <= set(unet["target_modules"])
    keys = load_file(str(path))
    assert any(".ff.net.2.lora_A" in k for k in keys) and all(k.startswith("unet.") for k in keys)


def test_reload_reproduces_trained_images_exactly(sd1_run):
    from PIL import Image

    trained = np.asarray(Image.open(sd1_run["out"] / "samples" / f"step-{STEPS:06d}.png")).astype(int)
    reloaded = render(fresh_pipe(sd1_run["base"], sd1_run["out"]))
    base = render(fresh_pipe(sd1_run["base"]))
    assert np.abs(reloaded - trained).max() == 0
    assert np.abs(base - trained).max() > 5  # the LoRA changed the images: the equality above means something


def test_kohya_file_keys_metadata_and_same_model(sd1_run):
    import torch

    from sdlora.lora.kohya import read_kohya

    state, metadata = read_kohya(sd1_run["out"] / "astro.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.") for k in state)
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 8.0
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_steps"] == str(STEPS)
    assert metadata["ss_num_train_images"] == "4" and metadata["modelspec.trigger_phrase"] == "sks person"
    assert metadata["ss_output_name"] == "astro" and metadata["ss_resolution"] == "(64, 64)"
    diffusers_pipe = fresh_pipe(sd1_run["base"], sd1_run["out"])
    kohya_pipe = fresh_pipe(sd1_run["base"], sd1_run["out"] / "astro.safetensors")
    base_pipe = fresh_pipe(sd1_run["base"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = (p.unet(x, 500, encoder_hidden_states=h).sample for p in (diffusers_pipe, kohya_pipe, base_pipe))
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3


def test_resume_from_step_3_equals_uninterrupted_6_steps(sd1_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(sd1_run["out"], out)
    for name in ("pytorch_lora_weights.safetensors", "astro.safetensors"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")
    shutil.rmtree(out / "samples")
    result = run_cli(*train_args(sd1_run["data"], out, sd1_run["base"], "--resume", "latest"))
    assert result.exit_code == 0, result.output
    straight = load_file(str(sd1_run["out"] / "checkpoints" / "step-000006" / "lora_state.safetensors"))
    resumed = load_file(str(out / "checkpoints" / "step-000006" / "lora_state.safetensors"))
    assert straight.keys() == resumed.keys()
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    final_a = load_file(str(sd1_run["out"] / "pytorch_lora_weights.safetensors"))
    final_b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert max((final_a[k] - final_b[k]).abs().max().item() for k in final_a) <= 1e-6
    records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, STEPS + 1))  # resumed steps replace, not duplicate, the old records


@pytest.mark.slow
def test_resume_with_compile_reports_compile_time_and_matches(sd1_run, tmp_path, monkeypatch):
    """--compile compiles the UNet (here with torch.compile's aot_eager backend: the same graph capture of forward
    and backward, no code generation), reports the first step's time, may be switched on at a resume, and trains
    the same LoRA."""
    import torch

    compiled = []
    original = torch.nn.Module.compile

    def compile_eager(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    out = tmp_path / "resumed"
    shutil.copytree(sd1_run["out"], out)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    result = run_cli(*train_args(sd1_run["data"], out, sd1_run["base"], "--resume", "latest", "--compile"))
    assert result.exit_code == 0, result.output
    assert compiled == ["UNet2DConditionModel"]
    assert "torch.compile: first step (compiling the UNet) took" in result.output
    straight = load_file(str(sd1_run["out"] / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-5
    torch._dynamo.reset()


def test_refuses_out_dir_of_another_run(sd1_run):
    again = run_cli(*train_args(sd1_run["data"], sd1_run["out"], sd1_run["base"]))
    assert again.exit_code == 2
    assert "already holds a run" in again.output and "--resume latest" in again.output
    other = run_cli(*train_args(sd1_run["data"], sd1_run["out"], sd1_run["base"], "--seed", "5", "--resume", "latest"))
    assert other.exit_code == 2 and "train.seed" in other.output


def test_comfyui_workflow_renders_the_sample_grid_settings(sd1_run):
    """astro.comfyui.json (OUT_DIR and each checkpoint): the sample prompts with the run's LoRA file at strength 1
    and the grids' sampler, steps, guidance, size and seed, in built-in ComfyUI nodes only."""
    from sdlora.comfyui import workflow
    from sdlora.config import Config

    out = sd1_run["out"]
    config = Config.model_validate_json((out / "config.json").read_text()).model_dump()
    for folder in (out, out / "checkpoints" / "step-000003"):
        graph = json.loads((folder / "astro.comfyui.json").read_text())
        assert workflow.problems(graph) == []
        samplers = [n["inputs"] for n in graph.values() if n["class_type"] == "KSampler"]
        assert len(samplers) == len(config["train"]["sample_prompts"])
        for inputs in samplers:
            assert (inputs["steps"], inputs["seed"], inputs["cfg"]) == (SAMPLE_STEPS, 42, config["generate"]["cfg"])
            assert (inputs["sampler_name"], inputs["scheduler"]) == ("dpmpp_2m", "karras")
        # No text encoder trained: the model alone gets the LoRA.
        (lora,) = [n["inputs"] for n in graph.values() if n["class_type"] == "LoraLoaderModelOnly"]
        assert (lora["lora_name"], lora["strength_model"]) == ("astro.safetensors", 1.0)
        texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
        assert texts[1:] == ["a photo of sks person", "a portrait of sks person, oil painting"]
        (latent,) = [n["inputs"] for n in graph.values() if n["class_type"] == "EmptyLatentImage"]
        assert (latent["width"], latent["height"]) == (64, 64)
