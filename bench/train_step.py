"""Seconds per training step and peak memory: sdlora's real step against diffusers' DreamBooth LoRA loop.

    PYTHONPATH=$PWD python bench/train_step.py --model sd15 --steps 3 --warmup 1 --json bench-sd15.json

Each variant runs in its own worker process (so its peak RSS is its own), all workers are set up first, then
the parent alternates them step by step (baseline, sdlora, baseline, sdlora, ...) so that a disturbance on the
machine hits both. Variants:

- `sdlora`: `sdlora.train.setup.setup_pipeline` + `run.optimisation_step` exactly as `sdlora train` runs them (cached
  latents and text embeddings, no per-step host sync), on the model built in memory; with `--anchor-script`,
  `--model-dir` or `--quantize`, on a saved folder (the one the script loads), through `setup.load_base` as
  `sdlora train --base FOLDER` loads it (and quantizes it: --quantize, --offload-blocks).
- `baseline`: per step what diffusers' examples/dreambooth/train_dreambooth_lora.py does: load and transform the
  batch's images, tokenize, VAE-encode (posterior sample), text-encoder forward, UNet forward/backward on fp32
  LoRA (targets to_q/k/v/out.0), clip, AdamW, LR scheduler, `loss.item()`.
- `sdlora:LEVER[+LEVER]`: sdlora with one lever changed, to measure it (see LEVERS).
- `unet`: UNet-only step on random cached latents/conditioning through sdlora.objectives / lora / optim (any
  model, SDXL included, whose text conditioning sdlora's trainer does not build yet): the memory row of gpu.sh.

`--anchor-script PATH` replaces the baseline by the real diffusers script (a checkout of
examples/dreambooth/train_dreambooth_lora.py, or train_dreambooth_lora_flux.py with `--model flux`; it needs
torchvision), run unchanged in a worker of its own and alternated step by step like the others (bench/anchor.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchor  # noqa: E402
from _models import FAMILY, MODELS, build_pipeline, native_resolution, write_dataset  # noqa: E402

TAG = "@@bench "  # the worker's answers to the parent, among whatever libraries print
CAPTION = "a photo of sks person"
BASELINE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]  # the diffusers script's
# Forward TFLOP per 512-px sample of the SD 1.5 UNet; a LoRA step (forward + input-gradient backward) ~2x.
SD15_FORWARD_TFLOP = 0.68
LEVERS = {
    "channels_last": "UNet weights and latents in channels_last memory format",
    "fused_adamw": "torch AdamW(fused=True) instead of the default",
    "foreach_adamw": "torch AdamW(foreach=True) instead of the default",
    "no_sdpa": "classic attention processor instead of scaled_dot_product_attention (shows SDPA's effect)",
    "item": "a loss.item() host sync after every step (what diffusers' loop does)",
    "free_encoders": "drop the VAE and text encoder once latents and embeddings are cached",
    "grad_ckpt": "gradient checkpointing in the UNet",
    "compile": "torch.compile of the UNet (train.compile): its compile time is in the first (warm-up) steps",
    "denormal": "torch.set_flush_denormal(True): denormal floats flushed to zero (CPU)",
    "malloc": "glibc malloc keeps freed memory (mallopt: 32 MB mmap threshold, no trimming) instead of returning it",
}


# ----------------------------------------------------------------------------------------------- worker side


def memory(device: str) -> float:
    """Peak memory in GB since the last reset: RSS high-water mark (VmHWM) on CPU, allocated memory on CUDA."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the RSS high-water mark (Linux)


