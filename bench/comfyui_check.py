"""Load our LoRA files with ComfyUI's own loader on the full SD 1.5 / SDXL architectures and on Flux.1's widths.

ComfyUI is never a dependency of sdlora: check it out outside the repo and run this with a Python that can
import both (e.g. a separate venv that adds ComfyUI's requirements on top of ours):

    PYTHONPATH=$PWD:/tmp/comfyui /tmp/comfy-venv/bin/python bench/comfyui_check.py --family sd1 sdxl flux

For each family: the diffusers UNet and CLIP text encoder(s) are built from the published configs on the meta
device (no weights, no download), LoRA is attached with peft (UNet attention + projection + feed-forward
layers, every text-encoder attention projection), `sdlora.lora.kohya` writes the kohya file, and ComfyUI builds its
own model objects from an original-format checkpoint state dict of the same architecture (tensors are
broadcast zeros: no memory). `comfy.sd.load_lora_for_models` then patches them; we count the keys it used and
skipped (it logs "lora key not loaded" for each skipped key) and compare each patched weight's change with
up @ down * alpha / rank computed from our file.

Flux (`--family flux`): FLUX.1-dev's widths (hidden 3072, 24 heads x 128) with 2 double and 2 single blocks on
the meta device, LoRA on every target of `lora.targets = "all"` plus CLIP-L; both of our files, the kohya one
(BFL names, fused q/k/v, `.alpha` keys, `lora_te1_`) and the diffusers one (`transformer.` keys), against
ComfyUI's Flux model built from a BFL state dict of broadcast zeros, and its CLIP-L.

Z-Image, FLUX.2 [klein] and Qwen-Image (`--family zimage klein qwenimage`: bench/comfyui_dit.py) need the
pip-installable fork hiddenswitch/pip-and-uv-installable-ComfyUI (`git archive` of its repo into /tmp/comfy-fork; a
venv over ours plus ConfigArgParse einops frozendict humanize natsort gguf sentencepiece protobuf av, and comfy-aimdo
comfy-kitchen with --no-deps). Stand-ins while importing: torchvision (below) and the fork's comfy.cmd.main_pre (its
tracing set-up: comfyui_dit.stub_fork_startup). PYTHONPATH=$PWD:$PWD/bench:/tmp/comfy-fork.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import comfyui_dit
import torch
from _models import CLIP_COMMON, CLIP_G, CLIP_L, SD15_UNET, SDXL_UNET
from comfyui_dit import Collect
from flux_models import flux_transformer

RANK, ALPHA = 8, 4.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def build_models(family: str, kind: str = "lora"):
    """Diffusers UNet and text encoder(s) on the meta device, with peft LoRA layers holding real random weights
    (`kind` dora or lokr: the adapters only, their tensors set by comfyui_adapters.randomise)."""
    import peft
    from comfyui_adapters import peft_config
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = CLIP_COMMON
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L, **common))]
        if family == "sdxl":
            config = CLIPTextConfig(**CLIP_G, **common, projection_dim=1280, pad_token_id=0)
            encoders.append(CLIPTextModelWithProjection(config))
        if kind != "lora":
            unet.add_adapter(peft_config(kind, RANK, ALPHA, UNET_TARGETS))
            for encoder in encoders:
                encoder.add_adapter(peft_config(kind, RANK, ALPHA, TE_TARGETS))
            return unet, encoders
        unet.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS))
        for encoder in encoders:
            encoder.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS))
    generator = torch.Generator().manual_seed(0)
    for model in (unet, *encoders):
        for module in model.modules():
            for name in ("lora_A", "lora_B"):
                for layer in getattr(module, name, {}).values():
                    shape = layer.weight.shape
                    layer.weight = torch.nn.Parameter(torch.randn(shape, generator=generator) / shape[1] ** 0.5)
    return unet, encoders


def zeros_like_meta(state: dict) -> dict:
    """Broadcast zeros with each tensor's shape: a checkpoint-shaped state dict that costs no memory."""
    return {key: torch.zeros((), dtype=torch.float16).expand(t.shape) for key, t in state.items()}


