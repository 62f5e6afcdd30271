"""--quantize fp8 (sdlora.fp8): refused in one line without torchao; the denoiser's Linear weights really float8
e4m3 with per-row scales and LoRA trained on top; the LoRA files of an fp8 run are those of an unquantized run and
reload into an unquantized pipeline; a real-width block's fp8 forward within a measured tolerance of fp32/bf16."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families, fp8, models
from sdlora.cli import app

runner = CliRunner()
# e4m3 has 3 mantissa bits: rounding to nearest moves a (normal) value by at most half a unit in the last place,
# 2^-4 of the value's binade, i.e. at most 2^-4 / (1 + 2^-4) = 0.0588 of the value itself.
E4M3_MAX_RELATIVE = 2.0**-4


def run(data: Path, out: Path, base: Path, quantize: str) -> None:
    args = ["train", data, out, "--base", base, "--steps", "2", "--resolution", "64", "--rank", "4", "--alpha", "8"]
    args += ["--lr", "1e-3", "--quantize", quantize, "--checkpoint-every", "0", "--sample-every", "0", "--name", "me"]
    result = runner.invoke(app, plain(args))
    assert result.exit_code == 0, result.output


def metadata(out: Path) -> list[dict[str, str]]:
    """The header metadata of the run's diffusers and kohya files."""
    found = []
    for name in ("pytorch_lora_weights.safetensors", "me.safetensors"):
        with safe_open(str(out / name), framework="pt") as handle:
            found.append(handle.metadata())
    return found


def float8_linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if type(getattr(m, "weight", None)).__name__ == "Float8Tensor"}


