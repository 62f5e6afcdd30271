"""What Qwen-Image has beyond the family contract (test_family_contract.py): its UI LoRA file in ComfyUI's form
(`diffusion_model.` + diffusers names, alpha/rank baked into lora_B, no `.alpha`) read back by diffusers, with its
metadata; its defaults (50 steps, true CFG 4, unshifted training sigmas); the transformer-only single file, bare or
under ComfyUI's prefix; per-channel latent normalisation, 2x2 packing and the prediction as QwenImagePipeline and
diffusers' Qwen-Image script compute them; cached prompts equal to the pipeline's encode_prompt; the Edit
pipelines left unclaimed; img2img and the x0 filmstrip through the one-frame video VAE."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app
from sdlora.families.qwenimage import QWENIMAGE

runner = CliRunner()


def load(folder: Path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformer_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        cond = QWENIMAGE.encode_prompts([pipe.tokenizer], [pipe.text_encoder], ["a photo of sks person", "x"])
        return QWENIMAGE.predict(pipe.transformer, noisy, torch.tensor([0.3, 0.8]), cond, None)


def test_comfyui_file_names_diffusers_modules_and_bakes_alpha_over_rank(tiny_models, tmp_path):
    """alpha 8 over rank 4: lora_B is peft's times 2, and diffusers reads the file to the same transformer."""
    from peft import LoraConfig

    from sdlora.lora import kohya

    pipe = load(tiny_models["qwenimage"])
    torch.manual_seed(3)
    targets = QWENIMAGE.denoiser_targets("all")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    trained = transformer_output(pipe)
    state = kohya.kohya_state_dict(pipe.transformer, [], QWENIMAGE, dtype=torch.float32)
    assert "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert "diffusion_model.transformer_blocks.1.attn.add_k_proj.lora_B.weight" in state
    assert "diffusion_model.transformer_blocks.0.txt_mlp.net.2.lora_B.weight" in state
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert not any(k.endswith(".alpha") for k in state)
    layer = pipe.transformer.transformer_blocks[1].attn.to_v
    key = "diffusion_model.transformer_blocks.1.attn.to_v"
    torch.testing.assert_close(state[f"{key}.lora_A.weight"], layer.lora_A["default"].weight)
    torch.testing.assert_close(state[f"{key}.lora_B.weight"], layer.lora_B["default"].weight * 2)
    path = tmp_path / "person.safetensors"
    kohya.save_kohya(path, state, {"modelspec.architecture": "Qwen-Image/lora"})
    fresh = load(tiny_models["qwenimage"])
    plain = transformer_output(fresh)
    fresh.load_lora_weights(str(path))  # diffusers strips `diffusion_model.`; ComfyUI maps the names as they are
    assert (transformer_output(fresh) - trained).abs().max() < 1e-5
    assert (plain - trained).abs().max() > 1e-3  # the LoRA changes the output


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory) -> Path:
    """A 2-step run of `sdlora train` on the tiny Qwen-Image, rank 4, alpha 8."""
    root = tmp_path_factory.mktemp("qwenimage-train")
    args = ["train", str(subject_set(root / "data")), str(root / "out"), "--base", str(tiny_models["qwenimage"])]
    args += ["--steps", "2", "--resolution", "64", "--rank", "4", "--alpha", "8", "--name", "person"]
    args += ["--sample-every", "0", "--checkpoint-every", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.mark.slow  # the contract's run covers the reload; this adds the names, the scale and the metadata
def test_trained_files_metadata_and_reload_in_diffusers(trained, tiny_models):
    with safe_open(str(trained / "person.safetensors"), framework="pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    assert metadata["modelspec.architecture"] == "Qwen-Image/lora"
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert families.detect_lora(metadata) == "qwenimage"
    assert (metadata["ss_timestep_sampling"], metadata["ss_discrete_flow_shift"]) == ("uniform", "1.0")
    assert metadata["sdlora.sampling_shift"] == "dynamic"
    assert metadata["ss_max_token_length"] == "512"
    assert keys and all(k.startswith("diffusion_model.") for k in keys)
    diffusers_file = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    assert not any(k.endswith(".alpha") for k in diffusers_file)  # diffusers 0.42's `.alpha` trap
    assert all(k.startswith("transformer.") for k in diffusers_file)
    ui = load_file(str(trained / "person.safetensors"))
    assert len(ui) == len(diffusers_file)
    for key, tensor in diffusers_file.items():
        name = "diffusion_model." + key.removeprefix("transformer.")
        torch.testing.assert_close(ui[name], tensor * 2 if ".lora_B." in key else tensor)  # alpha 8 / rank 4
    outputs = []
    for path in (trained, trained / "person.safetensors"):
        pipe = load(tiny_models["qwenimage"])
        pipe.load_lora_weights(str(path))
        outputs.append(transformer_output(pipe))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5


def test_defaults_names_and_the_training_sigmas():
    from sdlora.config import Config

    pipe = SimpleNamespace()  # nothing is read from the base: one checkpoint kind, undistilled
    defaults = QWENIMAGE.generate_defaults(pipe)
    assert (defaults["generate.steps"], defaults["generate.cfg"], defaults["train.timestep_shift"]) == (50, 4.0, 1.0)
    config = families.with_defaults(Config(), QWENIMAGE, pipe)
    assert (config.generate.steps, config.generate.cfg, config.generate.scheduler) == (50, 4.0, "flow_euler")
    assert not QWENIMAGE.is_distilled(pipe) and QWENIMAGE.undistilled_base(pipe) == ""
    assert QWENIMAGE.modelspec_architecture("flow") == "Qwen-Image/lora"
    assert families.detect_lora({"modelspec.architecture": "Qwen-Image/lora"}) == "qwenimage"
    assert families.detect_lora({"ss_base_model_version": "qwen_image"}) == "qwenimage"  # musubi-tuner's
    assert QWENIMAGE.sequence_length(pipe, None) == 512 and QWENIMAGE.sequence_length(pipe, 1024) == 1024
    from sdlora.errors import UsageError

    with pytest.raises(UsageError, match="at most 1024"):
        QWENIMAGE.sequence_length(pipe, 2048)
    objective = QWENIMAGE.objective(None, "cpu", "auto", config.train.timestep_shift)
    draws = objective.sample_timesteps(4096, torch.Generator().manual_seed(0))
    assert 0.45 < draws.mean() < 0.55 and draws.min() < 0.02 and draws.max() > 0.98  # U(0, 1), unshifted
    shifted = QWENIMAGE.objective(None, "cpu", "auto", 3.0)
    assert (shifted.sampling, shifted.shift) == ("shift", 3.0)


def test_edit_and_layered_pipelines_are_not_this_family(tiny_models):
    pipe = load(tiny_models["qwenimage"])
    assert families.detect(pipe) is QWENIMAGE
    for name in ("QwenImageEditPlusPipeline", "QwenImageEditPipeline", "QwenImageLayeredPipeline"):
        stand_in = SimpleNamespace(transformer=pipe.transformer, config={"_class_name": name})
        assert not QWENIMAGE.claims(stand_in)
    stand_in = SimpleNamespace(transformer=pipe.transformer, config={"_class_name": "QwenImagePipeline"})
    assert QWENIMAGE.claims(stand_in)
    pipe.transformer.register_to_config(zero_cond_t=True)  # Qwen-Image-Edit-2511's transformer
    with pytest.raises(ValueError, match="not a pipeline of a known family"):
        families.detect(pipe)


def test_single_file_round_trip_bare_and_under_comfyuis_prefix(tiny_models, tmp_path):
    from sdlora.testing import write_single_file

    path = write_single_file(tiny_models["qwenimage"], tmp_path / "qwen_image.safetensors")
    bare = load_file(str(path))
    assert "txt_norm.weight" in bare and "transformer_blocks.0.attn.to_q.weight" in bare  # diffusers' names
    assert families.detect_checkpoint(set(bare)) is QWENIMAGE
    prefixed = tmp_path / "qwen_image_comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in bare.items()}, str(prefixed))
    assert families.detect_checkpoint(set(load_file(str(prefixed)))) is QWENIMAGE
    original = load(tiny_models["qwenimage"]).transformer.state_dict()
    for file in (path, prefixed):
        loaded = QWENIMAGE.load_single_file(file, str(tiny_models["qwenimage"]), {}).transformer.state_dict()
        assert loaded.keys() == original.keys()
        assert all(torch.equal(loaded[k], original[k]) for k in original)
    from sdlora.errors import UsageError

    with pytest.raises(UsageError, match="model.single_file_config=Qwen/Qwen-Image"):
        QWENIMAGE.load_single_file(path, None, {})


def test_latents_and_prediction_equal_the_pipelines_own(tiny_models):
    """Per-channel normalisation as diffusers' script ((x - mean) * (1 / std)) and the pipeline's decode (x / (1 /
    std) + mean), 2x2 packing, t / 1000 and the masked caption as QwenImagePipeline passes them, on small tensors."""
    from diffusers import QwenImagePipeline as P

    from sdlora.families.qwenimage.family import pack, unpack

    pipe = load(tiny_models["qwenimage"])
    config = pipe.vae.config
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 4, 1, 8, 8, generator=generator)  # the VAE's one-frame latents
    mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std).view(1, 4, 1, 1, 1)
    ours = QWENIMAGE.normalize_latents(pipe.vae, raw[:, :, 0])
    assert torch.equal(ours, ((raw - mean) * inv_std)[:, :, 0])
    assert not torch.allclose(ours, raw[:, :, 0])  # the tiny VAE's statistics are not the identity
    torch.testing.assert_close(QWENIMAGE.denormalize_latents(pipe.vae, ours), raw[:, :, 0])
    packed = P._pack_latents(ours, 2, 4, 8, 8)
    assert torch.equal(pack(ours), packed) and torch.equal(unpack(packed, 8, 8), ours)
    assert torch.equal(P._unpack_latents(packed, 64, 64, 8)[:, :, 0], ours)
    torch.testing.assert_close(QWENIMAGE.preview_latents(pipe, packed, 64, 64), raw)  # what vae.decode takes
    with torch.no_grad():
        # The byte-level tiny tokenizer makes the template ~150 tokens (the real one: 34, all dropped).
        cond = QWENIMAGE.encode_prompts([pipe.tokenizer], [pipe.text_encoder], ["a photo of sks person", "a cat"], 512)
        assert cond["prompt_embeds"].shape[1] == 512  # padded for the cache, trimmed again in predict
        embeds, mask = pipe.encode_prompt(["a photo of sks person", "a cat"])
        sigmas = torch.tensor([0.25, 0.75])
        predicted = QWENIMAGE.predict(pipe.transformer, ours, sigmas, cond, None)
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=(sigmas * 1000) / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]
    torch.testing.assert_close(pack(predicted), theirs)