def sdlora_worker(opts: argparse.Namespace, levers: list[str], work: Path, timings: dict[str, float]):
    """Set up sdlora's trainer on an in-memory pipeline; returns step(k). `timings` gets setup_pipeline's seconds
    (LoRA, latent and text caches, optimizer: the set-up after the base is in memory)."""
    from sdlora.config import Config
    from sdlora.models import model_info
    from sdlora.train import Plan, run, setup, staging
    from sdlora.train.data import load_examples

    precision = accelerate_precision(opts.precision)
    family = FAMILY[opts.model]
    base = str(opts.anchor_model) if opts.anchor_model else f"bench:{opts.model}"
    config = Config(
        model={"base": base, "quantize": opts.quantize}
        | ({"max_sequence_length": opts.tokens} if anchor.has_tokens(opts.model) else {}),
        lora={"rank": opts.rank, "alpha": opts.rank, "targets": "attention"},
        train={
            # The diffusers scripts' timesteps: Flux.1's and klein's default weighting "none" draws uniform
            # sigmas (their schedulers shift only at inference); Z-Image's shifts them by the scheduler's static
            # shift, as sdlora's "auto" does. Flux.1's guidance 1.0 (the script's default is 3.5).
            **({"guidance": 1.0} if family == "flux" else {}),
            **({"timestep_sampling": "uniform"} if family in ("flux", "klein") else {}),
            "resolution": opts.resolution,
            "batch_size": opts.batch,
            "mixed_precision": precision,
            "optimizer": opts.optimizer,
            "gradient_checkpointing": opts.gradient_checkpointing or "grad_ckpt" in levers,
            "compile": "compile" in levers,
            "offload": opts.offload,
            # sdlora's block swapping (train.offload_blocks); the key is given only when asked for.
            **({"offload_blocks": opts.offload_blocks} if opts.offload_blocks else {}),
            "sample_every": 0,
            "checkpoint_every": 0,
            "steps": 10**6,
            "pivotal": False,  # the anchor scripts' plain LoRA
            "preservation": "none",
        },
    )
    dataset = write_dataset(work / "data", max(2, opts.batch), opts.resolution, CAPTION)
    plan = Plan(
        dataset_dir=dataset,
        out_dir=work / "out",
        examples=load_examples(dataset, CAPTION),
        trigger="sks person",
        precision=precision,
        resume_from=None,
        name="bench",
    )
    accelerator = setup.make_accelerator(config, precision)
    cached = None
    if opts.anchor_model:  # the folder the script loads, as `sdlora train --base FOLDER` loads it (setup.setup):
        # a staged family's frozen text encoders first, each alone, then the rest
        started = time.perf_counter()
        cached = staging.encode_first(config, plan, accelerator, weight_dtype(opts.precision))
        timings["encode_first_s"] = time.perf_counter() - started
        pipe, info = setup.load_base(config, accelerator, weight_dtype(opts.precision))
    else:
        pipe = build_pipeline(opts.model, device=opts.device)
        if opts.precision != "fp32":
            pipe.to(dtype=weight_dtype(opts.precision))  # what load_base's torch_dtype does
        info = model_info(pipe)
        setup.place_base(pipe, info, accelerator)
    started = time.perf_counter()
    state = setup.setup_pipeline(config, plan, accelerator, pipe, info, cached)
    timings["setup_pipeline_s"] = time.perf_counter() - started
    timings |= frozen_weights(accelerator.unwrap_model(state.denoiser), accelerator.device)
    apply_levers(state, levers)

    def step(k: int) -> None:
        loss = run.optimisation_step(state, k)
        if "item" in levers:
            float(loss)

    step.blocks = offload_state(accelerator.unwrap_model(state.denoiser))  # type: ignore[attr-defined]
    return step


def offload_state(denoiser: Any) -> Any:
    """--offload-blocks' hooks on the denoiser (sdlora.train.offload: their own accounting of the base-weight bytes
    resident on the device), or None: no blocks offloaded, or an sdlora without block offloading."""
    try:
        from sdlora.train import offload
    except ImportError:
        return None
    return offload.state_of(denoiser)


def frozen_weights(denoiser: Any, device: Any) -> dict[str, Any]:
    """The denoiser's frozen weights as stored (--quantize): GB on the training device and in CPU memory (blocks that
    --offload-blocks keeps there), and their storage dtypes (a quantized weight counted by the tensors inside it)."""
    import torch

    placed = {"device": 0, "cpu": 0}
    dtypes = set()
    for tensor in [p for p in denoiser.parameters() if not p.requires_grad] + list(denoiser.buffers()):
        quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes' 4-bit weight: its absmax beside it
        extra = [quant_state.absmax] if getattr(quant_state, "absmax", None) is not None else []
        for inner in inner_tensors(tensor.data) + extra:
            where = "device" if inner.device.type == torch.device(device).type else "cpu"
            placed[where] += inner.nbytes
            dtypes.add(str(inner.dtype).removeprefix("torch."))
    return {
        "frozen_gb_on_device": placed["device"] / 1e9,
        "frozen_gb_on_cpu": placed["cpu"] / 1e9,
        "frozen_dtypes": sorted(dtypes),
    }


