"""Qwen-Image's 20B transformer in bytes, and the `train.offload_blocks` N that fits a card: computed, not measured
on a GPU.

    PYTHONPATH=$PWD python bench/qwen_memory.py                    (the table for 24 and 16 GB cards)
    PYTHONPATH=$PWD python bench/qwen_memory.py --print-n 24 fp8   (N alone: what bench/gpu.sh's qwenimage part uses)
    PYTHONPATH=$PWD python bench/qwen_memory.py --measure          (also two counts on the CPU: below)

The transformer (Qwen/Qwen-Image's config, bench/qwen_models.py) is built on the meta device: no memory, no weights.
Bytes of its frozen weights as each --quantize stores them:

- none (bf16): 2 bytes a parameter;
- fp8 (sdlora.fp8, torchao's Float8WeightOnlyConfig): every nn.Linear weight 1 byte a parameter plus one fp32 scale
  per output row; biases and norms stay bf16;
- nf4 (bitsandbytes through diffusers' BitsAndBytesConfig, its defaults: blocks of 64, no double quantization):
  every nn.Linear weight half a byte a parameter plus one fp32 absmax per 64; biases and norms stay bf16.

The N for a card is the offloading's own arithmetic (bench/offload_memory.py, on the offloading branch, which
measured it with the offload hooks' accounting): at a step's peak the card holds the weights outside the blocks, the
L - N resident blocks and 2 more (the block computing and the one prefetched while it computes), beside an
allowance of 6.5 GiB for all that is not a base weight at 1024 px, batch 1, rank 16, gradient checkpointing (CUDA
context 0.8, allocator slack 1.0, LoRA + gradient + AdamW 0.35, checkpointed block inputs 1.6, one block's
recomputed activations and gradients 1.5, a quantized block's weights dequantized and held for its backward 0.7:
estimates, itemised there). N = the smallest with outside + (L - N + min(N, 2)) x block + 6.5 GiB <= the card. This
script adds NF4's bytes, and `--measure` checks the fp8 bytes and one of the allowance's terms:

`--measure` counts, on the CPU: the bytes of one real-width block quantized by sdlora.fp8 (torchao's tensors inside
its weights, against the fp8 formula), and the activations autograd saves for one block's backward at the
resolution (saved-tensor hooks on the meta device: no memory, no compute; attention counted as flash attention
saves it, q, k, v, output and log-sum-exp, since PyTorch's meta kernel would decompose it into the full matrix).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 2**30
QUANTIZE = ("none", "fp8", "nf4")
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (diffusers' default); one fp32 absmax per block
TEXT_TOKENS = 128  # a long caption's Qwen2.5-VL tokens after the template (sdlora trims the padding per batch)
ALLOWANCE_GIB = 6.5  # all that is not a base weight at 1024 px (bench/offload_memory.py's, itemised there)
IN_FLIGHT = 2  # blocks on the card beside the resident ones: the one computing, the one prefetched


def tensor_bytes(name: str, shape: tuple[int, ...], linear_weight: bool, quantize: str) -> float:
    """Bytes of one frozen tensor as `quantize` stores it (module docstring)."""
    count = math.prod(shape)
    if not linear_weight or quantize == "none":
        return 2.0 * count  # bf16
    if quantize == "fp8":
        return count + 4.0 * shape[0]  # e4m3 + an fp32 scale per output row
    return count / 2 + 4.0 * math.ceil(count / NF4_BLOCK)  # nf4 + an fp32 absmax per block


def transformer_bytes(model: Any, quantize: str) -> dict[str, Any]:
    """{"block": bytes of one transformer block, "blocks": their count, "outside": the rest of the weights}."""
    import torch

    linear = {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    per_block: dict[int, float] = {}
    outside = 0.0
    for name, param in model.named_parameters():
        size = tensor_bytes(name, tuple(param.shape), name in linear, quantize)
        if name.startswith("transformer_blocks."):
            index = int(name.split(".")[1])
            per_block[index] = per_block.get(index, 0.0) + size
        else:
            outside += size
    sizes = set(per_block.values())
    assert len(sizes) == 1, "blocks of different sizes"
    return {"block": sizes.pop(), "blocks": len(per_block), "outside": outside}


@functools.cache
def full_transformer() -> Any:
    """Qwen-Image's 60-block transformer on the meta device (shapes only)."""
    from qwen_models import QWENIMAGE_TRANSFORMER, qwenimage_transformer

    return qwenimage_transformer(QWENIMAGE_TRANSFORMER["num_layers"], device="meta")


def plan(card_gib: float, quantize: str) -> dict[str, Any]:
    """The bytes and the offload_blocks N for a card of `card_gib` GiB (0 when everything fits; fits False when
    nothing does)."""
    sizes = transformer_bytes(full_transformer(), quantize)
    blocks, block, outside = sizes["blocks"], sizes["block"], sizes["outside"]

    def peak(n: int) -> float:
        return outside + (blocks - n + min(n, IN_FLIGHT)) * block + ALLOWANCE_GIB * GIB

    n = next((n for n in range(blocks + 1) if peak(n) <= card_gib * GIB), None)
    return {
        "card_gib": card_gib,
        "quantize": quantize,
        "block_gb": block / 1e9,
        "blocks": blocks,
        "outside_gb": outside / 1e9,
        "weights_gb": (block * blocks + outside) / 1e9,
        "allowance_gib": ALLOWANCE_GIB,
        "offload_blocks": blocks if n is None else n,
        "fits": n is not None,
        "peak_gib": peak(blocks if n is None else n) / GIB,
    }


