"""Time sdlora's Flux.1 LoRA training step on the real architecture (random weights, no download) and measure its
memory: the family's packing and prediction, the flow-matching objective, peft LoRA and sdlora's optimizer, on
cached text embeddings and latents, as `sdlora train` steps after its set-up.

    PYTHONPATH=$PWD python bench/flux_step.py --double 1 --single 2 --resolution 256 --tokens 128   (CPU)
    PYTHONPATH=$PWD python bench/flux_step.py --device cuda --precision bf16 --resolution 1024          (GPU, full)
    ... --quantize nf4 --gradient-checkpointing --optimizer adamw8bit                                   (QLoRA)

Peak memory: `torch.cuda.max_memory_allocated` on a GPU (model, LoRA, optimizer and activations), the process's
peak RSS on the CPU. The comparison with diffusers' train_dreambooth_lora_flux.py (sdlora's whole trainer against
the real script, alternated) is `bench/train_step.py --model flux --anchor-script PATH`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from flux_models import CLIP_L_WIDTH, LATENT_CHANNELS, T5_XXL_WIDTH, flux_transformer


def quantize_nf4(model: Any, dtype: Any) -> None:
    """Every Linear of the blocks as a bitsandbytes NF4 layer, quantized as it moves to the GPU, one at a time."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "blocks" in f"{name}.{child_name}":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=dtype, quant_type="nf4", device="meta",
                )  # fmt: skip
                weight = torch.randn(child.out_features, child.in_features, dtype=dtype) * 0.02
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").cuda()
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device="cuda"))
                setattr(module, child_name, layer)


def build(options: argparse.Namespace, device: torch.device, dtype: Any) -> Any:
    """The transformer with random weights on `device` (frozen, in `dtype`), LoRA attached as sdlora does."""
    from sdlora import families
    from sdlora.lora import peft

    model = flux_transformer(options.double, options.single, device="meta")
    if options.quantize == "nf4":
        quantize_nf4(model, dtype)
    for module in model.modules():  # what is still on the meta device: all of it, or embedders, norms, final layer
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            module.to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dtype.is_floating_point:
                parameter.normal_(0, 0.02)
    model.requires_grad_(False)
    torch.manual_seed(0)
    peft.attach(model, options.rank, options.rank, 0.0, families.get("flux").denoiser_targets(options.targets))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # LoRA in fp32, as cast_training_params does
    if options.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def run(options: argparse.Namespace) -> dict[str, Any]:
    from sdlora import families, objectives
    from sdlora.lora.peft import trainable_parameters
    from sdlora.train.optim import build_optimizer

    device = torch.device(options.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[options.precision]
    family, objective = families.get("flux"), objectives.FlowMatching("shift", 3.1582)
    model = build(options, device, dtype)
    params = trainable_parameters(model)
    optimizer = build_optimizer([{"params": params, "lr": 1e-4}], options.optimizer, 1e-2, fused=device.type == "cuda")
    side = options.resolution // 8  # latent side; packing halves it again
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(options.batch, LATENT_CHANNELS, side, side, generator=generator).to(device)
    cond = {  # cached text conditioning: T5's hidden states and CLIP's pooled output
        "encoder_hidden_states": torch.randn(options.batch, options.tokens, T5_XXL_WIDTH).to(device, dtype),
        "pooled_projections": torch.randn(options.batch, CLIP_L_WIDTH).to(device, dtype),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(options.warmup + options.steps):
        started = time.perf_counter()
        noise = torch.randn(latents.shape, generator=generator).to(device)
        sigmas = objective.sample_timesteps(options.batch, generator).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            noisy = objective.noisy(latents, noise, sigmas)
            prediction = family.predict(model, noisy, sigmas, cond, None, 1.0)
        loss = objectives.denoising_loss(prediction, objective.target(latents, noise, sigmas))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # wait for the step
        seconds.append(time.perf_counter() - started)
    measured = seconds[options.warmup :]
    peak_gb = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "settings": vars(options) | {"json": str(options.json) if options.json else None},
        "median_s": statistics.median(measured),
        "samples_per_s": options.batch / statistics.median(measured),
        "step_seconds": seconds,
        "peak_gb": peak_gb,
        "peak_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "lora_parameters": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--double", type=int, default=19, help="double blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=38, help="single blocks (FLUX.1-dev: 38)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512, help="T5 tokens of the cached prompt")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", choices=["attention", "all"], default="attention")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--quantize", choices=["none", "nf4"], default="none")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    if options.quantize != "none" and options.device != "cuda":
        parser.error("--quantize nf4 needs --device cuda (bitsandbytes quantizes as weights move to the GPU)")
    result = run(options)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if options.json:
        options.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
