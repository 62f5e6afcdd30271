"""Kohya-format LoRA files: key names (SGM for SDXL, transformers-4 CLIP paths), metadata, and reloading."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from sdlora.errors import SdloraError, UsageError
from sdlora.families.sdxl.keys import sgm_namer
from sdlora.lora import kohya
from sdlora.models import ModelInfo

RANK, ALPHA = 4, 2.0  # alpha != rank: a wrong scale on reload shows up in the images
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT = "a photo of sks person"
CASES = [(family, te) for family in ("sd1", "sd2", "sdxl") for te in (False, True)]


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encoders(pipe) -> dict[str, object]:
    names = ("text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def _render(pipe):
    """(1, 4, 4, 4) latents at a fixed seed: more sensitive to the LoRA than decoded pixels."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=generator, output_type="latent").images


def _lora_modules(pipe) -> set[tuple[str, str]]:
    from peft.tuners.lora import LoraLayer

    models = {"unet": pipe.unet, **_encoders(pipe)}
    return {
        (name, path) for name, model in models.items() for path, m in model.named_modules() if isinstance(m, LoraLayer)
    }


def _add_lora(pipe, with_te: bool) -> None:
    """Attach LoRAs as training does, with non-zero random lora_B so that they change the output."""
    import peft
    import torch

    torch.manual_seed(1)
    models = [pipe.unet]
    pipe.unet.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS))
    if with_te:
        for encoder in _encoders(pipe).values():
            encoder.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS))
            models.append(encoder)
    for model in models:
        for _, layer in kohya.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)


def _save_diffusers(pipe, folder, with_te: bool) -> None:
    from peft.utils import get_peft_model_state_dict

    kwargs = {
        "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
        "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict(),
    }
    if with_te:
        for name, encoder in _encoders(pipe).items():
            kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
            kwargs[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(str(folder), **kwargs)


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'te' if te else 'unet'}" for f, te in CASES])
def case(request, tiny_models, tmp_path_factory):
    """One trained-like pipeline per (family, text-encoder LoRA), both files written, each reloaded fresh."""
    import torch

    from sdlora.models import model_info

    family, with_te = request.param
    out = tmp_path_factory.mktemp(f"kohya-{family}-{with_te}")
    pipe = _pipeline(tiny_models[family])
    base = _render(pipe)
    _add_lora(pipe, with_te)
    trained = _render(pipe)
    encoders = list(_encoders(pipe).values()) if with_te else []
    _save_diffusers(pipe, out / "diffusers", with_te)
    kohya.save_kohya(
        out / "exact.safetensors", kohya.kohya_state_dict(pipe.unet, encoders, family, dtype=torch.float32), {}
    )
    state = kohya.kohya_state_dict(pipe.unet, encoders, family)
    info = model_info(pipe)
    metadata = kohya.build_metadata(
        info,
        name="me",
        rank=RANK,
        alpha=ALPHA,
        steps=6,
        learning_rate=1e-4,
        resolution=32,
        num_train_images=3,
        trigger_phrase="sks person",
        started_at=1_700_000_000.0,
        finished_at=1_700_000_060.5,
        text_encoder_trained=with_te,
        extra={"ss_seed": "0"},
    )
    kohya.save_kohya(out / "me.safetensors", state, metadata)
    reloaded = {}
    sources = {"diffusers": out / "diffusers", "kohya": out / "exact.safetensors", "kohya_fp16": out / "me.safetensors"}
    for label, source in sources.items():
        fresh = _pipeline(tiny_models[family])
        fresh.load_lora_weights(str(source))
        reloaded[label] = (_render(fresh), _lora_modules(fresh))
    return SimpleNamespace(
        family=family,
        with_te=with_te,
        pipe=pipe,
        base=base,
        trained=trained,
        state=state,
        info=info,
        path=out / "me.safetensors",
        reloaded=reloaded,
        modules=_lora_modules(pipe),
    )


@pytest.mark.slow
def test_reloaded_files_give_the_trained_images(case):
    import torch

    assert (case.trained - case.base).abs().max() > 1e-2, (
        "the LoRA must change the output for this test to mean anything"
    )
    assert torch.equal(case.reloaded["diffusers"][0], case.trained)
    assert (case.reloaded["kohya"][0] - case.trained).abs().max() <= 1e-4
    # The default fp16 file rounds lora_A/lora_B: measured 1.5e-4 to 3.8e-4 here, against a LoRA effect of 0.36-1.15.
    assert (case.reloaded["kohya_fp16"][0] - case.trained).abs().max() <= 1e-3


def test_every_kohya_key_lands_on_the_trained_modules(case):
    assert case.reloaded["kohya"][1] == case.modules
    assert case.reloaded["diffusers"][1] == case.modules
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in case.state}
    assert len(names) == len(case.modules)
    for name in names:
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= case.state.keys()


