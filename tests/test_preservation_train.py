"""Output preservation, the face-weighted loss and timestep bias end to end through `sdlora train` on the tiny
SD 1.x and SDXL models: preservation_weight = 0 is exactly the plain run, every option together trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from train_utils import plain as plain_lora
from train_utils import square_entry, subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.prep.manifest import write_manifest

pytestmark = pytest.mark.slow  # several 2-step runs; the units are in test_preservation.py and test_masked_loss.py

EVERYTHING = [
    "--preservation",
    "output",
    "--set",
    "train.masked_loss=true",
    "--set",
    "train.mask_prior_weight=0.5",
    "--set",
    "train.timestep_bias='high'",
    "--set",
    "train.flip=true",
]


def masked_set(folder: Path) -> Path:
    """subject_set's four crops as a prep dataset whose manifest lists a mask per image (an ellipse around the
    face, as prep writes them)."""
    subject_set(folder)
    (folder / "masks").mkdir()
    entries = []
    for i in range(4):
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).ellipse((14 + i, 6, 50 + i, 54), fill=255)
        mask.save(folder / "masks" / f"img{i}.png")
        entries.append(square_entry(f"img{i}.png", f"/photos/{i}.png", mask=f"masks/img{i}.png"))
    write_manifest(folder / "manifest.jsonl", entries)
    return folder


def train(data: Path, out: Path, base: Path, *extra: str) -> dict:
    args = ["train", str(data), str(out), "--base", str(base), "--steps", "2", "--resolution", "64", "--rank", "4"]
    args += ["--lr", "1e-3", "--checkpoint-every", "0", "--sample-every", "0", "--eval-every", "0", *extra]
    result = CliRunner().invoke(app, plain_lora(args))
    assert result.exit_code == 0, result.output
    return load_file(out / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return masked_set(tmp_path_factory.mktemp("masked") / "data")


def test_sd1_weight_0_is_the_plain_run_and_everything_together_trains(data, tiny_sd1, tmp_path):
    plain = train(data, tmp_path / "plain", tiny_sd1)
    zero = train(data, tmp_path / "zero", tiny_sd1, "--preservation", "output", "--set", "train.preservation_weight=0")
    assert plain.keys() == zero.keys() and all((plain[k] == zero[k]).all() for k in plain)
    saved = json.loads((tmp_path / "zero" / "config.json").read_text())["train"]
    assert saved["preservation"] == "output" and saved["preservation_weight"] == 0
    everything = train(data, tmp_path / "all", tiny_sd1, *EVERYTHING)
    assert everything.keys() == plain.keys()
    assert all(v.isfinite().all() for v in everything.values())
    assert any(not (everything[k] == plain[k]).all() for k in plain)


def test_sdxl_everything_together_with_text_encoder_lora(data, tiny_sdxl, tmp_path):
    """SDXL (two text encoders with LoRA, micro-conditioning): output preservation re-encodes the class prompts
    with and without the encoders' adapters each step, with masks, the masked prior and biased timesteps."""
    tensors = train(data, tmp_path / "xl", tiny_sdxl, *EVERYTHING, "--train-text-encoder")
    assert any(k.startswith("text_encoder_2.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    assert all(v.isfinite().all() for v in tensors.values())


@pytest.mark.parametrize("name", ["zimage", "klein", "qwenimage"])
def test_dit_families_train_with_everything_and_the_memory_settings(name, data, tiny_models, tmp_path):
    """The 2026 DiT families with every likeness method at once, gradient checkpointing, 8-bit AdamW, two
    resolutions in one run: the LoRA trains (finite, changed from the
    plain run) and reloads as the family's diffusers file."""
    plain = train(data, tmp_path / "plain", tiny_models[name])
    memory = ["--gradient-checkpointing", "--optimizer", "adamw8bit"]  # --quantize nf4 needs CUDA (test_flux_options)
    memory += ["--set", "train.resolutions=[64, 80]"]
    everything = train(data, tmp_path / "all", tiny_models[name], *EVERYTHING, *memory)
    assert everything.keys() == plain.keys() and all(k.startswith("transformer.") for k in plain)
    assert all(v.isfinite().all() for v in everything.values())
    assert any(not (everything[k] == plain[k]).all() for k in plain)
    saved = json.loads((tmp_path / "all" / "config.json").read_text())
    assert saved["train"]["resolutions"] == [64, 80] and saved["train"]["optimizer"] == "adamw8bit"
