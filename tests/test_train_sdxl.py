"""`sdlora train` on the tiny SDXL model: both LoRA files reproduce the trained model, SGM kohya names, time ids from
the manifest, aspect-ratio buckets (SDXL and SD 1.x), resume, text-encoder LoRA on both encoders, offload."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_utils import bucketed_set, plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app

SAMPLE_STEPS = 3
PROMPTS = ["a photo of sks person", "a portrait of sks person, oil painting"]  # the default sample prompts


def run_cli(*args):
    return CliRunner().invoke(app, ["train", *plain(args)])


def common(base: Path, steps: int) -> list[str]:
    return [
        "--base", base, "--steps", steps, "--resolution", "64", "--rank", "4", "--alpha", "8", "--lr", "1e-3",
        "--sample-every", steps, "--set", f"train.sample_steps={SAMPLE_STEPS}", "--set", "train.log_every=1",
        "--name", "xl",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def buckets(tmp_path_factory) -> Path:
    return bucketed_set(tmp_path_factory.mktemp("sdxl-buckets") / "data")


@pytest.fixture(scope="module")
def unet_run(buckets, tiny_sdxl, tmp_path_factory):
    """6 steps of UNet LoRA on the bucketed set, batch 2, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("sdxl-unet") / "out"
    args = [buckets, out, *common(tiny_sdxl, 6), "--batch-size", "2", "--checkpoint-every", "3"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    return {"out": out, "args": args}


@pytest.fixture(scope="module")
def te_run(tiny_sdxl, tmp_path_factory):
    """3 steps with LoRA on the UNet and both text encoders (the second at its own learning rate)."""
    root = tmp_path_factory.mktemp("sdxl-te")
    out = root / "out"
    result = run_cli(
        subject_set(root / "data"), out, *common(tiny_sdxl, 3), "--checkpoint-every", "0", "--train-text-encoder",
        "--text-encoder-lr", "1e-3", "--set", "train.text_encoder_2_learning_rate=2e-3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def fresh_pipe(base: Path, lora: Path | None = None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def render(pipe) -> np.ndarray:
    from sdlora.generate.render import Sampling, make_grid, render_images

    images = render_images(pipe, PROMPTS, [42, 42], Sampling(SAMPLE_STEPS, 7.0, "dpmpp_2m_karras", 64, 64))
    return np.asarray(make_grid(images, cols=len(images))).astype(int)


def sample_grid(out: Path, step: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(out / "samples" / f"step-{step:06d}.png")).astype(int)


@torch.no_grad()
def unet_output(pipe) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)}
    return pipe.unet(x, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample


@torch.no_grad()
def text_output(pipe) -> torch.Tensor:
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=False)
    return torch.cat([embeds.flatten(), pooled.flatten()])


@pytest.mark.slow
def test_unet_lora_files_reproduce_the_trained_model(unet_run, tiny_sdxl):
    from sdlora.lora.peft import adapter_metadata_of, read_header

    out = unet_run["out"]
    trained = sample_grid(out, 6)
    diffusers_pipe = fresh_pipe(tiny_sdxl, out)
    assert np.abs(render(diffusers_pipe) - trained).max() == 0
    base_pipe = fresh_pipe(tiny_sdxl)
    assert np.abs(render(base_pipe) - trained).max() > 5  # the LoRA changed the images
    kohya_pipe = fresh_pipe(tiny_sdxl, out / "xl.safetensors")
    a, b, c = unet_output(diffusers_pipe), unet_output(kohya_pipe), unet_output(base_pipe)
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-3
    assert read_header(out / "pytorch_lora_weights.safetensors")["sdlora.family"] == "sdxl"
    assert adapter_metadata_of(out / "pytorch_lora_weights.safetensors")["unet"]["lora_alpha"] == 8


@pytest.mark.slow
def test_kohya_file_uses_sgm_names_for_exactly_the_peft_modules(unet_run):
    from sdlora.lora.kohya import read_kohya

    out = unet_run["out"]
    state, metadata = read_kohya(out / "xl.safetensors")
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in state}
    assert modules and all(
        m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        for m in modules
    )
    assert not any(word in m for m in modules for word in ("down_blocks", "up_blocks", "mid_block", "attentions"))
    peft_modules = {
        k.split(".lora_A")[0] for k in load_file(str(out / "pytorch_lora_weights.safetensors")) if ".lora_A" in k
    }
    assert len(modules) == len(peft_modules)
    assert any(m.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for m in modules)
    assert all(state[k].dtype == torch.float32 for k in state)  # exact weights, not fp16
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["sdlora.text_encoder_trained"] == "False"


