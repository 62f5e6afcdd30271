"""diffusers' real training script as one more alternated variant of bench/train_step.py (`--anchor-script PATH`).

The script (train_dreambooth_lora.py for SD, train_dreambooth_lora_flux.py for Flux; a checkout, never copied here)
runs unchanged inside a worker process, through runpy, with two hooks installed from outside:

- `accelerate.Accelerator.init_trackers`, which both scripts call once, after loading, caching and
  `accelerator.prepare` and before the first step: the end of the set-up. The worker answers "ready" there, and
  then waits for the parent's `step K` before it lets the script go on;
- torch's global optimizer step post-hook (`register_optimizer_step_post_hook`): the end of each step. The worker
  answers the step's wall and CPU seconds, then waits again.

So the parent alternates the script's steps with sdlora's exactly as it does for its own variants, and a step of
the script is one whole iteration of its loop: data loading, its per-step encoders, forward, backward, clipping,
optimizer, scheduler, logging and progress bar. On `quit` the worker leaves without the script's final save and
inference pipeline (neither is training). The model is a diffusers folder written by the parent beforehand, so
building it counts in no one's peak memory.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Script flags a variant `anchor:FLAG[+FLAG]` may add (the script's own names).
FLAGS = {"cache_latents": "train_dreambooth_lora_flux.py's --cache_latents: VAE-encode each image once"}


def is_flux(model: str) -> bool:
    return model in ("flux", "tiny-flux")


def script_arguments(opts: Any, model_dir: Path, data: Path, out: Path, flags: list[str], caption: str) -> list[str]:
    """The script's command line for the same model, resolution, batch, rank, precision and steps as sdlora's run:
    no validation and no checkpoint. Steps: one more than the parent asks for, so that the loop never ends first."""
    precision = {"fp32": "no"}.get(opts.precision, opts.precision)  # Accelerate's name; fp32 is "no"
    args = [f"--pretrained_model_name_or_path={model_dir}", f"--instance_data_dir={data}"]
    args += [f"--instance_prompt={caption}", f"--output_dir={out}", f"--resolution={opts.resolution}"]
    args += [f"--train_batch_size={opts.batch}", f"--rank={opts.rank}", "--learning_rate=1e-4"]
    args += [f"--max_train_steps={opts.warmup + opts.steps + 1}", "--lr_scheduler=constant", "--lr_warmup_steps=0"]
    args += ["--checkpointing_steps=1000000", "--seed=0", f"--mixed_precision={precision}"]
    args += ["--gradient_checkpointing"] if opts.gradient_checkpointing else []
    args += ["--use_8bit_adam"] if opts.optimizer == "adamw8bit" else []
    if is_flux(opts.model):
        # sdlora's settings: alpha = rank, its LoRA targets (the double blocks' attention, listed module by module:
        # the script's default adds the feed-forward layers and the single blocks' q/k/v), its T5 length, guidance
        # 1.0; uniform timesteps (the script's default weighting "none").
        args += [f"--lora_alpha={opts.rank}", f"--lora_layers={','.join(flux_lora_layers(model_dir))}"]
        args += [f"--max_sequence_length={opts.tokens}", "--guidance_scale=1.0", "--weighting_scheme=none"]
    return args + [f"--{flag}" for flag in flags]


def flux_lora_layers(model_dir: Path) -> list[str]:
    """The transformer's module paths that sdlora's `lora.targets = "attention"` adapts (peft full-matches the
    family's regular expression), read from the saved model's depth."""
    import json

    from sdlora import families

    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    pattern = re.compile(families.get("flux").denoiser_targets("attention"))
    names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    paths = [f"transformer_blocks.{i}.attn.{name}" for i in range(config["num_layers"]) for name in names]
    assert all(pattern.fullmatch(path) for path in paths), "sdlora's Flux attention targets changed"
    return paths


def captionless_dataset(folder: Path, count: int, resolution: int, caption: str) -> Path:
    """The benchmark's images without their caption files: the script opens every file of its folder as an image."""
    from _models import write_dataset

    data = write_dataset(folder, count, resolution, caption)
    for text in data.glob("*.txt"):
        text.unlink()
    return data


def commands(stats: Callable[[], dict], answer: Callable[[dict], None]) -> Iterator[int]:
    """The parent's commands on stdin: yields K for each `step K`, answers `stats`, ends at `quit` or EOF."""
    for line in sys.stdin:
        command = line.split()
        if command and command[0] == "step":
            yield int(command[1])
        elif command and command[0] == "stats":
            answer(stats())
        else:
            return


def run_worker(opts: Any, flags: list[str], work: Path, caption: str, meter: Any) -> None:
    """Run the script in this process, answering the parent at its set-up's end and after each step (module doc).
    `meter`: bench/train_step.py's module (answer, memory, reset_peak, process_peak): both sides measure alike."""
    import accelerate
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    started, device, answer = time.perf_counter(), opts.device, meter.answer
    data = captionless_dataset(work / "data", max(2, opts.batch), opts.resolution, caption)
    arguments = script_arguments(opts, opts.anchor_model, data, work / "out", flags, caption)
    sys.argv = [str(opts.anchor_script), *arguments]
    os.environ["HF_HUB_OFFLINE"] = "1"

    def stats() -> dict:
        step_peak = meter.memory(device)
        return {"step_peak_gb": step_peak, "process_peak_gb": max(meter.process_peak(device), step_peak)}

    steps = commands(stats, answer)
    clock: dict[str, float] = {}

    def wait_for_step() -> None:
        if next(steps, None) is None:  # quit: skip the script's final save and inference
            sys.stdout.flush()
            shutil.rmtree(work, ignore_errors=True)
            os._exit(0)
        clock.update(wall=time.perf_counter(), cpu=time.process_time())

    original = accelerate.Accelerator.init_trackers

    def init_trackers(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        setup_peak = meter.memory(device)
        meter.reset_peak(device)
        answer({"ready": True, "setup_s": time.perf_counter() - started, "setup_peak_gb": setup_peak})
        wait_for_step()
        return result

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        answer({"seconds": time.perf_counter() - clock["wall"], "cpu_seconds": time.process_time() - clock["cpu"]})
        wait_for_step()

    accelerate.Accelerator.init_trackers = init_trackers
    register_optimizer_step_post_hook(after_step)
    runpy.run_path(str(opts.anchor_script), run_name="__main__")
    raise SystemExit(f"{opts.anchor_script}: the script ended before the benchmark's last step")
