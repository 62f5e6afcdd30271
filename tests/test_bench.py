"""CI smoke runs of the benchmark scripts on the tiny model: they run, and the JSON they write is complete and sane."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_train_step_tiny_two_steps(tmp_path):
    out = tmp_path / "train.json"
    variants = "baseline,sdlora,sdlora:channels_last+item"
    result = run_script(
        "train_step.py", "--model", "tiny", "--resolution", "64", "--warmup", "1", "--steps", "1",
        "--variants", variants, "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert (data["model"], data["resolution"], data["batch"], data["rank"]) == ("tiny", 64, 1, 4)
    assert data["device"] == "cpu" and data["steps"] == 1 and data["warmup"] == 1
    assert [row["variant"] for row in data["variants"]] == variants.split(",")
    for row in data["variants"]:
        assert len(row["step_seconds"]) == 2 and all(positive(s) for s in row["step_seconds"])
        assert math.isclose(row["median_s"], row["step_seconds"][1], abs_tol=1e-3)  # the warm-up is not counted
        assert math.isclose(row["samples_per_s"], 1 / row["median_s"])
        for key in ("setup_s", "setup_peak_gb", "step_peak_gb", "process_peak_gb"):
            assert positive(row[key]), (row["variant"], key)
        # The process peak covers set-up and steps; a tiny model fits in well under 4 GB.
        assert row["step_peak_gb"] <= row["process_peak_gb"] + 1e-3 < 4
    assert positive(data["load_average_after"]) or data["load_average_after"] == 0
    lines = result.stdout.strip().splitlines()
    assert lines[-len(data["variants"]) - 1].startswith("variant") and "sdlora" in lines[-1]


def test_train_step_rejects_unknown_lever(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--variants", "baseline,sdlora:warp"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "unknown lever 'warp'" in result.stderr


def test_gpu_sh_rejects_an_unknown_part_before_running_anything():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "matmul", "b64"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown part 'b64'" in result.stderr and result.stdout == ""


@pytest.mark.slow
def test_generate_tiny(tmp_path):
    out = tmp_path / "generate.json"
    run_script(
        "generate.py", "--model", "tiny", "--resolution", "32", "--steps", "2", "--repeats", "1", "--warmup", "0",
        "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert [row["variant"] for row in data["variants"]] == [
        "diffusers-base",
        "diffusers+lora",
        "sdlora",
        "sdlora --fuse",
    ]
    for row in data["variants"]:
        assert len(row["seconds"]) == 1 and positive(row["median_s"])
        assert math.isclose(row["images_per_s"], data["batch"] / row["median_s"])


@pytest.mark.slow
def test_train_step_sdxl_memory_settings_tiny(tmp_path):
    """gpu.sh's SDXL row (sdlora's SDXL trainer with offload, 8-bit AdamW, checkpointing; the bare UNet step), tiny."""
    out = tmp_path / "sdxl.json"
    run_script(
        "train_step.py", "--model", "tiny-sdxl", "--variants", "sdlora,unet", "--rank", "16", "--optimizer",
        "adamw8bit", "--gradient-checkpointing", "--offload", "--warmup", "1", "--steps", "1", "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-sdxl" and data["optimizer"] == "adamw8bit" and data["gradient_checkpointing"]
    assert [row["variant"] for row in data["variants"]] == ["sdlora", "unet"]
    assert all(positive(row["median_s"]) and positive(row["step_peak_gb"]) for row in data["variants"])


# A stand-in for diffusers' training script, with the two calls bench/anchor.py hooks: init_trackers at the end of
# the set-up, then one optimizer step per iteration. It records the command line it was given.
FAKE_SCRIPT = """
import json, os, sys
import torch
from accelerate import Accelerator

steps = int(next(a for a in sys.argv if a.startswith("--max_train_steps=")).split("=")[1])
with open(os.environ["FAKE_SCRIPT_ARGV"], "w") as handle:
    json.dump(sys.argv[1:], handle)