def test_key_names(case):
    unet_keys = [key for key in case.state if key.startswith("lora_unet_")]
    te_keys = [key for key in case.state if not key.startswith("lora_unet_")]
    assert unet_keys and bool(te_keys) == case.with_te
    if case.family == "sdxl":
        assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d+_", key) for key in unet_keys)
        # The tiny SDXL UNet: 2 layers per block, attention only in the second down block and first up block.
        for name in (
            "input_blocks_4_1",
            "input_blocks_5_1",
            "middle_block_1",
            "output_blocks_0_1",
            "output_blocks_2_1",
        ):
            assert f"lora_unet_{name}_transformer_blocks_0_attn1_to_q.lora_down.weight" in case.state
        assert "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_out_0.alpha" in case.state
        assert "lora_unet_output_blocks_1_1_proj_in.lora_up.weight" in case.state
        te_prefixes = ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")
        assert {key[:9] for key in te_keys} == ({"lora_te1_", "lora_te2_"} if case.with_te else set())
        if case.with_te:  # the second encoder alone is still named lora_te2_
            alone = kohya.kohya_state_dict(case.pipe.unet, [case.pipe.text_encoder_2], "sdxl")
            assert {k for k in alone if k.startswith("lora_te")} == {k for k in te_keys if k.startswith("lora_te2_")}
    else:
        assert all(re.match(r"lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_", key) for key in unet_keys)
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in case.state
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in case.state
        te_prefixes = ("lora_te_text_model_encoder_layers_",)
    assert all(key.startswith(te_prefixes) for key in te_keys)
    if case.with_te:
        assert f"{te_prefixes[0]}0_self_attn_q_proj.lora_down.weight" in case.state


def test_tensors_alpha_and_dtype(case):
    import torch

    for path, layer in kohya.lora_layers(case.pipe.unet):
        name = "lora_unet_" + (sgm_namer(case.pipe.unet.config)(path) if case.family == "sdxl" else path).replace(
            ".", "_"
        )
        down, up = case.state[f"{name}.lora_down.weight"], case.state[f"{name}.lora_up.weight"]
        assert down.dtype == up.dtype == torch.float16 and down.is_contiguous() and up.is_contiguous()
        assert torch.equal(down, layer.lora_A["default"].weight.detach().half())
        assert torch.equal(up, layer.lora_B["default"].weight.detach().half())
        assert case.state[f"{name}.alpha"].item() == ALPHA
    assert all(case.state[key].item() == ALPHA for key in case.state if key.endswith(".alpha"))


