"""Load our kohya-format LoRA with ComfyUI's own loader on the full SD 1.5 / SDXL architectures (random weights).

ComfyUI is never a dependency of sdlora: check it out outside the repo and run this with a Python that can
import both (e.g. a separate venv that adds ComfyUI's requirements on top of ours):

    PYTHONPATH=$PWD:/tmp/comfyui /tmp/comfy-venv/bin/python bench/comfyui_check.py --family sd1 sdxl

For each family: the diffusers UNet and CLIP text encoder(s) are built from the published configs on the meta
device (no weights, no download), LoRA is attached with peft (UNet attention + projection + feed-forward
layers, every text-encoder attention projection), `sdlora.lora.kohya` writes the kohya file, and ComfyUI builds its
own model objects from an original-format checkpoint state dict of the same architecture (tensors are
broadcast zeros: no memory). `comfy.sd.load_lora_for_models` then patches them; we count the keys it used and
skipped (it logs "lora key not loaded" for each skipped key) and compare each patched weight's change with
up @ down * alpha / rank computed from our file.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from _models import CLIP_COMMON, CLIP_G, CLIP_L, SD15_UNET, SDXL_UNET

RANK, ALPHA = 8, 4.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def build_models(family: str):
    """Diffusers UNet and text encoder(s) on the meta device, with peft LoRA layers holding real random weights."""
    import peft
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = CLIP_COMMON
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET))
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L, **common))]
        if family == "sdxl":
            config = CLIPTextConfig(**CLIP_G, **common, projection_dim=1280, pad_token_id=0)
            encoders.append(CLIPTextModelWithProjection(config))
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

    from sdlora.lora.kohya import text_encoder_path

    unet_sd = zeros_like_meta({k: v for k, v in unet.state_dict().items() if "lora_" not in k})
    unet_sd = {k.replace(".base_layer.", "."): v for k, v in unet_sd.items()}
    to_original = comfy.utils.unet_to_diffusers(comfy.model_detection.unet_config_from_diffusers_unet(unet_sd))
    missing = sorted(set(unet_sd) - set(to_original))
    if missing:
        raise SystemExit(f"ComfyUI has no original name for {len(missing)} UNet keys, e.g. {missing[:3]}")
    checkpoint = {f"model.diffusion_model.{to_original[k]}": v for k, v in unet_sd.items()}
    te_sds = []
    for encoder in encoders:
        sd = zeros_like_meta({k: v for k, v in encoder.state_dict().items() if "lora_" not in k})
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


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_deltas(patcher, lora: dict) -> tuple[int, float]:
    """(patched weights, largest relative error) of ComfyUI's weight change against up @ down * alpha / rank."""
    import comfy.lora
    import comfy.utils

    worst = 0.0
    # Each ComfyUI LoRA adapter holds our tensors themselves: find the module name by identity.
    names = {id(t): k.removesuffix(".lora_up.weight") for k, t in lora.items() if k.endswith(".lora_up.weight")}
    for key, patches in patcher.patches.items():
        weight = comfy.utils.get_attr(patcher.model, key).detach().float()
        changed = comfy.lora.calculate_weight(patches, weight.clone(), key)
        (_, adapter, _, offset, _) = patches[0]
        name = names[id(adapter.weights[0])]
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        expected = (up.flatten(1) @ down.flatten(1)) * lora[f"{name}.alpha"].item() / down.shape[0]
        delta = changed - weight
        if offset is not None:
            delta = delta.narrow(*offset)
        error = (delta - expected.reshape(delta.shape)).abs().max() / expected.abs().max()
        worst = max(worst, error.item())
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


def main() -> None:
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # before comfy.model_management is imported: no CUDA here
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=["sd1", "sdxl"], default=["sd1"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in options.family:
            result = check(family, Path(tmp))
            results.append(result)
            print(json.dumps(result, indent=2))
    print(f"{'family':6} {'keys':>5} {'skipped':>7} {'peft modules':>13} {'patched':>8} {'max rel err':>11}")
    for r in results:
        peft_total = sum(r["peft_modules"].values())
        patched = r["unet_weights_patched"] + r["text_encoder_weights_patched"]
        error = max(r["max_relative_delta_error_unet"], r["max_relative_delta_error_text_encoders"])
        print(f"{r['family']:6} {r['keys_in_file']:5} {r['keys_skipped']:7} {peft_total:13} {patched:8} {error:11.2e}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