accelerator = Accelerator()
# 512 x 512: a step of milliseconds, so that its CPU time, rounded to 1 ms in the results, is never 0
weight = torch.nn.Parameter(torch.ones(512, 512))
optimizer = accelerator.prepare(torch.optim.AdamW([weight], lr=1e-4))
accelerator.init_trackers("fake")
for step in range(steps):
    (weight @ torch.randn(512, 512)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
raise SystemExit("the benchmark should have stopped the script before its loop ended")
"""


@pytest.mark.slow
def test_train_step_anchor_script_is_alternated_through_its_hooks(tmp_path, monkeypatch):
    """--anchor-script: the script runs unchanged in a worker; its steps are timed between the hooks, its peaks
    measured as sdlora's are, the saved model and a caption-free copy of the data are what it is given."""
    script, argv_file, out = tmp_path / "fake_train.py", tmp_path / "argv.json", tmp_path / "anchor.json"
    script.write_text(FAKE_SCRIPT)
    monkeypatch.setenv("FAKE_SCRIPT_ARGV", str(argv_file))
    run_script(
        "train_step.py", "--model", "tiny", "--variants", "baseline", "--anchor-script", str(script),
        "--warmup", "1", "--steps", "2", "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    (row,) = data["variants"]
    assert row["variant"] == "anchor" and data["anchor_script"] == str(script)
    assert len(row["step_seconds"]) == 3 and all(positive(s) for s in row["step_seconds"] + row["step_cpu_seconds"])
    assert math.isclose(row["median_s"], statistics.median(row["step_seconds"][1:]), abs_tol=1e-3)
    for key in ("setup_s", "setup_peak_gb", "step_peak_gb", "process_peak_gb"):
        assert positive(row[key]), key
    given = dict(a.split("=", 1) for a in json.loads(argv_file.read_text()))
    assert given["--max_train_steps"] == "4" and given["--mixed_precision"] == "no" and given["--rank"] == "4"
    assert (Path(given["--pretrained_model_name_or_path"]) / "model_index.json").name == "model_index.json"


def test_anchor_flux_arguments_match_sdloras_settings(tmp_path, monkeypatch):
    """The Flux script is given sdlora's LoRA targets module by module (not its default feed-forward and single
    blocks), alpha = rank, the T5 length, guidance 1.0 and uniform timesteps."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import anchor

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"num_layers": 2, "num_single_layers": 3}))
    opts = argparse.Namespace(
        model="flux", precision="fp32", resolution=256, batch=1, rank=16, warmup=1, steps=3, tokens=128,
        gradient_checkpointing=False, optimizer="adamw",
    )  # fmt: skip
    args = anchor.script_arguments(opts, tmp_path, tmp_path / "data", tmp_path / "out", ["cache_latents"], "a b")
    given = dict(a.split("=", 1) if "=" in a else (a, "") for a in args)
    layers = given["--lora_layers"].split(",")
    assert len(layers) == 16 and "transformer_blocks.1.attn.to_add_out" in layers
    assert not any("single" in name or ".ff" in name for name in layers)
    assert given["--lora_alpha"] == "16" and given["--max_sequence_length"] == "128"
    assert given["--guidance_scale"] == "1.0" and given["--weighting_scheme"] == "none"
    assert given["--max_train_steps"] == "5" and "--cache_latents" in given and "--validation_prompt" not in given


def test_comfyui_dit_rows_deltas_and_warning_without_comfyui(monkeypatch):
    """bench/comfyui_dit.py's parts that need no ComfyUI: each trained Z-Image layer (real widths, every target of
    'all') lands at its rows of an original-format weight, the expected change is peft's own delta (alpha != r),
    and ComfyUI's "lora keys not loaded" warning is counted."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import comfyui_dit

    from sdlora.families.zimage.keys import to_original

    transformer = comfyui_dit.build("zimage")
    layers = comfyui_dit.lora_layers(transformer)
    rows = {path: layer.base_layer.out_features for path, layer in layers.items()}
    where = comfyui_dit.module_rows(to_original, rows)
    assert len(layers) == 6 * 7  # 2 layers + 2 + 2 refiners, q k v out w1 w2 w3
    assert where["layers.1.attention.to_k"] == ("layers.1.attention.qkv.weight", 3840)
    assert where["context_refiner.0.attention.to_out.0"] == ("context_refiner.0.attention.out.weight", 0)
    original = comfyui_dit.zeros_like_meta(to_original(comfyui_dit.base_state(transformer)))
    for module, (key, row) in where.items():
        assert original[key].shape[0] >= row + rows[module] and original[key].shape[1] == layers[module].in_features
    assert original["layers.0.attention.qkv.weight"].shape == (3 * 3840, 3840)
    expected = comfyui_dit.expected_deltas(layers, where, "diffusion_model.")
    assert len(expected) == 30 and len(expected["diffusion_model.noise_refiner.1.attention.qkv.weight"]) == 3
    layer = layers["layers.0.feed_forward.w2"]
    assert layer.scaling["default"] == comfyui_dit.ALPHA / comfyui_dit.RANK != 1
    assert torch.allclose(comfyui_dit.trained_delta(layer), layer.get_delta_weight("default"))
    with pytest.raises(ValueError, match="not contiguous"):
        comfyui_dit.module_rows(lambda s: {"w": torch.cat([s["a.weight"].flip(0), s["b.weight"]])}, {"a": 2, "b": 1})
    warning = "[None] lora keys not loaded (2 / 10): ['x.lora_A.weight', 'x.lora_B.weight']"
    assert comfyui_dit.not_loaded(["other", warning]) == (2, ["x.lora_A.weight", "x.lora_B.weight"])
    assert comfyui_dit.not_loaded(["Had to shift TE back."]) == (0, [])


@pytest.mark.slow  # imports diffusers and peft to build the transformer on the meta device
def test_anchor_zimage_arguments_match_sdloras_settings(tmp_path, monkeypatch):
    """Diffusers' Z-Image script is given the modules sdlora's attention targets adapt (every attention, the
    refiners' included, none of the feed-forward layers), alpha = rank, the text length, uniform weighting, and
    sdlora's --quantize as its bitsandbytes config file."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import anchor

    (tmp_path / "transformer").mkdir()
    config = {"_class_name": "ZImageTransformer2DModel", "in_channels": 4, "dim": 32, "n_layers": 2}
    config |= {"n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16, "axes_dims": [8, 4, 4]}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config | {"axes_lens": [1024, 64, 64]}))
    opts = argparse.Namespace(
        model="zimage", precision="fp32", resolution=256, batch=1, rank=16, warmup=1, steps=3, tokens=512,
        gradient_checkpointing=True, optimizer="adamw8bit", quantize="nf4",
    )  # fmt: skip
    args = anchor.script_arguments(opts, tmp_path, tmp_path / "data", tmp_path / "out", [], "a b")
    given = dict(a.split("=", 1) if "=" in a else (a, "") for a in args)
    layers = given["--lora_layers"].split(",")
    # 2 layers + 1 noise refiner + 1 context refiner, 4 projections each
    assert len(layers) == 16 and {"layers.1.attention.to_out.0", "context_refiner.0.attention.to_q"} <= set(layers)
    assert not any("feed_forward" in name for name in layers)
    assert given["--lora_alpha"] == "16" and given["--max_sequence_length"] == "512"
    assert given["--weighting_scheme"] == "none" and "--text_encoder_out_layers" not in given
    assert "--gradient_checkpointing" in given and "--use_8bit_adam" in given
    bnb = json.loads(Path(given["--bnb_quantization_config_path"]).read_text())
    assert bnb == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def test_gpu_sh_dit_part_commands_parse(monkeypatch):
    """gpu.sh's dit part cannot run without a GPU: its --dry-run prints each command, and each is a valid
    bench/train_step.py command line for the full-depth models with the settings the issue names."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import train_step

    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "dit"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    seen = set()
    for line in lines:
        words = line.split()
        assert words[0] == "timeout" and int(words[1]) <= 120 and words[3] == "bench/train_step.py"
        opts = train_step.parse_args(words[4:])
        assert (opts.device, opts.precision, opts.resolution, opts.rank, opts.batch) == ("cuda", "bf16", 1024, 16, 1)
        assert opts.anchor_script.name.startswith("train_dreambooth_lora_") and opts.model_dir is not None
        low = (opts.quantize, opts.gradient_checkpointing, opts.optimizer) == ("nf4", True, "adamw8bit")
        assert low or (opts.quantize, opts.gradient_checkpointing, opts.optimizer) == ("none", False, "adamw")
        seen.add((opts.model, low))
    assert seen == {(m, low) for m in ("zimage-6b", "klein-4b") for low in (False, True)}
    assert sum(int(line.split()[1]) for line in lines) <= 360  # about 5 minutes of device time


def test_gpu_sh_identity_part_runs_the_issues_protocol_on_both_bases():
    """gpu.sh's identity part (issue 32's protocol, which the CPU affords only in part), dry-run: each benchmark
    command is the protocol's (64 seeds, checkpoints 200/400/800/1,500, every subject) on a packaged base, every cell
    it names is one the benchmark knows, the flow grid's cells are all there at the toy DiT's rate, and the whole
    fits a device call."""
    from bench.identity import grids

    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "identity"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.strip().splitlines()]
    runs = [words for words in lines if words[3:5] == ["-m", "bench.identity"]]
    assert len(runs) == 2 and [w[4] for w in lines] == ["bench.identity", "bench.identity", "bench.identity.report"]
    cells = {}
    for words in runs:
        text = " ".join(words)
        assert "--seeds 64 --steps 200 400 800 1500" in text and "--subjects" not in text and "--by-setting" in text
        base = words[words.index("--base") + 1]
        assert (ROOT / base).is_file()
        combine = words[words.index("--combine") + 1 : words.index("--out")]
        cells[Path(base).name] = [grids.combine(label) for label in combine]
    flow = cells["identity-dit.safetensors"]
    assert {c.name.removesuffix("+lr1e-3") for c in flow} >= {m.name for m in grids.FLOW}
    assert all(dict(c.options)["train.learning_rate"] == 1e-3 for c in flow)
    assert "pivotal+class_images+named+rank4+text_encoder" in {c.name for c in cells["identity-base.safetensors"]}
    assert sum(int(words[1]) for words in lines) <= 600


