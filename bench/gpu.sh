#!/usr/bin/env bash
# Everything that needs a GPU, in one run of at most 8 minutes; prints a short table last.
#
#   bash bench/gpu.sh              (from the repo root; results under $OUT or /tmp/sdlora-gpu)
#   bash bench/gpu.sh matmul b32   (only the parts named: matmul b1 b8 sdxl b32 flux dit offload qwenimage
#                                   identity; b32, flux, dit, offload, qwenimage and identity are not in the default run)
#   bash bench/gpu.sh --dry-run dit  (print each part's commands, run nothing)
#
# No network is needed: models are built from configs with random weights. Packages missing on the machine
# (diffusers, bitsandbytes, peft...) can come as wheels in .whl/ (see docs/benchmarks.md); they are installed
# into /tmp/site and put on PYTHONPATH. torch.compile's time (about 2-3 minutes per shape on 16 cores) is in
# the compiled variant's first warm-up step.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
PARTS=${*:-matmul b1 b8 sdxl}
for part in $PARTS; do
  case $part in
  matmul | b1 | b8 | sdxl | b32 | flux | dit | offload | qwenimage | identity) ;;
  *) echo "bench/gpu.sh: unknown part '$part'; choose from matmul b1 b8 sdxl b32 flux dit offload qwenimage identity" >&2
    exit 2 ;;
  esac
done
# The dit part runs diffusers' own training scripts, which are not part of this repository: copies of diffusers'
# examples/dreambooth/train_dreambooth_lora_z_image.py and train_dreambooth_lora_flux2_klein.py (main branch) in
# $DIFFUSERS_EXAMPLES (default .anchor/, ignored by git: carry it); they import torchvision (its wheel in .whl/).
EXAMPLES=${DIFFUSERS_EXAMPLES:-.anchor}
if [[ " $PARTS " == *" dit "* ]] && [ -z "$DRY_RUN" ]; then
  for script in train_dreambooth_lora_z_image.py train_dreambooth_lora_flux2_klein.py; do
    if [ ! -f "$EXAMPLES/$script" ]; then
      echo "bench/gpu.sh: part dit needs $EXAMPLES/$script: copy it from diffusers' examples/dreambooth" \
        "(or set DIFFUSERS_EXAMPLES to its folder)" >&2
      exit 2
    fi
  done
fi
PY=${PYTHON:-python3}
RESULTS=${OUT:-/tmp/sdlora-gpu}

if [ -n "$DRY_RUN" ]; then  # each command of the parts named, with its time limit; nothing runs
  run() { echo "timeout $*"; }
else
  mkdir -p "$RESULTS"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
  # Each part has its own time limit (default parts: 440 s), so one hang cannot eat the whole run; a failed part
  # is reported and the others still run. timeout signals the command's whole process group: its workers too.
  run() { local limit=$1; shift; timeout "$limit" "$@" || echo "FAILED ($?): $*"; }
