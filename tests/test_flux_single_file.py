"""A Flux.1 base given as one BFL-format file (as flux1-dev.safetensors ships, also float8_e4m3fn) with
model.single_file_config: detected by its keys, loaded to the same transformer, trained and rendered through the
CLI like the folder; without a config, one clear error before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from generate_helpers import max_diff
from safetensors.torch import load_file, save_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families, models
from sdlora.cli import app
from sdlora.quantization import quantization_config
from sdlora.testing import write_single_file


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory) -> tuple[Path, Path]:
    from sdlora import testing

    root = tmp_path_factory.mktemp("flux-single")
    folder = testing.save_tiny_pipeline("flux", root / "folder")
    return folder, write_single_file(folder, root / "flux1-tiny.safetensors")


def test_bfl_file_loads_the_same_transformer(flux_files, tmp_path):
    folder, path = flux_files
    keys = set(load_file(str(path)))
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "single_blocks.0.linear1.weight" in keys
    assert families.detect_checkpoint(keys) is families.get("flux")
    ours = models.load_pipeline(str(path), single_file_config=str(folder)).transformer.state_dict()
    theirs = models.load_pipeline(str(folder)).transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # float8_e4m3fn, as the low-memory community files are: widened while read, equal up to fp8 rounding.
    fp8 = tmp_path / "flux1-tiny-fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(path)).items()}, str(fp8))
    widened = models.load_pipeline(str(fp8), single_file_config=str(folder)).transformer.state_dict()
    key = "transformer_blocks.0.attn.to_q.weight"
    assert widened[key].dtype == torch.float32
    assert torch.equal(widened[key], theirs[key].to(torch.float8_e4m3fn).float())


@pytest.mark.slow
@pytest.mark.usefixtures("two_torch_threads")  # the pixels equal the folder's on two threads (conftest)
def test_train_and_generate_on_the_single_file(flux_files, tmp_path):
    folder, path = flux_files
    data = subject_set(tmp_path / "data")
    runner = CliRunner()
    config = ["--set", f"model.single_file_config='{folder}'"]
    args = ["--steps", "2", "--resolution", "64", "--rank", "4", "--sample-every", "0", "--checkpoint-every", "0"]
    result = runner.invoke(app, ["train", *plain([data, tmp_path / "out", "--base", path, *args, *config])])
    assert result.exit_code == 0, result.output
    gen = ["generate", "--prompt", "a photo of sks person", "--n", "1", "--size", "64x64", "--steps", "3"]
    gen += ["--lora", str(tmp_path / "out")]
    result = runner.invoke(app, [*gen, "--base", str(path), *config, "--out", str(tmp_path / "single")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*gen, "--base", str(folder), "--out", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    assert max_diff(tmp_path / "single" / "0000-42.png", tmp_path / "folder" / "0000-42.png") == 0


def test_single_file_without_config_is_one_clear_error(flux_files, tmp_path):
    _, path = flux_files
    result = CliRunner().invoke(app, ["generate", "--base", str(path), "--prompt", "x", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "holds the transformer" in result.output and "model.single_file_config" in result.output
    assert not (tmp_path / "out").exists()


def test_quantize_a_single_file_goes_through_diffusers_from_single_file(flux_files, monkeypatch):
    """--quantize with a BFL file: our BFL->diffusers state dict to diffusers' from_single_file with a
    BitsAndBytesConfig (bitsandbytes quantizes only on CUDA: here the quantizing call is checked, then made without
    it, which must give the folder's transformer)."""
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    from sdlora.families.flux import single_file as flux_single_file

    folder, path = flux_files
    calls = []
    original = FluxTransformer2DModel.from_single_file.__func__

    def from_single_file(cls, state, **kwargs):
        calls.append(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
        return original(cls, state, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "from_single_file", classmethod(from_single_file))
    quantization = quantization_config("nf4", torch.float32)
    pipe = flux_single_file.load_pipeline(path, str(folder), {"quantization_config": quantization})
    [call] = calls
    bnb = call["quantization_config"]
    assert isinstance(bnb, BitsAndBytesConfig) and bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"
    assert (call["config"], call["subfolder"]) == (str(folder), "transformer")
    theirs = models.load_pipeline(str(folder)).transformer.state_dict()
    ours = pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.cuda
def test_nf4_single_file_trains(flux_files, tmp_path):
    folder, path = flux_files
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(path), "--set", f"model.single_file_config='{folder}'"]
    args += ["--steps", "2", "--resolution", "64", "--rank", "4", "--quantize", "nf4", "--checkpoint-every", "0"]
    result = CliRunner().invoke(app, plain([*args, "--sample-every", "2", "--set", "train.sample_steps=2"]))
    assert result.exit_code == 0, result.output
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert state and all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("key", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"])
def test_fused_tensor_of_the_wrong_size_is_one_line_naming_the_file(flux_files, tmp_path, key):
    """A fused qkv (or linear1) whose rows don't split at the config's widths: one `error:` line naming the file,
    the tensor and the sizes, not the catch-all "this is a bug in sdlora" (issue 28)."""
    folder, path = flux_files
    state = load_file(str(path))
    state[key] = state[key][:-8]  # 8 rows short of q + k + v (+ mlp)
    bad = tmp_path / "flux1-cut.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "out"
    args = ["generate", "--base", str(bad), "--prompt", "x", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--set", f"model.single_file_config='{folder}'"])
    assert result.exit_code != 0 and "bug in sdlora" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], result.output
    assert key.rsplit(".", 1)[0] in lines[0] and str(state[key].shape[0]) in lines[0], result.output
    assert not out.exists()