def test_cached_prompts_equal_the_pipelines_encode_prompt(tiny_models):
    """Rows cached at a fixed length (staged training) give back what encode_prompt computes, mask included (None
    where nothing is padding, as the pipeline returns it)."""
    from sdlora.families.qwenimage.family import CachedPrompts

    pipe = load(tiny_models["qwenimage"])
    rows = {}
    with torch.no_grad():
        for batch in (["a photo of sks person", "a cat"], [""]):
            cond = QWENIMAGE.encode_prompts([pipe.tokenizer], [pipe.text_encoder], batch, 512)
            rows |= {p: {k: v[i].to(torch.float32) for k, v in cond.items()} for i, p in enumerate(batch)}
        cached = CachedPrompts(pipe, rows)
        for batch in (["a photo of sks person", "a cat"], [""]):
            ours, theirs = cached(batch, max_sequence_length=512), pipe.encode_prompt(batch, max_sequence_length=512)
            assert torch.equal(ours[0], theirs[0])
            assert (ours[1] is None and theirs[1] is None) or torch.equal(ours[1], theirs[1])
    assert cached([""])[1] is None  # one prompt: no padding, no mask


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--train-text-encoder"], ["--train-text-encoder", "Qwen-Image trains no text-encoder LoRA"]),
        (["--pivotal"], ["--pivotal: not available for Qwen-Image bases", "--no-pivotal"]),
    ],
)
def test_what_the_family_cant_honour_is_refused_before_training(tiny_models, tmp_path, option, words):
    data, out = subject_set(tmp_path / "data"), tmp_path / "out"
    args = ["train", str(data), str(out), "--base", str(tiny_models["qwenimage"]), "--steps", "2", *option]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(word in line for word in words), line
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_init_image_with_the_comfyui_file_and_a_filmstrip_through_the_cli(trained, tiny_models, tmp_path):
    """--init-image (QwenImageImg2ImgPipeline from AutoPipelineForImage2Image, true CFG) with NAME.safetensors as
    the LoRA, and the x0 filmstrip decoded through the one-frame video VAE (--save-steps)."""
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(photo)
    lora = trained / "person.safetensors"
    args = ["generate", "--base", str(tiny_models["qwenimage"]), "--lora", str(lora), "--prompt", "sks person"]
    args += ["--n", "1", "--size", "64x64", "--steps", "4", "--init-image", str(photo), "--strength", "0.5"]
    result = runner.invoke(app, [*args, "--save-steps", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(tmp_path / "out" / "0000-42.png")).astype(int)
    assert image.shape == (64, 64, 3) and image.std() > 0
    strip = Image.open(tmp_path / "out" / "0000-42-steps.png")
    assert strip.size == (2 * 64, 64)  # 4 steps x strength 0.5: two frames
    assert np.array_equal(np.asarray(strip.crop((64, 0, 128, 64))).astype(int), image)  # the last x0 is the image
