"""Pivotal tuning (train.pivotal): only the new token rows train, their files reload into `generate` to the trained
pipeline's images, a resume mid-pivotal is exact; SD 1.x and SDXL on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora.cli import app

STEPS, SAMPLE_STEPS = 6, 2  # the rows train in steps 0-2 (pivotal_fraction 0.5), are frozen in 3-5
SETTINGS = {
    "train.steps": STEPS,
    "train.resolution": 64,
    "lora.rank": 4,
    "train.learning_rate": 1e-3,
    "train.checkpoint_every": 2,
    "train.sample_every": STEPS,
    "train.sample_steps": SAMPLE_STEPS,
    "generate.cfg": 5.0,
    "train.sample_prompts": ["a photo of {trigger}"],
    "train.name": "astro",
    "train.pivotal": True,
    "train.preservation": "none",  # pivotal tuning alone (the recommended setting adds class images)
    "train.pivotal_learning_rate": 0.05,
    "train.pivotal_tokens": 2,
}


def train_args(data: Path, out: Path, base: Path, *extra: str, **changes: object) -> list[str]:
    """`sdlora train` with SETTINGS (JSON values are TOML values) and `changes` (train.steps as train__steps)."""
    settings = SETTINGS | {key.replace("__", "."): value for key, value in changes.items()}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    return ["train", str(data), str(out), "--base", str(base), *sets, *extra]


def generate(base: Path, lora: Path, out: Path, *extra: str) -> np.ndarray:
    from PIL import Image

    args = [
        "generate",
        "--base",
        str(base),
        "--lora",
        str(lora),
        "--out",
        str(out),
        "--prompt",
        "a photo of sks person",
    ]
    args += ["--size", "64x64", "--steps", str(SAMPLE_STEPS), "--cfg", "5", "--seed", "42", "--n", "1", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(sorted(out.glob("*.png"))[0]).convert("RGB")).astype(int)


def sample(out: Path, step: int = STEPS) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(out / "samples" / f"step-{step:06d}.png").convert("RGB")).astype(int)


def test_rewrite_rule_whole_words_only():
    from sdlora.lora.embeddings import rewrite_rule, token_names

    pattern, replacement = rewrite_rule("sks", token_names(2))
    assert pattern.sub(replacement, "a photo of sks person, SKS's hat; asks sksx <sks>") == (
        "a photo of <s0><s1> person, <s0><s1>'s hat; asks sksx <sks>"
    )


def test_extra_rows_train_and_every_other_row_stays_byte_identical():
    """The mechanism on a small table: AdamW with weight decay moves the new rows and nothing else."""
    from sdlora.lora.embeddings import ExtraRows

    table = torch.nn.Embedding(10, 4)
    table.requires_grad_(False)
    before = table.weight.detach().clone()
    rows = ExtraRows(table, torch.zeros(2, 4))
    rows.rows.requires_grad_(True)
    optimizer = torch.optim.AdamW([rows.rows], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        out = rows(torch.tensor([[1, 10, 3, 11, 9]]))
        (out * torch.arange(1.0, 5.0)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(rows.weight[:10], before) and rows.weight.shape == (12, 4)
    assert rows.rows.abs().min() > 0  # both new rows moved
    assert torch.equal(rows(torch.tensor([10, 2])), torch.stack([rows.rows[0], before[2]]).detach())


def test_flux_refused_with_reason():
    from types import SimpleNamespace

    from sdlora.config import Config
    from sdlora.errors import UsageError
    from sdlora.families import get
    from sdlora.train.methods import pivotal

    config = Config().model_copy(update={"train": Config().train.model_copy(update={"pivotal": True})})
    with pytest.raises(UsageError, match="--pivotal: not available for Flux.1 bases .*T5, which never trains"):
        pivotal.start(config, SimpleNamespace(dataset_dir=Path(".")), None, get("flux"))


def test_captions_without_the_trigger_word_refused_before_loading(tmp_path):
    data = subject_set(tmp_path / "data", token="zwx")
    (data / "config.json").unlink()  # captions say "zwx", prep.token is "sks"
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")  # never loaded: the check comes first
    result = CliRunner().invoke(app, train_args(data, tmp_path / "out", base))
    assert result.exit_code == 2
    assert "--pivotal: no caption names the trigger word 'sks'" in result.output


@pytest.fixture(scope="module")
def sd1_pivotal(tmp_path_factory, tiny_sd1):
    """A 6-step pivotal run through `sdlora train`'s own functions, keeping the trained pipeline to inspect."""
    from sdlora.config import load
    from sdlora.train import preflight, run, setup

    root = tmp_path_factory.mktemp("pivotal-sd1")
    data, out = subject_set(root / "data"), root / "out"
    config = load(None, SETTINGS | {"model.base": str(tiny_sd1)})
    plan = preflight(config, data, out)
    state = setup.setup(config, plan, setup.make_accelerator(config, plan.precision))
    run.finish(state, run.loop(state, []))
    return {"data": data, "out": out, "base": tiny_sd1, "state": state}