def original_checkpoint(family: str, unet, encoders) -> dict:
    """The state dict of an original-format (SGM/LDM) checkpoint of this architecture, converted by ComfyUI."""
    import comfy.diffusers_convert
    import comfy.model_detection
    import comfy.utils

    from sdlora.families.clip_keys import text_encoder_path

    unet_sd = zeros_like_meta({k: v for k, v in unet.state_dict().items() if "lora_" not in k and "lokr_" not in k})
    unet_sd = {k.replace(".base_layer.", "."): v for k, v in unet_sd.items()}
    to_original = comfy.utils.unet_to_diffusers(comfy.model_detection.unet_config_from_diffusers_unet(unet_sd))
    missing = sorted(set(unet_sd) - set(to_original))
    if missing:
        raise SystemExit(f"ComfyUI has no original name for {len(missing)} UNet keys, e.g. {missing[:3]}")
    checkpoint = {f"model.diffusion_model.{to_original[k]}": v for k, v in unet_sd.items()}
    te_sds = []
    for encoder in encoders:
        sd = zeros_like_meta({k: v for k, v in encoder.state_dict().items() if "lora_" not in k and "lokr_" not in k})
        te_sds.append({text_encoder_path(k.replace(".base_layer.", ".")): v for k, v in sd.items()})
    if family == "sdxl":
        checkpoint |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in te_sds[0].items()}
        open_clip = comfy.diffusers_convert.convert_text_enc_state_dict_v20(
            {f"transformer.{k}": v for k, v in te_sds[1].items()}
        )
        checkpoint |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip.items()}
    else:
        checkpoint |= {f"cond_stage_model.transformer.{k}": v for k, v in te_sds[0].items()}
    return checkpoint


def check_deltas(patcher, lora: dict, peft_scale: float | None = None) -> tuple[int, float]:
    """(patched weights, largest relative error) of ComfyUI's weight change against up @ down * alpha / rank
    (kohya keys), or B @ A * `peft_scale` (peft's alpha / r, for files with lora_A/lora_B keys)."""
    import comfy.lora
    import comfy.utils

    worst = 0.0
    # Each ComfyUI LoRA adapter holds our tensors themselves: find the module name by identity.
    ups = (".lora_up.weight", ".lora_B.weight")
    names = {id(t): k for k, t in lora.items() if k.endswith(ups)}
    for key, patches in patcher.patches.items():
        weight = comfy.utils.get_attr(patcher.model, key).detach().float()
        delta = comfy.lora.calculate_weight(patches, weight.clone(), key) - weight
        covered = torch.zeros_like(delta, dtype=torch.bool)
        # Several patches on one weight: Flux's diffusers q, k and v, each a slice (offset) of the fused qkv.
        for _, adapter, _, offset, _ in patches:
            up_key = names[id(adapter.weights[0])]
            up = lora[up_key].float()
            if up_key.endswith(".lora_B.weight"):
                down = lora[up_key.replace(".lora_B.", ".lora_A.")].float()
                scale = peft_scale if peft_scale is not None else 1.0
            else:
                name = up_key.removesuffix(".lora_up.weight")
                down = lora[f"{name}.lora_down.weight"].float()
                scale = lora[f"{name}.alpha"].item() / down.shape[0]
            expected = (up.flatten(1) @ down.flatten(1)) * scale
            part, seen = (delta, covered) if offset is None else (delta.narrow(*offset), covered.narrow(*offset))
            seen.fill_(True)
            error = (part - expected.reshape(part.shape)).abs().max() / expected.abs().max()
            worst = max(worst, error.item())
        if not covered.all():  # rows no patch of ours should change must be unchanged
            worst = max(worst, float(delta[~covered].abs().max() > 0))
    return len(patcher.patches), worst