fi
# --offload-blocks on Qwen-Image's real-width blocks (8 of 60), 1024 px (4096 tokens), rank 16, checkpointed, bf16
# and fp8: the hooks' resident base-weight bytes at the step's peak, torch's own peak and s/step for N = 0, 5, 8
# (the slowdown of offloading). A Qwen-Image benchmark of the full model may call it too. About 2 minutes.
offload_part() {
  run 170 $PY bench/offload_memory.py --device cuda --depth 8 --tokens 4096 --json "$RESULTS/offload.json"
}
for part in $PARTS; do
  case $part in
  offload) offload_part ;;
  matmul) run 30 $PY bench/matmul.py --json "$RESULTS/matmul.json" ;;
  # Batch 1 is bound by per-step launch overhead in eager mode, which torch.compile removes.
  b1) run 230 $PY bench/train_step.py --device cuda --model sd15 --precision bf16 --batch 1 --warmup 3 --steps 10 \
    --variants baseline,sdlora,sdlora:compile --json "$RESULTS/sd15-b1.json" ;;
  b8) run 70 $PY bench/train_step.py --device cuda --model sd15 --precision bf16 --batch 8 --warmup 2 --steps 6 \
    --json "$RESULTS/sd15-b8.json" ;;
  # SDXL 1024: UNet-only LoRA rank 16 with the memory-saving settings: sdlora's trainer (cached latents and
  # embeddings, encoders and VAE offloaded to the CPU) and the bare UNet step on random cached inputs.
  sdxl) run 110 $PY bench/train_step.py --device cuda --model sdxl --variants sdlora,unet --precision bf16 --rank 16 \
    --gradient-checkpointing --optimizer adamw8bit --offload --warmup 2 --steps 3 --json "$RESULTS/sdxl-unet.json" ;;
  # The best batch size for throughput, eager and compiled.
  b32) run 240 $PY bench/train_step.py --device cuda --model sd15 --precision bf16 --batch 32 --warmup 2 --steps 5 \
    --variants sdlora,sdlora:compile --json "$RESULTS/sd15-b32.json" ;;
  # Flux.1-dev's architecture (19 + 38 blocks, random weights) at 1024 px, rank 16, batch 1, cached embeddings:
  # bf16, then NF4 + gradient checkpointing + 8-bit AdamW (targets: bf16 <= 30 GB, NF4 <= 12 GB).
  flux) run 200 env PYTHONPATH="$PYTHONPATH:$PWD/bench" $PY bench/flux_step.py --device cuda --precision bf16 \
      --resolution 1024 --rank 16 --warmup 2 --steps 3 --json "$RESULTS/flux-bf16.json"
    run 240 env PYTHONPATH="$PYTHONPATH:$PWD/bench" $PY bench/flux_step.py --device cuda --precision bf16 \
      --resolution 1024 --rank 16 --quantize nf4 --gradient-checkpointing --optimizer adamw8bit --warmup 2 --steps 3 \
      --json "$RESULTS/flux-nf4.json" ;;
  # Z-Image (30 layers + 2 refiner layers a side, dim 3840: 6.2 B) and FLUX.2 [klein] 4B (5 double + 20 single
  # blocks, hidden 3072) at full depth, random weights, 1024 px, rank 16, batch 1, 512 text tokens: sdlora against
  # diffusers' own script, alternated step by step (bench/anchor.py), in bf16, then with the low-memory settings
  # (sdlora: --quantize nf4 --gradient-checkpointing --optimizer adamw8bit; the script the same through
  # --bnb_quantization_config_path, --gradient_checkpointing, --use_8bit_adam). Qwen3 at reduced depth: both
  # trainers cache the captions and move it off the GPU before the first step. Each model is built on the GPU,
  # saved once in bf16 and reused by its two runs. Targets: Z-Image <= 16 GB and klein-4B <= 12 GB with the
  # low-memory settings; samples/s >= 1.3x the script's. About 5 minutes in all.
  dit) for model in zimage-6b klein-4b; do
      if [ $model = zimage-6b ]; then script=train_dreambooth_lora_z_image.py limit=100; else
        script=train_dreambooth_lora_flux2_klein.py limit=75; fi
      common=(--device cuda --model $model --precision bf16 --resolution 1024 --rank 16 --tokens 512 --warmup 2)
      common+=(--steps 3 --anchor-script "$EXAMPLES/$script" --model-dir "/tmp/sdlora-gpu-$model")
      run $limit $PY bench/train_step.py "${common[@]}" --json "$RESULTS/$model-bf16.json"
      run $limit $PY bench/train_step.py "${common[@]}" --quantize nf4 --gradient-checkpointing \
        --optimizer adamw8bit --json "$RESULTS/$model-lowmem.json"
      [ -n "$DRY_RUN" ] || rm -rf "/tmp/sdlora-gpu-$model"
    done ;;
  # Qwen-Image's 20B transformer at full depth (60 blocks), random weights built on the GPU in bf16 and saved once
  # (40 GB: the first command, alone), then sdlora's trainer as `sdlora train --base FOLDER` runs it (Qwen2.5-VL,
  # reduced, loads alone, encodes and is freed; the transformer loads, --quantize applies) at 1024 px, rank 16,
  # batch 1, gradient checkpointing: bf16, fp8, fp8 + the offload_blocks computed for a 24 GB card, NF4 + the one
  # computed for 16 GB (bench/qwen_memory.py: computed from the blocks' bytes, not measured). Targets: peak <= 24 GB
  # with fp8 + offload, <= 16 GB with NF4 + offload, offloading's s/step <= 1.5x fp8's. About 6 minutes.
  # QWEN_OFFLOAD_24GB / QWEN_OFFLOAD_16GB replace the computed Ns (e.g. after a first run has measured the peaks).
  qwenimage) dir=/tmp/sdlora-gpu-qwenimage-20b
    n24=${QWEN_OFFLOAD_24GB:-$($PY bench/qwen_memory.py --print-n 24 fp8)}
    n16=${QWEN_OFFLOAD_16GB:-$($PY bench/qwen_memory.py --print-n 16 nf4)}
    common=(--device cuda --model qwenimage-20b --precision bf16 --resolution 1024 --rank 16 --tokens 512)
    common+=(--gradient-checkpointing --variants sdlora --warmup 1 --steps 2 --model-dir "$dir")
    run 80 $PY bench/train_step.py "${common[@]}" --save-model "$dir"
    run 50 $PY bench/train_step.py "${common[@]}" --json "$RESULTS/qwenimage-bf16.json"
    run 90 $PY bench/train_step.py "${common[@]}" --quantize fp8 --json "$RESULTS/qwenimage-fp8.json"
    run 90 $PY bench/train_step.py "${common[@]}" --quantize fp8 --offload-blocks "$n24" \
      --json "$RESULTS/qwenimage-fp8-offload.json"
    run 60 $PY bench/train_step.py "${common[@]}" --quantize nf4 --offload-blocks "$n16" \
      --json "$RESULTS/qwenimage-nf4-offload.json"
    [ -n "$DRY_RUN" ] || rm -rf "$dir" ;;
  # The identity benchmark at issue 32's protocol, which this 2-core CPU affords only in part (about 17 hours for the
  # flow grid): three subjects, 64 seeds per prompt, checkpoints 200/400/800/1,500. The flow grid on the packaged
  # DiT base at the toy world's lr 1e-3 (docs/identity-benchmark.md, "The methods grid on the DiT base"), then the
  # UNet base's default and its most exact cell. The toy models are a few MB: eight runs share the GPU, one CPU
  # thread each; --by-setting saves whole cells first, so a cut run still reports the cells it finished. On CUDA
  # sdlora trains with its mixed precision ('auto': bf16), the CPU in fp32: say so beside the figures.
  identity) flow=(plain output output+pw0.2 class_images class_images+prior0.2 lokr dora ts_uniform ts_sigmoid)
    flow+=(ts_shift6 ts_logit_normal caption_dropout masked masked+prior)
    protocol=(--grid methods --only none --by-setting --seeds 64 --steps 200 400 800 1500 --jobs 8)
    run 360 $PY -m bench.identity --base sdlora/demo/identity-dit.safetensors "${protocol[@]}" \
      --combine "${flow[@]/%/+lr1e-3}" --out "$RESULTS/identity-flow"
    run 150 $PY -m bench.identity --base sdlora/demo/identity-base.safetensors "${protocol[@]}" \
      --combine pivotal+class_images pivotal+class_images+named+rank4+text_encoder --out "$RESULTS/identity-unet"
    run 60 $PY -m bench.identity.report "$RESULTS/identity-flow/results.json" "$RESULTS/identity-unet/results.json" \
      --out "$RESULTS/identity-report" ;;
  esac