@pytest.mark.slow
def test_sd1_only_new_rows_change_and_files_reload_to_trained_images(sd1_pivotal, tmp_path):
    from diffusers import StableDiffusionPipeline

    out, base, state = sd1_pivotal["out"], sd1_pivotal["base"], sd1_pivotal["state"]
    original = StableDiffusionPipeline.from_pretrained(str(base)).text_encoder.get_input_embeddings().weight
    trained = state.pipe.text_encoder.get_input_embeddings().weight.detach()
    size = original.shape[0]
    assert trained.shape[0] == size + 2
    assert torch.equal(trained[:size], original)  # every row but the new ones, byte for byte
    person = original[state.pipe.tokenizer("person", add_special_tokens=False).input_ids[0]]
    assert (trained[size:] - person).abs().amax(dim=1).min() > 1e-3  # each new row moved from the class word's

    emb = load_file(str(out / "astro_emb.safetensors"))
    assert set(emb) == {"clip_l"} and torch.equal(emb["clip_l"], trained[size:])
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("pivotal_lora_emb.clip_l"), trained[size:])
        assert handle.metadata()["sdlora.pivotal_tokens"] == "<s0>,<s1>"
    checkpoint = load_file(str(out / "checkpoints" / "step-000004" / "astro_emb.safetensors"))
    assert torch.equal(checkpoint["clip_l"], emb["clip_l"])  # frozen after step 3

    # `generate` finds the embeddings in OUT_DIR (inside the diffusers file) and beside a kohya file.
    assert np.abs(generate(base, out, tmp_path / "g1") - sample(out)).max() == 0
    beside = tmp_path / "beside"
    beside.mkdir()
    for name in ("pytorch_lora_weights.safetensors", "astro_emb.safetensors"):
        shutil.copy(out / name, beside / ("astro.safetensors" if name.startswith("pytorch") else name))
    assert np.abs(generate(base, beside / "astro.safetensors", tmp_path / "g2") - sample(out)).max() == 0
    # With the trigger word left a plain word, the trained pipeline draws another image: the equalities above rest
    # on the new tokens.
    from sdlora.generate.render import Sampling, render_images
    from sdlora.lora import embeddings

    embeddings.set_enabled(state.pipe, state.family, False)
    try:
        sampling = Sampling(SAMPLE_STEPS, 5.0, "dpmpp_2m_karras", 64, 64)
        plain = render_images(state.pipe, ["a photo of sks person"], [42], sampling)[0]
    finally:
        embeddings.set_enabled(state.pipe, state.family, True)
    assert np.abs(np.asarray(plain.convert("RGB")).astype(int) - sample(out)).max() > 5


