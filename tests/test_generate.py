"""`sdlora generate` on tiny models: files and metadata, seeds, LoRA scales, fuse, compare, filmstrips, errors."""

from __future__ import annotations

import json
import logging
import re

import pytest
from generate_helpers import make_lora, max_diff, parse_parameters
from PIL import Image
from typer.testing import CliRunner

from sdlora import __version__
from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.generate import expand_triggers, read_prompts
from sdlora.lora.files import parse_lora

runner = CliRunner()
FAST = ["--size", "64x64", "--steps", "2", "--scheduler", "euler_a", "--cfg", "5"]


@pytest.fixture(scope="module")
def loras(tiny_sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(tiny_sd1, root / "lora-a", seed=1, metadata={"sdlora.trigger_phrase": "zwx person"}),
        "b": make_lora(tiny_sd1, root / "lora-b", seed=2),
    }


def gen(*args: str) -> str:
    result = runner.invoke(app, ["generate", *FAST, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_outputs_parameters_chunk_and_json(tiny_sd1, loras, tmp_path):
    out = tmp_path / "out"
    gen("--base", str(tiny_sd1), "--lora", f"{loras['a']}:0.8", "--prompt", "a photo of {trigger}",
        "--negative", "blurry, dark", "--n", "2", "--batch-size", "2", "--out", str(out))  # fmt: skip
    # .sdlora.json: the folder's ownership marker
    assert sorted(p.name for p in out.iterdir()) == [
        ".sdlora.json", "0000-42.json", "0000-42.png", "0001-43.json", "0001-43.png", "comfyui.json", "config.json",
        "grid.png",
    ]  # fmt: skip
    assert Image.open(out / "grid.png").size == (128, 64)
    image = Image.open(out / "0001-43.png")
    prompt, negative, settings = parse_parameters(image.text["parameters"])
    assert prompt == "a photo of zwx person <lora:lora-a:0.8>"
    assert negative == "blurry, dark"
    assert settings["Steps"] == "2" and settings["Sampler"] == "Euler a" and settings["CFG scale"] == "5.0"
    assert settings["Seed"] == "43" and settings["Size"] == "64x64" and settings["Model"] == "sd1"
    assert re.fullmatch(r'"lora-a: [0-9a-f]{12}"', settings["Lora hashes"])
    record = json.loads((out / "0001-43.json").read_text())
    assert record["prompt"] == "a photo of zwx person" and record["seed"] == 43
    assert record["sdlora_version"] == __version__
    assert record["loras"][0]["scale"] == 0.8 and record["loras"][0]["trigger"] == "zwx person"
    assert record["loras"][0]["hash"].startswith(settings["Lora hashes"].split(": ")[1][:12])
    assert record["parameters"] == image.text["parameters"]
    assert json.loads((out / "config.json").read_text())["generate"]["loras"] == [f"{loras['a']}:0.8"]
    # ComfyUI's `prompt` chunk: this image's workflow; comfyui.json: the run's (both images).
    from sdlora.comfyui import workflow

    graph = json.loads(image.text["prompt"])
    assert workflow.problems(graph) == []
    (sampler,) = [node["inputs"] for node in graph.values() if node["class_type"] == "KSampler"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (
        43,
        2,
        5.0,
        "euler_ancestral",
    )
    (lora,) = [node["inputs"] for node in graph.values() if node["class_type"].startswith("LoraLoader")]
    assert lora["lora_name"] == "lora-a.safetensors" and lora["strength_model"] == 0.8
    texts = {node["inputs"]["text"] for node in graph.values() if node["class_type"] == "CLIPTextEncode"}
    assert texts == {"a photo of zwx person", "blurry, dark"}
    run = json.loads((out / "comfyui.json").read_text())
    assert workflow.problems(run) == []
    assert [n["inputs"]["seed"] for n in run.values() if n["class_type"] == "KSampler"] == [42, 43]


@pytest.mark.slow
def test_image_remade_alone_by_seed(tiny_sd1, tmp_path):
    base = ["--base", str(tiny_sd1), "--prompts", str(_prompts(tmp_path, "# comment", "a cat", "", "a dog"))]
    gen(*base, "--n", "2", "--batch-size", "3", "--seed", "10", "--out", str(tmp_path / "all"))
    gen("--base", str(tiny_sd1), "--prompt", "a dog", "--n", "1", "--seed", "13", "--out", str(tmp_path / "one"))
    assert (tmp_path / "all" / "0003-13.png").is_file()
    assert max_diff(tmp_path / "all" / "0003-13.png", tmp_path / "one" / "0000-13.png") <= 2
    assert max_diff(tmp_path / "all" / "0002-12.png", tmp_path / "one" / "0000-13.png") > 10


@pytest.mark.slow
def test_two_loras_with_scales(tiny_sd1, loras, tmp_path):
    common = ["--base", str(tiny_sd1), "--prompt", "zwx person", "--n", "1"]
    gen(*common, "--out", str(tmp_path / "base"))
    gen(*common, "--lora", f"{loras['a']}:0", "--lora", f"{loras['b']}:0.0", "--out", str(tmp_path / "zero"))
    gen(*common, "--lora", f"{loras['a']}:1", "--lora", f"{loras['b']}:0.5", "--out", str(tmp_path / "both"))
    gen(*common, "--lora", str(loras["a"]), "--out", str(tmp_path / "a"))
    png = "0000-42.png"
    assert max_diff(tmp_path / "zero" / png, tmp_path / "base" / png) <= 1
    assert max_diff(tmp_path / "both" / png, tmp_path / "base" / png) > 10
    assert max_diff(tmp_path / "both" / png, tmp_path / "a" / png) > 5
    settings = parse_parameters(Image.open(tmp_path / "both" / png).text["parameters"])[2]
    assert settings["Lora hashes"].count(":") == 2


@pytest.mark.slow
def test_fused_equals_unfused_and_compare_grid(tiny_sd1, loras, tmp_path):
    common = ["--base", str(tiny_sd1), "--prompt", "zwx person", "--n", "2", "--lora", f"{loras['a']}:0.7"]
    gen(*common, "--out", str(tmp_path / "unfused"), "--compare")
    gen(*common, "--out", str(tmp_path / "fused"), "--fuse")
    gen("--base", str(tiny_sd1), "--prompt", "zwx person", "--n", "2", "--out", str(tmp_path / "base"))
    for png in ("0000-42.png", "0001-43.png"):
        assert max_diff(tmp_path / "fused" / png, tmp_path / "unfused" / png) <= 2
        assert max_diff(tmp_path / "unfused" / png, tmp_path / "base" / png) > 10
    compare = Image.open(tmp_path / "unfused" / "compare.png")
    assert compare.size == (2 * 64, 2 * 64)  # one row per seed: base | LoRA
    assert max_diff(compare.crop((0, 64, 64, 128)), tmp_path / "base" / "0001-43.png") <= 1
    assert max_diff(compare.crop((64, 64, 128, 128)), tmp_path / "unfused" / "0001-43.png") == 0


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras"])
def test_save_steps_filmstrip(tiny_sd1, tmp_path, scheduler):
    gen("--base", str(tiny_sd1), "--prompt", "a cat", "--n", "1", "--steps", "5", "--save-steps", "2",
        "--scheduler", scheduler, "--size", "64x48", "--out", str(tmp_path))  # fmt: skip
    strip = Image.open(tmp_path / "0000-42-steps.png")
    assert strip.size == (3 * 64, 48)  # steps 2, 4 and the last one (5)
    last = strip.crop((128, 0, 192, 48))
    assert max_diff(last, tmp_path / "0000-42.png") <= 2  # the final x0 is the image itself
    assert max_diff(strip.crop((0, 0, 64, 48)), last) > 5


def test_family_mismatch_refused_before_generating(tiny_sd1, tiny_sdxl, loras, tmp_path):
    sdxl_lora = make_lora(tiny_sdxl, tmp_path / "xl", seed=3)
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", *FAST, "--base", str(tiny_sd1), "--prompt", "x",
                                 "--lora", str(loras["a"]), "--lora", str(sdxl_lora), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2
    assert "64-wide text features" in result.output and "base model (sd1) has 32" in result.output
    assert not out.exists()
    tagged = make_lora(tiny_sd1, tmp_path / "tagged", seed=4, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    result = runner.invoke(app, ["generate", *FAST, "--base", str(tiny_sd1), "--prompt", "x",
                                 "--lora", str(tagged), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "made for sdxl, but the base model is sd1" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_kohya_format_lora(tiny_sd1, tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    tensors = {
        f"{module}.lora_down.weight": torch.randn(4, 64),
        f"{module}.lora_up.weight": torch.randn(64, 4),
        f"{module}.alpha": torch.tensor(4.0),
    }
    path = tmp_path / "kohya.safetensors"
    save_file(
        tensors,
        str(path),
        metadata={"ss_base_model_version": "sd_v1", "ss_tag_frequency": '{"x": {"qwz man": 5, "smile": 2}}'},
    )
    assert parse_lora(str(path)).trigger == "qwz man"
    gen("--base", str(tiny_sd1), "--prompt", "{trigger}", "--n", "1", "--lora", str(path), "--out", str(tmp_path / "k"))
    gen("--base", str(tiny_sd1), "--prompt", "qwz man", "--n", "1", "--out", str(tmp_path / "b"))
    assert max_diff(tmp_path / "k" / "0000-42.png", tmp_path / "b" / "0000-42.png") > 3


def test_triggers_and_prompt_files(loras, tmp_path, caplog):
    lora = parse_lora(str(loras["a"]))
    with caplog.at_level(logging.WARNING):
        assert expand_triggers(["{trigger} at sea", "a dog"], [lora]) == ["zwx person at sea", "a dog"]
    assert "'a dog' lacks the LoRA trigger phrase 'zwx person'" in caplog.text
    with pytest.raises(UsageError, match="no --lora has a trigger phrase"):
        expand_triggers(["{trigger}"], [parse_lora(str(loras["b"]))])
    assert read_prompts(_prompts(tmp_path, "# c", " a cat ", "", "#x", "a dog")) == ["a cat", "a dog"]


def test_cli_errors(tiny_sd1, tmp_path):
    prompts = _prompts(tmp_path, "a cat")
    cases = [
        (["--prompt", "x", "--prompts", str(prompts)], "can't give both --prompt and --prompts"),
        ([], "no prompt: give --prompt TEXT or --prompts FILE"),
        (["--prompt", "x", "--lora", str(tmp_path / "missing")], f"--lora {tmp_path / 'missing'}: no such file"),
        (["--prompts", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        (["--prompt", "x", "--compare"], "--compare needs at least one --lora"),
        (["--prompt", "x", "--scheduler", "plms"], "generate.scheduler"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--out", str(tmp_path / "o"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def _prompts(tmp_path, *lines: str):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
