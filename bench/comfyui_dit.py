"""ComfyUI's own loader on sdlora's Z-Image, FLUX.2 [klein] and Qwen-Image LoRA files, at the real widths and
reduced depth.

Run through `bench/comfyui_check.py --family zimage klein qwenimage` (its docstring has the command and the
stand-ins). The upstream ComfyUI snapshots here predate these families; this needs the pip-installable fork
hiddenswitch/pip-and-uv-installable-ComfyUI (checked at 87606c5f, 2026-02-10), whose `comfy/` package has Z-Image
(as Lumina2, `utils.z_image_to_diffusers`), FLUX.2 (`model_base.Flux2`, the Flux key map) and Qwen-Image
(`model_base.QwenImage`, whose module names are diffusers' own).

For each architecture (`ARCHS`): the diffusers transformer at the real widths on the meta device, peft LoRA (rank 8,
alpha 4: alpha != rank) with random weights on every target of `lora.targets = "all"`; both files written by sdlora's
own writers as training writes them (`kohya.kohya_state_dict` + `save_kohya`: NAME.safetensors, which is the
family's `ui_lora_state` where it has one; `peft.save_diffusers`: pytorch_lora_weights.safetensors); ComfyUI's model
built by `comfy.sd.load_diffusion_model_state_dict` from the family's original-format names (`keys.to_original`,
`keys.to_bfl`) over broadcast zeros. Each file goes through `comfy.sd.load_lora_for_models`; we count the keys it
reports as not loaded and compare every patched weight, `comfy.lora.calculate_weight` on a random W, with
W + alpha/r * B @ A computed from the peft layers themselves (the scale the user trained), at the rows the family's
own renaming puts each layer in. `scale_ratio`: ComfyUI's weight change over the trained one (1.0 = the strength
trained; a file without `.alpha` and alpha/r not baked in loads at r/alpha times it).
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RANK, ALPHA = 8, 4.0
# Published transformer configs (Tongyi-MAI/Z-Image, black-forest-labs/FLUX.2-klein-4B and -9B, Qwen/Qwen-Image),
# depth reduced.
ZIMAGE = dict(dim=3840, n_layers=2, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560)
KLEIN = dict(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=128, guidance_embeds=False)
# Qwen-Image: hidden 3072 = 24 heads x 128, text width 3584, 64 input channels (diffusers' defaults are its config).
QWENIMAGE = dict(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=24)
QWENIMAGE |= dict(joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
ARCHS: dict[str, dict[str, Any]] = {
    "zimage": {
        "family": "zimage",
        "model": ("ZImageTransformer2DModel", ZIMAGE),
        "pipeline": "ZImagePipeline",
        "to_original": "sdlora.families.zimage.keys:to_original",
        "variant": "base",
    },
    "klein-4b": {
        "family": "klein",
        "model": ("Flux2Transformer2DModel", KLEIN | dict(num_attention_heads=24, joint_attention_dim=7680)),
        "pipeline": "Flux2KleinPipeline",
        "to_original": "sdlora.families.klein.keys:to_bfl",
        "variant": "4b-base",
    },
    "klein-9b": {
        "family": "klein",
        "model": ("Flux2Transformer2DModel", KLEIN | dict(num_attention_heads=32, joint_attention_dim=12288)),
        "pipeline": "Flux2KleinPipeline",
        "to_original": "sdlora.families.klein.keys:to_bfl",
        "variant": "9b-base",
    },
    "qwenimage": {
        "family": "qwenimage",
        "model": ("QwenImageTransformer2DModel", QWENIMAGE),
        "pipeline": "QwenImagePipeline",
        "to_original": "comfyui_dit:same_names",  # ComfyUI's Qwen-Image names are diffusers' (families/qwenimage/keys)
        "variant": "",
    },
}
FAMILY_ARCHS = {"zimage": ["zimage"], "klein": ["klein-4b", "klein-9b"], "qwenimage": ["qwenimage"]}


def same_names(state: dict[str, Any]) -> dict[str, Any]:
    """The original format of a family whose original names are diffusers' own (Qwen-Image)."""
    return dict(state)


def stub_fork_startup() -> None:
    """The fork's comfy.model_management imports `tracer` from comfy.cmd.main_pre, whose import parses the command
    line and sets up OpenTelemetry exporters and instrumentation (a dozen packages, network services). A stand-in
    module gives the loader what it uses of it: the parsed `args` and a tracer whose spans do nothing. Nothing on
    upstream ComfyUI, which has no comfy.cmd package."""
    import contextlib
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("comfy.cmd") is None or "comfy.cmd.main_pre" in sys.modules:
        return
    from comfy.cli_args import args

    class Span(contextlib.ContextDecorator):
        def __enter__(self) -> Span:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    stand_in = types.ModuleType("comfy.cmd.main_pre")
    stand_in.args = args
    stand_in.tracer = types.SimpleNamespace(start_as_current_span=lambda name, *a, **k: Span())
    sys.modules["comfy.cmd.main_pre"] = stand_in


def resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build(arch: str) -> Any:
    """The diffusers transformer of `arch` on the meta device with peft LoRA (RANK, ALPHA) on the family's
    `denoiser_targets("all")`, the LoRA tensors real and random."""
    import diffusers
    import peft
    import torch

    from sdlora import families

    spec = ARCHS[arch]
    name, config = spec["model"]
    targets = families.get(spec["family"]).denoiser_targets("all")
    with torch.device("meta"):
        transformer = getattr(diffusers, name)(**config)
        transformer.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    for module in transformer.modules():
        for attr in ("lora_A", "lora_B"):
            for layer in getattr(module, attr, {}).values():
                shape = layer.weight.shape
                layer.weight = torch.nn.Parameter(torch.randn(shape, generator=generator) / shape[1] ** 0.5)
    return transformer


def write_files(arch: str, transformer: Any, workdir: Path) -> tuple[Path, Path]:
    """NAME.safetensors and pytorch_lora_weights.safetensors as sdlora.train.outputs.save_loras writes them."""
    import diffusers
    import torch

    from sdlora import families
    from sdlora.lora import kohya, peft
    from sdlora.models import ModelInfo

    spec = ARCHS[arch]
    family = families.get(spec["family"])
    header = {"sdlora.family": family.name, "sdlora.trigger_phrase": "sks person"}
    diffusers_path = workdir / f"{arch}-pytorch_lora_weights.safetensors"
    pipeline = getattr(diffusers, spec["pipeline"])
    models = {"transformer": transformer}
    peft.save_diffusers(diffusers_path, pipeline, models, header, for_comfyui=family.comfyui_diffusers_file)
    info = ModelInfo(family=family.name, prediction_type="flow", vae_scale_factor=8, variant=spec["variant"])
    now = time.time()
    metadata = kohya.build_metadata(
        info, name=arch, rank=RANK, alpha=ALPHA, steps=1, learning_rate=1e-4, resolution=1024, num_train_images=1,
        trigger_phrase="sks person", started_at=now, finished_at=now, text_encoder_trained=False,
    )  # fmt: skip
    ui_path = workdir / f"{arch}.safetensors"
    kohya.save_kohya(ui_path, kohya.kohya_state_dict(transformer, [], family, dtype=torch.float32), metadata)
    return ui_path, diffusers_path