@pytest.mark.slow
def test_resume_from_step_3_equals_uninterrupted_6_steps(unet_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(unet_run["out"], out)
    for name in ("pytorch_lora_weights.safetensors", "xl.safetensors"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")
    shutil.rmtree(out / "samples")
    args = [*unet_run["args"][:1], out, *unet_run["args"][2:], "--resume", "latest", "--sample-every", "0"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    state = "checkpoints/step-000006/lora_state.safetensors"
    straight, resumed = load_file(str(unet_run["out"] / state)), load_file(str(out / state))
    assert straight.keys() == resumed.keys()
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    assert max(straight[k].abs().max().item() for k in straight if "lora_B" in k) > 0  # it trained


@pytest.mark.slow
def test_text_encoder_loras_on_both_encoders_reproduce_the_trained_model(te_run, tiny_sdxl):
    from sdlora.lora.kohya import read_kohya
    from sdlora.lora.peft import adapter_metadata_of

    keys = load_file(str(te_run / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(
        adapter_metadata_of(te_run / "pytorch_lora_weights.safetensors")
    )
    state, metadata = read_kohya(te_run / "xl.safetensors")
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in state)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in state)
    assert metadata["sdlora.text_encoder_trained"] == "True"
    diffusers_pipe = fresh_pipe(tiny_sdxl, te_run)
    assert np.abs(render(diffusers_pipe) - sample_grid(te_run, 3)).max() == 0
    kohya_pipe, base_pipe = fresh_pipe(tiny_sdxl, te_run / "xl.safetensors"), fresh_pipe(tiny_sdxl)
    a, b, c = text_output(diffusers_pipe), text_output(kohya_pipe), text_output(base_pipe)
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-4
    assert (unet_output(diffusers_pipe) - unet_output(kohya_pipe)).abs().max() < 1e-4


def setup_run(data: Path, base: Path, out: Path, **settings):
    from sdlora.config import load
    from sdlora.train import preflight, setup

    options = {"model.base": str(base), "train.resolution": 64, "train.steps": 1, "train.sample_every": 0}
    options |= {"train.pivotal": False, "train.preservation": "none"}  # the plain LoRA
    config = load(None, options | {f"train.{k}": v for k, v in settings.items()})
    plan = preflight(config, data, out)
    return setup.setup(config, plan, setup.make_accelerator(config, plan.precision))


def test_batches_hold_one_bucket_with_the_manifests_time_ids_and_offload(buckets, tiny_sdxl, tmp_path):
    from sdlora.prep.manifest import read_manifest

    run = setup_run(buckets, tiny_sdxl, tmp_path / "out", batch_size=2, offload=True, flip=True)
    assert run.offloaded == ["text_encoder", "text_encoder_2", "vae"]
    assert all(next(getattr(run.pipe, name).parameters()).device.type == "cpu" for name in run.offloaded)
    assert next(run.pipe.unet.parameters()).device == run.accelerator.device
    entries = read_manifest(buckets)
    seen = set()
    for k in range(2 * run.batches.order.per_epoch):
        slots = run.batches.order.batch(k)
        batch = run.batches.micro_batch(k, run.accelerator.device)
        sizes = {(entries[i].width, entries[i].height) for i, _ in slots}
        assert len(sizes) == 1  # one bucket per micro-batch
        width, height = sizes.pop()
        assert tuple(batch.latents.shape[-2:]) == (height // 8, width // 8)
        for row, (i, flipped) in zip(batch.time_ids.tolist(), slots, strict=True):
            e = entries[i]
            left = e.original_size[1] - e.crop_top_left[1] - e.width if flipped else e.crop_top_left[1]
            assert row == [*e.original_size, e.crop_top_left[0], left, e.height, e.width]
            seen.add((i, flipped))
    assert {i for i, _ in seen} == {0, 1, 2, 3} and {f for _, f in seen} == {0, 1}


@pytest.mark.slow
def test_sd1_trains_on_buckets(buckets, tiny_sd1, tmp_path):
    run = setup_run(buckets, tiny_sd1, tmp_path / "setup", batch_size=2)
    assert {tuple(run.batches.micro_batch(k, run.accelerator.device).latents.shape[-2:]) for k in range(3)} == {
        (8, 8),
        (8, 12),
    }
    assert run.offloaded == []
    out = tmp_path / "out"
    result = run_cli(buckets, out, *common(tiny_sd1, 2), "--batch-size", "2", "--checkpoint-every", "0")
    assert result.exit_code == 0, result.output
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_prior_preservation_refuses_bucketed_sets(buckets, tiny_sdxl, tmp_path):
    result = run_cli(buckets, tmp_path / "out", *common(tiny_sdxl, 1), "--class-prompt", "a photo of a person")
    assert result.exit_code == 2 and "prior preservation needs square images" in result.output


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sdxl_half_precision_on_cuda_trains_and_samples(tiny_sdxl, tmp_path, precision):
    """On a GPU: half-precision frozen weights (the VAE kept in fp32 for SDXL), fp32 LoRA, finite losses, samples
    that are images (not black/NaN) rendered mid-training through the VAE."""
    import json

    out = tmp_path / "out"
    result = run_cli(
        subject_set(tmp_path / "data"), out, *common(tiny_sdxl, 2), "--checkpoint-every", "0",
        "--mixed-precision", precision, "--gradient-checkpointing", "--optimizer", "adamw8bit",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"precision {precision}" in result.output
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(np.isfinite(losses))
    grid = sample_grid(out, 2)
    assert grid.std() > 0  # a real picture, not a constant (black) one
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert state and all(torch.isfinite(t.float()).all() for t in state.values())
