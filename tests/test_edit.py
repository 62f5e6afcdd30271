"""Edit models and reference images: Qwen-Image-Edit as a family (detection, its processor stand-in, a LoRA trained
text-to-image that reloads, resumes and renders), `generate --reference` (photos or a prepped dataset's best faces,
recorded in each image's metadata) on Qwen-Image-Edit and FLUX.2 [klein], and the one-line refusal of a base that
takes no reference images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from generate_helpers import max_diff
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families, models
from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.generate import references

runner = CliRunner()
PROMPT = "a photo of sks person"


@pytest.fixture(autouse=True)
def small_references(monkeypatch):
    """The Edit-Plus pipeline scales references to ~384^2 px for the VL prompt and ~1024^2 px for the VAE tokens:
    64^2 keeps the tiny renders fast on a CPU (the code path is the same)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return sorted(subject_set(tmp_path_factory.mktemp("edit-photos") / "set").glob("*.png"))


def generate(base, out, *extra):
    args = ["generate", "--base", str(base), "--prompt", PROMPT, "--n", "1", "--steps", "2", "--size", "64x64"]
    result = runner.invoke(app, [*args, "--out", str(out), *map(str, extra)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "0000-42.json").read_text())


@pytest.mark.slow
def test_reference_photos_render_and_are_recorded(tiny_models, photos, tmp_path):
    base = tiny_models["qwenedit"]
    pipe = models.load_base(models_config(base))
    family = families.detect(pipe)
    assert (family.name, family.variant(pipe), families.references(family, pipe)) == ("qwenedit", "2511", 3)
    assert type(pipe.processor).__name__ == "VLProcessor"  # Qwen2VLProcessor needs torchvision: the stand-in
    record = generate(base, tmp_path / "refs", "--reference", photos[0], "--reference", photos[1])
    assert record["references"] == [str(photos[0]), str(photos[1])]
    assert json.loads((tmp_path / "refs" / "config.json").read_text())["generate"]["reference"] == record["references"]
    plain_record = generate(base, tmp_path / "text")  # no reference: text-to-image on the Edit model's weights
    assert plain_record["references"] == []
    image = tmp_path / "refs" / "0000-42.png"
    assert np.asarray(Image.open(image)).std() > 0
    assert max_diff(image, tmp_path / "text" / "0000-42.png") > 0  # the photos steer the image
    comfyui_loads_the_references(tmp_path / "refs", photos[:2], "TextEncodeQwenImageEditPlus")


def comfyui_loads_the_references(out, photos, encoder):
    """The run's ComfyUI workflow is sound, loads the photos saved beside the images (comfyui-reference-N.png, the
    photos' pixels) into `encoder` and renders with the run's steps and seed."""
    from sdlora.comfyui import workflow

    graph = json.loads((out / "comfyui.json").read_text())
    assert workflow.problems(graph) == []
    names = [node["inputs"]["image"] for node in graph.values() if node["class_type"] == "LoadImage"]
    assert names == [f"comfyui-reference-{i}.png" for i in range(1, len(photos) + 1)]
    for name, photo in zip(names, photos, strict=True):
        assert max_diff(out / name, photo) == 0
    assert any(node["class_type"] == encoder for node in graph.values())
    (noise,) = [n["inputs"] for n in graph.values() if n["class_type"] in ("KSampler", "RandomNoise")]
    assert noise.get("seed", noise.get("noise_seed")) == 42


def models_config(base):
    from sdlora.config import Config

    return Config().model.model_copy(update={"base": str(base)})


def test_a_base_without_reference_input_is_refused_in_one_line_before_loading(tiny_models, photos, tmp_path):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    base = tiny_models["sd1"]
    args = ["generate", "--base", str(base), "--prompt", PROMPT, "--reference", str(photos[0]), "--out", str(tmp_path)]
    original, models.load_pipeline = models.load_pipeline, no_loading
    try:
        result = runner.invoke(app, args)
    finally:
        models.load_pipeline = original
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --reference") and "takes no reference" in lines[0]
    assert "Qwen-Image-Edit" in lines[0] and not list(tmp_path.glob("*.png"))


