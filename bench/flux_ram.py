"""Peak system RAM of `sdlora train` preparing a Flux.1, Z-Image, FLUX.2 [klein] or Qwen-Image run: one step on a
base with the real widths (Flux.1-dev: hidden 3072, T5 4096, CLIP-L 768; Z-Image: dim 3840, Qwen3-4B 2560; klein 4B:
hidden 3072, text 7680 from Qwen3-4B; Qwen-Image: hidden 3072, Qwen2.5-VL-7B 3584) and reduced depth, random weights
saved as a diffusers folder. Each run is its own process (GNU time's %M gives its peak RSS; the base is built in
another one, since a child's peak starts at its parent's); `--code DIR` runs another checkout's sdlora (e.g. the
commit before the text encoders were staged) on the same base, alternating, so that both see the same machine.

    PYTHONPATH=$PWD python bench/flux_ram.py --code /tmp/sdlora-old --code $PWD --repeats 2
    PYTHONPATH=$PWD python bench/flux_ram.py --model zimage        (Z-Image: 2 layers + 1 refiner, Qwen3 2 layers)
    PYTHONPATH=$PWD python bench/flux_ram.py --model klein         (klein 4B: 1 double + 2 single, Qwen3 27 narrow)
    PYTHONPATH=$PWD python bench/flux_ram.py --model qwenimage     (Qwen-Image: 2 blocks, Qwen2.5-VL 1 layer)

What it shows: before, T5, CLIP-L and the transformer were in RAM at once; now each text encoder loads alone and
is freed before the transformer loads, so the peak is the larger of them, not the sum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import KLEIN_DEPTH, ZIMAGE_DEPTH  # noqa: E402
from flux_models import CLIP_L_WIDTH, T5_XXL_WIDTH, flux_transformer  # noqa: E402

DIT_MODELS = ("zimage", "klein", "qwenimage")  # built by bench/_models.py / qwen_models.py at the depth given here


def build_base(folder: Path, double: int, single: int, t5_layers: int, dtype: str = "fp32") -> dict[str, int]:
    """A FluxPipeline folder with the real widths (random weights, saved in `dtype`: bf16 as the hub's files are, so
    that the fp32 CPU run copies every weight instead of mapping the file); returns each part's parameter count."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sdlora import testing
    from sdlora.families.flux import tiny as flux_tiny

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = testing.clip_tokenizer(Path(tmp) / "tok")
    tokenizer_2 = testing.t5_tokenizer(512)
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=CLIP_L_WIDTH, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
            eos_token_id=49407, pad_token_id=49407,
        )
    )  # fmt: skip
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128, d_model=T5_XXL_WIDTH, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    )  # fmt: skip
    transformer = flux_transformer(double, single, device="cpu")
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 32, 32], norm_num_groups=32, latent_channels=16, layers_per_block=1,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    parts = {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5, "vae": vae}
    pipe = FluxPipeline(scheduler=flux_tiny.flux_scheduler(), tokenizer=tokenizer, tokenizer_2=tokenizer_2, **parts)
    pipe.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(folder, safe_serialization=True)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def build_dit_base(folder: Path, model: str, depth: dict[str, int], dtype: str = "bf16") -> dict[str, int]:
    """A Z-Image, klein or Qwen-Image pipeline folder at the real widths and `depth` (bench/_models.py,
    qwen_models.py), weights in `dtype`; returns each part's parameter count."""
    import torch
    from _models import build_klein, build_zimage
    from qwen_models import build_qwenimage

    torch.manual_seed(0)
    pipe = {"zimage": build_zimage, "klein": build_klein, "qwenimage": build_qwenimage}[model](depth)
    parts = {name: getattr(pipe, name) for name in ("transformer", "text_encoder", "vae")}
    pipe.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).save_pretrained(folder, safe_serialization=True)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def train_once(code: Path, base: Path, data: Path, out: Path, tokens: int, samples: bool) -> dict[str, Any]:
    """One `sdlora train` step in a fresh process with `code` first on its path (`samples`: and a 1-step sample
    grid after it): its peak RSS and wall time."""
    args = ["train", str(data), str(out), "--base", str(base), "--steps", "1", "--resolution", "64", "--rank", "4"]
    args += ["--sample-every", "1" if samples else "0", "--set", "train.sample_steps=1"]
    args += ["--checkpoint-every", "0", "--set", "train.eval_every=0"]
    args += ["--set", f"model.max_sequence_length={tokens}"]
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    # GNU time's %M: the peak RSS of the command itself, in KiB (kernel's ru_maxrss of the waited child).
    script = "import sys, sdlora; print('sdlora_from=' + sdlora.__file__, file=sys.stderr); "
    script += "from sdlora.cli import app; app()"
    command = ["/usr/bin/time", "-f", "maxrss_kib=%M", sys.executable, "-c", script]
    # Not in the repository's folder: `python -c` puts the working folder first on the path.
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise SystemExit(f"{code}: sdlora train failed:\n{(done.stdout + done.stderr)[-3000:]}")
    kib = int(done.stderr.rsplit("maxrss_kib=", 1)[1].split()[0])
    used = done.stderr.split("sdlora_from=", 1)[1].split()[0]
    if not Path(used).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"{code}: ran the sdlora of {used} instead")
    seconds = round(time.perf_counter() - started, 1)
    return {"code": str(code), "peak_rss_gb": round(kib / 2**20, 2), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, action="append", help="a checkout whose sdlora to run (repeatable)")
    parser.add_argument("--model", choices=["flux", *DIT_MODELS], default="flux")
    parser.add_argument("--double", type=int, default=1, help="Flux.1, klein: double blocks")
    parser.add_argument("--single", type=int, default=None, help="Flux.1, klein: single blocks (1; klein: 2)")
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2, help="Z-Image: main layers; Qwen-Image: blocks")
    parser.add_argument("--refiner", type=int, default=1, help="Z-Image: refiner layers on each side")
    parser.add_argument("--qwen3-layers", type=int, default=None, help="Z-Image, klein: Qwen3 layers (2; klein: 27)")
    parser.add_argument("--text-layers", type=int, default=1, help="Qwen-Image: Qwen2.5-VL's language layers")
    parser.add_argument("--tokens", type=int, default=64, help="T5 tokens per prompt (model.max_sequence_length)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samples", action="store_true", help="render a sample grid after the step")
    parser.add_argument("--save-dtype", choices=["fp32", "bf16"], default="bf16", help="the base's weights on disk")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the base here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--build-only", action="store_true", help="only save the base into --workdir")
    options = parser.parse_args()
    if options.single is None:
        options.single = 2 if options.model == "klein" else 1
    if options.qwen3_layers is None:  # bench/_models.py's: klein reads Qwen3's hidden layer 27
        options.qwen3_layers = {"klein": KLEIN_DEPTH, "zimage": ZIMAGE_DEPTH}.get(options.model, {}).get("qwen3", 2)
    codes = options.code or [Path(__file__).resolve().parents[1]]
    with tempfile.TemporaryDirectory() as tmp:
        root = options.workdir or Path(tmp)
        base, data = root / "base", root / "data"
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from train_utils import subject_set

        if options.build_only and options.model in DIT_MODELS:
            depth = {"layers": options.layers, "refiner": options.refiner, "qwen3": options.qwen3_layers}
            depth |= {"double": options.double, "single": options.single}
            depth |= {"text_layers": options.text_layers, "vision_layers": 1}
            params = build_dit_base(base, options.model, depth, options.save_dtype)
            print(json.dumps(params))
            return
        if options.build_only:
            params = build_base(base, options.double, options.single, options.t5_layers, options.save_dtype)
            print(json.dumps(params))
            return
        if not base.exists():
            # In a child process: a forked child's peak RSS (ru_maxrss) starts at its parent's, so the parent must
            # stay small.
            build = [sys.executable, __file__, "--build-only", "--workdir", str(root), "--double", str(options.double)]
            build += ["--single", str(options.single), "--t5-layers", str(options.t5_layers)]
            build += ["--save-dtype", options.save_dtype, "--model", options.model, "--layers", str(options.layers)]
            build += ["--refiner", str(options.refiner), "--qwen3-layers", str(options.qwen3_layers)]
            build += ["--text-layers", str(options.text_layers)]
            built = subprocess.run(build, check=True, capture_output=True, text=True).stdout
            params = json.loads(built.strip().splitlines()[-1])
        else:
            params = {}
        if not data.exists():
            subject_set(data)
        runs = []
        for _ in range(options.repeats):
            for code in codes:
                run = train_once(code, base, data, root / f"out-{time.time_ns()}", options.tokens, options.samples)
                runs.append(run)
                print(json.dumps(run), flush=True)
    result = {"params": params, "settings": {k: str(v) for k, v in vars(options).items()}, "runs": runs}
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