def inner_tensors(tensor: Any) -> list[Any]:
    """The plain tensors a tensor subclass (torchao's float8 weight, bitsandbytes' 4-bit one) is made of."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]


def apply_levers(run: Any, levers: list[str]) -> None:
    import torch

    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise SystemExit(f"unknown lever(s) {sorted(unknown)}; choose from {', '.join(LEVERS)}")
    unet = run.accelerator.unwrap_model(run.denoiser)
    if "denormal" in levers:
        torch.set_flush_denormal(True)
    if "malloc" in levers:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3) at its 64-bit maximum, M_TRIM_THRESHOLD (-1) and M_TOP_PAD (-2) large.
        assert libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 34) and libc.mallopt(-2, 256 << 20)
    if "channels_last" in levers:
        unet.to(memory_format=torch.channels_last)
    if "no_sdpa" in levers:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if "fused_adamw" in levers or "foreach_adamw" in levers:
        flag = {"fused": True} if "fused_adamw" in levers else {"foreach": True}
        groups = [{"params": g["params"], "lr": g["lr"]} for g in run.optimizer.param_groups]
        run.optimizer = run.accelerator.prepare(torch.optim.AdamW(groups, weight_decay=1e-2, **flag))
    if "free_encoders" in levers:
        run.pipe.vae, run.pipe.text_encoder = None, None
        run.batches.instances.vae = None
        import gc

        gc.collect()


def accelerate_precision(precision: str) -> str:
    """This script's --precision as Accelerate's (and diffusers' scripts') mixed_precision: fp32 is "no"."""
    return {"fp32": "no"}.get(precision, precision)


def weight_dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def baseline_worker(opts: argparse.Namespace, work: Path):
    """The per-step work of diffusers' train_dreambooth_lora.py (written from reading it, not copied)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from sdlora.train.data import load_examples, load_pixels

    precision = accelerate_precision(opts.precision)
    accelerator = Accelerator(mixed_precision=precision)
    pipe = build_pipeline(opts.model, device=opts.device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype(opts.precision))
    unet.add_adapter(
        LoraConfig(r=opts.rank, lora_alpha=opts.rank, init_lora_weights="gaussian", target_modules=BASELINE_TARGETS)
    )
    cast_training_params(unet, dtype=torch.float32)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_baseline_optimizer(params, opts.optimizer)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    examples = load_examples(write_dataset(work / "data", max(2, opts.batch), opts.resolution, CAPTION), CAPTION)

    def step(k: int) -> None:
        # The dataset's __getitem__: open and transform each image, tokenize its prompt.
        batch = [examples[(k * opts.batch + i) % len(examples)] for i in range(opts.batch)]
        pixels = torch.stack([load_pixels(e.image, opts.resolution) for e in batch])
        ids = tokenizer(
            [e.caption for e in batch], truncation=True, padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with accelerator.accumulate(unet):
            model_input = vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, 1000, (len(batch),), device=model_input.device).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            hidden = text_encoder(ids.to(accelerator.device), attention_mask=None)[0]
            pred = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        loss.detach().item()  # the script logs it every step

    return step


def build_baseline_optimizer(params: list[Any], name: str):
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)