def test_a_dataset_folder_gives_its_best_faces(tmp_path):
    from sdlora.prep.manifest import ManifestEntry, write_manifest

    def entry(i, sharpness, face):
        Image.new("RGB", (64, 64)).save(tmp_path / f"img{i}.png")
        box = (0, 0, 512, 512)
        return ManifestEntry(
            image=f"img{i}.png",
            caption="a photo of sks person",
            source=f"/photos/{i}.jpg",
            source_sha256="0" * 64,
            source_size=(512, 512),
            crop_box=box,
            face_box=None if face is None else (100, 100, 100 + face, 100 + face),
            sharpness=sharpness,
            width=64,
            height=64,
        )

    # Image 3 is sharpest but its face is tiny; image 4 has no face.
    entries = [
        entry(0, 50.0, 300),
        entry(1, 80.0, 300),
        entry(2, 20.0, 300),
        entry(3, 400.0, 20),
        entry(4, 900.0, None),
    ]
    write_manifest(tmp_path / "manifest.jsonl", entries)
    assert references.choose([tmp_path], 3) == [tmp_path / "img1.png", tmp_path / "img0.png", tmp_path / "img3.png"]
    assert references.choose([tmp_path], 1) == [tmp_path / "img1.png"]
    with pytest.raises(UsageError, match="at most 1"):
        references.choose([tmp_path / "img0.png", tmp_path / "img1.png"], 1)
    (tmp_path / "manifest.jsonl").unlink()
    with pytest.raises(UsageError, match="not a prepped dataset"):
        references.choose([tmp_path], 3)


@pytest.mark.slow
def test_klein_renders_from_reference_photos(tiny_models, photos, tmp_path):
    record = generate(tiny_models["klein"], tmp_path / "refs", "--reference", photos[0])
    generate(tiny_models["klein"], tmp_path / "text")
    assert record["references"] == [str(photos[0])]
    comfyui_loads_the_references(tmp_path / "refs", photos[:1], "ReferenceLatent")
    assert max_diff(tmp_path / "refs" / "0000-42.png", tmp_path / "text" / "0000-42.png") > 0


@pytest.mark.slow
def test_flux_kontext_takes_one_reference_and_flux_none(photos, tmp_path):
    from diffusers import FluxKontextPipeline

    pipe = families.get("flux").tiny_pipeline(0)
    kontext = FluxKontextPipeline.from_pipe(pipe)
    assert families.detect(kontext).name == "flux"
    flux = families.get("flux")
    assert (families.references(flux, kontext), families.references(flux, pipe)) == (1, 0)
    kontext.save_pretrained(tmp_path / "kontext")  # the whole command on a Kontext folder: one photo, recorded
    record = generate(tmp_path / "kontext", tmp_path / "refs", "--reference", photos[0])
    assert record["references"] == [str(photos[0])]
    two = ["--reference", str(photos[0]), "--reference", str(photos[1]), "--out", str(tmp_path / "two")]
    result = runner.invoke(app, ["generate", "--base", str(tmp_path / "kontext"), "--prompt", PROMPT, *two])
    assert result.exit_code == 2 and "at most 1" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "two").exists()


