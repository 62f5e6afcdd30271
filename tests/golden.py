"""Golden outputs of fixed-seed runs through the CLI: sha256s of LoRA tensors and of rendered pixels.

Recorded once on the code before a refactor (`python tests/golden.py --record`), then checked by
tests/test_golden.py after every move: a refactor must not change a single bit of what a user gets. Each scenario
runs in a fresh process with CPU-independent kernels (PINNED_ENV): the first recording, made in-process, followed
the CPU, and failed on the same code once the machines changed (AVX-512 without AMX -> AMX). Re-recorded under
PINNED_ENV on 2026-12-02 from the code of 18f6c43 (before the recommended person defaults), whose hashes the
code after that change gives bit for bit; the scenarios name the plain LoRA's settings. Even pinned, training
still followed the machine: on an AMD EPYC (AVX-512) CI machine the unchanged code of 1f5f202 gave other training
tensors than the Intel recording (its render-only scenario, generate-kohya-euler_a, matched bit for bit), run after
run the same. Re-recorded there on 2026-12-07 from 1f5f202, before the family-folder refactor; golden.json keeps
the recording machine under "_recorded_on" so that a mismatch on a new kind of machine says so. The hashes
cover tensor values, dtypes and shapes (not the files, whose headers hold timestamps) and decoded RGB pixels.

CI and working machines come as both makes, so golden.json holds one recording per CPU make ("AMD", "Intel"; see
`cpu_make`) and the test checks against its machine's. The Intel one was recorded on 2026-12-08 (Intel Xeon,
AVX-512) from the code of 1f5f202, the AMD recording's code, and today's code gave the same hashes bit for bit
there: the family-folder refactor changed no output on either make. `--record` writes this machine's make only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GOLDEN_FILE = Path(__file__).parent / "data" / "golden.json"


def tensors_sha256(path: Path) -> str:
    """sha256 over every tensor of a .safetensors file: key, dtype, shape and bytes, in key order."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for key, value in sorted(load_file(str(path)).items()):
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pixels_sha256(path: Path) -> str:
    """sha256 of an image's decoded RGB pixels and size."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return hashlib.sha256(f"{array.shape}|".encode() + array.tobytes()).hexdigest()


def cli(*args: str) -> str:
    from typer.testing import CliRunner

    from sdlora.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        raise AssertionError(f"sdlora {' '.join(args)} exited {result.exit_code}:\n{result.output}")
    return result.output


def _train_args(data: Path, out: Path, base: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        str(data),
        str(out),
        "--base",
        str(base),
        "--steps",
        str(steps),
        "--resolution",
        "64",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "2",
        "--sample-every",
        str(steps),
        "--name",
        "golden",
        "--set",
        "train.log_every=1",
        "--no-pivotal",  # the plain LoRA the goldens were recorded with
        "--preservation",
        "none",
        "--set",
        "train.sample_steps=3",
        *extra,
    ]


def _run_files(out: Path) -> dict[str, str]:
    hashes = {
        "lora_diffusers": tensors_sha256(out / "pytorch_lora_weights.safetensors"),
        "lora_kohya": tensors_sha256(out / "golden.safetensors"),
    }
    for checkpoint in sorted((out / "checkpoints").glob("step-*")):
        hashes[f"{checkpoint.name}/lora_state"] = tensors_sha256(checkpoint / "lora_state.safetensors")
    for sample in sorted((out / "samples").glob("*.png")):
        hashes[f"samples/{sample.name}"] = pixels_sha256(sample)
    return hashes


def _images(folder: Path, prefix: str) -> dict[str, str]:
    return {f"{prefix}/{p.name}": pixels_sha256(p) for p in sorted(folder.glob("*.png"))}


def _generate_args(base: Path, lora: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--base",
        str(base),
        "--lora",
        f"{lora}:0.8",
        "--prompt",
        "a photo of {trigger}, smiling",
        "--n",
        "2",
        "--steps",
        "3",
        "--size",
        "64x64",
        "--out",
        str(out),
        *extra,
    ]


def scenario_sd1(root: Path, models: Callable[[str], Path]) -> dict[str, str]:
    """SD 1.x: all targets, text-encoder LoRA, min-SNR, flips, offset noise, caption dropout; generate with
    compare, filmstrips and two schedulers."""
    from train_utils import subject_set

    data, out, base = subject_set(root / "data"), root / "run", models("sd1")
    extra = ["--train-text-encoder", "--set", "lora.targets='all'", "--set", "train.min_snr_gamma=5.0"]
    extra += ["--set", "train.flip=true", "--set", "train.noise_offset=0.05", "--set", "train.caption_dropout=0.25"]
    cli(*_train_args(data, out, base, 4, *extra))
    hashes = _run_files(out)
    cli(*_generate_args(base, out, root / "gen", "--compare", "--save-steps", "2"))
    hashes |= _images(root / "gen", "generate")
    cli(*_generate_args(base, out / "golden.safetensors", root / "gen-euler", "--scheduler", "euler_a", "--fuse"))
    hashes |= _images(root / "gen-euler", "generate-kohya-euler_a")
    return hashes


def scenario_sd1_prior(root: Path, models: Callable[[str], Path]) -> dict[str, str]:
    """SD 1.x with prior preservation: generated class images, then the paired loss."""
    from train_utils import subject_set

    data, out, base = subject_set(root / "data"), root / "run", models("sd1")
    extra = ["--class-prompt", "a photo of a person", "--num-class-images", "3", "--prior-loss-weight", "0.5"]
    cli(*_train_args(data, out, base, 3, *extra, "--batch-size", "2"))
    hashes = _run_files(out)
    hashes |= _images(out / "class_images", "class_images")
    return hashes


def scenario_sd2(root: Path, models: Callable[[str], Path]) -> dict[str, str]:
    """SD 2.x (v-prediction), gradient accumulation, cosine schedule with warmup."""
    from train_utils import subject_set

    data, out, base = subject_set(root / "data"), root / "run", models("sd2")
    extra = ["--grad-accum", "2", "--set", "train.lr_scheduler='cosine'", "--set", "train.warmup_steps=1"]
    cli(*_train_args(data, out, base, 3, *extra))
    hashes = _run_files(out)
    cli(*_generate_args(base, out, root / "gen", "--scheduler", "ddim"))
    return hashes | _images(root / "gen", "generate")


def scenario_sdxl(root: Path, models: Callable[[str], Path]) -> dict[str, str]:
    """SDXL: both text encoders trained, aspect-ratio buckets (micro-conditioning from the manifest)."""
    from train_utils import bucketed_set

    data, out, base = bucketed_set(root / "data"), root / "run", models("sdxl")
    cli(*_train_args(data, out, base, 4, "--train-text-encoder", "--set", "train.eval_every=0"))
    hashes = _run_files(out)
    cli(*_generate_args(base, out, root / "gen", "--size", "96x64"))
    return hashes | _images(root / "gen", "generate")


SCENARIOS = {
    "sd1": scenario_sd1,
    "sd1_prior": scenario_sd1_prior,
    "sd2": scenario_sd2,
    "sdxl": scenario_sdxl,
}


# The same bits on every x86-64 CPU (the recording machine's and CI's differ: AVX2, AVX-512, AMX): torch's own
# kernels without CPU-specific vectorisation, MKL's conditional numerical reproducibility, one thread (a reduction
# split over threads rounds differently), and no oneDNN (whose kernels and blocking follow the CPU; with it off,
# convolutions go through MKL's GEMM). Each scenario runs in a fresh process, as these are read when torch loads.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def machine() -> dict[str, str]:
    """The CPU and torch build that a recording was made on (training tensors still follow the CPU's make)."""
    import platform

    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def cpu_make(cpu: str) -> str:
    """The key of a machine's recording in golden.json: the CPU's make, whose training tensors differ even pinned."""
    return next((make for make in ("AMD", "Intel") if make.lower() in cpu.lower()), cpu)


def recorded() -> dict:
    """The recording for this machine's CPU make ({} when none was made on one)."""
    recordings = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
    return recordings.get(cpu_make(machine()["cpu"]), {})


def run_pinned(name: str) -> dict[str, str]:
    """One scenario's hashes, computed in a fresh process under PINNED_ENV."""
    import subprocess

    env = {**os.environ, **PINNED_ENV, "PYTHONPATH": str(Path(__file__).parents[1])}  # this checkout's sdlora
    done = subprocess.run(
        [sys.executable, __file__, "--scenario", name], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise AssertionError(f"golden scenario {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scenario(name: str) -> dict[str, str]:
    import tempfile

    import torch

    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    from sdlora import testing

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        return SCENARIOS[name](root / name, lambda family: testing.save_tiny_pipeline(family, root / "models" / family))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if "--scenario" in sys.argv:
        print(json.dumps(_scenario(sys.argv[sys.argv.index("--scenario") + 1]), sort_keys=True))
        sys.exit(0)
    result: dict = {name: run_pinned(name) for name in SCENARIOS}
    if "--record" in sys.argv:  # this machine's make only: the others' recordings stay
        result["_recorded_on"] = machine()
        recordings = json.loads(GOLDEN_FILE.read_text(encoding="utf-8")) if GOLDEN_FILE.is_file() else {}
        recordings[cpu_make(result["_recorded_on"]["cpu"])] = result
        GOLDEN_FILE.write_text(json.dumps(recordings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {GOLDEN_FILE}")
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