def base_state(transformer: Any) -> dict[str, Any]:
    """The transformer's own weights (meta tensors) under diffusers names, without peft's layers."""
    state = transformer.state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def lora_layers(transformer: Any) -> dict[str, Any]:
    """peft's LoRA layers by module path."""
    from peft.tuners.lora import LoraLayer

    return {path: m for path, m in transformer.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def module_rows(to_original: Callable, rows: dict[str, int]) -> dict[str, tuple[str, int]]:
    """Where each diffusers linear module's output rows land in the original-format state dict: {module: (original
    weight key, first row)}, found by passing row numbers through the family's own renaming (`to_original`:
    diffusers state dict -> original one, q/k/v fused)."""
    import torch

    numbered: dict[str, Any] = {}
    start = 0
    for module, count in rows.items():
        numbered[f"{module}.weight"] = torch.arange(start, start + count)
        start += count
    found: dict[int, tuple[str, int]] = {}
    for key, ids in to_original(numbered).items():
        for position, row in enumerate(ids.tolist()):
            found[row] = (key, position)
    where: dict[str, tuple[str, int]] = {}
    first = 0
    for module, count in rows.items():
        key, position = found[first]
        if found.get(first + count - 1) != (key, position + count - 1):
            raise ValueError(f"{module}: its rows are not contiguous in {key}")
        where[module] = (key, position)
        first += count
    return where


def expected_deltas(layers: dict[str, Any], where: dict[str, tuple[str, int]], prefix: str) -> dict[str, list]:
    """{ComfyUI weight key: [(first row, module)]}: which trained layers should change which rows."""
    out: dict[str, list] = {}
    for module in layers:
        key, row = where[module]
        out.setdefault(prefix + key, []).append((row, module))
    return out


def trained_delta(layer: Any) -> Any:
    """alpha/r * B @ A of one peft layer, fp32 (out, in): the weight change the user trained."""
    import torch

    a = layer.lora_A["default"].weight.detach().to(torch.float32)
    b = layer.lora_B["default"].weight.detach().to(torch.float32)
    return (b @ a) * float(layer.scaling["default"])


def compare(patcher: Any, layers: dict[str, Any], expected: dict[str, list]) -> dict[str, Any]:
    """ComfyUI's patched weights against W + the trained deltas, W random: largest absolute and relative errors,
    and the least-squares ratio of ComfyUI's change to the trained one."""
    import comfy.lora
    import comfy.utils
    import torch

    generator = torch.Generator().manual_seed(1)
    worst_abs = worst_rel = 0.0
    dot = norm = 0.0
    for key in sorted(set(patcher.patches) & set(expected)):
        shape = comfy.utils.get_attr(patcher.model, key).shape
        weight = torch.randn(shape, generator=generator)
        delta = comfy.lora.calculate_weight(patcher.patches[key], weight.clone(), key) - weight
        del weight
        want = torch.zeros_like(delta)
        for row, module in expected[key]:
            change = trained_delta(layers[module])
            want[row : row + change.shape[0]] = change
        worst_abs = max(worst_abs, (delta - want).abs().max().item())
        worst_rel = max(worst_rel, ((delta - want).abs().max() / want.abs().max()).item())
        dot += (delta * want).sum().item()
        norm += (want * want).sum().item()
    return {
        "weights_expected": len(expected),
        "weights_patched": len(patcher.patches),
        "expected_not_patched": sorted(set(expected) - set(patcher.patches))[:5],
        "patched_not_expected": sorted(set(patcher.patches) - set(expected))[:5],
        "max_abs_error": worst_abs,
        "max_relative_error": worst_rel,
        "scale_ratio": dot / norm if norm else float("nan"),
    }


def zeros_like_meta(state: dict[str, Any]) -> dict[str, Any]:
    """Broadcast zeros with each tensor's shape: a checkpoint-shaped state dict that costs no memory."""
    import torch

    return {key: torch.zeros((), dtype=torch.float16).expand(t.shape) for key, t in state.items()}


def not_loaded(messages: list[str]) -> tuple[int, list[str]]:
    """How many keys ComfyUI's "lora keys not loaded (N / M): [...]" warning names, and the first few."""
    import ast

    for message in messages:
        if "lora keys not loaded" in message:
            count = int(message.split("(", 1)[1].split("/", 1)[0])
            return count, ast.literal_eval(message.split("): ", 1)[1])[:5]
    return 0, []


class Collect(logging.Handler):
    """ComfyUI's warnings while it loads (keys it did not load are logged, not raised); the bench scripts share it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_arch(arch: str, workdir: Path) -> dict[str, Any]:
    """Both files of `arch` through ComfyUI's loader: keys used, keys not loaded, patched weights vs trained."""
    import comfy.sd
    import comfy.utils
    import torch

    started = time.time()
    transformer = build(arch)
    paths = write_files(arch, transformer, workdir)
    layers = lora_layers(transformer)
    to_original = resolve(ARCHS[arch]["to_original"])
    rows = {path: layer.base_layer.out_features for path, layer in layers.items()}
    expected = expected_deltas(layers, module_rows(to_original, rows), "diffusion_model.")
    checkpoint = zeros_like_meta(to_original(base_state(transformer)))
    model = comfy.sd.load_diffusion_model_state_dict(checkpoint, model_options={"dtype": torch.float16})
    del checkpoint
    result: dict[str, Any] = {
        "arch": arch,
        "family": ARCHS[arch]["family"],
        "comfyui_model": type(model.model).__name__,
        "lora_layers": len(layers),
    }
    for label, path in zip(("ui_file", "diffusers_file"), paths, strict=True):
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)  # how ComfyUI reads a LoRA file
        collect = Collect()
        logging.getLogger().addHandler(collect)
        try:
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 1.0)
        finally:
            logging.getLogger().removeHandler(collect)
        skipped, examples = not_loaded(collect.messages)
        result[label] = {
            "name": path.name,
            "keys_in_file": len(lora),
            "keys_loaded": len(lora) - skipped,
            "keys_not_loaded": skipped,
            "not_loaded_examples": examples,
            "has_alpha_keys": any(k.endswith(".alpha") for k in lora),
            "key_example": sorted(lora)[0],
        } | compare(patched, layers, expected)
        del patched, lora
    result["seconds"] = round(time.time() - started, 1)
    return result


def run(family_names: list[str], workdir: Path) -> list[dict[str, Any]]:
    """check_arch over every architecture of the named families; prints each result and a table."""
    import gc
    import json

    from sdlora import families

    missing = [name for name in family_names if name not in families.REGISTRY]
    if missing:
        raise SystemExit(f"error: this sdlora has no {', '.join(missing)} family (known: {', '.join(families.NAMES)})")
    results = []
    for name in family_names:
        for arch in FAMILY_ARCHS[name]:
            results.append(check_arch(arch, workdir))
            print(json.dumps(results[-1], indent=2), flush=True)
            gc.collect()
    head = f"{'arch':9} {'file':14} {'keys':>5} {'loaded':>6} {'not loaded':>10} {'patched':>7}"
    print(f"{head} {'max abs err':>11} {'scale':>6}")
    for r in results:
        for label in ("ui_file", "diffusers_file"):
            f = r[label]
            print(
                f"{r['arch']:9} {label:14} {f['keys_in_file']:5} {f['keys_loaded']:6} {f['keys_not_loaded']:10} "
                f"{f['weights_patched']:7} {f['max_abs_error']:11.2e} {f['scale_ratio']:6.3f}"
            )
    return results
