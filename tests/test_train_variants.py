"""`sdlora train` variants on tiny models: SD 2.x v-prediction with text-encoder LoRA and 8-bit AdamW, prior
preservation with generated class images, bf16/fp16 code paths on the CPU, NaN detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app


def run(*args):
    return CliRunner().invoke(app, ["train", *plain(args)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return subject_set(tmp_path_factory.mktemp("variants") / "data")


COMMON = ["--resolution", "64", "--rank", "4", "--alpha", "4", "--set", "train.sample_steps=3"]


def test_sd2_v_prediction_text_encoder_adamw8bit(dataset, tiny_sd2, tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from sdlora.generate.render import Sampling, make_grid, render_images
    from sdlora.lora.kohya import read_kohya

    out = tmp_path / "sd2"
    result = run(
        dataset, out, "--base", tiny_sd2, *COMMON, "--steps", "3", "--train-text-encoder", "--optimizer", "adamw8bit",
        "--lr", "1e-3", "--text-encoder-lr", "1e-3", "--grad-accum", "2", "--batch-size", "2", "--sample-every", "3",
        "--checkpoint-every", "0", "--set", "train.min_snr_gamma=5.0", "--set", "train.noise_offset=0.05",
        "--set", "train.lr_scheduler='cosine'", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
        "--set", "train.caption_dropout=0.3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "effective batch 2 x 2 accumulation x 1 processes = 4" in result.output
    keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") and "q_proj.lora_A" in k for k in keys)
    _, metadata = read_kohya(out / "sd2.safetensors")
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["modelspec.prediction_type"] == "v"
    assert metadata["sdlora.text_encoder_trained"] == "True"
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[1]  # warmup to the peak, then cosine decay
    # the reloaded LoRA (UNet + text encoder) renders the trained model's last samples exactly
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    prompts = ["a photo of sks person", "a portrait of sks person, oil painting"]
    images = render_images(pipe, prompts, [42, 42], Sampling(3, 7.0, "dpmpp_2m_karras", 64, 64))
    trained = np.asarray(Image.open(out / "samples" / "step-000003.png")).astype(int)
    assert np.abs(np.asarray(make_grid(images, cols=2)).astype(int) - trained).max() == 0


def test_prior_preservation_generates_class_images_once(dataset, tiny_sd1, tmp_path):
    out = tmp_path / "prior"
    args = [dataset, out, "--base", tiny_sd1, *COMMON, "--steps", "2", "--sample-every", "0", "--checkpoint-every", "0"]
    args += ["--class-prompt", "a photo of a person", "--num-class-images", "3", "--prior-loss-weight", "0.5"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "4 images + 3 class images" in result.output
    made = sorted((out / "class_images").glob("class-*.png"))
    assert [p.name for p in made] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    again = run(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in made] == stamps  # reused, not generated again
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "precision", ["bf16", pytest.param("fp16", marks=pytest.mark.cuda)]
)  # fp16: GradScaler + fp32 LoRA grads, CUDA only
def test_half_precision_paths(dataset, tiny_sd1, tmp_path, precision):
    import torch

    out = tmp_path / precision
    result = run(
        dataset, out, "--base", tiny_sd1, *COMMON, "--steps", "2", "--mixed-precision", precision,
        "--sample-every", "2", "--checkpoint-every", "1", "--set", "train.log_every=1", "--gradient-checkpointing",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{precision} mixed precision" in result.output  # said in words (issue 28: "precision no" confused)
    state = load_file(str(out / "checkpoints" / "step-000002" / "lora_state.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())  # trainable LoRA weights stay fp32
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(dataset, tiny_sd1, tmp_path, monkeypatch):
    # A diverging run: from the third micro-batch on the loss overflows (the config refuses a learning rate as
    # absurd as the 1e30 this test once used, so the overflow is injected).
    from sdlora import objectives

    real, calls = objectives.denoising_loss, []

    def overflowing(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(calls) >= 3 else loss

    monkeypatch.setattr(objectives, "denoising_loss", overflowing)
    out = tmp_path / "nan"
    result = run(
        dataset, out, "--base", tiny_sd1, *COMMON, "--steps", "6", "--lr", "1e-3", "--checkpoint-every", "1",
        "--sample-every", "0", "--set", "train.log_every=1", "--set", "train.max_grad_norm=0",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "loss became NaN/inf at step" in result.output and "learning rate" in result.output
    bad_step = int(result.output.split("at step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and kept[-1] == f"step-{bad_step - 1:06d}"  # nothing saved from the bad step on
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_cross_attention_targets_train_only_the_prompts_key_and_value(dataset, tiny_sd1, tiny_models, tmp_path):
    """lora.targets = "cross_attention" (Custom Diffusion's layers): both files hold every attn2 to_k/to_v of the
    UNet and nothing else; a transformer family, which has no cross-attention, refuses it in one line."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "cross"
    result = run(
        dataset, out, "--base", tiny_sd1, *COMMON, "--steps", "2", "--sample-every", "0", "--checkpoint-every", "0",
        "--set", "lora.targets='cross_attention'", "--name", "me",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet")
    layers = {name for name, _ in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))}
    assert len(layers) >= 4
    diffusers_keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    trained = {key.removeprefix("unet.").split(".lora_")[0] for key in diffusers_keys}
    assert trained == layers
    kohya = load_file(str(out / "me.safetensors"))
    names = {key.split(".")[0] for key in kohya}
    assert len(names) == len(layers) and all(name.endswith(("attn2_to_k", "attn2_to_v")) for name in names)
    assert all(float(diffusers_keys[k].abs().max()) > 0 for k in diffusers_keys if "lora_B" in k)  # they trained

    refused = run(
        dataset, tmp_path / "z", "--base", tiny_models["zimage"], *COMMON, "--steps", "1",
        "--set", "lora.targets='cross_attention'",
    )  # fmt: skip
    assert refused.exit_code == 2, refused.output
    lines = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cross_attention" in lines[0] and "Z-Image" in lines[0] and "'attention'" in lines[0]
    assert "Traceback" not in refused.output and not (tmp_path / "z" / "pytorch_lora_weights.safetensors").exists()