@pytest.mark.slow
def test_sd1_resume_mid_pivotal_is_exact(sd1_pivotal, tmp_path):
    """Resumed at step 2 (the rows still train until step 3): every later checkpoint and file equals the straight
    run's, bit for bit."""
    straight, out = sd1_pivotal["out"], tmp_path / "resumed"
    shutil.copytree(straight, out)
    for name in ("pytorch_lora_weights.safetensors", "astro.safetensors", "astro_emb.safetensors"):
        (out / name).unlink()
    for step in (4, 6):
        shutil.rmtree(out / "checkpoints" / f"step-{step:06d}")
    shutil.rmtree(out / "samples")
    result = CliRunner().invoke(app, train_args(sd1_pivotal["data"], out, sd1_pivotal["base"], "--resume", "latest"))
    assert result.exit_code == 0, result.output
    for relative in (
        "checkpoints/step-000004/lora_state.safetensors",
        "checkpoints/step-000004/astro_emb.safetensors",
        "checkpoints/step-000006/lora_state.safetensors",
        "astro_emb.safetensors",
        "pytorch_lora_weights.safetensors",
    ):
        a, b = load_file(str(straight / relative)), load_file(str(out / relative))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), relative
    assert np.abs(sample(out) - sample(straight)).max() == 0


@pytest.mark.slow
def test_sdxl_both_encoders_get_the_tokens_and_generate_reloads(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    result = CliRunner().invoke(app, train_args(data, out, tiny_sdxl, train__steps=2, train__sample_every=2))
    assert result.exit_code == 0, result.output
    emb = load_file(str(out / "astro_emb.safetensors"))
    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    assert set(emb) == {"clip_l", "clip_g"}
    for key, encoder in (("clip_l", plain.text_encoder), ("clip_g", plain.text_encoder_2)):
        table = encoder.get_input_embeddings().weight
        assert emb[key].shape == (2, table.shape[1])
        person = table[plain.tokenizer("person", add_special_tokens=False).input_ids[0]]
        assert (emb[key] - person).abs().amax(dim=1).min() > 1e-3, key  # trained, through both encoders
    image = generate(tiny_sdxl, out, tmp_path / "g")
    assert np.abs(image - sample(out, 2)).max() == 0


@pytest.mark.slow
def test_sd1_kohya_file_names_its_embedding_file_and_refuses_without_it(sd1_pivotal, tmp_path):
    """The kohya file says which embedding file it needs; alone in a folder, generate refuses it in one line
    (without the file it would render the trigger word without its trained tokens, silently)."""
    from sdlora.lora.embeddings import NEEDS_KEY

    out, base = sd1_pivotal["out"], sd1_pivotal["base"]
    for folder in (out, out / "checkpoints" / "step-000006"):
        with safe_open(str(folder / "astro.safetensors"), "pt") as handle:
            assert handle.metadata()[NEEDS_KEY] == "astro_emb.safetensors"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "astro.safetensors", alone / "astro.safetensors")
    args = ["generate", "--base", str(base), "--lora", str(alone / "astro.safetensors"), "--prompt", "sks"]
    result = CliRunner().invoke(app, [*args, "--size", "64x64", "--steps", "2", "--out", str(tmp_path / "g")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "its embedding file astro_emb.safetensors is not beside it" in lines[0], result.output
    # Beside its embedding file, it loads (and renders with the tokens: test_sd1_only_new_rows_change...).
    shutil.copy(out / "astro_emb.safetensors", alone / "astro_emb.safetensors")
    generate(base, alone / "astro.safetensors", tmp_path / "g2")


@pytest.mark.slow
def test_sd1_comfyui_workflow_asks_for_the_embedding_by_its_file_name(sd1_pivotal):
    """ComfyUI gets the trained tokens from astro_emb.safetensors when the prompt says `embedding:astro_emb`."""
    from sdlora.comfyui import workflow

    graph = json.loads((sd1_pivotal["out"] / "astro.comfyui.json").read_text())
    assert workflow.problems(graph) == []
    texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert "a photo of embedding:astro_emb person" in texts
