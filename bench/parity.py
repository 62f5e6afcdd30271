"""Parity: a LoRA trained by sdlora, rendered by sdlora and by ComfyUI's own code from the run's NAME.comfyui.json.

ComfyUI is never a dependency of sdlora: export upstream ComfyUI outside the repo and run this with a Python that
has our stack plus ComfyUI's requirements (torchsde, scipy; torchvision is stubbed while comfy imports):

    git -C /work/.mirror/Comfy-Org+ComfyUI/repo archive HEAD | tar -x -C /tmp/comfyui   # (or cat-file each blob)
    PYTHONPATH=$PWD:$PWD/bench nice -n 15 /tmp/comfy-venv/bin/python bench/parity.py --comfyui /tmp/comfyui \
        --case tiny-sd1 tiny-sdxl tiny-sd2 tiny-flux toy --json docs/bench-results/parity.json

Cases (CASES): SD 1.x tiny and toy, SDXL tiny, SD 2.x tiny (ComfyUI's CLIP-H reading, and the tiny pipeline's),
FLUX.1 [dev] tiny (at ComfyUI's 256 T5 tokens, and at dev's default 512 in sdlora); FLUX.1 [schnell] tiny; Flux with
a CLIP-L LoRA (LoraLoader); the toy base with pivotal tuning (the demo's recipe, `embedding:me_emb`, 8 seeds);
Z-Image (Base, Turbo) and FLUX.2 [klein] (base, distilled) tiny (bench/parity_zimage.py), Qwen-Image and
Qwen-Image-Edit tiny (bench/parity_qwen.py), through the pip-installable fork (`--comfyui FORK`: its export and
the command in bench/parity_fork.py and docs/parity.md).
Per case: the base saved as a diffusers folder and as the files ComfyUI loads (the family's save_single_file;
Flux: BFL's transformer file, clip_l, t5xxl and ae as bench/parity_flux.py writes them); `sdlora train` (CLI, a
few steps, LoRA on the denoiser and, SD 1.x/2.x/SDXL, the text encoders, rank 8 / alpha 4,
`train.sample_like = "comfyui"`); then
- ComfyUI: the run's workflow file executed node by node by ComfyUI's node classes (bench/parity_comfy.py:
  CheckpointLoaderSimple or UNETLoader/DualCLIPLoader/VAELoader, LoraLoader with the run's NAME.safetensors,
  ModelSamplingDiscrete/ModelSamplingFlux, CLIPTextEncode, FluxGuidance, KSampler, VAEDecode);
- sdlora: `render_images` with the run's sample settings (Sampling.for_training), the LoRA loaded as `generate`
  loads it, the same prompts and seeds;
- diffusers: the base pipeline with `load_lora_weights` of NAME.safetensors (the file ComfyUI reads) rendered the
  same way.
Reported: LoRA keys ComfyUI used / keys in the file; the largest difference between ComfyUI's patched weights and
sdlora's merged weights (diffusers fuse_lora, written by the family's single-file writer under the checkpoint's
names); whether ComfyUI's initial noise equals sdlora's (torch.randn of the latent shape from each seed: both draw
it so); the images' max / mean absolute difference in [0, 1] (8-bit, as saved); for the toy base the toy world's
identity reading of both renders (exact subject share, attribute agreement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from comfyui_dit import Collect

STEPS = 40
SEEDS = 4
PROMPT = "a photo of sks person"
# sdlora renders every sample prompt at the one seed generate.seed (so are the workflow's KSamplers): the images
# differ by prompt; the first is the training caption.
PROMPTS = (PROMPT, "a close-up photo of sks person", "a portrait of sks person, smiling", "sks person outdoors")
CASES = {
    "toy": "SD 1.x toy base (sdlora/demo/identity-base.safetensors: UNet 32-64-64, CLIP width 64, 4x VAE)",
    "tiny-sd1": "SD 1.x tiny test pipeline (sdlora.testing: UNet 32-64, CLIP width 32, 8x VAE)",
    "tiny-sdxl": "SDXL tiny test pipeline (sdlora.testing: UNet 32-64 with text_time, CLIP-L and CLIP-G width 32)",
    "tiny-sd2": "SD 2.x tiny test pipeline (sdlora.testing: UNet 32-64, linear projections, v-prediction, CLIP "
    "width 32): ComfyUI's own CLIP-H reading (penultimate layer, '!' padding)",
    "tiny-sd2-pipeline-reading": "the same, ComfyUI's CLIP-H read as the tiny pipeline reads its encoder (last "
    "layer, end-of-text padding: what the published SD 2.x encoder makes equal)",
    "tiny-flux": "FLUX.1 [dev] tiny test pipeline (sdlora.testing: 1 double + 1 single block, hidden 32, T5 and "
    "CLIP-L width 32, 4-channel AE)",
    "tiny-flux-512": "the same, sdlora's T5 at FLUX.1 [dev]'s default 512 tokens (ComfyUI pads to 256)",
}
FAMILY = {
    "toy": "sd1",
    "tiny-sd1": "sd1",
    "tiny-sdxl": "sdxl",
    "tiny-sd2": "sd2",
    "tiny-sd2-pipeline-reading": "sd2",
    "tiny-flux": "flux",
    "tiny-flux-512": "flux",
}
# Flux: T5 tokens as ComfyUI pads them (at least 256; diffusers' FluxPipeline pads dev to 512, see docs/parity.md)
EXTRA = {"tiny-flux": ["--set", "model.max_sequence_length=256"]}
LATENT_SCALE = {"toy": 4}  # the VAE's downsampling where it is not 8
# Z-Image and FLUX.2 [klein]: through the pip-installable fork of ComfyUI (--comfyui FORK; bench/parity_zimage.py),
# the transformer alone trained (neither family trains its Qwen3); Turbo: the distilled checkpoint's own workflow.
CASES |= {
    "tiny-zimage": "Z-Image (Base) tiny test pipeline (sdlora.families.zimage.tiny: 2 layers + 1 refiner layer each "
    "side, width 32, Qwen3 2 layers of width 16, 4-channel FLUX.1 AE)",
    "tiny-zimage-turbo": "the same with Z-Image-Turbo's scheduler (shift 3) and CFG off, trained with "
    "--allow-distilled: the workflow of the checkpoint users render with",
    "tiny-klein": "FLUX.2 [klein] (base) tiny test pipeline (sdlora.families.klein.tiny: 1 double + 2 single "
    "blocks, width 32, Qwen3 28 layers of width 16, 4-channel AutoencoderKLFlux2 with batch-norm statistics)",
    "tiny-klein-distilled": "the same as klein's step-distilled checkpoint (the pipeline's is_distilled: CFG off), "
    "trained with --allow-distilled",
}
FAMILY |= {
    "tiny-zimage": "zimage",
    "tiny-zimage-turbo": "zimage",
    "tiny-klein": "klein",
    "tiny-klein-distilled": "klein",
}
EXTRA |= {
    "tiny-zimage-turbo": ["--allow-distilled", "--set", "generate.cfg=0.0"],
    "tiny-klein-distilled": ["--allow-distilled", "--set", "generate.cfg=1.0"],
}
BASES = {  # (module, builder, its arguments): a tiny pipeline with other settings than its family's tiny_pipeline
    "tiny-zimage-turbo": ("sdlora.families.zimage.tiny", "tiny_zimage_pipeline", {"turbo": True}),
    "tiny-klein-distilled": ("sdlora.families.klein.tiny", "tiny_klein_pipeline", {"distilled": True}),
}
# Qwen-Image (bench/parity_qwen.py): rendered by the pip-installable fork's code (upstream's snapshot predates it);
# --comfyui names the fork's export (bench/parity_fork.py).
CASES["tiny-qwenimage"] = (
    "Qwen-Image tiny test pipeline (sdlora.families.qwenimage.tiny: 2 blocks of 3 heads x 16, Qwen2.5-VL width 16 "
    "behind the byte-level Qwen tokenizer, 4-channel 3D-causal VAE)"
)
CASES["tiny-qwenedit"] = "Qwen-Image-Edit tiny test pipeline (sdlora.families.qwenedit.tiny), trained text-to-image"
FAMILY |= {"tiny-qwenimage": "qwenimage", "tiny-qwenedit": "qwenedit"}
QWEN = ("qwenimage", "qwenedit")
FORK_FAMILIES = ("zimage", "klein", *QWEN)  # rendered by the fork (parity_fork), the others by upstream
TEXT_ENCODER_LORA = ("sd1", "sd2", "sdxl")  # the other families train the transformer only
# FLUX.1 [schnell]; a LoRA on Flux's CLIP-L too (LoraLoader); pivotal tuning through the workflow (embedding:me_emb,
# the demo's recipe on the toy base, one prompt at seeds generate.seed + i: the workflow's KSampler seeds set so).
CASES |= {
    "tiny-flux-schnell": "FLUX.1 [schnell] tiny (the tiny Flux without guidance embedding, its scheduler's static "
    "shift 1)",
    "tiny-flux-te": "FLUX.1 [dev] tiny with a LoRA on CLIP-L too (--train-text-encoder; T5 never trains), 256 T5 "
    "tokens",
    "toy-pivotal": "SD 1.x toy base, the demo's recipe (pivotal tuning, rank 16 / alpha 16, batch 4, lr 3e-3, 300 "
    "steps, class-image preservation): embedding:me_emb in the workflow, one prompt at 8 seeds",
}
FAMILY |= {"tiny-flux-schnell": "flux", "tiny-flux-te": "flux", "toy-pivotal": "sd1"}
DEMO = ("lora.rank=16", "lora.alpha=16.0", "train.batch_size=4", "train.pivotal=true", "train.steps=300",
        "train.sample_every=300", "train.pivotal_learning_rate=3e-3", "train.preservation='auto'",
        "lora.targets='attention'")  # fmt: skip
EXTRA |= {"tiny-flux-te": EXTRA["tiny-flux"], "toy-pivotal": [a for s in DEMO for a in ("--set", s)]}
LATENT_SCALE |= {"toy-pivotal": 4}
TEXT = {"tiny-flux-te"}  # Flux cases whose LoRA covers CLIP-L
SEEDED = {"toy-pivotal"}
BASES["tiny-flux-schnell"] = ("sdlora.families.flux.tiny", "tiny_flux_pipeline", {"schnell": True})
# Real widths, reduced depth (bench/_models.py's pipelines; bench/parity_real.py): ComfyUI detects the published model
# classes itself. Few sampling steps (8) to fit a shared CPU; run with --steps 10 --seeds 2 (docs/parity.md).
REAL = {"real-flux": "flux", "real-zimage": "zimage", "real-sd15": "sd15", "real-klein": "klein"}
CASES |= {
    "real-flux": "FLUX.1 [dev] at its real widths (hidden 3072, CLIP-L, T5-XXL 4096, the 16-channel AE), 1 double + "
    "2 single blocks, T5 2 layers; 256 T5 tokens",
    "real-zimage": "Z-Image (Base) at its real widths (dim 3840, Qwen3-4B 2560, the FLUX.1 AE), 2 layers + 1 refiner "
    "layer each side, Qwen3 2 layers",
    "real-sd15": "SD 1.5's published architecture, every layer (UNet 320-640-1280-1280, CLIP-L, the SD VAE)",
    "real-klein": "FLUX.2 [klein] 4B at its real widths (hidden 3072, text 7680, the 32-channel FLUX.2 AE), 1 double "
    "+ 2 single blocks, Qwen3 27 narrow layers",
}
FAMILY |= {"real-flux": "flux", "real-zimage": "zimage", "real-sd15": "sd1", "real-klein": "klein"}
BASES |= {case: ("_models", "build_pipeline", {"model": model}) for case, model in REAL.items()}
EXTRA |= {case: ["--set", "train.sample_steps=8"] for case in REAL}
EXTRA["real-flux"] += EXTRA["tiny-flux"]


def base_folder(case: str, folder: Path) -> Path:
    import importlib

    from sdlora import testing
    from sdlora.demo.base import restore_packaged

    if case in BASES:
        module, name, kwargs = BASES[case]
        getattr(importlib.import_module(module), name)(**kwargs).save_pretrained(folder, safe_serialization=True)
        return folder
    return restore_packaged(folder) if case.startswith("toy") else testing.save_tiny_pipeline(FAMILY[case], folder)


def dataset(folder: Path) -> Path:
    """The toy subject's 64 px renders with captions and prep's config.json: a dataset `sdlora train` reads."""
    from sdlora.demo import toy

    toy.write_subject_photos(folder / "photos")
    folder.mkdir(exist_ok=True)
    for path in sorted((folder / "photos").glob("*.png")):
        shutil.copy(path, folder / path.name)
        (folder / path.with_suffix(".txt").name).write_text(PROMPT, encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"prep": {"token": "sks", "class_word": "person"}}))
    return folder


def sample_prompts(n: int) -> list[str]:
    return [
        PROMPTS[i % len(PROMPTS)] + (f", take {i // len(PROMPTS) + 1}" if i >= len(PROMPTS) else "") for i in range(n)
    ]


def train(data: Path, base: Path, out: Path, steps: int, seeds: int, extra: list[str], text: bool) -> None:
    from typer.testing import CliRunner

    from sdlora.cli import app

    args = [
        "train", str(data), str(out), "--base", str(base), "--steps", str(steps), "--resolution", "64",
        "--rank", "8", "--alpha", "4", "--lr", "3e-3",
        "--sample-every", str(steps), "--eval-every", "0", "--name", "me", "--no-pivotal", "--preservation", "none",
        "--set", "train.sample_steps=20", "--set", "generate.cfg=4.0", "--set", "train.sample_like='comfyui'",
        "--set", f"train.sample_prompts={sample_prompts(seeds)!r}", "--set", "lora.targets='all'",
    ]  # fmt: skip
    args += ["--train-text-encoder", "--text-encoder-lr", "1e-3"] if text else []
    result = CliRunner().invoke(app, args + extra)
    if result.exit_code != 0:
        raise SystemExit(f"train failed:\n{result.output}")


def samples(workflow: dict[str, Any], emb: Path) -> list[tuple[str, int, str]]:
    """(prompt, seed, SaveImage prefix) of each image of an API-format workflow, in order; the prompt as sdlora
    writes it (pivotal tuning's `embedding:NAME_emb` back to the trigger word of `emb`, where it exists)."""
    from sdlora.lora import embeddings

    found = embeddings.read(emb) if emb.exists() else None
    out = []
    for spec in workflow.values():
        if spec["class_type"] != "SaveImage":
            continue
        sampler = workflow[workflow[spec["inputs"]["images"][0]]["inputs"]["samples"][0]]["inputs"]
        if "guider" in sampler:  # SamplerCustomAdvanced: the seed in RandomNoise, the prompts in CFGGuider
            seed = workflow[sampler["noise"][0]]["inputs"]["noise_seed"]
            sampler = workflow[sampler["guider"][0]]["inputs"] | {"seed": seed}
        positive = workflow[sampler["positive"][0]]["inputs"]
        while "text" not in positive and "prompt" not in positive:  # FluxGuidance & co between prompt and sampler
            positive = workflow[positive["conditioning"][0]]["inputs"]
        prompt = positive.get("text", positive.get("prompt"))  # CLIPTextEncode's, TextEncodeQwenImageEditPlus's
        prompt = prompt.replace(f"embedding:{emb.stem}", found.word) if found else prompt
        out.append((prompt, sampler["seed"], spec["inputs"]["filename_prefix"]))
    return out


def to_array(image: Any) -> np.ndarray:
    """A PIL image or ComfyUI's (1, H, W, 3) tensor as SaveImage writes it: uint8 (H, W, 3)."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    return np.clip(255.0 * image[0].float().numpy(), 0, 255).astype(np.uint8)


def image_diff(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    diffs = [np.abs(x.astype(float) - y.astype(float)) / 255.0 for x, y in zip(a, b, strict=True)]
    return {"max": float(max(d.max() for d in diffs)), "mean": float(np.mean([d.mean() for d in diffs]))}


def identity(images: list[np.ndarray]) -> dict[str, Any]:
    """The toy world's reading against the demo's subject: exact share and attribute agreement."""
    from PIL import Image

    from sdlora.demo import toy
    from sdlora.faces import toyworld as world

    readings = [world.read(Image.fromarray(i)) for i in images]
    exact = sum(r.valid and r.identity == toy.SUBJECT for r in readings)
    agreement = sum(world.agreement(r.identity, toy.SUBJECT) for r in readings) / len(readings)
    return {"exact": f"{exact}/{len(images)}", "agreement": round(agreement, 3)}


def sdlora_render(base: Path, lora: Path, config: Any, items: list[tuple[str, int, str]], fuse: Path | None):
    """sdlora's images (generate's loading, render_images); with `fuse`, the merged weights written there."""
    from sdlora import families
    from sdlora.generate.render import Sampling, load_for_rendering, render_images
    from sdlora.lora.files import Lora
    from sdlora.settings import ModelConfig

    pipe, family, adapters = load_for_rendering(ModelConfig(base=str(base)), [Lora(lora, 1.0, "me")])
    sampling = Sampling.for_training(config)
    images = render_images(pipe, [p for p, _, _ in items], [s for _, s, _ in items], sampling)
    pipe.disable_lora()  # the base alone, same settings: how much the LoRA changes the images
    without = render_images(pipe, [p for p, _, _ in items], [s for _, s, _ in items], sampling)
    pipe.enable_lora()
    if fuse is not None:
        # every model that can hold LoRA (Flux's fuse_lora fuses the transformer only by default, not CLIP-L)
        pipe.fuse_lora(components=list(pipe._lora_loadable_modules), adapter_names=adapters, lora_scale=1.0)
        pipe.unload_lora_weights()
        families.detect(pipe).save_single_file(pipe, fuse)
        if families.detect(pipe).name == "flux":  # CLIP-L beside it (its LoRA's weights, merged; else the base's)
            import parity_flux

            parity_flux.with_clip_l(fuse, parity_flux.clip_state(pipe), fuse)
    return [to_array(i) for i in images], sampling, [to_array(i) for i in without]


def diffusers_render(base: Path, lora: Path, sampling: Any, items: list[tuple[str, int, str]]) -> list[np.ndarray]:
    """diffusers alone: from_pretrained (the pipeline class of the folder), load_lora_weights(lora) and, with
    pivotal tuning, load_textual_inversion of me_emb.safetensors (the trigger word written as its token), sdlora's
    render settings."""
    from diffusers import DiffusionPipeline

    from sdlora.families import stand_ins
    from sdlora.generate.render import render_images
    from sdlora.lora import embeddings

    # stand_ins: Qwen-Image-Edit's processor without torchvision ({} for the others)
    pipe = DiffusionPipeline.from_pretrained(str(base), **stand_ins(str(base), {}))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p, _, _ in items]
    emb = lora.with_name("me_emb.safetensors")
    found = embeddings.read(emb) if emb.exists() else None
    if found is not None:  # pivotal tuning: diffusers' textual inversion of the vectors, named as the file is
        pipe.load_textual_inversion(found.vectors["clip_l"], token="me_emb")
        prompts = [re.sub(rf"\b{re.escape(found.word)}\b", "me_emb", p) for p in prompts]
    return [to_array(i) for i in render_images(pipe, prompts, [s for _, s, _ in items], sampling)]


def weight_diffs(family: str, theirs: dict[str, tuple[Any, Any]], base_file: Path, merged_file: Path) -> dict[str, Any]:
    """ComfyUI's patched weights against sdlora's merged ones (`merged_file`, the base's single file written
    again after diffusers' fuse_lora), both files read under ComfyUI's names by ComfyUI's own conversion; per
    model: the largest difference of the weights, and of the weight changes (each against its own base weight:
    ComfyUI holds CLIP in fp16, so its CLIP weights differ from ours by fp16 rounding before any LoRA)."""
    import parity_comfy
    from safetensors.torch import load_file

    merged = parity_comfy.comfy_names(family, load_file(str(merged_file)))
    base = parity_comfy.comfy_names(family, load_file(str(base_file)))
    out: dict[str, Any] = {"weights_patched": len(theirs)}
    labels = (("unet", "diffusion_model."), ("text_encoder", "clip_l."), ("text_encoder", "clip_h."))
    for label, prefix in (*labels, ("text_encoder_2", "clip_g.")):
        keys = [k for k in theirs if k.startswith(prefix)]
        if not keys:
            continue
        full = max((theirs[k][1] - merged[k].float()).abs().max().item() for k in keys)
        change = max(
            ((theirs[k][1] - theirs[k][0]) - (merged[k].float() - base[k].float())).abs().max().item() for k in keys
        )
        largest = max((merged[k].float() - base[k].float()).abs().max().item() for k in keys)
        out[label] = {"weights": len(keys), "max_weight_diff": full, "max_change_diff": change, "max_change": largest}
    return out


def recheck_weights(root: Path, family: str) -> dict[str, Any]:
    """weight_diffs for a case folder kept by --keep (its checkpoint, LoRA and merged.st), without training or
    rendering again: ComfyUI's CheckpointLoaderSimple and LoraLoader only."""
    import parity_comfy

    workflow = json.loads((root / "out/me.comfyui.json").read_text())
    ckpt_name = workflow["1"]["inputs"]["ckpt_name"]
    with parity_comfy.tiny_loading(family, root / "base", root):
        sub = {"1": workflow["1"]}
        sub["2"] = {"class_type": "LoraLoader", "inputs": {
            "lora_name": "me.safetensors", "strength_model": 1.0, "strength_clip": 1.0, "model": ["1", 0],
            "clip": ["1", 1]}}  # fmt: skip
        saved = parity_comfy.execute(sub, {"checkpoints": root / "checkpoints", "loras": root / "out"})
    return weight_diffs(family, saved["_weights"], root / "checkpoints" / ckpt_name, root / "merged.st")


def comfy_files(
    family: str, base: Path, workflow: dict[str, Any], root: Path, reading: str = "comfyui"
) -> tuple[dict[str, Path], Any, Path]:
    """The base's files where the workflow's loaders look for them ({ComfyUI folder kind: folder}), the context
    that lets ComfyUI load the tiny models, and the model file (checkpoint or transformer)."""
    import parity_comfy
    import parity_flux
    import parity_zimage

    if root.name in REAL:  # the case's folder: real widths, ComfyUI's own detection
        import parity_real

        return parity_real.comfy_files(family, base, workflow, root)
    if family in parity_zimage.FAMILIES:
        folders = parity_zimage.write_files(family, base, workflow, root)
        unet = next(n["inputs"]["unet_name"] for n in workflow.values() if n["class_type"] == "UNETLoader")
        return folders, parity_zimage.tiny_loading(family, base), folders["diffusion_models"] / unet
    loaders = {n["class_type"]: n["inputs"] for n in workflow.values()}
    if family in QWEN:
        import parity_qwen

        from sdlora import families

        return parity_qwen.comfy_files(base, workflow, root, families.get(family))
    if family == "flux":
        name = loaders["UNETLoader"]["unet_name"]
        folders = parity_flux.write_files(base, name, root)
        from safetensors.torch import load_file

        clip = load_file(str(folders["text_encoders"] / parity_flux.CLIP_L))
        both = parity_flux.with_clip_l(folders["diffusion_models"] / name, clip, root / "base-and-clip.st")
        return folders, parity_flux.tiny_loading(base, root), both
    from sdlora import testing

    ckpt = testing.write_single_file(base, root / "checkpoints" / loaders["CheckpointLoaderSimple"]["ckpt_name"])
    return {"checkpoints": ckpt.parent}, parity_comfy.tiny_loading(family, base, root, reading), ckpt


def run_case(case: str, workdir: Path, steps: int, seeds: int) -> dict[str, Any]:
    import parity_comfy
    import parity_zimage
    import torch
    from safetensors.torch import load_file

    from sdlora.comfyui.workflow import problems
    from sdlora.config import Config

    started = time.time()
    root = workdir / case
    out, base, family = root / "out", root / "base", FAMILY[case]
    if not (out / "me.comfyui.json").exists():  # else a run --keep kept: measured again, not trained again
        base = base_folder(case, base)
        (root / "checkpoints").mkdir(parents=True)
        extra = EXTRA.get(case, []) + (["--set", f"train.sample_prompts={[PROMPT] * seeds!r}"] * (case in SEEDED))
        train(dataset(root / "data"), base, out, steps, seeds, extra, text=family in TEXT_ENCODER_LORA or case in TEXT)
    workflow = json.loads((out / "me.comfyui.json").read_text())
    for i, spec in enumerate(n for n in workflow.values() if case in SEEDED and n["class_type"] == "KSampler"):
        spec["inputs"]["seed"] += i  # the seed a user varies: the same prompt at seeds generate.seed + i
    assert not problems(workflow), problems(workflow)
    reading = "pipeline" if case.endswith("pipeline-reading") else "comfyui"
    folders, loading, ckpt_name = comfy_files(family, base, workflow, root, reading)
    folders["loras"] = folders["embeddings"] = out  # NAME.safetensors, and pivotal tuning's NAME_emb.safetensors
    config = Config.model_validate_json((out / "config.json").read_text())
    items = samples(workflow, out / "me_emb.safetensors")

    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        with loading, parity_comfy.recorded_noise() as noise:
            comfy = parity_comfy.execute(workflow, folders)
    finally:
        logging.getLogger().removeHandler(collect)
    lora_keys = load_file(str(out / "me.safetensors"))
    not_loaded = [m for m in collect.messages if m.startswith("lora key not loaded")]

    ours, sampling, without = sdlora_render(
        base, out / "pytorch_lora_weights.safetensors", config, items, root / "merged.st"
    )
    weights = weight_diffs(family, comfy["_weights"], ckpt_name, root / "merged.st")
    channels, factor = parity_zimage.LATENT.get(family, (4, LATENT_SCALE.get(case, 8)))
    if case in REAL:
        import parity_real

        channels, factor = parity_real.LATENT[family]
    latent = [1, channels, sampling.height // factor, sampling.width // factor]
    noise_equal = all(  # Qwen-Image's ComfyUI latent is 5-D (B, C, 1, H, W): the same values
        torch.equal(n.reshape(latent), torch.randn(latent, generator=torch.Generator().manual_seed(seed)))
        for seed, n in noise
    )
    theirs = [to_array(comfy[prefix]) for _, _, prefix in items]
    try:
        plain, diffusers_file = diffusers_render(base, out / "me.safetensors", sampling, items), "me.safetensors"
    except (AssertionError, ValueError) as error:  # diffusers' kohya Flux converter assumes FLUX.1's widths (3072)
        diffusers_note = f"load_lora_weights(me.safetensors) failed: {type(error).__name__} {error}".strip()
        plain = diffusers_render(base, out / "pytorch_lora_weights.safetensors", sampling, items)
        diffusers_file = f"pytorch_lora_weights.safetensors ({diffusers_note})"
    result = {
        "case": case,
        "family": FAMILY[case],
        "about": CASES[case],
        "steps_trained": config.train.steps,
        "sampling": {
            "sampler": workflow["1"]["_meta"]["sdlora"]["sampler"],
            "steps": sampling.steps,
            "cfg": sampling.cfg,
        },
        "workflow_nodes": sorted({n["class_type"] for n in workflow.values()}),
        "lora_keys_in_file": len(lora_keys),
        "lora_keys_used": len(lora_keys) - len(not_loaded),
        "not_loaded_examples": not_loaded[:3],
        **weights,
        "noise_equal": noise_equal and len(noise) == len(items),
        "comfyui_vs_sdlora": image_diff(theirs, ours),
        "diffusers_vs_sdlora": image_diff(plain, ours),
        "diffusers_file": diffusers_file,
        "lora_effect": image_diff(without, ours),  # sdlora's base alone vs with the LoRA, the same settings
        "seconds": round(time.time() - started, 1),
    }
    if family in QWEN:  # what the difference is made of (docs/parity.md)
        import parity_qwen

        others = {}  # the Edit workflow as written before: its prompts through CLIPTextEncode (Qwen-Image's template)
        if family == "qwenedit":
            others["comfyui_clip_text_encode"] = parity_qwen.with_clip_text_encode(workflow, base, folders, root)
        lora = out / "pytorch_lora_weights.safetensors"
        result["explained"] = parity_qwen.explain(base, lora, items, sampling, theirs, others)
    if case.startswith("toy"):
        result["identity"] = {"sdlora": identity(ours), "comfyui": identity(theirs), "diffusers": identity(plain)}
    with contextlib.suppress(Exception):
        from PIL import Image

        sheet = np.concatenate([np.concatenate(ours, 1), np.concatenate(theirs, 1)], 0)
        Image.fromarray(sheet).save(workdir / f"parity-{case}.png")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (upstream, or the fork)")
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="images per case (sample prompts, one seed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--keep", type=Path, help="work in this folder (kept) instead of a temporary one; a case trained there "
        "before is measured again without training",
    )  # fmt: skip
    parser.add_argument("--recheck-weights", type=Path, help="only the weight comparison, for a --keep case folder")
    options = parser.parse_args()
    import parity_comfy
    import parity_fork

    fork = parity_fork.is_fork(options.comfyui)  # the pip-installable fork: its own layout
    wrong = [case for case in options.case if (FAMILY[case] in FORK_FAMILIES) != fork]
    if wrong:
        raise SystemExit(
            f"error: --comfyui {options.comfyui} is {'the fork' if fork else 'upstream ComfyUI'}; "
            f"run {' '.join(wrong)} with {'upstream' if fork else 'the fork (bench/parity_fork.py)'}"
        )
    (parity_fork.import_fork if fork else parity_comfy.import_comfy)(options.comfyui)
    if options.recheck_weights:
        case = options.case[0] if len(options.case) == 1 else "tiny-sd1"
        print(json.dumps(recheck_weights(options.recheck_weights, FAMILY[case]), indent=2))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = options.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for case in options.case:
            results.append(run_case(case, workdir, options.steps, options.seeds))
            print(json.dumps(results[-1], indent=2), flush=True)
    print(table(results))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n")


def table(results: list[dict[str, Any]]) -> str:
    head = "| case | keys used / total | max weight diff | ComfyUI vs sdlora image max / mean | diffusers vs sdlora "
    head += "| identity sdlora / ComfyUI (exact, agreement) |\n|---|---|---|---|---|---|"
    rows = [head]
    for r in results:
        c, d = r["comfyui_vs_sdlora"], r["diffusers_vs_sdlora"]
        ident = r.get("identity")
        who = f"{ident['sdlora']['exact']} {ident['sdlora']['agreement']:.2f} / " if ident else "n/a"
        who += f"{ident['comfyui']['exact']} {ident['comfyui']['agreement']:.2f}" if ident else ""
        names = (("unet", "model"), ("text_encoder", "CLIP"), ("text_encoder_2", "CLIP-G"))
        w = ", ".join(
            f"{label} {r[k]['max_weight_diff']:.1e} (change {r[k]['max_change_diff']:.1e})"
            for k, label in names
            if k in r
        )
        rows.append(
            f"| {r['case']} | {r['lora_keys_used']} / {r['lora_keys_in_file']} | {w} "
            f"| {c['max']:.3f} / {c['mean']:.4f} | {d['max']:.3f} / {d['mean']:.4f} | {who} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