def test_metadata(case):
    state, metadata = kohya.read_kohya(case.path)
    assert state.keys() == case.state.keys()
    assert all(isinstance(value, str) for value in metadata.values())
    expected_version = {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[case.family]
    expected_arch = {
        "sd1": "stable-diffusion-v1/lora",
        "sd2": "stable-diffusion-v2-768-v/lora",
        "sdxl": "stable-diffusion-xl-v1-base/lora",
    }[case.family]
    assert metadata["ss_base_model_version"] == expected_version
    assert metadata["modelspec.architecture"] == expected_arch
    assert metadata["ss_v2"] == str(case.family == "sd2")
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == ("4", ALPHA)
    assert metadata["ss_output_name"] == metadata["modelspec.title"] == "me"
    assert (metadata["ss_steps"], float(metadata["ss_learning_rate"])) == ("6", 1e-4)
    assert (metadata["ss_resolution"], metadata["ss_num_train_images"]) == ("(32, 32)", "3")
    assert float(metadata["ss_training_started_at"]) == 1_700_000_000.0
    assert float(metadata["ss_training_finished_at"]) == 1_700_000_060.5
    assert metadata["modelspec.trigger_phrase"] == "sks person"
    assert metadata["modelspec.sai_model_spec"] and metadata["modelspec.implementation"]
    assert metadata["sdlora.text_encoder_trained"] == str(case.with_te)
    assert metadata["ss_seed"] == "0"
    assert re.fullmatch(r"[0-9a-f]{64}", metadata["sshs_model_hash"])


def _sdxl_like_config(layers: int = 2):
    down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    return SimpleNamespace(layers_per_block=layers, up_block_types=up, down_block_types=down)


@pytest.mark.parametrize(
    ("diffusers_path", "sgm"),
    [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v",
            "input_blocks.8.1.transformer_blocks.9.attn2.to_v",
        ),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2", "output_blocks.2.1.transformer_blocks.3.ff.net.2"),
        ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("conv_in", "input_blocks.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ],
)
def test_sgm_names_of_the_real_sdxl_layout(diffusers_path, sgm):
    assert sgm_namer(_sdxl_like_config())(diffusers_path) == sgm


def test_diffusers_reads_back_every_real_sdxl_attention_name():
    """Every LoRA-able attention module of the real SDXL UNet (built on the meta device: no memory, no weights)
    maps to an SGM name that diffusers' own kohya reader turns back into the same module."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    layout = _sdxl_like_config()
    config = dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=layout.down_block_types,
        up_block_types=layout.up_block_types,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        layers_per_block=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    wanted = [path for path, _ in unet.named_modules() if path.endswith(tuple(UNET_TARGETS))]
    assert len(wanted) == 70 * 10 + 11 * 2  # 70 transformer blocks x (8 attention + 2 ff) + 11 x proj_in/out
    rename = sgm_namer(unet.config)
    state = {}
    for path in wanted:
        name = "lora_unet_" + rename(path).replace(".", "_")
        state |= {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1)}
    mapped = _maybe_map_sgm_blocks_to_diffusers(state, unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    back = {key.removeprefix("unet.").split(".lora")[0].split("_lora")[0] for key in converted}
    back = {p.replace(".processor.to_out", ".to_out.0").replace(".processor.", ".") for p in back}
    assert back == set(wanted)


def test_text_encoder_paths_follow_transformers_4():
    assert (
        kohya.text_encoder_path("encoder.layers.3.self_attn.q_proj") == "text_model.encoder.layers.3.self_attn.q_proj"
    )
    assert kohya.text_encoder_path("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert kohya.text_encoder_path("text_projection") == "text_projection"


def test_wrapped_models_keep_their_names(case):
    """DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers do not leak into the key names."""
    import torch

    wrapper = torch.nn.Module()
    wrapper.module = torch.nn.Module()
    wrapper.module._orig_mod = case.pipe.unet
    wrapper.config = case.pipe.unet.config
    state = kohya.kohya_state_dict(wrapper, [], case.family)
    assert state.keys() == {key for key in case.state if key.startswith("lora_unet_")}


def test_is_kohya_state_dict():
    assert kohya.is_kohya_state_dict(["lora_unet_a_b.lora_down.weight", "lora_te1_x.alpha"])
    assert not kohya.is_kohya_state_dict([])
    assert not kohya.is_kohya_state_dict(["unet.down_blocks.0.lora_A.weight"])
    assert not kohya.is_kohya_state_dict(["lora_unet_a.lora_down.weight", "text_encoder.x.lora_A.weight"])


def test_metadata_extra_must_be_strings():
    info = ModelInfo(family="sd1", prediction_type="epsilon", vae_scale_factor=8)
    kwargs = dict(
        name="n",
        rank=1,
        alpha=1,
        steps=1,
        learning_rate=1.0,
        resolution=512,
        num_train_images=1,
        trigger_phrase="",
        started_at=0.0,
        finished_at=0.0,
        text_encoder_trained=False,
    )
    assert kohya.build_metadata(info, **kwargs)["ss_base_model_version"] == "sd_v1"
    with pytest.raises(TypeError, match="ss_seed"):
        kohya.build_metadata(info, **kwargs, extra={"ss_seed": 0})


def test_save_is_atomic_and_validated(tmp_path):
    import torch

    good = {"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)}
    with pytest.raises(SdloraError, match="not a kohya LoRA key"):
        kohya.save_kohya(tmp_path / "a.safetensors", {"unet.x.lora_A.weight": torch.ones(1)}, {})
    with pytest.raises(SdloraError, match="must be strings"):
        kohya.save_kohya(tmp_path / "a.safetensors", good, {"ss_steps": 3})
    assert list(tmp_path.iterdir()) == []
    kohya.save_kohya(tmp_path / "a.safetensors", good, {"ss_steps": "3"})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    state, metadata = kohya.read_kohya(tmp_path / "a.safetensors")
    assert torch.equal(state["lora_unet_x.lora_up.weight"], good["lora_unet_x.lora_up.weight"])
    assert metadata["ss_steps"] == "3"


def test_read_errors(tmp_path):
    with pytest.raises(UsageError, match="no such LoRA file"):
        kohya.read_kohya(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SdloraError, match="not a readable"):
        kohya.read_kohya(tmp_path / "junk.safetensors")


def test_dora_and_wrong_encoder_lists_are_errors():
    import peft
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"], use_dora=True), model)
    with pytest.raises(SdloraError, match="DoRA"):
        list(kohya.lora_layers(model))
    unet = SimpleNamespace(config=None, named_modules=lambda: iter(()))
    with pytest.raises(ValueError, match="share a key prefix"):
        kohya.kohya_state_dict(unet, [model, model], "sd1")
    with pytest.raises(ValueError, match="family"):
        kohya.kohya_state_dict(unet, [], "sd3")


def test_no_lora_layers_is_an_error(tiny_sd1):
    with pytest.raises(SdloraError, match="no LoRA layers"):
        kohya.kohya_state_dict(_pipeline(tiny_sd1).unet, [], "sd1")
