"""The adapter kinds' table (sdlora.lora.kinds): one row per lora.kind, each telling its own configs, layers and
files apart from the others'."""

from __future__ import annotations

import copy
import typing

import pytest
import torch

from sdlora import families
from sdlora.config import LoraConfig
from sdlora.lora import kinds, kohya


def test_one_row_per_config_kind():
    assert set(kinds.KINDS) == set(typing.get_args(LoraConfig.model_fields["kind"].annotation))
    assert all(name == row.name for name, row in kinds.KINDS.items())


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_each_row_knows_its_own_config_layers_and_files(name):
    row = kinds.KINDS[name]
    config = row.peft_config(4, 4.0, 0.0, ["to_q"])
    assert kinds.config_kind(config) == name
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(8, 8))
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config, model)
    assert [kinds.layer_kind(m) for m in model.modules() if kinds.layer_kind(m)] == [name]
    keys = {"lora_unet_to_q.alpha"} | {f"lora_unet_to_q{suffix}" for suffix in row.extra_suffixes}
    assert kinds.file_kind(keys) == name
    assert row.diffusers_reads == (name == "lora") == row.fuses
    metadata = kohya.adapter_metadata(name, {"unet": {"r": 4}})
    assert (metadata.get("sdlora.adapter"), metadata.get("ss_network_module")) == (
        (None, None) if name == "lora" else (name, "lycoris.kohya")
    )


# Families whose UI file names DoRA and LoKr modules as SimpleTuner's LyCORIS keys (Z-Image, FLUX.2 [klein],
# Qwen-Image and its Edit), each with every kind that writes LyCORIS keys. The quick suite keeps klein's DoRA (its
# q, k and v fused in ComfyUI, DoRA's row norms); the others are slow (0.2-1.5 s each).
QUICK = ("klein", "dora")
LYCORIS_CASES = [
    pytest.param(name, kind, id=f"{name}-{kind}", marks=() if (name, kind) == QUICK else pytest.mark.slow)
    for name, family in families.REGISTRY.items()
    if family.lycoris_names
    for kind, row in kinds.KINDS.items()
    if not row.fuses
]


def adapted(denoiser, family, kind: str, lokr_factor: int = -1):
    """A copy of `denoiser` with the family's `kind` adapter on every target ("all", rank 4, alpha 8: a wrong
    scale shows), its tensors random (LoKr's w1 and DoRA's up start at zero, DoRA's magnitude at ||W||)."""
    from sdlora.lora import peft

    model = copy.deepcopy(denoiser)
    peft.attach(model, 4, 8.0, 0.0, family.denoiser_targets("all"), kind, lokr_factor)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise)
            elif ".default" in name:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model


def merged_weights(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """peft's own merge of each adapted layer: the weights of the trained model."""
    out = {}
    for path, layer, _ in kohya.adapter_layers(model, adapter):
        layer.merge(adapter_names=[adapter])
        out[path] = layer.get_base_layer().weight.detach().clone()
    return out


def comfyui_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One module of the file applied to its base weight as ComfyUI does (comfy/weight_adapter/lokr.py, lora.py):
    LoKr W + kron(w1, w2) (reshaped to W's shape) * alpha / dim (dim: the rank of a factorised part, else the scale
    is 1); DoRA dora_scale * (W + up @ down * alpha / rank) normalised per output row, by its own norm as peft does
    (ComfyUI 0.3.64 and the 2026-02 fork divide by ||W||: README "Adapter types")."""
    if "dora_scale" in tensors:
        rank = tensors["lora_down.weight"].shape[0]
        changed = weight + tensors["lora_up.weight"] @ tensors["lora_down.weight"] * (tensors["alpha"] / rank)
        return tensors["dora_scale"] * changed / changed.norm(dim=1, keepdim=True)
    from sdlora.lora.kinds import lokr

    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    w1 = w1[:, :, None, None] if w2.ndim == 4 else w1  # a conv's whole w2 is 4-D (SD 1.x's proj_in/out)
    return weight + torch.kron(w1, w2).reshape(weight.shape) * lokr.reader_scale(tensors)


def check_both_files(family, pipe, model, kind: str, tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    """NAME.safetensors and pytorch_lora_weights.safetensors of `model`'s adapter (on `pipe`'s denoiser), written
    as training writes them: each module of the first applied as ComfyUI applies it equals the trained model's
    merged weight, one module per adapted layer, and both files load back through sdlora's own readers (generate,
    eval) to the same weights. Returns the first file's modules."""
    from safetensors.torch import load_file

    from sdlora.lora import files, lycoris, peft

    layers = {path: layer for path, layer, _ in kohya.adapter_layers(model)}
    originals = {path: layer.get_base_layer().weight.detach().clone() for path, layer in layers.items()}
    configs = {family.denoiser: peft.adapter_metadata(model)}
    ui_file, diffusers_file = tmp_path / "me.safetensors", tmp_path / "pytorch_lora_weights.safetensors"
    state = kohya.kohya_state_dict(model, [], family, dtype=torch.float32)  # as training writes it
    kohya.save_kohya(ui_file, state, kohya.adapter_metadata(kind, configs))
    peft.save_diffusers(diffusers_file, type(pipe), {family.denoiser: model}, {"sdlora.family": family.name})
    trained = merged_weights(model)
    modules = lycoris.group_modules(load_file(str(ui_file)))
    names = next(names for attr, _, names in kohya.named_models(pipe, family) if attr == family.denoiser)
    assert sorted(names[module] for module in modules) == sorted(layers)
    for module, tensors in modules.items():
        path = names[module]
        assert (trained[path] - originals[path]).abs().max() > 1e-3  # the adapter changes the layer
        torch.testing.assert_close(comfyui_weight(originals[path], tensors), trained[path], atol=1e-5, rtol=1e-5)
    for path in (ui_file, diffusers_file):
        fresh = family.tiny_pipeline(0)  # the same base weights
        assert files.load_adapter_file(fresh, path, "reloaded")  # generate's and eval's reader: through peft
        reloaded = merged_weights(getattr(fresh, family.denoiser), "reloaded")
        assert reloaded.keys() == trained.keys(), path.name
        for key, weight in reloaded.items():
            torch.testing.assert_close(weight, trained[key], atol=1e-6, rtol=1e-6, msg=f"{path.name}: {key}")
    return modules


