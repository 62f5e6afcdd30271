"""What FLUX.2 [klein] has beyond the family contract (test_family_contract.py): its UI LoRA file in the form ComfyUI
loads (kohya `lora_unet_` + BFL names, q/k/v fused, `.alpha`) at the trained scale, and the diffusers file with no
`.alpha`; the metadata; base and distilled checkpoints told apart by the pipeline config, with their generate
defaults; the original-name single file read back through diffusers' converter; the latent and flow-matching math
against the pipeline's own on small tensors; --init-image through klein's inpainting pipeline; what it refuses."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app

runner = CliRunner()
KLEIN = families.get("klein")


def load(folder: Path):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_output(pipe) -> torch.Tensor:
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = KLEIN.encode_prompts([pipe.tokenizer], [pipe.text_encoder], ["a photo of sks person", "x"])
        return KLEIN.predict(pipe.transformer, noisy, torch.tensor([0.3, 0.8]), cond, None)


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Path:
    """A 2-step run of `sdlora train` on the tiny klein (base), every target ('all'), rank 4, alpha 8."""
    root = tmp_path_factory.mktemp("klein-train")
    args = ["train", str(subject_set(root / "data")), str(root / "out"), "--base", str(tiny_models["klein"])]
    args += ["--steps", "2", "--resolution", "64", "--rank", "4", "--alpha", "8", "--name", "person"]
    args += ["--sample-every", "0", "--checkpoint-every", "0", "--set", "lora.targets=all", "--lr", "1e-2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.mark.slow
def test_comfyui_file_has_bfl_names_fused_qkv_and_the_trained_scale(trained):
    """Every module under kohya's `lora_unet_` + BFL name with its `.alpha` (ComfyUI maps those through its generic
    `diffusion_model.` map of the FLUX.2 model and scales by alpha/rank); q, k and v one block-diagonal qkv whose
    weight change is the three layers' changes of the diffusers file stacked."""
    ui = load_file(str(trained / "person.safetensors"))
    diffusers_file = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in ui}
    assert modules == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_img_mlp_0",
        "lora_unet_double_blocks_0_img_mlp_2",
        "lora_unet_double_blocks_0_txt_mlp_0",
        "lora_unet_double_blocks_0_txt_mlp_2",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_0_linear2",
        "lora_unet_single_blocks_1_linear1",
        "lora_unet_single_blocks_1_linear2",
    }
    assert all(f"{m}.{s}" in ui for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert not any(k.startswith(("diffusion_model.", "transformer.")) for k in ui)

    def delta(prefix: str) -> torch.Tensor:  # what diffusers applies: B @ A * alpha / r (alpha 8, r 4)
        return diffusers_file[f"{prefix}.lora_B.weight"] @ diffusers_file[f"{prefix}.lora_A.weight"] * 2

    def ui_delta(module: str) -> torch.Tensor:  # what ComfyUI applies: up @ down * alpha / rank
        down, up = ui[f"{module}.lora_down.weight"].float(), ui[f"{module}.lora_up.weight"].float()
        return up @ down * (ui[f"{module}.alpha"].item() / down.shape[0])

    block = "transformer.transformer_blocks.0.attn"
    qkv = torch.cat([delta(f"{block}.to_q"), delta(f"{block}.to_k"), delta(f"{block}.to_v")])
    torch.testing.assert_close(ui_delta("lora_unet_double_blocks_0_img_attn_qkv"), qkv, atol=1e-3, rtol=1e-2)
    linear1 = delta("transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj")
    torch.testing.assert_close(ui_delta("lora_unet_single_blocks_1_linear1"), linear1, atol=1e-3, rtol=1e-2)
    assert qkv.abs().max() > 1e-3  # it trained


@pytest.mark.slow
def test_trained_files_metadata_and_reload_in_diffusers(trained, tiny_models):
    """The diffusers file holds no `.alpha` (diffusers 0.42 refuses them for FLUX.2), only `transformer.` keys;
    both files load in Flux2KleinPipeline.load_lora_weights to the same transformer."""
    with safe_open(str(trained / "person.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "Flux.2-klein/lora"  # the tiny model is neither 4B nor 9B wide
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
    assert metadata["ss_base_model_version"] == "flux2_klein"
    assert metadata["sdlora.klein_variant"] == "base" and metadata["sdlora.klein_distilled"] == "False"
    assert (metadata["ss_timestep_sampling"], metadata["ss_discrete_flow_shift"]) == ("uniform", "1.0")
    assert metadata["ss_text_encoder_layers"] == "9,18,27"
    assert families.detect_lora(metadata) == "klein"
    diffusers_file = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    assert not any(k.endswith(".alpha") for k in diffusers_file)
    assert all(k.startswith("transformer.") for k in diffusers_file)
    outputs = []
    for path in (trained, trained / "person.safetensors"):
        pipe = load(tiny_models["klein"])
        pipe.load_lora_weights(str(path))
        outputs.append(transformer_output(pipe))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-4
    assert (outputs[0] - transformer_output(load(tiny_models["klein"]))).abs().max() > 1e-4


def test_names_and_versions_of_the_real_checkpoints():
    """musubi-tuner's and ai-toolkit's names for the 4B and 9B checkpoints, from the transformer's width."""
    for width, size in ((3072, "4b"), (4096, "9b")):
        transformer = SimpleNamespace(config=SimpleNamespace(num_attention_heads=width // 128, attention_head_dim=128))
        for distilled, kind in ((False, "base"), (True, "distilled")):
            pipe = SimpleNamespace(transformer=transformer, config={"is_distilled": distilled})
            variant = KLEIN.variant(pipe)
            assert variant == f"{size}-{kind}" and KLEIN.is_distilled(pipe) is distilled
            assert KLEIN.modelspec_architecture("flow", variant) == f"Flux.2-klein-{size}/lora"
            assert KLEIN.kohya_base_version("flow", variant) == f"flux2_klein_{size}"
    assert families.detect_lora({"ss_base_model_version": "flux2_klein_9b"}) == "klein"  # not Flux.1's "flux"
    assert families.detect_lora({"modelspec.architecture": "Flux.2-klein-4b/lora"}) == "klein"


def test_base_and_distilled_told_apart_by_the_pipeline_config(tiny_models):
    from sdlora.config import Config
    from sdlora.families.klein.tiny import tiny_klein_pipeline

    pipe = load(tiny_models["klein"])
    assert not KLEIN.is_distilled(pipe) and KLEIN.variant(pipe) == "base"
    base = families.with_defaults(Config(), KLEIN, pipe)
    assert (base.generate.steps, base.generate.cfg, base.generate.scheduler) == (50, 4.0, "flow_euler")
    objective = KLEIN.objective(pipe.scheduler, "cpu", "auto", base.train.timestep_shift)
    assert objective.sampling == "uniform"  # diffusers' klein script: unshifted sigmas
    shifted = KLEIN.objective(pipe.scheduler, "cpu", "auto", 3.0)  # train.timestep_shift set
    assert (shifted.sampling, shifted.shift) == ("shift", 3.0)
    distilled = tiny_klein_pipeline(distilled=True)  # the same weights, is_distilled in the pipeline config
    assert KLEIN.is_distilled(distilled) and KLEIN.variant(distilled) == "distilled"
    config = families.with_defaults(Config(), KLEIN, distilled)
    assert (config.generate.steps, config.generate.cfg) == (4, 1.0)
    given = Config.model_validate({"generate": {"steps": 8}})
    assert families.with_defaults(given, KLEIN, distilled).generate.steps == 8  # a setting given wins


def test_single_file_round_trip_through_diffusers_converter(tiny_models, tmp_path):
    """BFL's names (fused qkv, `linear1`, `.scale` norms, swapped final modulation), bare and under ComfyUI's
    prefix, read back by diffusers' FLUX.2 converter to the same transformer; FLUX.2 [dev]'s keys not claimed."""
    from safetensors.torch import save_file

    from sdlora import models
    from sdlora.config import ModelConfig
    from sdlora.testing import write_single_file

    path = write_single_file(tiny_models["klein"], tmp_path / "flux-2-klein-tiny.safetensors")
    state = load_file(str(path))
    assert "double_blocks.0.img_attn.qkv.weight" in state and "single_blocks.1.linear1.weight" in state
    assert "double_blocks.0.txt_attn.norm.key_norm.scale" in state and "final_layer.adaLN_modulation.1.weight" in state
    comfy = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(comfy))
    expected = load(tiny_models["klein"]).transformer.state_dict()
    for file in (path, comfy):
        assert models.peek_family(ModelConfig(base=str(file))) is KLEIN
        pipe = KLEIN.load_single_file(file, str(tiny_models["klein"]), {})
        got = pipe.transformer.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not KLEIN.claims_checkpoint(set(state) | {"guidance_in.in_layer.weight"})  # FLUX.2 [dev]
    assert families.detect_checkpoint(state) is KLEIN


def test_latents_and_prediction_equal_the_pipelines_own(tiny_models):
    """Patchify, batch-norm normalisation, packing, positions, t / 1000 and unpacking as Flux2KleinPipeline does
    them, on small tensors; our latents keep image order, so noise and targets are (B, C, H, W)."""
    from diffusers import Flux2KleinPipeline as P

    from sdlora.families.klein.family import patchify, unpatchify

    pipe = load(tiny_models["klein"])
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 4, 8, 8, generator=generator)  # VAE latents
    patches = P._patchify_latents(raw)
    assert torch.equal(patchify(raw), patches) and torch.equal(unpatchify(patches), raw)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    ours = KLEIN.normalize_latents(pipe.vae, raw)
    torch.testing.assert_close(patchify(ours), (patches - mean) / std)
    torch.testing.assert_close(KLEIN.denormalize_latents(pipe.vae, ours), raw)
    packed = P._pack_latents(patchify(ours))  # what the pipeline's loop holds: (B, 16, 16) tokens
    torch.testing.assert_close(KLEIN.preview_latents(pipe, packed, 64, 64), raw)
    with torch.no_grad():
        embeds = torch.randn(2, 7, 48, generator=generator)  # (B, L, 3 x 16) stacked Qwen3 layers
        sigmas = torch.tensor([0.25, 0.75])
        predicted = KLEIN.predict(pipe.transformer, ours, sigmas, {"prompt_embeds": embeds}, None)
        text_ids = P._prepare_text_ids(embeds)
        ids = P._prepare_latent_ids(patchify(ours))
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=(sigmas * 1000) / 1000,
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
    torch.testing.assert_close(patchify(predicted), P._unpack_latents_with_ids(theirs, ids))
    # Flow matching on these latents: x_t = (1 - s) x0 + s eps, velocity eps - x0, x0 back from x_t - s v.
    objective = KLEIN.objective(pipe.scheduler, "cpu")
    noise = torch.randn(ours.shape, generator=generator)
    noisy = objective.noisy(ours, noise, sigmas)
    torch.testing.assert_close(noisy[1], 0.25 * ours[1] + 0.75 * noise[1])
    velocity = objective.target(ours, noise, sigmas)
    torch.testing.assert_close(noisy - sigmas.view(-1, 1, 1, 1) * velocity, ours)
    draws = objective.sample_timesteps(4096, torch.Generator().manual_seed(0))
    assert 0.45 < draws.mean() < 0.55 and draws.min() < 0.02 and draws.max() > 0.98  # U(0, 1), unshifted


def test_photo_renders_through_the_inpainting_pipeline(tiny_models):
    """diffusers' AutoPipelineForImage2Image gives klein's text-to-image pipeline (whose `image` is a reference, not
    a start) and AutoPipelineForInpainting none: --init-image runs Flux2KleinInpaintPipeline with the whole image
    masked at --strength, --keep-face with the face kept; sharing the base's weights."""
    from diffusers import Flux2KleinInpaintPipeline

    from sdlora.config import GenerateConfig
    from sdlora.generate import Source, _runner

    pipe, photo = load(tiny_models["klein"]), Image.new("RGB", (64, 64), (120, 80, 40))
    runner_, call = _runner(pipe, KLEIN, GenerateConfig(strength=0.4), Source(photo))
    assert isinstance(runner_, Flux2KleinInpaintPipeline) and runner_.transformer is pipe.transformer
    assert call["call_kwargs"] == {"strength": 0.4} and call["init_images"] is photo
    assert call["mask_images"].size == (64, 64) and call["mask_images"].getextrema() == (255, 255)
    face = Image.new("L", (64, 64), 0)
    runner_, call = _runner(pipe, KLEIN, GenerateConfig(), Source(photo, landmarks=[], face_mask=face))
    assert isinstance(runner_, Flux2KleinInpaintPipeline) and call["call_kwargs"] == {"strength": 1.0}


@pytest.mark.slow
def test_init_image_with_the_comfyui_file_and_a_filmstrip_through_the_cli(trained, tiny_models, tmp_path):
    """--init-image with NAME.safetensors as the LoRA (read by diffusers' kohya FLUX.2 converter) and the x0
    filmstrip of klein's packed latents (--save-steps)."""
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(photo)
    lora = trained / "person.safetensors"
    args = ["generate", "--base", str(tiny_models["klein"]), "--lora", str(lora), "--prompt", "sks person"]
    args += ["--n", "1", "--size", "64x64", "--steps", "4", "--init-image", str(photo), "--strength", "0.5"]
    result = runner.invoke(app, [*args, "--save-steps", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(tmp_path / "out" / "0000-42.png")).astype(int)
    assert image.shape == (64, 64, 3) and image.std() > 0
    strip = Image.open(tmp_path / "out" / "0000-42-steps.png")
    assert strip.size == (2 * 64, 64)  # 4 steps x strength 0.5: two frames
    assert np.array_equal(np.asarray(strip.crop((64, 0, 128, 64))).astype(int), image)  # the last x0 is the image


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--train-text-encoder"], ["--train-text-encoder", "FLUX.2 [klein] trains no text-encoder LoRA"]),
        (["--pivotal"], ["--pivotal: not available for FLUX.2 [klein] bases", "--no-pivotal"]),
    ],
)
def test_what_the_family_cant_honour_is_refused_before_training(tiny_models, tmp_path, option, words):
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(tiny_models["klein"]), "--steps", "2", *option]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(word in line for word in words), line
    assert not (out / "checkpoints").exists()


def test_flux2_dev_and_a_negative_prompt_refused(tiny_models, tmp_path):
    """FLUX.2 [dev] (a guidance embedding, a Mistral encoder) is no klein; klein's pipelines take no negative
    prompt, so a set one is refused in one line rather than dropped."""
    dev = SimpleNamespace(
        transformer=type("Flux2Transformer2DModel", (), {"config": SimpleNamespace(guidance_embeds=True)})()
    )
    assert not KLEIN.claims(dev)
    args = ["generate", "--base", str(tiny_models["klein"]), "--prompt", "x", "--negative", "blurry"]
    result = runner.invoke(app, [*args, "--size", "64x64", "--steps", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--negative: FLUX.2 [klein] pipelines take no negative prompt" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything loads or is written
    data = subject_set(tmp_path / "data")
    args = ["train", str(data), str(tmp_path / "run"), "--base", str(tiny_models["klein"]), "--steps", "1"]
    result = runner.invoke(app, [*args, "--set", "generate.negative=blurry"])  # the sample grids' negative prompt
    assert result.exit_code == 2 and "take no negative prompt" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_kohya_name_is_a_weight_of_the_real_bfl_transformer():
    """At klein-4B's real widths (hidden 3072, text width 7680; one block of each kind, on the meta device): each
    LoRA target's kohya module is a weight of the BFL-named transformer (what ComfyUI's generic `lora_unet_` map is
    built from), with the fused rows adding up, and diffusers' own converter reads the BFL names back."""
    import re

    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from sdlora.families.klein import keys

    config = dict(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24)
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**config, joint_attention_dim=7680, guidance_embeds=False)
    state = transformer.state_dict()
    bfl = keys.to_bfl(state)
    targets = re.compile(KLEIN.denoiser_targets("all"))
    rows: dict[str, int] = {}
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and targets.fullmatch(path):
            name, _, _ = keys.bfl_module(path)
            assert f"{name}.weight" in bfl, path
            rows[name] = rows.get(name, 0) + module.weight.shape[0]
    assert all(bfl[f"{name}.weight"].shape[0] == count for name, count in rows.items())
    assert rows["double_blocks.0.img_attn.qkv"] == 3 * 3072 and "single_blocks.0.linear1" in rows
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape for k in state)
