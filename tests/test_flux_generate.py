"""`sdlora generate` on the tiny Flux.1: Flux's defaults (flow-matching Euler, 28 steps, guidance 3.5) and Forge's
`Distilled CFG Scale`, --compare, --save-steps (x0 = x_t - sigma v), --init-image, --keep-face (Flux inpainting).
LoRAs and samplers of another family refused: test_family_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from generate_helpers import max_diff, parse_parameters, pixels
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from sdlora import testing

    return testing.save_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny-flux-gen") / "flux")


def make_flux_lora(base: Path, out_dir: Path, seed: int) -> Path:
    """A random-weight LoRA (r=4) on the tiny Flux's double-block attention, in diffusers format with our family."""
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from sdlora import families

    pipe = FluxPipeline.from_pretrained(str(base))
    torch.manual_seed(seed)
    targets = families.get("flux").denoiser_targets("attention")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    FluxPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
    )
    path = out_dir / "pytorch_lora_weights.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"sdlora.family": "flux", "format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def flux_lora(tiny_flux, tmp_path_factory) -> Path:
    return make_flux_lora(tiny_flux, tmp_path_factory.mktemp("flux-lora"), seed=1)


def gen(*args: str):
    return runner.invoke(app, ["generate", "--size", "64x64", "--n", "1", *args])


@pytest.mark.slow
def test_flux_defaults_and_forge_parameters(tiny_flux, flux_lora, tmp_path):
    result = gen("--base", str(tiny_flux), "--prompt", "a photo of sks person", "--lora", str(flux_lora),
                 "--compare", "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "0000-42.json").read_text())
    assert (record["scheduler"], record["steps"], record["cfg"]) == ("flow_euler", 28, 3.5)
    _, _, settings = parse_parameters(record["parameters"])
    assert settings["Sampler"] == "Euler" and settings["Steps"] == "28"
    assert settings["Distilled CFG Scale"] == "3.5" and settings["CFG scale"] == "1"
    compare = Image.open(tmp_path / "compare.png")
    assert compare.size == (128, 64)
    assert max_diff(compare.crop((64, 0, 128, 64)), tmp_path / "0000-42.png") == 0
    assert max_diff(compare.crop((0, 0, 64, 64)), tmp_path / "0000-42.png") > 0  # the LoRA changes the image


@pytest.mark.slow
def test_save_steps_filmstrip_of_the_flow_x0(tiny_flux, tmp_path):
    result = gen("--base", str(tiny_flux), "--prompt", "a cat", "--steps", "5", "--save-steps", "2",
                 "--size", "64x48", "--out", str(tmp_path))  # fmt: skip
    assert result.exit_code == 0, result.output
    strip = Image.open(tmp_path / "0000-42-steps.png")
    assert strip.size == (3 * 64, 48)
    last = strip.crop((128, 0, 192, 48))
    assert max_diff(last, tmp_path / "0000-42.png") <= 2  # at the last step x0 is the image itself
    assert max_diff(strip.crop((0, 0, 64, 48)), last) > 5


@pytest.mark.slow
def test_init_image_and_keep_face(tiny_flux, flux_lora, tmp_path):
    from skimage import data

    from sdlora.faces.dlib import DlibFaces
    from sdlora.generate import keepface

    photo = Image.fromarray(data.astronaut())
    path = tmp_path / "astronaut.png"
    photo.save(path)
    result = gen("--base", str(tiny_flux), "--prompt", "a person", "--steps", "4", "--init-image", str(path),
                 "--strength", "0.5", "--out", str(tmp_path / "i2i"))  # fmt: skip
    assert result.exit_code == 0, result.output
    result = gen("--base", str(tiny_flux), "--prompt", "a person", "--steps", "4", "--out", str(tmp_path / "t2i"))
    assert result.exit_code == 0, result.output
    # The tiny VAE is random (it does not reconstruct photos): check that the photo, not only the seed, made it.
    assert max_diff(tmp_path / "i2i" / "0000-42.png", tmp_path / "t2i" / "0000-42.png") > 20
    kf = tmp_path / "kf"
    result = gen("--base", str(tiny_flux), "--prompt", "a person in a garden", "--steps", "2", "--size",
                 "128x128", "--lora", str(flux_lora), "--keep-face", str(path), "--out", str(kf))  # fmt: skip
    assert result.exit_code == 0, result.output
    face = DlibFaces().detect(photo)[0]
    fitted, mask = keepface.prepare(photo, face.landmarks, 128, 128)
    core, outside = np.asarray(mask) == 255, np.asarray(mask) == 0
    out = pixels(tmp_path / "kf" / "0000-42.png")
    assert core.sum() > 150 and (out[core] == pixels(fitted)[core]).all()  # the photo's own face
    assert np.abs(out[outside] - pixels(fitted)[outside]).mean() > 20  # the rest repainted by Flux