def test_qwen_memory_offload_plan_is_the_least_n_that_fits(monkeypatch):
    """bench/qwen_memory.py's N for Qwen-Image's 20B transformer (meta device): block bytes follow each storage
    (fp8: 1 byte + a scale per row; nf4: half a byte + an absmax per 64), and N is the smallest count of swapped
    blocks whose resident weights, the 2 blocks in flight and the allowance fit the card (the offloading's own
    arithmetic: fp8 on 24 GB gives its 7)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import qwen_memory

    bf16, fp8, nf4 = (qwen_memory.plan(24, q) for q in ("none", "fp8", "nf4"))
    assert bf16["blocks"] == 60 and 40 < bf16["weights_gb"] < 42  # 20.4 B parameters in bf16
    assert 0.5 < fp8["block_gb"] / bf16["block_gb"] < 0.502 and 0.28 < nf4["block_gb"] / bf16["block_gb"] < 0.29
    assert (bf16["offload_blocks"], fp8["offload_blocks"], nf4["offload_blocks"]) == (35, 7, 0)
    gib, allowance = qwen_memory.GIB, qwen_memory.ALLOWANCE_GIB * qwen_memory.GIB
    for card, quantize in ((24, "fp8"), (16, "nf4"), (24, "none")):
        row = qwen_memory.plan(card, quantize)
        n, block, outside = row["offload_blocks"], row["block_gb"] * 1e9, row["outside_gb"] * 1e9
        assert 2 < n < 60 and row["fits"], (card, quantize)
        assert outside + (60 - n + 2) * block + allowance <= card * gib < outside + (61 - n + 2) * block + allowance
        assert math.isclose(row["peak_gib"] * gib, outside + (62 - n) * block + allowance)
    assert all(qwen_memory.plan(80, q)["offload_blocks"] == 0 for q in ("fp8", "nf4"))
    assert qwen_memory.plan(4, "nf4")["fits"] is False


def test_gpu_sh_qwenimage_part_commands_parse(monkeypatch):
    """gpu.sh's qwenimage part, dry-run with the Ns given (bench/qwen_memory.py's computation is tested above): the
    model saved once, then bf16, fp8, fp8 + the 24 GB N and nf4 + the 16 GB N, each a valid bench/train_step.py
    command line for the 20B model at 1024 px, rank 16, batch 1, gradient checkpointing, within ~6 minutes."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import train_step

    env = os.environ | {"QWEN_OFFLOAD_24GB": "7", "QWEN_OFFLOAD_16GB": "9"}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "qwenimage"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5 and "--save-model" in lines[0]
    seen = []
    for line in lines:
        words = line.split()
        assert words[0] == "timeout" and words[3] == "bench/train_step.py"
        opts = train_step.parse_args(words[4:])
        assert (opts.model, opts.device, opts.precision, opts.resolution, opts.rank, opts.batch) == (
            "qwenimage-20b", "cuda", "bf16", 1024, 16, 1
        )  # fmt: skip
        assert opts.gradient_checkpointing and str(opts.model_dir) == "/tmp/sdlora-gpu-qwenimage-20b"
        seen.append((opts.quantize, opts.offload_blocks, opts.json and opts.json.name))
    assert seen[1:] == [
        ("none", 0, "qwenimage-bf16.json"),
        ("fp8", 0, "qwenimage-fp8.json"),
        ("fp8", 7, "qwenimage-fp8-offload.json"),
        ("nf4", 9, "qwenimage-nf4-offload.json"),
    ]
    assert sum(int(line.split()[1]) for line in lines) <= 370  # about 6 minutes of device time