def check(family: str, workdir: Path) -> dict:
    import comfy.sd
    import comfy.utils

    from sdlora.lora import kohya
    from sdlora.models import ModelInfo

    started = time.time()
    unet, encoders = build_models(family)
    state = kohya.kohya_state_dict(unet, encoders, family)
    info = ModelInfo(family=family, prediction_type="epsilon", vae_scale_factor=8)
    metadata = kohya.build_metadata(
        info, name=f"check-{family}", rank=RANK, alpha=ALPHA, steps=1, learning_rate=1e-4,
        resolution=1024 if family == "sdxl" else 512, num_train_images=1, trigger_phrase="sks person",
        started_at=started, finished_at=time.time(), text_encoder_trained=True,
    )  # fmt: skip
    path = workdir / f"check-{family}.safetensors"
    kohya.save_kohya(path, state, metadata)
    peft_modules = {"unet": len(list(kohya.lora_layers(unet)))}
    peft_modules |= {f"text_encoder_{i + 1}": len(list(kohya.lora_layers(e))) for i, e in enumerate(encoders)}
    checkpoint = original_checkpoint(family, unet, encoders)
    del unet, encoders

    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        dtype = {"dtype": torch.float16} if family == "sdxl" else {}  # SDXL in fp32 needs 14 GB: half of this machine
        model, clip, _, _ = comfy.sd.load_state_dict_guess_config(
            checkpoint, output_vae=False, model_options=dtype, te_model_options=dtype
        )
        del checkpoint
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)  # how ComfyUI reads a LoRA file
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(collect)
    skipped = [m for m in collect.messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
    unet_patched, unet_error = check_deltas(new_model, lora)
    clip_patched, clip_error = check_deltas(new_clip.patcher, lora)
    return {
        "family": family,
        "comfyui_model": type(model.model).__name__,
        "keys_in_file": len(lora),
        "keys_skipped": len(skipped),
        "skipped_examples": skipped[:5],
        "peft_modules": peft_modules,
        "unet_weights_patched": unet_patched,
        "text_encoder_weights_patched": clip_patched,
        "max_relative_delta_error_unet": unet_error,
        "max_relative_delta_error_text_encoders": clip_error,
        "other_warnings": [m for m in collect.messages if m not in skipped][:5],
        "seconds": round(time.time() - started, 1),
    }


def build_flux():
    """Flux transformer (real widths, 2 + 2 blocks) and CLIP-L on the meta device, LoRA with random weights."""
    import peft
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora import families

    flux = families.get("flux")
    transformer = flux_transformer(double=2, single=2)
    with torch.device("meta"):
        encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **CLIP_COMMON))
        transformer.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=flux.denoiser_targets("all")))
        encoder.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS))
    generator = torch.Generator().manual_seed(0)
    for model in (transformer, encoder):
        for module in model.modules():
            for name in ("lora_A", "lora_B"):
                for layer in getattr(module, name, {}).values():
                    shape = layer.weight.shape
                    layer.weight = torch.nn.Parameter(torch.randn(shape, generator=generator) / shape[1] ** 0.5)
    return transformer, encoder


def load_in_comfy(state: dict, load) -> tuple[Any, Any, list[str]]:
    """ComfyUI's loader `load(lora_state)` on a LoRA state dict, with the warnings it logged."""
    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        patched = load(state)
    finally:
        logging.getLogger().removeHandler(collect)
    return patched, collect.messages


