"""diffusers' real training script as one more alternated variant of bench/train_step.py (`--anchor-script PATH`).

The script (train_dreambooth_lora.py for SD, train_dreambooth_lora_flux.py for Flux.1, train_dreambooth_lora_z_image.py
for Z-Image, train_dreambooth_lora_flux2_klein.py for FLUX.2 [klein], train_dreambooth_lora_qwen_image.py for
Qwen-Image; a checkout, never copied here)
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

import json
import os
import re
import runpy
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _models import FAMILY

# Script flags a variant `anchor:FLAG[+FLAG]` may add (the script's own names).
FLAGS = {"cache_latents": "the DiT scripts' --cache_latents: VAE-encode each image once"}


def is_flux(model: str) -> bool:
    return FAMILY[model] == "flux"


def has_tokens(model: str) -> bool:
    """Whether the model's text length is a setting (model.max_sequence_length, the scripts' --max_sequence_length)."""
    return FAMILY[model] in ("flux", "zimage", "klein", "qwenimage")


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
    elif FAMILY[opts.model] in ("zimage", "klein", "qwenimage"):
        # alpha = rank; sdlora's `lora.targets = "attention"`, module by module; the same text length; the
        # scripts' default weighting "none" (Z-Image: sigmas shifted by the scheduler's static shift, as sdlora's
        # "auto"; klein: uniform, given to sdlora as train.timestep_sampling = "uniform"; Qwen-Image: uniform,
        # its scheduler's dynamic shifting leaving the training sigmas unshifted, as sdlora's "auto").
        args += [f"--lora_alpha={opts.rank}", f"--lora_layers={','.join(lora_layers(FAMILY[opts.model], model_dir))}"]
        args += [f"--max_sequence_length={opts.tokens}", "--weighting_scheme=none"]
        if FAMILY[opts.model] == "klein":  # the Qwen3 layers stacked: sdlora's (the script's default is [dev]'s)
            args += ["--text_encoder_out_layers", *(str(n) for n in klein_out_layers(model_dir))]
    quantize = getattr(opts, "quantize", "none")
    if quantize != "none":  # sdlora's --quantize: diffusers' BitsAndBytesConfig, as the script reads it from a file
        bnb = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "int8": {"load_in_8bit": True}}[quantize]
        out.mkdir(parents=True, exist_ok=True)
        (out / "bnb.json").write_text(json.dumps(bnb))
        args += [f"--bnb_quantization_config_path={out / 'bnb.json'}"]
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


def lora_layers(family: str, model_dir: Path) -> list[str]:
    """The module paths of the saved transformer (built on the meta device from its config) that sdlora's
    `lora.targets = "attention"` adapts, matched as peft matches them: the same modules on both sides."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from sdlora import families

    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    lora = LoraConfig(target_modules=families.get(family).denoiser_targets("attention"))
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    paths = [name for name in linear if check_target_module_exists(lora, name)]
    assert paths, f"no {family} module matches sdlora's attention targets"
    return paths


def klein_out_layers(model_dir: Path) -> list[int]:
    """The Qwen3 hidden layers sdlora's klein family stacks (9, 18, 27; the script's default is [dev]'s)."""
    from sdlora.families.klein.family import TEXT_LAYERS

    return list(TEXT_LAYERS)


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