def measure_fp8_block() -> dict[str, float]:
    """One real-width Qwen-Image block (random weights, bf16) quantized by sdlora.fp8 on the CPU: the bytes its
    tensors hold afterwards (the float8 data and scales inside torchao's tensor subclass, counted), against the
    formula's."""
    import torch
    from qwen_models import qwenimage_transformer

    from sdlora import fp8

    model = qwenimage_transformer(1, device="meta")
    block = model.transformer_blocks[0].to_empty(device="cpu").to(torch.bfloat16)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    fp8.quantize(block)
    counted = 0
    for param in block.parameters():
        counted += sum(inner.nbytes for inner in inner_tensors(param.data))
    formula = transformer_bytes(model, "fp8")["block"]
    return {"fp8_block_counted_gb": counted / 1e9, "fp8_block_formula_gb": formula / 1e9}


def saved_activations(resolution: int, text_tokens: int = TEXT_TOKENS) -> dict[str, float]:
    """The bytes autograd saves for the backward of one Qwen-Image block in bf16 at `resolution` (its weights, which
    it saves by reference, apart), counted with saved-tensor hooks on the meta device; attention as flash attention
    saves it (q, k, v, output, log-sum-exp)."""
    import torch
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    from qwen_models import QWENIMAGE_TRANSFORMER, qwenimage_transformer

    model = qwenimage_transformer(1, device="meta").to(torch.bfloat16).requires_grad_(False)
    weights = {id(p) for p in model.parameters()}
    width, side = 3072, resolution // 16
    meta = {"device": "meta", "dtype": torch.bfloat16}
    image = torch.empty(1, side * side, width, **meta, requires_grad=True)
    text = torch.empty(1, text_tokens, width, **meta, requires_grad=True)
    rope = QwenEmbedRope(theta=10000, axes_dim=list(QWENIMAGE_TRANSFORMER["axes_dims_rope"]), scale_rope=True)
    freqs = tuple(f.to("meta") for f in rope([(1, side, side)], device="cpu", max_txt_seq_len=text_tokens))
    counted = {"activations": 0.0, "weights": 0.0}

    def pack(tensor: Any) -> Any:
        weight = id(tensor) in weights or (tensor._base is not None and id(tensor._base) in weights)
        counted["weights" if weight else "activations"] += tensor.numel() * tensor.element_size()
        return tensor

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _FlashSaves.call
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model.transformer_blocks[0](
                hidden_states=image, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                temb=torch.empty(1, width, **meta), image_rotary_emb=freqs,
            )  # fmt: skip
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    unit = 2.0 * side * side * width
    return {"block_saved_activations_gb": counted["activations"] / 1e9, "in_image_units": counted["activations"] / unit}


class _FlashSaves:
    """scaled_dot_product_attention's shapes, saving for backward what flash attention saves (meta tensors)."""

    @staticmethod
    def call(query: Any, key: Any, value: Any, attn_mask: Any = None, **_: Any) -> Any:
        import torch

        class Flash(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, q: Any, k: Any, v: Any) -> Any:
                out = torch.empty_like(q)
                ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
                return out

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                return tuple(torch.empty_like(t) for t in ctx.saved_tensors[:3])

        assert attn_mask is None, "sdlora passes no mask to a batch without padding"
        return Flash.apply(query, key, value)


def inner_tensors(tensor: Any) -> list[Any]:
    """The plain tensors a tensor subclass (torchao's float8 weight) is made of; a plain tensor itself."""
    if not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=float, nargs="+", default=[24, 16], help="card sizes in GiB")
    parser.add_argument("--resolution", type=int, default=1024, help="--measure: the activations' resolution")
    parser.add_argument("--print-n", nargs=2, metavar=("GIB", "QUANTIZE"), help="print only N for this card")
    parser.add_argument("--measure", action="store_true", help="also quantize one real block (fp8) and count")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    if opts.print_n:
        card, quantize = float(opts.print_n[0]), opts.print_n[1]
        if quantize not in QUANTIZE:
            parser.error(f"--print-n: quantize {quantize!r}: choose from {', '.join(QUANTIZE)}")
        print(plan(card, quantize)["offload_blocks"])
        return
    rows = [plan(card, q) for card in opts.cards for q in QUANTIZE]
    print(f"{'card GiB':>8} {'quantize':8} {'block GB':>8} {'weights GB':>10} {'N':>3} {'peak GiB':>8}")
    for r in rows:
        print(
            f"{r['card_gib']:8.0f} {r['quantize']:8} {r['block_gb']:8.3f} {r['weights_gb']:10.2f} "
            f"{r['offload_blocks']:3d} {r['peak_gib']:8.2f}" + ("" if r["fits"] else "  (does not fit)")
        )
    result: dict[str, Any] = {"rows": rows}
    if opts.measure:
        result["measured"] = measure_fp8_block() | saved_activations(opts.resolution)
        print(json.dumps(result["measured"]))
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
