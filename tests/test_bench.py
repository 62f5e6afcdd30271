"""CI smoke runs of the benchmark scripts on the tiny model: they run, and the JSON they write is complete and sane."""

from __future__ import annotations

import json
import math
import os
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