def unet_worker(opts: argparse.Namespace):
    """UNet-only LoRA step on random cached latents and conditioning, with sdlora's diffusion/lora/optim code."""
    import torch

    from sdlora import objectives
    from sdlora.families.sd import UNET_ATTENTION
    from sdlora.lora import peft
    from sdlora.train.optim import build_optimizer

    device, dtype = opts.device, weight_dtype(opts.precision)
    unet = build_pipeline(opts.model, device=device).unet  # encoders and VAE are dropped: outputs are cached
    unet.requires_grad_(False)
    unet.to(device, dtype)
    torch.manual_seed(0)
    peft.attach(unet, opts.rank, opts.rank, 0.0, UNET_ATTENTION)
    for p in peft.trainable_parameters(unet):
        p.data = p.data.float()
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = peft.trainable_parameters(unet)
    optimizer = build_optimizer([{"params": params, "lr": 1e-4}], opts.optimizer, 1e-2, fused=device == "cuda")
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0).to(device)
    b, side = opts.batch, opts.resolution // 8
    latents = torch.randn(b, 4, side, side, device=device)
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": torch.randn(b, 77, unet.config.cross_attention_dim, device=device)
    }
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and 6 size/crop ids
        size = float(opts.resolution)
        ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=device).repeat(b, 1)
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(b, pooled, device=device), "time_ids": ids}
    kwargs = {
        k: (v.to(dtype) if torch.is_tensor(v) else {kk: vv.to(dtype) for kk, vv in v.items()})
        for k, v in kwargs.items()
    }

    def step(k: int) -> None:
        generator = torch.Generator().manual_seed(k)
        noise = objectives.sample_noise(latents.shape, generator).to(device)
        t = objectives.sample_timesteps(b, 1000, generator).to(device)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            noisy = objectives.add_noise(latents, noise, t, alphas).to(dtype)
            pred = unet(noisy, t, **kwargs).sample
            loss = objectives.denoising_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker_main(opts: argparse.Namespace) -> None:
    """Set up one variant, then answer the parent's `step K` / `stats` / `quit` lines on stdin."""
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    name, _, lever_text = opts.worker.partition(":")
    levers, timings = [x for x in lever_text.split("+") if x], {}
    if name == "anchor":  # the script's own loop drives; the answers come from its hooks
        anchor.run_worker(opts, levers, Path(tempfile.mkdtemp(prefix="bench-anchor-")), CAPTION, sys.modules[__name__])
        return
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if name == "sdlora":
            step = sdlora_worker(opts, levers, Path(tmp), timings)
        elif name == "baseline":
            step = baseline_worker(opts, Path(tmp))
        elif name == "unet":
            step = unet_worker(opts)
        else:
            raise SystemExit(f"unknown variant {opts.worker!r}")
        setup_peak = memory(opts.device)
        reset_peak(opts.device)
        blocks = getattr(step, "blocks", None)
        if blocks is not None:
            blocks.reset_peak()
        answer({"ready": True, "setup_s": time.perf_counter() - started, "setup_peak_gb": setup_peak} | timings)

        def stats() -> dict:
            step_peak = memory(opts.device)
            whole = max(process_peak(opts.device), setup_peak, step_peak)  # two counters, take the larger
            resident = {} if blocks is None else {"offload_resident_peak_gb": blocks.resident_peak() / 1e9}
            return {"step_peak_gb": step_peak, "process_peak_gb": whole} | resident

        for k in anchor.commands(stats, answer):
            wall, cpu = timed(step, k, opts.device)
            answer({"seconds": wall, "cpu_seconds": cpu})


