"""A single-file original-format (LDM / SGM, "A1111") `--base`: loads offline with `model.single_file_config` into
the same weights as the diffusers folder, renders the same images, trains through the CLI; clear errors otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import models
from sdlora.cli import app
from sdlora.errors import SdloraError, UsageError
from sdlora.families.sdxl.tiny import save_with_distinct_encoders as save_sdxl_with_distinct_encoders
from sdlora.testing import write_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def single_files(tiny_sd1, tmp_path_factory):
    """family -> (diffusers folder, the same model as one original-format .safetensors file)."""
    root = tmp_path_factory.mktemp("single-file")
    sdxl = save_sdxl_with_distinct_encoders(root / "sdxl")
    return {
        "sd1": (tiny_sd1, write_single_file(tiny_sd1, root / "sd1.safetensors")),
        "sdxl": (sdxl, write_single_file(sdxl, root / "sdxl.safetensors")),
    }


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipes(request, single_files):
    """(family, pipeline loaded from the folder, pipeline loaded from the single file)."""
    folder, path = single_files[request.param]
    return (
        request.param,
        models.load_pipeline(str(folder)),
        models.load_pipeline(str(path), single_file_config=str(folder)),
    )


def test_file_has_the_original_layout(single_files):
    expected = {
        "sd1": [
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.output_blocks.2.2.conv.weight",  # the up block's upsampler, after its attention
            "first_stage_model.decoder.up.3.upsample.conv.weight",  # the decoder counts its levels down
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        ],
        "sdxl": [
            "model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection",
        ],
    }
    for family, keys in expected.items():
        with safe_open(str(single_files[family][1]), framework="pt") as handle:
            names = set(handle.keys())
            assert set(keys) <= names, family
            assert all(
                n.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
                for n in names
            )
            assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]


def test_single_file_loads_the_folders_weights(pipes):
    family, folder_pipe, file_pipe = pipes
    assert type(file_pipe) is type(folder_pipe)
    assert models.model_info(file_pipe) == models.model_info(folder_pipe)
    assert models.model_info(file_pipe).family == family
    for name in [n for n in COMPONENTS if hasattr(folder_pipe, n)]:
        want, got = getattr(folder_pipe, name).state_dict(), getattr(file_pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():  # a weight the file lacks stays on the meta device: fails here
            assert got[key].device == tensor.device and torch.equal(got[key], tensor), f"{name}.{key}"


def test_single_file_renders_the_same_image(pipes):
    family, folder_pipe, file_pipe = pipes
    images = [
        pipe(
            "a photo of sks person",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(7),
        ).images  # fmt: skip
        for pipe in (folder_pipe, file_pipe)
    ]
    assert images[0].std() > 0.01  # a real picture, not a constant
    # Same weights; only the memory alignment of the loaded tensors differs, which moves CPU kernels by ~1e-6.
    np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)


def cli(*args: object) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(single_files, tmp_path_factory):
    """`sdlora train` for 2 steps on the SD 1.x single file and on its folder: (data, {"file"|"folder": OUT_DIR})."""
    folder, path = single_files["sd1"]
    root = tmp_path_factory.mktemp("single-file-train")
    data = subject_set(root / "data")
    common = ["--steps", "2", "--resolution", "64", "--rank", "4", "--sample-every", "0", "--checkpoint-every", "0"]
    common += ["--lr", "1e-3", "--set", "train.eval_every=0", "--set", "train.log_every=1"]
    common += ["--no-pivotal", "--preservation", "none"]  # the plain LoRA
    outs = {"file": root / "file", "folder": root / "folder"}
    cli("train", data, outs["file"], "--base", path, *common, "--set", f"model.single_file_config='{folder}'")
    cli("train", data, outs["folder"], "--base", folder, *common)
    return data, outs


@pytest.mark.slow
def test_train_cli_on_a_single_file_base(single_files, trained):
    folder, path = single_files["sd1"]
    _, outs = trained
    stored = json.loads((outs["file"] / "config.json").read_text())["model"]
    assert stored["base"] == str(path) and stored["single_file_config"] == str(folder)
    # Training on the file is training on the same model: the same losses and LoRA as from the folder.
    losses = [[json.loads(line)["loss"] for line in (outs[k] / "metrics.jsonl").open()] for k in ("file", "folder")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5, abs=0)
    lora, reference = (load_file(outs[k] / "pytorch_lora_weights.safetensors") for k in ("file", "folder"))
    assert lora.keys() == reference.keys() and lora
    for key in lora:
        torch.testing.assert_close(lora[key], reference[key], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_generate_and_eval_cli_on_a_single_file_base(single_files, trained, tmp_path):
    folder, path = single_files["sd1"]
    data, outs = trained
    config = ["--set", f"model.single_file_config='{folder}'"]
    fast = ["--size", "64x64", "--steps", "2", "--scheduler", "ddim", "--n", "1", "--lora", outs["file"]]
    cli("generate", "--base", path, *config, *fast, "--prompt", "a photo of {trigger}", "--out", tmp_path / "file")
    cli("generate", "--base", folder, *fast, "--prompt", "a photo of {trigger}", "--out", tmp_path / "folder")
    images = [np.asarray(Image.open(tmp_path / kind / "0000-42.png"), dtype=int) for kind in ("file", "folder")]
    assert np.abs(images[0] - images[1]).max() <= 1  # 8-bit rounding of ~1e-6 differences (see above)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("{trigger} on a boat\n")
    report = tmp_path / "eval.json"
    cli("eval", "--reference", data, "--lora", outs["file"], "--base", path, *config, "--prompts", prompts,
        "--n", "1", "--json", report, "--set", "generate.steps=2", "--set", "generate.size=64x64")  # fmt: skip
    assert [image["prompt"] for image in json.loads(report.read_text())["images"]] == ["sks person on a boat"]


def test_single_file_without_config_offline_is_one_line_error(single_files, tmp_path):
    _, path = single_files["sd1"]
    with pytest.raises(SdloraError, match="--set model.single_file_config=DIR"):
        models.load_pipeline(str(path))
    result = CliRunner().invoke(
        app,
        ["train", str(subject_set(tmp_path / "data")), str(tmp_path / "out"), "--base", str(path)]
        + ["--set", "train.eval_every=0"],  # no notice about identity scoring: the error is the only line
    )
    assert result.exit_code == 1, result.output
    assert "model.single_file_config" in result.output and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


def test_bad_single_file_inputs_are_usage_errors(single_files, tmp_path):
    folder, _ = single_files["sd1"]
    lora = tmp_path / "lora.safetensors"  # a LoRA file given as the base: no UNet weights in it
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(UsageError, match="not a full checkpoint .*a LoRA or VAE file is not a base model"):
        models.load_pipeline(str(lora), single_file_config=str(folder))
    with pytest.raises(UsageError, match="model.single_file_config .*no model_index.json"):
        models.check_base(str(lora), allow_pickle=False, single_file_config=str(tmp_path))
