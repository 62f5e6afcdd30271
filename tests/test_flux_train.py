"""`sdlora train` on the tiny Flux.1 (dev-like) model through the CLI: both files' keys and metadata, the
diffusers file reloading into FluxPipeline with identical images, kohya's fused q/k/v equal to the unfused
product, the kohya file in diffusers within 1e-4 (with lora.targets 'all'). Resume and the rest of the family contract:
test_family_contract.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.config import Config

STEPS = 6
SAMPLE_STEPS = 3
pytestmark = pytest.mark.slow  # a 6-step run with checkpoints and a resume: the contract test covers the quick path


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from sdlora import testing

    return testing.save_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux") / "flux")


def train_args(data: Path, out: Path, base: Path, *extra: str) -> list[str]:
    args = ["train", str(data), str(out), "--base", str(base), "--steps", str(STEPS), "--resolution", "64"]
    args += ["--rank", "4", "--alpha", "8", "--lr", "1e-3", "--checkpoint-every", "3", "--keep-checkpoints", "2"]
    args += ["--sample-every", str(STEPS), "--name", "astro", "--set", "train.log_every=1"]
    args += ["--set", f"train.sample_steps={SAMPLE_STEPS}", "--set", "lora.targets='all'", *plain([])]
    args += ["--set", "train.sample_prompts=['a photo of {trigger}']"]
    return args + list(extra)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux):
    root = tmp_path_factory.mktemp("train-flux")
    data, out = subject_set(root / "data"), root / "out"
    result = CliRunner().invoke(app, train_args(data, out, tiny_flux))
    assert result.exit_code == 0, result.output
    return {"data": data, "out": out, "base": tiny_flux, "output": result.output}


def fresh_pipe(base: Path, lora: Path | None = None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def test_files_keys_and_metadata(flux_run):
    from sdlora.lora.kohya import read_kohya
    from sdlora.lora.peft import adapter_metadata_of, read_header

    out = flux_run["out"]
    diffusers_file = out / "pytorch_lora_weights.safetensors"
    keys = load_file(str(diffusers_file))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in keys
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in keys
    assert all(k.startswith("transformer.") for k in keys)
    assert read_header(diffusers_file)["sdlora.family"] == "flux"
    # alpha as `.alpha` tensors (ComfyUI applies alpha / rank only with them), not as peft's adapter metadata
    assert "lora_adapter_metadata" not in read_header(diffusers_file) and adapter_metadata_of(diffusers_file) == {}
    alphas = {k: v for k, v in keys.items() if k.endswith(".alpha")}
    assert len(alphas) == sum(k.endswith(".lora_A.weight") for k in keys) and all(
        float(v) == 8.0 for v in alphas.values()
    )
    state, metadata = read_kohya(out / "astro.safetensors")
    modules = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in state}
    assert {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_img_mlp_0",
        "lora_unet_double_blocks_0_img_mlp_2",
        "lora_unet_double_blocks_0_txt_mlp_0",
        "lora_unet_double_blocks_0_txt_mlp_2",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_0_linear2",
    } == modules
    assert all(f"{m}.alpha" in state for m in modules)
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_guidance_scale"] == "1.0" and metadata["ss_timestep_sampling"] == "shift"
    assert float(metadata["ss_discrete_flow_shift"]) == pytest.approx(3.1582)
    assert metadata["ss_t5xxl_max_token_length"] == "512"
    from sdlora import families

    config = Config.model_validate_json((out / "config.json").read_text())
    assert config.generate.scheduler == "dpmpp_2m_karras"  # what was given: the run files hold no family defaults
    resolved = families.with_defaults(config, families.get("flux"), fresh_pipe(flux_run["base"]))
    assert (resolved.generate.scheduler, resolved.generate.cfg, resolved.generate.steps) == ("flow_euler", 3.5, 28)


def _delta(state: dict, prefix: str, scale: float) -> torch.Tensor:
    return state[f"{prefix}.lora_B.weight"] @ state[f"{prefix}.lora_A.weight"] * scale


def test_kohya_fusion_equals_the_unfused_product(flux_run):
    out = flux_run["out"]
    peft_state, kohya = (
        load_file(str(out / "pytorch_lora_weights.safetensors")),
        load_file(str(out / "astro.safetensors")),
    )
    scale = 8 / 4  # alpha / rank of every peft layer
    fused = {
        "lora_unet_double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_" + p for p in "qkv"],
        "lora_unet_double_blocks_0_txt_attn_qkv": [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"],
        "lora_unet_single_blocks_0_linear1": [f"single_transformer_blocks.0.attn.to_{p}" for p in "qkv"]
        + ["single_transformer_blocks.0.proj_mlp"],
    }
    for name, parts in fused.items():
        down, up, alpha = (kohya[f"{name}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == 4 * len(parts)  # down weights stacked: rank 4 per part
        product = up @ down * (float(alpha) / down.shape[0])
        expected = torch.cat([_delta(peft_state, f"transformer.{p}", scale) for p in parts])
        assert product.abs().max() > 0
        assert torch.allclose(product, expected, atol=1e-6), name
    plain = kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"]
    assert float(plain) == 8.0


def render(pipe) -> np.ndarray:
    from sdlora.generate.render import Sampling, make_grid, render_images

    sampling = Sampling(SAMPLE_STEPS, 3.5, "flow_euler", 64, 64)
    return np.asarray(make_grid(render_images(pipe, ["a photo of sks person"], [42], sampling), cols=1)).astype(int)


def test_diffusers_file_reproduces_the_trained_images_and_kohya_file_is_within_1e4(flux_run):
    from PIL import Image
    from safetensors.torch import save_file

    from sdlora import families
    from sdlora.lora.peft import read_header

    out, base = flux_run["out"], flux_run["base"]
    trained = np.asarray(Image.open(out / "samples" / f"step-{STEPS:06d}.png").convert("RGB")).astype(int)
    assert np.array_equal(render(fresh_pipe(base, out)), trained)
    assert np.abs(render(fresh_pipe(base)) - trained).max() > 0  # the LoRA changed the images
    family = families.get("flux")
    outputs = []
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # diffusers' kohya reader splits single blocks' linear1 at the real widths (3072 x 3 + 12288) only: on the tiny
    # model compare without the single blocks (bench/comfyui_check.py loads the whole file at the real widths).
    tmp = out.parent / "double-only"
    tmp.mkdir(exist_ok=True)
    files = []
    for name, single in (
        ("pytorch_lora_weights.safetensors", "single_transformer_blocks"),
        ("astro.safetensors", "single_blocks"),
    ):
        state = {k: v for k, v in load_file(str(out / name)).items() if single not in k}
        save_file(state, str(tmp / name), metadata=read_header(out / name))
        files.append(tmp / name)
    for lora in (*files, None):
        pipe = fresh_pipe(base, lora)
        with torch.no_grad():
            cond = family.encode_prompts(families.tokenizers(pipe, family), families.encoders(pipe, family), ["x"])
            outputs.append(family.predict(pipe.transformer, noisy, torch.tensor([0.6]), cond, None, 1.0))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-4
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4


def test_attention_targets_are_the_double_blocks_only():
    from sdlora import families

    pattern = families.get("flux").denoiser_targets("attention")
    assert re.fullmatch(pattern, "transformer_blocks.3.attn.to_add_out")
    assert re.fullmatch(pattern, "transformer_blocks.0.attn.add_v_proj")
    assert not re.fullmatch(pattern, "single_transformer_blocks.0.attn.to_q")
    assert not re.fullmatch(pattern, "transformer_blocks.0.ff.net.2")
    everything = families.get("flux").denoiser_targets("all")
    assert re.fullmatch(everything, "single_transformer_blocks.7.proj_out")
    assert re.fullmatch(everything, "transformer_blocks.0.ff_context.net.0.proj")
    assert not re.fullmatch(everything, "transformer_blocks.0.norm1.linear")