def timed(step, k: int, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of step k. CPU seconds barely move when other programs share
    the cores (with OMP_WAIT_POLICY=PASSIVE, set by the parent): the cross-check of a disturbed wall time."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    step(k)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def process_peak(device: str) -> float:
    """Peak over the whole process (set-up included): ru_maxrss on CPU, reserved-memory peak on CUDA."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_reserved() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def answer(payload: dict) -> None:
    print(TAG + json.dumps(payload), flush=True)


# ----------------------------------------------------------------------------------------------- parent side


class Worker:
    """One variant in its own process."""

    def __init__(self, variant: str, argv: list[str]) -> None:
        self.variant = variant
        command = [sys.executable, __file__, *argv, "--worker", variant]
        # Idle OpenMP threads sleep instead of spinning: CPU seconds then count work, not waiting.
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.ready = self.read()

    def read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
            sys.stderr.write(line)
        raise SystemExit(f"variant {self.variant}: worker exited with {self.proc.wait()} (see its errors above)")

    def ask(self, command: str) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask_quit()

    def ask_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def load_average() -> float:
    return os.getloadavg()[0]


def summarise(variant: str, ready: dict, steps: list[dict], stats: dict, opts: argparse.Namespace) -> dict:
    measured = steps[opts.warmup :]
    median = statistics.median(s["seconds"] for s in measured)
    row = {
        "variant": variant,
        "setup_s": round(ready["setup_s"], 2),
        "step_seconds": [round(s["seconds"], 4) for s in steps],
        "step_cpu_seconds": [round(s["cpu_seconds"], 3) for s in steps],
        "median_s": median,
        "median_cpu_s": statistics.median(s["cpu_seconds"] for s in measured),
        "samples_per_s": opts.batch / median,
        "setup_peak_gb": round(ready["setup_peak_gb"], 3),
        "step_peak_gb": round(stats["step_peak_gb"], 3),
        "process_peak_gb": round(stats["process_peak_gb"], 3),
    }
    if "setup_pipeline_s" in ready:  # sdlora: LoRA, caches and optimizer, without building the model
        row["setup_pipeline_s"] = round(ready["setup_pipeline_s"], 2)
    if "encode_first_s" in ready:  # sdlora, staged family: its text encoders loaded alone, captions encoded
        row["encode_first_s"] = round(ready["encode_first_s"], 2)
    for key in ("frozen_gb_on_device", "frozen_gb_on_cpu", "frozen_dtypes"):  # sdlora: the base as stored
        if key in ready:
            row[key] = ready[key]
    if "offload_resident_peak_gb" in stats:  # --offload-blocks: base weights on the device at the steps' peak
        row["offload_resident_peak_gb"] = stats["offload_resident_peak_gb"]
    if opts.model == "sd15":
        # The UNet's work only (what any trainer must do); the baseline's VAE/text-encoder work is not counted.
        tflop = 2 * SD15_FORWARD_TFLOP * (opts.resolution / 512) ** 2 * opts.batch
        row["achieved_tflops"] = tflop / median
    return row


def measure_workers(opts: argparse.Namespace, argv: list[str], variants: list[str]) -> list[dict]:
    """Set every variant up, then alternate their steps; returns one row per variant."""
    workers = []
    try:
        for variant in variants:  # one at a time: set-ups do not compete for the cores
            workers.append(Worker(variant, argv))
        seconds: dict[str, list[dict]] = {w.variant: [] for w in workers}
        for k in range(opts.warmup + opts.steps):
            for worker in workers if k % 2 == 0 else workers[::-1]:  # neither always goes first
                seconds[worker.variant].append(worker.ask(f"step {k}"))
                took = seconds[worker.variant][-1]
                print(
                    f"step {k} {worker.variant}: {took['seconds']:.3f} s ({took['cpu_seconds']:.1f} CPU-s), "
                    f"load {load_average():.2f}",
                    file=sys.stderr,
                )
        return [summarise(w.variant, w.ready, seconds[w.variant], w.ask("stats"), opts) for w in workers]
    finally:
        for worker in workers:
            worker.close()


def table(rows: list[dict], reference: str) -> str:
    ref = next((r for r in rows if r["variant"] == reference), rows[0])
    lines = [
        f"{'variant':34} {'s/step':>8} {'CPU-s':>7} {'samples/s':>9} {'speedup':>7} {'step peak GB':>12} "
        f"{'proc peak GB':>12} {'setup s':>8}"
    ]
    for r in rows:
        step_peak = "-" if r["step_peak_gb"] is None else f"{r['step_peak_gb']:.2f}"
        proc_peak = "-" if r["process_peak_gb"] is None else f"{r['process_peak_gb']:.2f}"
        lines.append(
            f"{r['variant']:34} {r['median_s']:8.3f} {r.get('median_cpu_s') or 0:7.1f} {r['samples_per_s']:9.3f} "
            f"{ref['median_s'] / r['median_s']:6.2f}x {step_peak:>12} {proc_peak:>12} {r['setup_s']:8.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--resolution", type=int, help="default: the model's native size (64 tiny, 512, 1024)")
    parser.add_argument(
        "--tokens", type=int, default=512, help="Flux, Z-Image, klein: text tokens per prompt (max_sequence_length)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--quantize", choices=["none", "nf4", "int8", "fp8"], default="none",
        help="the frozen transformer: nf4/int8 through bitsandbytes (CUDA; the script's "
        "--bnb_quantization_config_path), fp8 through torchao (sdlora only): sdlora's --quantize",
    )  # fmt: skip
    parser.add_argument(
        "--offload-blocks", type=int, default=0,
        help="sdlora: train.offload_blocks (transformer blocks kept in CPU memory, brought in for each use)",
    )  # fmt: skip
    parser.add_argument("--offload", action="store_true", help="sdlora: train.offload (encoders/VAE to the CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="steps per variant not counted")
    parser.add_argument("--variants", default="baseline,sdlora", help="comma-separated; the first is the reference")
    parser.add_argument(
        "--anchor-script", type=Path, help="diffusers' real train_dreambooth_lora[_flux].py instead of baseline"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--model-dir", type=Path,
        help="the saved model's folder the script and sdlora load (sdlora as `sdlora train --base FOLDER`), written "
        "there if absent, else reused (with --anchor-script or --quantize, default: a temporary folder, removed "
        "afterwards)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--anchor-model", type=Path, help=argparse.SUPPRESS)  # the saved model the script loads
    parser.add_argument("--save-model", type=Path, help=argparse.SUPPRESS)  # write it there and exit
    opts = parser.parse_args(argv)
    opts.resolution = opts.resolution or native_resolution(opts.model)
    for variant in opts.variants.split(","):
        name, _, levers = variant.partition(":")
        if name not in ("baseline", "sdlora", "unet", "anchor"):
            parser.error(f"--variants: unknown variant {name!r}; choose baseline, sdlora[:LEVER+...], unet or anchor")
        known = anchor.FLAGS if name == "anchor" else LEVERS
        unknown = [lever for lever in levers.split("+") if lever and lever not in known]
        if unknown:
            parser.error(f"--variants: unknown lever {unknown[0]!r}; choose from {', '.join(known)}")
        if name == "anchor" and opts.anchor_script is None:
            parser.error("--variants: anchor needs --anchor-script PATH (diffusers' training script)")
        if name == "baseline" and FAMILY[opts.model] not in ("sd1", "sdxl") and opts.anchor_script is None:
            parser.error("--variants: baseline is SD's DreamBooth loop; for a DiT use --anchor-script PATH")
    if opts.device == "cpu" and opts.precision == "fp16":
        parser.error("--precision fp16 needs --device cuda")
    dits = ("flux", "zimage", "klein", "qwenimage")
    if opts.quantize != "none" and FAMILY[opts.model] not in dits:
        parser.error(f"--quantize needs a transformer model ({', '.join(dits)})")
    if opts.quantize in ("nf4", "int8") and opts.device != "cuda":
        parser.error(f"--quantize {opts.quantize} needs --device cuda (bitsandbytes)")
    if opts.quantize == "fp8" and opts.anchor_script is not None:
        parser.error("--quantize fp8 is sdlora's alone: diffusers' scripts have no such option")
    return opts


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.worker:
        worker_main(opts)
        return
    if opts.save_model:
        save_model(opts)
        return
    variants = [v for v in opts.variants.split(",") if v]
    if opts.anchor_script is not None:  # the real script takes the baseline's place
        variants = [("anchor" if v == "baseline" else v) for v in variants]
    load_before = load_average()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        if any(v.startswith("anchor") for v in variants) or opts.model_dir or opts.quantize != "none":
            # The script loads a saved model: written by a process of its own, so it is in no worker's peak.
            model_dir = opts.model_dir or Path(tmp) / "model"
            if not (model_dir / "model_index.json").is_file():
                subprocess.run([sys.executable, __file__, *argv, "--save-model", str(model_dir)], check=True)
            argv = [*argv, "--anchor-model", str(model_dir)]
        rows = measure_workers(opts, argv, variants)
    result = {
        "model": opts.model,
        "resolution": opts.resolution,
        "batch": opts.batch,
        "rank": opts.rank,
        "precision": opts.precision,
        "optimizer": opts.optimizer,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "quantize": opts.quantize,
        "offload_blocks": opts.offload_blocks,
        "device": opts.device,
        "device_name": device_name(opts.device),
        "warmup": opts.warmup,
        "steps": opts.steps,
        **({"tokens": opts.tokens} if anchor.has_tokens(opts.model) else {}),
        **({"anchor_script": str(opts.anchor_script)} if opts.anchor_script else {}),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "wall_s": round(time.time() - started, 1),
        "variants": rows,
    }
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))
    print(
        f"{opts.model} {opts.resolution}px batch {opts.batch} rank {opts.rank} {opts.precision} on "
        f"{result['device_name']}; median of {opts.steps} steps after {opts.warmup} warm-up; "
        f"load {load_before:.2f} -> {result['load_average_after']:.2f}"
    )
    print(table(rows, rows[0]["variant"]))


def save_model(opts: argparse.Namespace) -> None:
    """Build the model on the benchmark's device (a 6B transformer's random init takes minutes on a CPU, seconds on a
    GPU), in its precision (Qwen-Image's 20B in fp32 would not fit an 80 GB card), and save it so, as the hub's
    half-precision files are."""
    import torch

    dtype = weight_dtype(opts.precision)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in it: no fp32 copy ever exists
    try:
        pipe = build_pipeline(opts.model, device=opts.device)
    finally:
        torch.set_default_dtype(default)
    pipe.to(dtype=dtype).save_pretrained(opts.save_model, safe_serialization=True)


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU x{os.cpu_count()} ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
