"""Memory of a frozen denoiser loaded with --quantize none vs fp8: FLUX.2 [klein]-4B's transformer at its real
widths (hidden 3072, 24 x 128 heads, MLP x3, text width 7680) and reduced depth, random weights saved in bf16 as
the hub's files are. Each load is its own process, alternated: the bytes of its weights as they sit in memory
(float8 data + fp32 row scales for the quantized Linears), its RSS once loaded (and, for fp8, quantized) with every
weight touched (all of it, and its anonymous part: safetensors maps the file, whose pages count in RSS but are page
cache), and its peak RSS (GNU time's %M). The compute dtype is the training's: fp32 on the CPU, bf16 on a GPU.

    PYTHONPATH=$PWD python bench/fp8_memory.py --workdir /tmp/fp8-mem [--double 1 --single 2 --repeats 2]

fp8 quantizes after loading (sdlora.fp8), so the load's own peak is that of `none`; the fp8 figures that matter are
the weight bytes and the RSS after loading, which is what stays resident (and what moves to a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(folder: Path, double: int, single: int) -> None:
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(
        in_channels=128, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False,
    )  # fmt: skip
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def load(folder: Path, mode: str) -> dict[str, float]:
    """In a child process: load, quantize for fp8, and measure."""
    import gc

    import torch
    from diffusers import Flux2Transformer2DModel

    from sdlora import fp8

    dtype = torch.bfloat16 if mode.endswith("bf16") else torch.float32
    start = time.perf_counter()
    model = Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=dtype).requires_grad_(False)
    loaded = time.perf_counter() - start
    linears = fp8.quantize(model) if mode.startswith("fp8") else 0
    gc.collect()
    seconds = time.perf_counter() - start
    weights = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        parts = [tensor.qdata, tensor.scale] if type(tensor).__name__ == "Float8Tensor" else [tensor]
        for part in parts:
            weights += part.numel() * part.element_size()
            part.view(-1)[::512].float().sum()  # every page touched, as a training step touches them
    status = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("VmRSS:", "RssAnon:"))}  # fmt: skip
    rss, anon = status["VmRSS"], status["RssAnon"]  # KiB
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "quantized_linears": linears,
        "weights_gb": round(weights / 2**30, 3),
        "rss_after_load_gb": round(rss / 2**20, 2),  # with the pages of the mapped bf16 file that were read
        "anon_rss_after_load_gb": round(anon / 2**20, 2),  # the process's own memory (no file-backed pages)
        "load_s": round(loaded, 1),
        "total_s": round(seconds, 1),
    }


def measure(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """A fresh process per load (GNU time's %M: its peak RSS, in KiB)."""
    command = ["/usr/bin/time", "-f", "MAXRSS %M", sys.executable, __file__, "--child", mode]
    command += ["--workdir", str(args.workdir), "--double", str(args.double), "--single", str(args.single)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    kib = int(next(line for line in done.stderr.splitlines() if line.startswith("MAXRSS")).split()[1])
    return {"mode": mode, **result, "peak_rss_gb": round(kib / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.workdir / f"klein4b-{args.double}d{args.single}s"
    if args.child:
        print(json.dumps(load(folder, args.child)))
        return
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import fp8_memory; fp8_memory.build(__import__('pathlib').Path({str(folder)!r}), "
                        f"{args.double}, {args.single})"], check=True)  # fmt: skip
    rows = []
    for _ in range(args.repeats):
        for mode in ("none-fp32", "fp8-fp32", "none-bf16", "fp8-bf16"):
            rows.append(measure(args, mode))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