done
[ -z "$DRY_RUN" ] || exit 0

$PY - "$RESULTS" <<'PYEOF'
import json, sys
from pathlib import Path

results = Path(sys.argv[1])
def load(name):
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None

matmul = load("matmul.json")
peak = matmul["tflops"] if matmul else None
print(f"\nbf16 matmul: {peak:.1f} TFLOP/s" if peak else "\nbf16 matmul: not measured")
print(f"{'run':14} {'variant':20} {'s/step':>8} {'samples/s':>9} {'speedup':>7} {'TFLOP/s':>8} {'of matmul':>9} "
      f"{'peak GB':>8} {'1st step s':>10}")
dit = [f"{m}-{s}.json" for m in ("zimage-6b", "klein-4b") for s in ("bf16", "lowmem")]
dit += [f"qwenimage-{s}.json" for s in ("bf16", "fp8", "fp8-offload", "nf4-offload")]
for name in ("sd15-b1.json", "sd15-b8.json", "sd15-b32.json", "sdxl-unet.json", *dit):
    data = load(name)
    if data is None:
        print(f"{name[:-5]:14} not measured (failed or timed out)")
        continue
    rows = data["variants"]
    ref = rows[0]["median_s"]
    for r in rows:
        tflops = r.get("achieved_tflops")
        share = f"{100 * tflops / peak:8.0f}%" if tflops and peak else f"{'-':>9}"
        tf = f"{tflops:8.1f}" if tflops else f"{'-':>8}"
        print(f"{name[:-5]:14} {r['variant']:20} {r['median_s']:8.3f} {r['samples_per_s']:9.2f} "
              f"{ref / r['median_s']:6.2f}x {tf} {share} {r['step_peak_gb']:8.2f} {r['step_seconds'][0]:10.1f}")
for name in ("flux-bf16.json", "flux-nf4.json"):
    data = load(name)
    if data is not None:
        print(f"{name[:-5]:14} {'sdlora':20} {data['median_s']:8.3f} {data['samples_per_s']:9.2f} {'':7} {'':8} {'':9} "
              f"{data['peak_gb']:8.2f} {data['step_seconds'][0]:10.1f}")
PYEOF
