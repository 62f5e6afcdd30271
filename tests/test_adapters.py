"""lora.kind = "dora" | "lokr" (`--adapter`): trained through `sdlora train`, both files reload (through what
`generate` and `eval` load with) to the trained model's images; their LyCORIS keys; a resumed run equals the
uninterrupted one; kinds a family can't export."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import config as sdconfig
from sdlora import families
from sdlora.cli import app
from sdlora.layout import LORA_STATE
from sdlora.lora import kinds
from sdlora.lora.kinds import dora, lokr

STEPS = 2
SAMPLE_STEPS = 1
PROMPT = "a photo of {trigger}"
# Z-Image's LoKr (what users train characters with there): LyCORIS names in ComfyUI's file (test_kinds has the
# other DiT families and kinds, without a training run), at a factor of its own (lora.lokr_factor; 2 splits the
# tiny widths otherwise than peft's default: test_kinds); the UNets' LoKr at the default.
CASES = [(family, kind) for family in ("sd1", "sdxl") for kind in ("dora", "lokr")] + [("zimage", "lokr")]
LOKR_FACTOR = {("zimage", "lokr"): 2}


def train_args(data, out, base, kind: str, text_encoder: bool) -> list[str]:
    return [
        "train", str(data), str(out), "--base", str(base), "--adapter", kind, "--steps", str(STEPS),
        "--resolution", "64", "--rank", "4", "--alpha", "8",  # alpha != rank: a wrong scale on reload shows
        "--lr", "3e-2", "--text-encoder-lr", "3e-2", "--checkpoint-every", "1", "--sample-every", str(STEPS),
        "--eval-every", "0", "--name", "me", "--set", f"train.sample_steps={SAMPLE_STEPS}",
        "--set", f"train.sample_prompts=['{PROMPT}']", "--set", "lora.targets='all'",
        *(["--train-text-encoder"] if text_encoder else []), "--no-pivotal", "--preservation", "none",
    ]  # fmt: skip


_RUNS: dict[tuple[str, str], dict] = {}


def trained(family: str, kind: str, tiny_models, tmp_path_factory) -> dict:
    """One training run per (family, kind) for the whole session, whichever test asks first."""
    if (family, kind) not in _RUNS:
        root = tmp_path_factory.mktemp(f"adapter-{family}-{kind}")
        out = root / "out"
        # Text-encoder adapters on SD 1.x; SDXL on the UNet only (time: its te1/te2 naming is LoRA's, test_kohya).
        text_encoder = family == "sd1"
        args = train_args(subject_set(root / "data"), out, tiny_models[family], kind, text_encoder)
        factor = LOKR_FACTOR.get((family, kind), -1)
        args += ["--set", f"lora.lokr_factor={factor}"] if factor != -1 else []
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        _RUNS[family, kind] = {
            "family": family,
            "kind": kind,
            "out": out,
            "base": tiny_models[family],
            "text_encoder": text_encoder,
            "args": args,
            "lokr_factor": factor,
        }
    return _RUNS[family, kind]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{k}" for f, k in CASES])
def run(request, tiny_models, tmp_path_factory):
    return trained(*request.param, tiny_models, tmp_path_factory)


def render(base, lora_specs: list[str]) -> list[np.ndarray]:
    """The last sample grid's image rendered through generate's and eval's loading path (parse_lora,
    check_family, load_loras) with each LoRA in turn: all loaded into one pipeline as adapters, one active at a
    time (or the base, without any)."""
    from sdlora.generate.render import Sampling, load_for_rendering, make_grid, render_images
    from sdlora.lora.files import parse_lora

    pipe, _, names = load_for_rendering(sdconfig.ModelConfig(base=str(base)), [parse_lora(s) for s in lora_specs])
    prompts = [PROMPT.replace("{trigger}", "sks person")]
    sampling = Sampling.for_training(sdconfig.Config(train={"resolution": 64, "sample_steps": SAMPLE_STEPS}))
    grids = []
    for name in names or [None]:
        if name is not None:
            pipe.set_adapters([name], adapter_weights=[1.0])
        images = render_images(pipe, prompts, [sdconfig.GenerateConfig().seed] * len(prompts), sampling)
        grids.append(np.asarray(make_grid(images, cols=len(images))).astype(int))
    return grids


@functools.cache
def base_images(base):
    return render(base, [])[0]


@pytest.mark.slow
def test_both_files_reload_to_the_trained_images(run):
    from PIL import Image

    out = run["out"]
    trained = np.asarray(Image.open(out / "samples" / f"step-{STEPS:06d}.png")).astype(int)
    assert np.abs(base_images(run["base"]) - trained).max() > 5  # the adapter changed the images
    from_diffusers, from_kohya = render(run["base"], [str(out), str(out / "me.safetensors")])
    assert np.abs(from_diffusers - trained).max() == 0  # pytorch_lora_weights.safetensors
    # The kohya file is fp32; LoKr's scale, folded into lokr_w1 where no factor is factorised, comes out again
    # within one float32 rounding (measured: 0 here too).
    assert np.abs(from_kohya - trained).max() <= 1


@pytest.mark.slow
def test_lycoris_keys_and_metadata(run):
    with safe_open(str(run["out"] / "me.safetensors"), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()  # noqa: SIM118
        shapes = {key: handle.get_slice(key).get_shape() for key in keys}
    modules = {key.split(".", 1)[0] for key in keys}
    assert kinds.file_kind(keys) == run["kind"]
    lycoris = families.get(run["family"]).lycoris_names  # SimpleTuner's LyCORIS names, else kohya's
    assert {m.startswith("lycoris_") for m in modules} == {lycoris}
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["sdlora.adapter"] == run["kind"]
    text_prefixes = ("lora_te1_", "lora_te2_") if run["family"] == "sdxl" else ("lora_te_",)
    found = {m.split("_text_model")[0] + "_" for m in modules if m.startswith("lora_te")}
    assert found == (set(text_prefixes) if run["text_encoder"] else set())
    for module in modules:
        suffixes = {key.split(".", 1)[1] for key in keys if key.startswith(module + ".")}
        if run["kind"] == "dora":
            assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
            out_features = shapes[f"{module}.lora_up.weight"][0]
            # On the output axis, never 1-D (ComfyUI broadcasts a 1-D dora_scale wrongly).
            assert shapes[f"{module}.dora_scale"][:2] == [out_features, 1]
        else:
            assert "alpha" in suffixes and suffixes & {"lokr_w1", "lokr_w1_a"} and suffixes & {"lokr_w2", "lokr_w2_a"}
    if run["family"] == "sdxl":  # SGM names, as kohya writes SDXL
        assert any(m.startswith("lora_unet_input_blocks_") for m in modules)
    with safe_open(str(run["out"] / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        diffusers_meta = handle.metadata()
        assert kinds.file_kind(handle.keys()) == run["kind"]
    assert diffusers_meta["sdlora.adapter"] == run["kind"]
    assert json.loads(diffusers_meta["lora_adapter_metadata"])
    if run["kind"] == "lokr":  # the factor trained with, stored for sdlora's reader in both files and config.json
        ui_configs = json.loads(metadata["sdlora.adapter_config"]).values()  # {model: peft config}
        diffusers_config = json.loads(diffusers_meta["lora_adapter_metadata"])  # {"model.key": value}
        factors = [c["decompose_factor"] for c in ui_configs]
        factors += [value for key, value in diffusers_config.items() if key.endswith(".decompose_factor")]
        assert len(factors) >= 2 and set(factors) == {run["lokr_factor"]}
        saved = json.loads((run["out"] / "config.json").read_text())
        assert saved["lora"]["lokr_factor"] == run["lokr_factor"]
        args = json.loads(metadata["ss_network_args"])  # LyCORIS's record of the factor, as it writes it
        assert args == {"algo": "lokr"} | ({"factor": str(run["lokr_factor"])} if run["lokr_factor"] != -1 else {})
        if run["lokr_factor"] != -1:  # w1 at most factor x factor in every module (peft's default: wider here)
            w1 = [shape for key, shape in shapes.items() if key.endswith(".lokr_w1")]
            assert w1 and all(max(shape) <= run["lokr_factor"] for shape in w1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_resume_from_step_1_equals_the_straight_run(kind, tiny_models, tmp_path_factory, tmp_path):
    """The adapter's own tensors (DoRA's magnitudes, LoKr's factors, on the UNet and the text encoder) and their
    optimizer state come back from a checkpoint: resumed after step 1, step 2 and both files equal the straight run.
    SD 1.x only: SDXL's adapters differ in naming, which the tests above check."""
    run = trained("sd1", kind, tiny_models, tmp_path_factory)
    straight, resumed = run["out"], tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")
    for name in ("pytorch_lora_weights.safetensors", "me.safetensors"):
        (resumed / name).unlink()
    args = [str(resumed) if a == str(straight) else a for a in run["args"]]
    result = CliRunner().invoke(app, [*args, "--resume", "latest"])
    assert result.exit_code == 0, result.output
    state = f"checkpoints/step-{STEPS:06d}/{LORA_STATE}"
    for name in (state, "pytorch_lora_weights.safetensors", "me.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys(), name
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    own = "magnitude" if run["kind"] == "dora" else "lokr"  # the kind's own tensors are among those compared
    assert any(own in key for key in load_file(str(straight / state))), sorted(load_file(str(straight / state)))[:4]


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_kinds_on_fused_kohya_modules_are_refused(kind):
    """Flux's kohya names fuse q, k and v into qkv: DoRA and LoKr there are refused by the family-blind check that
    `train` runs before anything slow; plain LoRA and the UNet families pass it."""
    from diffusers import FluxTransformer2DModel

    from sdlora.errors import UsageError
    from sdlora.lora import peft

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip  # only its module names matter here: the transformer alone, not the family's whole tiny pipeline
    flux = families.get("flux")
    with pytest.raises(UsageError, match=rf"--adapter {kind}: Flux.1's kohya format fuses 3 layers into double_blocks"):
        peft.check_exportable(sdconfig.LoraConfig(kind=kind), transformer, flux)
    peft.check_exportable(sdconfig.LoraConfig(kind="lora"), transformer, flux)


@pytest.mark.slow
def test_a_kind_flux_cannot_export_is_refused_before_training(tiny_models, tmp_path):
    from sdlora.cli import app

    data = subject_set(tmp_path / "data")
    args = ["train", str(data), str(tmp_path / "out"), "--base", str(tiny_models["flux"]), "--adapter", "lokr"]
    result = CliRunner().invoke(app, [*args, "--steps", "1", "--resolution", "64"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--adapter lokr" in lines[0] and "qkv" in lines[0] and "use --adapter lora" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_lokr_has_no_input_dropout():
    with pytest.raises(ValueError, match="no input dropout"):
        sdconfig.LoraConfig(kind="lokr", dropout=0.1)
    assert sdconfig.LoraConfig(kind="dora", dropout=0.1).kind == "dora"


def test_lokr_factor_is_lokrs_only_and_minus_one_or_two_and_up():
    from sdlora.errors import ConfigError

    assert [sdconfig.LoraConfig(kind="lokr", lokr_factor=f).lokr_factor for f in (-1, 2, 16)] == [-1, 2, 16]
    assert sdconfig.LoraConfig(kind="dora").lokr_factor == -1
    for factor in (0, 1, -2):
        with pytest.raises(ValueError, match=rf"lora\.lokr_factor = {factor}: use -1"):
            sdconfig.LoraConfig(kind="lokr", lokr_factor=factor)
    with pytest.raises(ConfigError) as refused:
        sdconfig.load(None, {"lora.kind": "dora", "lora.lokr_factor": 4})
    assert str(refused.value) == (
        "config: lora: lora.lokr_factor = 4 applies to kind 'lokr' only, not 'dora'; set lora.kind = 'lokr' or drop "
        "lokr_factor"
    )


def test_lokr_scale_round_trip_and_dora_orientation():
    """The LoKr scale readers apply (alpha / dim, or 1 with both factors whole) and peft's agree after the fold;
    dora_scale has the base weight's output axis first."""
    import peft
    import torch

    from sdlora.lora import kohya

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(64, 64))
    peft.inject_adapter_in_model(peft.LoKrConfig(r=2, alpha=3, target_modules=["0", "1"]), model)
    for _, layer, _ in kohya.adapter_layers(model):
        for part in lokr.PARTS:
            if "default" in getattr(layer, part):
                torch.nn.init.normal_(getattr(layer, part)["default"])
        tensors = lokr.module_tensors(layer, "default")
        w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
        reader = torch.kron(w1, w2) * lokr.reader_scale(tensors)
        torch.testing.assert_close(reader, layer.get_delta_weight("default"))
    kinds = {("lokr_w2_a" in lokr.module_tensors(layer, "default")) for _, layer, _ in kohya.adapter_layers(model)}
    assert kinds == {False, True}  # one layer with both factors whole (the folded case), one factorised
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 1))
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"], use_dora=True), conv)
    (_, layer, kind), *_ = kohya.adapter_layers(conv)
    assert kind == "dora" and dora.module_tensors(layer, "default")["dora_scale"].shape == (6, 1, 1, 1)


def test_family_of_a_lokr_file_from_its_shapes(tmp_path):
    """check_family reads a LoKr file's cross-attention width as in(w1) * in(w2)."""
    import torch
    from safetensors.torch import save_file

    from sdlora.errors import UsageError
    from sdlora.lora.files import check_family, parse_lora

    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{module}.lokr_w1": torch.zeros(4, 8), f"{module}.lokr_w2": torch.zeros(8, 128)}
    save_file(tensors | {f"{module}.alpha": torch.tensor(1.0)}, str(tmp_path / "x.safetensors"))

    def pipe(width: int):
        config = type("Config", (), {"cross_attention_dim": width})()
        return type("Pipe", (), {"unet": type("UNet", (), {"config": config})()})()

    lora = parse_lora(str(tmp_path / "x.safetensors"))
    check_family(lora, families.get("sd2"), pipe(1024))  # 8 * 128 = 1024: SD 2.x's text width
    with pytest.raises(UsageError, match="1024-wide text features"):
        check_family(lora, families.get("sd1"), pipe(768))