def check_flux(workdir: Path) -> dict:
    import comfy.sd
    import comfy.utils

    from sdlora.families.flux.keys import to_bfl
    from sdlora.lora import kohya
    from sdlora.lora.peft import save_diffusers

    started = time.time()
    transformer, encoder = build_flux()
    state = kohya.kohya_state_dict(transformer, [encoder], "flux")
    path = workdir / "check-flux.safetensors"
    kohya.save_kohya(path, state, {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"})
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    diffusers_path = workdir / "pytorch_lora_weights.safetensors"
    models = {"transformer": transformer, "text_encoder": encoder}
    save_diffusers(diffusers_path, FluxPipeline, models, {"sdlora.family": "flux"}, for_comfyui=True)
    diffusers_state = load_file(str(diffusers_path))
    peft_modules = {
        "transformer": len(list(kohya.lora_layers(transformer))),
        "clip_l": len(list(kohya.lora_layers(encoder))),
    }
    base = {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if "lora_" not in k}
    checkpoint = zeros_like_meta(to_bfl(base))
    clip_sd = zeros_like_meta(
        {
            kohya.text_encoder_path(k.replace(".base_layer.", ".")): v
            for k, v in encoder.state_dict().items()
            if "lora_" not in k
        }
    )
    del transformer, encoder
    model = comfy.sd.load_diffusion_model_state_dict(checkpoint, model_options={"dtype": torch.float16})
    clip = comfy.sd.load_text_encoder_state_dicts([clip_sd], model_options={"dtype": torch.float16})
    del checkpoint
    results = {"family": "flux", "comfyui_model": type(model.model).__name__, "peft_modules": peft_modules}
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    (new_model, new_clip), messages = load_in_comfy(
        lora, lambda sd: comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    )
    skipped = [m for m in messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
    unet_patched, unet_error = check_deltas(new_model, lora)
    clip_patched, clip_error = check_deltas(new_clip.patcher, lora)
    results |= {
        "kohya_keys_in_file": len(lora), "kohya_keys_skipped": len(skipped), "skipped_examples": skipped[:5],
        "kohya_transformer_weights_patched": unet_patched, "kohya_clip_weights_patched": clip_patched,
        "kohya_max_relative_delta_error": max(unet_error, clip_error),
    }  # fmt: skip
    (new_model, new_clip), messages = load_in_comfy(
        diffusers_state, lambda sd: comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    )
    skipped = [m for m in messages if m.startswith(("lora key not loaded", "NOT LOADED"))]
    patched, error = check_deltas(new_model, diffusers_state, peft_scale=ALPHA / RANK)
    clip_patched, clip_error = check_deltas(new_clip.patcher, diffusers_state, peft_scale=ALPHA / RANK)
    results |= {
        "diffusers_keys_in_file": len(diffusers_state), "diffusers_keys_skipped": len(skipped),
        "diffusers_skipped_examples": skipped[:5], "diffusers_transformer_weights_patched": patched,
        "diffusers_clip_weights_patched": clip_patched,
        "diffusers_max_relative_delta_error": max(error, clip_error),
        "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    return results


def import_comfy() -> None:
    """Import ComfyUI's loader. ComfyUI imports torchvision at module level for models this check never builds;
    without it (our stack has none), a stand-in module is there only while comfy.sd imports, after transformers,
    peft and diffusers have seen that torchvision is absent."""
    import importlib.util
    import sys
    import types

    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    comfyui_dit.stub_fork_startup()  # the pip-installable fork only
    stub = importlib.util.find_spec("torchvision") is None
    if stub:
        for name in ("torchvision", "torchvision.models", "torchvision.transforms"):
            sys.modules[name] = types.ModuleType(name)
    try:
        import comfy.sd  # noqa: F401
    finally:
        if stub:
            for name in ("torchvision", "torchvision.models", "torchvision.transforms"):
                sys.modules.pop(name, None)


def main() -> None:
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # before comfy.model_management is imported: no CUDA here
    import_comfy()
    from sdlora.lora.kinds import KINDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    families = ["sd1", "sdxl", "flux", "zimage", "klein", "qwenimage"]
    parser.add_argument("--family", nargs="+", choices=families, default=["sd1"])
    parser.add_argument("--adapter", choices=list(KINDS), default="lora", help="lora.kind to check")
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    if options.adapter != "lora":
        return adapter_main(options)
    dits = [f for f in options.family if f in comfyui_dit.FAMILY_ARCHS]  # Z-Image, klein: bench/comfyui_dit.py
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in (f for f in options.family if f not in dits):
            result = check_flux(Path(tmp)) if family == "flux" else check(family, Path(tmp))
            results.append(result)
            print(json.dumps(result, indent=2))
        results += comfyui_dit.run(dits, Path(tmp)) if dits else []
    legacy = [r for r in results if "keys_in_file" in r]
    if legacy:
        print(f"{'family':6} {'keys':>5} {'skipped':>7} {'peft modules':>13} {'patched':>8} {'max rel err':>11}")
    for r in legacy:
        peft_total = sum(r["peft_modules"].values())
        patched = r["unet_weights_patched"] + r["text_encoder_weights_patched"]
        error = max(r["max_relative_delta_error_unet"], r["max_relative_delta_error_text_encoders"])
        print(f"{r['family']:6} {r['keys_in_file']:5} {r['keys_skipped']:7} {peft_total:13} {patched:8} {error:11.2e}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


def adapter_main(options) -> None:
    """--adapter dora|lokr: comfyui_adapters.check_adapter per family; Flux shows sdlora's refusal instead."""
    from comfyui_adapters import check_adapter

    from sdlora import config, families
    from sdlora.errors import UsageError
    from sdlora.lora import peft

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in options.family:
            if family == "flux":
                transformer = flux_transformer(double=1, single=1)
                try:
                    lora = config.LoraConfig(kind=options.adapter)
                    peft.check_exportable(lora, transformer, families.get("flux"))
                except UsageError as exc:
                    results.append({"family": family, "adapter": options.adapter, "refused": str(exc)})
            else:
                args = (build_models, original_checkpoint, Collect)
                results.append(check_adapter(family, options.adapter, Path(tmp), *args))
            print(json.dumps(results[-1], indent=2))
    head = f"{'family':6} {'adapter':7} {'keys':>5} {'skipped':>7} {'patched':>8}"
    print(f"{head} {'err vs trained':>14} {'vs formula':>10}")
    for r in (r for r in results if "keys_in_file" in r):
        patched = r["unet"]["weights_patched"] + r["text_encoders"]["weights_patched"]
        error = max(r["unet"]["max_relative_error_vs_trained"], r["text_encoders"]["max_relative_error_vs_trained"])
        formula = max(
            r[m].get("max_relative_error_vs_comfyui_formula", float("nan")) for m in ("unet", "text_encoders")
        )
        print(f"{r['family']:6} {r['adapter']:7} {r['keys_in_file']:5} {r['keys_skipped']:7} {patched:8} "
              f"{error:14.2e} {formula:10.2e}")  # fmt: skip
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
