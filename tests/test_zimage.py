"""What Z-Image has beyond the family contract (test_family_contract.py): its UI LoRA file in ComfyUI's form
(`diffusion_model.` + diffusers names, alpha/rank baked into lora_B, no `.alpha`) with its metadata; Base and
Turbo told apart by the scheduler's shift, with their generate defaults and training shift; the original-name
single file read back through diffusers' converter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app

runner = CliRunner()


def load(folder: Path):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_output(pipe) -> torch.Tensor:
    family = families.get("zimage")
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = family.encode_prompts([pipe.tokenizer], [pipe.text_encoder], ["a photo of sks person", "x"])
        return family.predict(pipe.transformer, noisy, torch.tensor([0.3, 0.8]), cond, None)


def test_comfyui_file_names_diffusers_modules_and_bakes_alpha_over_rank(tiny_models, tmp_path):
    """alpha 8 over rank 4: lora_B is peft's times 2, and diffusers reads the file to the same transformer."""
    from peft import LoraConfig

    from sdlora.errors import SdloraError
    from sdlora.lora import kohya

    pipe = load(tiny_models["zimage"])
    family = families.get("zimage")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=family.denoiser_targets("attention"), init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    trained = transformer_output(pipe)
    state = kohya.kohya_state_dict(pipe.transformer, [], family, dtype=torch.float32)
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in state
    assert "diffusion_model.noise_refiner.0.attention.to_out.0.lora_B.weight" in state
    assert "diffusion_model.context_refiner.0.attention.to_k.lora_B.weight" in state
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert not any(k.endswith(".alpha") or "lora_unet_" in k for k in state)
    layer = pipe.transformer.layers[1].attention.to_v
    torch.testing.assert_close(
        state["diffusion_model.layers.1.attention.to_v.lora_A.weight"], layer.lora_A["default"].weight
    )
    torch.testing.assert_close(
        state["diffusion_model.layers.1.attention.to_v.lora_B.weight"], layer.lora_B["default"].weight * 2
    )
    path = tmp_path / "person.safetensors"
    kohya.save_kohya(path, state, {"modelspec.architecture": "Z-Image/lora"})
    fresh = load(tiny_models["zimage"])
    plain = transformer_output(fresh)
    fresh.load_lora_weights(str(path))
    reloaded = transformer_output(fresh)
    assert (reloaded - trained).abs().max() < 1e-5
    assert (plain - trained).abs().max() > 1e-3  # the LoRA changes the output
    with pytest.raises(SdloraError, match="not a kohya LoRA key"):  # only the family's own prefix is let through
        kohya.save_kohya(tmp_path / "bad.safetensors", {"transformer.x.lora_A.weight": torch.zeros(1)}, {})


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Path:
    """A 2-step run of `sdlora train` on the tiny Z-Image (Base), rank 4, alpha 8."""
    root = tmp_path_factory.mktemp("zimage-train")
    args = ["train", str(subject_set(root / "data")), str(root / "out"), "--base", str(tiny_models["zimage"])]
    args += ["--steps", "2", "--resolution", "64", "--rank", "4", "--alpha", "8", "--name", "person"]
    args += ["--sample-every", "0", "--checkpoint-every", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "out"


def test_trained_files_metadata_and_reload_in_diffusers(trained, tiny_models):
    with safe_open(str(trained / "person.safetensors"), framework="pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert metadata["modelspec.architecture"] == "Z-Image/lora"
    assert metadata["ss_base_model_version"] == "zimage"
    assert metadata["sdlora.zimage_variant"] == "base"
    assert metadata["ss_discrete_flow_shift"] == "6.0"  # the Base scheduler's own shift
    assert metadata["sdlora.text_encoder_trained"] == "False"
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    diffusers_file = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    assert not any(k.endswith(".alpha") for k in diffusers_file)  # diffusers 0.42's `.alpha` trap
    assert all(k.startswith("transformer.") for k in diffusers_file)
    ui = load_file(str(trained / "person.safetensors"))
    for key, tensor in diffusers_file.items():
        name = "diffusion_model." + key.removeprefix("transformer.")
        expected = tensor * 2 if ".lora_B." in key else tensor  # alpha 8 / rank 4, baked in
        torch.testing.assert_close(ui[name], expected)
    outputs = []
    for path in (trained, trained / "person.safetensors"):
        pipe = load(tiny_models["zimage"])
        pipe.load_lora_weights(str(path))
        outputs.append(transformer_output(pipe))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5


def test_base_and_turbo_told_apart_by_the_scheduler_shift(tiny_models):
    from sdlora.config import Config
    from sdlora.families.zimage.tiny import zimage_scheduler

    family, pipe = families.get("zimage"), load(tiny_models["zimage"])
    assert family.variant(pipe) == "base"
    base = family.generate_defaults(pipe)
    assert (base["generate.steps"], base["generate.cfg"], base["train.timestep_shift"]) == (50, 5.0, 6.0)
    assert family.modelspec_architecture("flow", "base") == "Z-Image/lora"
    pipe.scheduler = zimage_scheduler(turbo=True)  # the distilled checkpoint's config: shift 3, same weights
    assert family.variant(pipe) == "turbo"
    turbo = family.generate_defaults(pipe)
    assert (turbo["generate.steps"], turbo["generate.cfg"], turbo["train.timestep_shift"]) == (8, 0.0, 3.0)
    config = families.with_defaults(Config(), family, pipe)
    assert (config.generate.steps, config.generate.cfg, config.generate.scheduler) == (8, 0.0, "flow_euler")
    given = Config.model_validate({"generate": {"steps": 12}})
    assert families.with_defaults(given, family, pipe).generate.steps == 12  # a setting given wins
    objective = family.objective(pipe.scheduler, "cpu", "auto", config.train.timestep_shift)
    assert (objective.sampling, objective.shift) == ("shift", 3.0)


def test_single_file_round_trip_through_diffusers_converter(tiny_models, tmp_path):
    from sdlora.testing import write_single_file

    path = write_single_file(tiny_models["zimage"], tmp_path / "z_image.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert "layers.0.attention.qkv.weight" in keys and "final_layer.linear.weight" in keys
    assert not any("to_q" in k or "all_final_layer" in k for k in keys)
    family = families.get("zimage")
    pipe = family.load_single_file(path, str(tiny_models["zimage"]), {})
    original = load(tiny_models["zimage"]).transformer.state_dict()
    loaded = pipe.transformer.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--train-text-encoder"], ["--train-text-encoder", "Z-Image trains no text-encoder LoRA"]),
        (["--adapter", "lokr", "--set", "lora.dropout=0"], ["--adapter lokr", "can't hold it", "--adapter lora"]),
    ],
)
def test_what_the_family_cant_honour_is_refused_before_training(tiny_models, tmp_path, option, words, monkeypatch):
    """Qwen3 trains no LoRA (diffusers and ComfyUI load the transformer's alone): refused in the pre-flight (before,
    the text-encoder flag did nothing, silently). Every family's files hold every adapter kind today; a family
    whose files could not (Family.adapter_kinds, here narrowed to LoRA) refuses the others there, in one line
    (before, DoRA failed when the first file was saved)."""
    import dataclasses

    narrowed = dataclasses.replace(families.get("zimage"), adapter_kinds=("lora",))
    monkeypatch.setitem(families.REGISTRY, "zimage", narrowed)
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(tiny_models["zimage"]), "--steps", "2", *option]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(word in line for word in words), line
    assert not (out / "checkpoints").exists()


def test_every_family_names_only_known_adapter_kinds():
    from sdlora.lora.kinds import KINDS

    for family in families.REGISTRY.values():
        assert family.adapter_kinds is None or set(family.adapter_kinds) <= set(KINDS), family.name