@pytest.mark.slow
def test_train_step_qwenimage_fp8_from_a_saved_folder(tmp_path):
    """gpu.sh's qwenimage rows on the tiny model: --model-dir without a script saves the model once, sdlora loads it
    as `sdlora train --base FOLDER` does and --quantize fp8 stores the frozen transformer in float8 (on the CPU)."""
    out, model_dir = tmp_path / "q.json", tmp_path / "model"
    run_script(
        "train_step.py", "--model", "tiny-qwenimage", "--variants", "sdlora", "--quantize", "fp8", "--model-dir",
        str(model_dir), "--gradient-checkpointing", "--warmup", "1", "--steps", "1", "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    (row,) = data["variants"]
    assert (model_dir / "model_index.json").is_file() and data["quantize"] == "fp8" and data["offload_blocks"] == 0
    assert "float8_e4m3fn" in row["frozen_dtypes"] and positive(row["frozen_gb_on_device"])
    assert row["frozen_gb_on_cpu"] == 0 and positive(row["median_s"]) and positive(row["step_peak_gb"])


def test_comfyui_dit_qwenimage_rows_are_its_own_names(monkeypatch):
    """Qwen-Image in bench/comfyui_dit.py: ComfyUI's names are diffusers', so every trained layer (real widths, every
    target of 'all') is expected to change its own weight, from row 0."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import comfyui_dit

    transformer = comfyui_dit.build("qwenimage")
    layers = comfyui_dit.lora_layers(transformer)
    rows = {path: layer.base_layer.out_features for path, layer in layers.items()}
    where = comfyui_dit.module_rows(comfyui_dit.same_names, rows)
    assert len(layers) == 2 * 12  # 2 blocks: q k v out, add_q/k/v, to_add_out, two MLPs of two layers each
    assert all(where[module] == (f"{module}.weight", 0) for module in layers)
    expected = comfyui_dit.expected_deltas(layers, where, "diffusion_model.")
    assert expected["diffusion_model.transformer_blocks.1.img_mlp.net.2.weight"] == [
        (0, "transformer_blocks.1.img_mlp.net.2")
    ]