@pytest.mark.parametrize(("family_name", "kind"), LYCORIS_CASES)
def test_the_ui_file_holds_each_kind_as_comfyui_reads_it(family_name, kind, tmp_path):
    """NAME.safetensors of a DoRA or LoKr adapter on a family whose ComfyUI reads LyCORIS names (its Z-Image,
    FLUX.2 and Qwen-Image maps: `lycoris_` + the diffusers module path, q/k/v put into the fused qkv rows there):
    one module per adapted layer with the kind's keys, each applied as ComfyUI applies it equal to the trained
    model's merged weight; both files (it and pytorch_lora_weights.safetensors) load back through sdlora's own
    readers (generate, eval) to the same weights. The kind passes the pre-flight that refuses fused modules."""
    from sdlora.lora import peft

    family = families.get(family_name)
    pipe = family.tiny_pipeline(0)
    base = getattr(pipe, family.denoiser)
    peft.check_exportable(LoraConfig(kind=kind, targets="all", dropout=0.0), base, family)
    model = adapted(base, family, kind)
    layers = {path for path, _, _ in kohya.adapter_layers(model)}
    modules = check_both_files(family, pipe, model, kind, tmp_path)
    assert set(modules) == {"lycoris_" + path.replace(".", "_") for path in layers}
    own = {"dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}}.get(kind)
    for path in layers:
        tensors = modules["lycoris_" + path.replace(".", "_")]
        if own:
            out_features = dict(model.named_modules())[path].get_base_layer().weight.shape[0]
            assert set(tensors) == own and tensors["dora_scale"].shape == (out_features, 1)
        else:
            assert "alpha" in tensors and {p.split("_")[1] for p in tensors if p.startswith("lokr_")} == {"w1", "w2"}


# lora.lokr_factor = 2 on the tiny widths (32 and 64; 85 and 256 in feed-forwards): w1 at most 2 x 2 where peft's
# default gives 4 x 4 to 16 x 8, and every w2 factorised at rank 4 (readers then scale by alpha / dim), where the
# default keeps most whole.
@pytest.mark.parametrize("family_name", ["zimage", pytest.param("sd1", marks=pytest.mark.slow)])
def test_a_lokr_factor_changes_the_factors_and_both_files_still_load(family_name, tmp_path):
    """LoKr at lora.lokr_factor (peft's decompose_factor) other than the default: other factor shapes in
    NAME.safetensors (kohya names on SD 1.x, LyCORIS names on Z-Image), each applied as ComfyUI applies it equal to
    the trained merge, the factor stored with the file, and both files loading back to the same weights."""
    import json

    from safetensors import safe_open

    from sdlora.lora import lycoris

    family = families.get(family_name)
    pipe = family.tiny_pipeline(0)
    base = getattr(pipe, family.denoiser)
    modules = check_both_files(family, pipe, adapted(base, family, "lokr", 2), "lokr", tmp_path)
    shapes = {name: {part: tuple(t.shape) for part, t in m.items()} for name, m in modules.items()}
    default = lycoris.group_modules(kohya.kohya_state_dict(adapted(base, family, "lokr"), [], family))
    assert default.keys() == shapes.keys()
    assert all(shapes[name] != {part: tuple(t.shape) for part, t in m.items()} for name, m in default.items())
    assert all(max(parts["lokr_w1"]) <= 2 and "lokr_w2_a" in parts for parts in shapes.values())
    with safe_open(str(tmp_path / "me.safetensors"), framework="pt") as handle:
        stored = json.loads(handle.metadata()["sdlora.adapter_config"])
    assert stored[family.denoiser]["decompose_factor"] == 2
