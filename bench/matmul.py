"""The card's measured bf16 matmul throughput (TFLOP/s): the yardstick for the training step's achieved TFLOP/s."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(size: int = 8192, repeats: int = 50, device: str = "cuda") -> float:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    tflops = measure(opts.size, opts.repeats, opts.device)
    print(f"matmul {opts.size}^3 {'bf16' if opts.device == 'cuda' else 'fp32'}: {tflops:.1f} TFLOP/s")
    if opts.json:
        opts.json.write_text(json.dumps({"size": opts.size, "tflops": tflops}))


if __name__ == "__main__":
    main()