def test_fp8_without_torchao_is_one_line_before_any_model_loads(tiny_sd1, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(fp8, "installed", lambda: False)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    result = runner.invoke(app, plain(["train", data, out, "--base", tiny_sd1, "--quantize", "fp8"]))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --quantize fp8 needs torchao") and "pip install 'sdlora[fp8]'" in lines[-1]
    assert not out.exists()
    args = ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--quantize", "fp8", "--out", str(tmp_path / "g")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "needs torchao" in result.output and not (tmp_path / "g").exists()


def test_fp8_refuses_fuse_in_one_line(tmp_path):
    args = ["generate", "--base", str(tmp_path / "none"), "--prompt", "x", "--quantize", "fp8", "--fuse"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "--fuse with --quantize fp8" in result.output and not (tmp_path / "g").exists()


def test_fp8_denoiser_is_float8_with_row_scales_and_only_lora_gets_gradients(tiny_sd1):
    from sdlora.lora import peft

    plain_pipe = models.load_pipeline(str(tiny_sd1))
    pipe = models.load_pipeline(str(tiny_sd1), quantize="fp8")
    before = dict(plain_pipe.unet.named_modules())
    quantized = float8_linears(pipe.unet)
    linears = [n for n, m in before.items() if type(m) is torch.nn.Linear]
    assert sorted(quantized) == sorted(linears) and linears  # every Linear of the UNet, nothing else
    for name, module in quantized.items():
        weight, original = module.weight, before[name].weight
        assert weight.qdata.dtype == torch.float8_e4m3fn and weight.qdata.shape == original.shape
        # Per-row scales, not a bare cast: one fp32 scale per output row, the row's absmax on e4m3's largest, 448.
        assert weight.scale.shape == (original.shape[0], 1) and weight.scale.dtype == torch.float32
        expected = original.detach().abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
        assert torch.allclose(weight.scale, expected, rtol=1e-6)
        error = (weight.dequantize() - original).abs()
        assert torch.all(error <= E4M3_MAX_RELATIVE * original.abs() + 1e-3 * weight.scale)  # + e4m3's subnormals
    for name, module in pipe.unet.named_modules():  # convolutions, norms, embeddings: as loaded
        if type(module) is torch.nn.Conv2d:
            assert torch.equal(module.weight, before[name].weight)
    encoder = pipe.text_encoder  # the text encoder is not quantized
    assert not float8_linears(encoder)
    unet = pipe.unet.requires_grad_(False)
    peft.attach(unet, 4, 4.0, 0.0, families.get("sd1").denoiser_targets("attention"))
    wrapped = [m for m in unet.modules() if type(m).__name__ == "TorchaoLoraLinear"]
    assert wrapped  # peft's LoRA layer for torchao weights
    torch.manual_seed(0)
    for module in wrapped:  # a non-zero B, so that every LoRA tensor gets a gradient
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size)
    text = torch.randn(1, 4, unet.config.cross_attention_dim)
    unet(x, torch.tensor([10]), encoder_hidden_states=text).sample.square().mean().backward()
    for name, param in unet.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name
        if "lora_" in name:
            assert param.dtype == torch.float32 and param.grad.abs().sum() > 0, name
    assert all(m.base_layer.weight.grad is None for m in wrapped)


def check_reloads_into_unquantized(base: Path, out: Path, denoiser: str) -> None:
    """diffusers' load_lora_weights reads the fp8 run's files into the plain (unquantized) pipeline: the diffusers
    file tensor for tensor, the kohya file onto the same modules (the format of every other run)."""
    from peft.utils import get_peft_model_state_dict

    pipe = models.load_pipeline(str(base))
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors", adapter_name="me")
    loaded = get_peft_model_state_dict(getattr(pipe, denoiser), adapter_name="me")
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert saved and len(loaded) == len(saved)
    for key, value in saved.items():
        assert value.dtype == torch.float32 and torch.equal(loaded[key.removeprefix(f"{denoiser}.")], value), key
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained: B moved from zero
    pipe.load_lora_weights(str(out), weight_name="me.safetensors", adapter_name="kohya")
    assert len(get_peft_model_state_dict(getattr(pipe, denoiser), adapter_name="kohya")) == len(saved)
    assert not float8_linears(getattr(pipe, denoiser))


@pytest.mark.slow
def test_fp8_sd1_run_saves_loras_that_reload_into_an_unquantized_pipeline(tiny_sd1, tmp_path):
    run(subject_set(tmp_path / "data"), tmp_path / "out", tiny_sd1, "fp8")
    for header in metadata(tmp_path / "out"):
        assert header["sdlora.quantize"] == "fp8"  # what the LoRA was trained against
    check_reloads_into_unquantized(tiny_sd1, tmp_path / "out", "unet")
    lora = str(tmp_path / "out" / "pytorch_lora_weights.safetensors")  # and renders on an fp8 base
    args = ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--quantize", "fp8", "--lora", lora]
    result = runner.invoke(app, [*args, "--steps", "2", "--size", "64x64", "--out", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "g").glob("0000-*.png"))


@pytest.mark.slow
def test_fp8_zimage_run_trains_on_float8_and_reloads_unquantized(tiny_models, tmp_path):
    """A DiT family: Z-Image's transformer quantized the same way (no family hook), its LoRA files reloaded."""
    base = tiny_models["zimage"]
    run(subject_set(tmp_path / "data"), tmp_path / "out", base, "fp8")
    for header in metadata(tmp_path / "out"):
        assert header["sdlora.quantize"] == "fp8" and json.loads(header["sdlora.trained_on"])["base"] == str(base)
    assert float8_linears(models.load_pipeline(str(base), quantize="fp8").transformer)
    check_reloads_into_unquantized(base, tmp_path / "out", "transformer")


@pytest.mark.slow
def test_fp8_forward_of_a_real_width_block_is_within_the_e4m3_tolerance():
    """One FLUX.2 [klein]-4B single-stream block at its real width (hidden 3072, 24 x 128 heads, MLP x3: 123M
    weights, random), 64 tokens. Measured on this CPU, relative L2 error of the block's residual branch (output
    minus input; the residual itself passes unquantized and would hide the error):
      fp8 weights, fp32 compute vs the fp32 block      0.043
      fp8 weights, bf16 compute vs the bf16 block      0.049
      bf16 block (bf16 compute) vs the fp32 block      0.021  (bf16 weights alone: 0.003; the rest is activations)
    Why ~0.04: rounding to e4m3 moves each weight by at most 2^-4 of its binade and by ~2.5% RMS (measured 0.0254
    on both Linears, the uniform-rounding value 2^-4 / sqrt(3) x E[1/mantissa]); a dot product of independent
    errors keeps that relative RMS, and the branch has two quantized Linears in series (qkv+MLP in, attention+MLP
    out), sqrt(2) x 0.025 = 0.036, plus the softmax's sensitivity. Tolerance 0.06 = 2^-4 / (1 + 2^-4), the most any
    single weight can move: the branch error must stay under a single weight's worst case. (A bare e4m3 cast with
    no scale, diffusers' layerwise casting, puts 87% of these weights (std ~0.01) below e4m3's smallest normal 2^-6
    and zeroes 5-11% of them: weight errors 0.054 and 0.11 instead of 0.025.)"""
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock

    torch.manual_seed(0)
    block = Flux2SingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128, mlp_ratio=3.0)
    block = block.eval().requires_grad_(False)
    x, modulation = torch.randn(1, 64, 3072), torch.randn(1, 3 * 3072) * 0.5

    def branch(module: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return module(x, None, modulation) - x

    reference = branch(block)
    bf16_weights = branch(copy.deepcopy(block).to(torch.bfloat16).float())  # bf16 storage, fp32 compute
    assert fp8.quantize(block) == 2  # its two Linears: to_qkv_mlp_proj (27648 x 3072) and to_out (3072 x 12288)
    assert len(float8_linears(block)) == 2
    quantized = branch(block)
    tolerance = E4M3_MAX_RELATIVE / (1 + E4M3_MAX_RELATIVE)
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0.01 < error < tolerance  # really quantized (bf16's error is 0.003), within the tolerance
    assert ((quantized - bf16_weights).norm() / bf16_weights.norm()).item() < tolerance
