"""--offload-blocks: bytes of base weights resident on the compute device at the peak of a training step, from the
offload hooks' own accounting (sdlora.train.offload), for N = 0 and offloaded N; then the arithmetic for the full
architecture (block bytes measured here, times the depth) and the N it recommends for a 24 GB and a 16 GB card.

Qwen-Image's transformer at its real widths (hidden 3072 = 24 x 128 heads, MLP x4, text width 3584) and reduced
depth, random weights in bf16 (and the same quantized to fp8 with sdlora.fp8), a rank-16 LoRA on the attention
(sdlora's default targets), gradient checkpointing on, one step of a few tokens (the weights, not the activations,
are what is counted). On the CPU the hooks clone instead of copying to a GPU: the accounting is the same.

    PYTHONPATH=$PWD python bench/offload_memory.py [--depth 4] [--quantize none fp8] [--json out.json]
    PYTHONPATH=$PWD python bench/offload_memory.py --device cuda --tokens 4096   (a GPU: also torch's own peak)

The recommendation is arithmetic, not a GPU measurement: resident(N) = rest + (L - N + 2) x block for N >= 2 (a
block computing and the next being prefetched are on the device beside the L - N resident ones), plus an
allowance for everything that is not a base weight (stated in ALLOWANCE_GIB), at most the card's memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

GIB = 2**30
FULL_DEPTH = 60  # Qwen-Image's transformer_blocks
# GiB that are not base weights, at 1024 px, batch 1, rank 16, gradient checkpointing (estimates, not measured on a
# GPU): CUDA context and cuBLAS workspace 0.8; allocator slack 1.0; the LoRA with its gradient and AdamW state 0.35
# (24 M fp32 parameters x 16 bytes: rank 16 on to_q/k/v/out.0 of 60 blocks); the checkpointed block inputs 1.6 (60 x
# ~4200 tokens x 3072 x bf16); one block's recomputed activations and their gradients 1.5; fp8: the bf16 weights
# dequantized for that block's matmuls and held for its backward 0.7. Sum 5.95, taken as 6.5.
ALLOWANCE_GIB = 6.5
CARDS_GIB = (24, 16)


def build(depth: int, quantize: str):
    """The real-width transformer at `depth` blocks, frozen (bf16, or fp8 with per-row scales), LoRA attached."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from sdlora import fp8
    from sdlora.lora import peft

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 (the hub's files), not fp32 and cast
    try:
        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=depth, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    if quantize == "fp8":
        fp8.quantize(model)
    peft.attach(model, 16, 16.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], "lora")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the LoRA in fp32, as training casts it
    model.enable_gradient_checkpointing()
    return model


def frozen_bytes(module) -> int:
    from sdlora.train import offload

    return sum(offload.nbytes(t) for t in [*module.parameters(), *module.buffers()] if not t.requires_grad)


def step(model, device, tokens: int) -> float:
    """One forward and backward: `tokens` image tokens (a square), 16 caption tokens; returns its seconds."""
    import torch

    side = max(int(tokens**0.5), 1)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, side * side, 64, generator=g).to(device, torch.bfloat16)
    text = torch.randn(1, 16, 3584, generator=g).to(device, torch.bfloat16)
    started = time.perf_counter()
    out = model(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16), img_shapes=[[(1, side, side)]],
                return_dict=False)[0]  # fmt: skip
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(model, n: int, device, tokens: int) -> dict[str, float]:
    """The peak of base-weight bytes on the device over one step (after a warm-up step) with N blocks offloaded."""
    import torch

    from sdlora.train import offload

    state = offload.offload(model, n, device)
    model.to(device)
    step(model, device, tokens)  # warm-up (and the prefetch direction settles)
    if state is not None:
        state.reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = step(model, device, tokens)
    resident = state.resident_peak() if state is not None else frozen_bytes(model)
    row = {"n": n, "resident_peak_gib": round(resident / GIB, 3), "step_s": round(seconds, 2)}
    if device.type == "cuda":
        row["torch_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    if state is not None:
        row["copies_peak_gib"] = round(state.peak / GIB, 3)
        state.remove()
        model.to("cpu")  # back for the next N (unhooked, nothing is kept home any more)
    return row


def recommend(block: float, rest: float, card: float) -> int:
    """The smallest N whose resident weights fit the card beside ALLOWANCE_GIB (all in GiB)."""
    for n in range(FULL_DEPTH + 1):
        resident = rest + (FULL_DEPTH - n + (2 if n >= 2 else n)) * block
        if resident + ALLOWANCE_GIB <= card:
            return n
    return FULL_DEPTH + 1  # does not fit even with every block offloaded


def main() -> None:
    import torch

    from sdlora.train import offload

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks built (the real model has 60)")
    parser.add_argument("--quantize", nargs="+", default=["none", "fp8"], choices=["none", "fp8"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=16, help="image tokens per step (1024 px: 4096)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for quantize in args.quantize:
        model = build(args.depth, quantize)
        blocks = [b for _, b in offload.repeated_blocks(model)]
        block, total = frozen_bytes(blocks[0]) / GIB, frozen_bytes(model) / GIB
        rest = total - args.depth * block
        rows = [measure(model, n, device, args.tokens) for n in sorted({0, args.depth // 2 + 1, args.depth})]
        cards = {f"{card}gb_n": recommend(block, rest, card) for card in CARDS_GIB}
        full = rest + FULL_DEPTH * block
        results.append({"quantize": quantize, "block_gib": round(block, 4), "rest_gib": round(rest, 4),
                        "full_weights_gib": round(full, 2), "rows": rows, **cards})  # fmt: skip
        del model
    print(f"Qwen-Image transformer, real widths, depth {args.depth} (measured, {device.type}); full depth 60 "
          f"(arithmetic; allowance {ALLOWANCE_GIB} GiB for all that is not a base weight)")  # fmt: skip
    for r in results:
        print(
            f"\n{r['quantize']}: block {r['block_gib']:.3f} GiB, rest {r['rest_gib']:.3f} GiB, 60 blocks + rest "
            f"{r['full_weights_gib']:.2f} GiB; recommended N: 24 GB card {r['24gb_n']}, 16 GB card {r['16gb_n']}"
        )
        for row in r["rows"]:
            print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps({"depth": args.depth, "device": device.type, "results": results}, indent=1))


if __name__ == "__main__":
    main()