def train_args(data, out, base, *extra):
    args = ["train", data, out, "--base", base, "--steps", "4", "--resolution", "64", "--rank", "4", "--alpha", "8"]
    args += ["--lr", "1e-3", "--sample-every", "4", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    args += [
        "--name",
        "person",
        "--set",
        "train.sample_steps=2",
        "--set",
        "train.sample_prompts=['a photo of {trigger}']",
    ]
    return plain([*args, *extra])


def resume_equals(data, out, base, *extra):
    """A copy of `out` resumed from its step-2 checkpoint ends with the same LoRA."""
    resumed = out.parent / f"{out.name}-resumed"
    shutil.copytree(out, resumed)
    for name in ("pytorch_lora_weights.safetensors", "person.safetensors"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    result = runner.invoke(app, train_args(data, resumed, base, "--resume", "latest", *extra))
    assert result.exit_code == 0, result.output
    straight = load_file(str(out / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == again.keys()
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) <= 1e-6
    assert max(straight[k].abs().max().item() for k in straight if "lora_B" in k) > 0  # it trained


@pytest.mark.slow
def test_an_edit_model_lora_trains_text_to_image_resumes_and_renders_its_sample(tiny_models, photos, tmp_path):
    base, data, out = tiny_models["qwenedit"], subject_set(tmp_path / "data"), tmp_path / "out"
    result = runner.invoke(app, train_args(data, out, base))
    assert result.exit_code == 0, result.output
    for path in (out / "pytorch_lora_weights.safetensors", out / "person.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            metadata, keys = handle.metadata(), list(handle.keys())
        assert families.detect_lora(metadata) == "qwenedit"
    assert metadata["ss_base_model_version"] == "qwen_image_edit"
    assert keys and all(key.startswith("diffusion_model.transformer_blocks.") for key in keys)  # ComfyUI's names
    generate(base, tmp_path / "gen", "--lora", out, "--compare")
    assert max_diff(tmp_path / "gen" / "0000-42.png", out / "samples" / "step-000004.png") == 0
    record = generate(base, tmp_path / "refs", "--lora", out, "--reference", photos[0], "--compare")
    assert record["references"] == [str(photos[0])] and Image.open(tmp_path / "refs" / "compare.png").size == (128, 64)
    resume_equals(data, out, base)


def control_images(data, folder):
    """Each dataset image's control image, named as it: the image mirrored and darkened (an 'edit' to undo)."""
    folder.mkdir()
    for image in data.glob("*.png"):
        Image.eval(Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT), lambda v: v // 2).save(
            folder / image.name
        )
    return folder


@pytest.mark.slow
def test_edit_training_with_control_images_resumes_and_reloads(tiny_models, tmp_path):
    import torch

    base, data, out = tiny_models["qwenedit"], subject_set(tmp_path / "data"), tmp_path / "out"
    controls = control_images(data, tmp_path / "controls")
    result = runner.invoke(app, train_args(data, out, base, "--control-dir", controls))
    assert result.exit_code == 0, result.output
    resume_equals(data, out, base, "--control-dir", controls)
    family, pipe = families.get("qwenedit"), models.load_base(models_config(base))
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    control = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = family.encode_prompts([pipe.tokenizer], [pipe.text_encoder], [PROMPT])
        before = family.predict(pipe.transformer, noisy, torch.tensor([0.5]), {**cond, "control": control[:1]}, None)
        pipe.load_lora_weights(str(out))
        after = [
            family.predict(pipe.transformer, noisy, torch.tensor([0.5]), {**cond, "control": c[None]}, None)
            for c in control
        ]
    assert after[0].shape == noisy.shape  # the target's tokens alone come back
    assert (after[0] - before).abs().max() > 1e-4  # the LoRA reloads and acts
    assert (after[0] - after[1]).abs().max() > 1e-6  # the control tokens condition the prediction


def test_control_images_come_from_the_manifest_or_a_folder_and_need_an_edit_model(tmp_path):
    from sdlora.config import Config
    from sdlora.prep.manifest import ManifestEntry, write_manifest
    from sdlora.train import data as train_data

    folder = subject_set(tmp_path / "plain")
    controls = control_images(folder, tmp_path / "controls")
    examples = train_data.load_examples(folder, "x", controls)
    assert [e.control for e in examples] == [controls / e.image.name for e in examples]
    train = Config().train.model_copy(update={"control_dir": controls, "preservation": "none"})
    train_data.check_controls(examples, families.get("qwenedit"), train)
    with pytest.raises(UsageError, match="--control-dir: Qwen-Image bases take no control images"):
        train_data.check_controls(examples, families.get("qwenimage"), train)
    (controls / "img0.png").unlink()
    with pytest.raises(UsageError, match="no control image for img0.png"):
        train_data.load_examples(folder, "x", controls)
    size = dict(source="/p.jpg", source_sha256="0" * 64, source_size=(64, 64), crop_box=(0, 0, 64, 64), sharpness=1.0)
    entry = ManifestEntry(image="img1.png", caption="c", width=64, height=64, control="ctl/img1.png", **size)
    (folder / "ctl").mkdir()
    shutil.copy(folder / "img1.png", folder / "ctl" / "img1.png")
    write_manifest(folder / "manifest.jsonl", [entry])
    (example,) = train_data.load_examples(folder, "x")
    assert example.control == folder / "ctl" / "img1.png"


EDIT_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "processor", "transformer")


def pipeline_picture(pipe, image):
    """An input image as QwenImageEditPlusPipeline's __call__ hands it to encode_prompt: scaled to
    CONDITION_IMAGE_SIZE's area, sides multiples of 32."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    width, height = plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, image.width / image.height)
    return pipe.image_processor.resize(image, height, width)


def test_an_edit_prompt_with_its_control_image_is_encoded_as_the_pipeline_does(photos):
    """Edit training's conditioning of (prompt, control image): the Edit-Plus pipeline's own
    encode_prompt(prompt, image=...) of the image as its __call__ scales it, the first Edit's likewise (its template's
    one picture at ~1024^2 px), and not the text-only encoding."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import torch
    from diffusers import QwenImageEditPipeline

    from sdlora.families.qwenedit.family import FIRST_EDIT_TEMPLATE

    family = families.get("qwenedit")
    pipe = family.tiny_pipeline(0)
    picture = Image.open(photos[0]).convert("RGB").resize((48, 64))
    with torch.no_grad():
        ours = family.encode_with_pictures(pipe, pipe.text_encoder, [PROMPT, ""], [picture, picture])
        theirs = [pipe.encode_prompt(prompt, image=[pipeline_picture(pipe, picture)])[0][0] for prompt in (PROMPT, "")]
        text = family.encode_prompts([pipe.tokenizer], [pipe.text_encoder], [PROMPT])
        first = QwenImageEditPipeline(**{name: getattr(pipe, name) for name in EDIT_PARTS})
        ours_first = family.encode_with_pictures(first, pipe.text_encoder, [PROMPT], [picture])["prompt_embeds"]
        w, h, _ = edit.calculate_dimensions(1024 * 1024, 48 / 64)
        theirs_first, _ = first.encode_prompt(PROMPT, image=first.image_processor.resize(picture, h, w))
    for row, expected in enumerate(theirs):
        n = len(expected)
        assert ours["prompt_mask"][row].sum() == n and ours["prompt_mask"][row, :n].all()
        torch.testing.assert_close(ours["prompt_embeds"][row, :n], expected, atol=1e-5, rtol=1e-4)
    n = int(text["prompt_mask"][0].sum())
    assert len(theirs[0]) > n  # the picture's tokens come before the prompt's
    assert not torch.allclose(theirs[0][-n:], text["prompt_embeds"][0, :n], atol=1e-3)  # not the text-only one
    assert first.prompt_template_encode == FIRST_EDIT_TEMPLATE
    torch.testing.assert_close(ours_first, theirs_first, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_edit_training_looks_up_each_prompt_with_its_control_image(tiny_models, tmp_path):
    """What training feeds the transformer for examples with control images (cached by staging before the denoiser
    loads, looked up per micro-batch, with flips and caption dropout) is the Edit pipeline's own encoding of the
    prompt with the control image as cut (and mirrored) for training."""
    import torch
    from accelerate import Accelerator
    from PIL import ImageOps

    from sdlora.config import Config
    from sdlora.train import data as train_data
    from sdlora.train import staging
    from sdlora.train.batches import Batches, image_sets
    from sdlora.train.state import Plan

    base, folder = tiny_models["qwenedit"], subject_set(tmp_path / "data")
    controls = control_images(folder, tmp_path / "controls")
    config = Config().model_copy(update={"model": models_config(base)})
    train = config.train.model_copy(update={"resolution": 64, "flip": True, "caption_dropout": 0.5})
    train = train.model_copy(update={"sample_every": 0, "eval_every": 0, "preservation": "none"})
    config = config.model_copy(update={"train": train})
    examples = train_data.load_examples(folder, "x", controls)
    plan = Plan(folder, tmp_path / "out", examples, "sks person", "no", None, "person", config=config)
    cached = staging.encode_first(config, plan, Accelerator(cpu=True), None)
    pipe = models.load_base(config.model)
    family = families.detect(pipe)
    instances, _, control_set = image_sets(examples, None, train, pipe.vae, family)
    objective = family.objective(pipe.scheduler, "cpu")
    settings = dict(seed=0, batch_size=4, num_processes=1, rank=0, noise_offset=0.0, caption_dropout=0.5)
    batches = Batches(instances, None, text_cache=cached.captions, controls=control_set,
                      objective=objective, **settings)  # fmt: skip
    seen = set()
    with torch.no_grad():
        for k in range(2):
            batch = batches.micro_batch(k, torch.device("cpu"))
            for row, prompt, (i, flipped) in zip(range(4), batch.prompts, batches.order.batch(k), strict=True):
                image = ImageOps.fit(Image.open(examples[i].control).convert("RGB"), (64, 64), Image.Resampling.LANCZOS)
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image
                embeds = pipe.encode_prompt(prompt, image=[pipeline_picture(pipe, image)])[0][0]
                n = len(embeds)
                assert batch.cond["prompt_mask"][row].sum() == n and batch.cond["prompt_mask"][row, :n].all()
                torch.testing.assert_close(batch.cond["prompt_embeds"][row, :n], embeds, atol=1e-5, rtol=1e-4)
                seen.add((prompt, bool(flipped)))
    assert {prompt for prompt, _ in seen} == {PROMPT, ""} and {f for _, f in seen} == {True, False}


def test_a_single_file_edit_transformer_loads_with_its_edit_config(tiny_models, tmp_path):
    """Comfy-Org's Edit transformer file (Qwen-Image's names, bare or under ComfyUI's prefix) with
    model.single_file_config naming an Edit folder: the Edit pipeline, its family and 2511's zero_cond_t from the
    config, the file's weights; without the config, one line naming it."""
    import torch
    from safetensors.torch import save_file

    from sdlora.testing import write_single_file

    base = tiny_models["qwenedit"]
    path = write_single_file(base, tmp_path / "qwen_image_edit_2511_bf16.safetensors")
    state = load_file(str(path))
    assert state.pop("__index_timestep_zero__").numel() == 0  # ComfyUI's sign of 2511 (comfy/model_detection.py)
    assert families.detect_checkpoint(set(state)).name == "qwenimage"  # the keys alone can't tell
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(prefixed))
    config = models_config(path).model_copy(update={"single_file_config": str(base)})
    assert models.peek_family(config).name == "qwenedit"
    for file in (path, prefixed):
        pipe = models.load_base(config.model_copy(update={"base": str(file)}))
        family = families.detect(pipe)
        assert (type(pipe).__name__, family.name, family.variant(pipe)) == (
            "QwenImageEditPlusPipeline",
            "qwenedit",
            "2511",
        )
        assert type(pipe.processor).__name__ == "VLProcessor"
        loaded = pipe.transformer.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    args = ["generate", "--base", str(path), "--prompt", PROMPT, "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "single_file_config=Qwen/Qwen-Image-Edit-2511" in lines[0]
