"""`sdlora eval` end to end: scoring a folder (with CLIP), generating with a LoRA on the tiny model, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.prep.manifest import ManifestEntry, write_manifest
from tests import eval_photos as photos

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A prep-style dataset folder: two crops of the astronaut and manifest.jsonl."""
    folder = tmp_path_factory.mktemp("dataset")
    entries = []
    for i, image in enumerate([photos.astronaut(), photos.same_person_variants()["flip"]]):
        name = f"{i:04d}.png"
        image.save(folder / name)
        entries.append(
            ManifestEntry(
                image=name,
                caption="a photo of zwx person",
                source=f"/photos/{i}.jpg",
                source_sha256="0" * 64,
                source_size=(256, 256),
                crop_box=(0, 0, 256, 256),
                face_box=None,
                sharpness=1.0,
                width=256,
                height=256,
            )
        )
    (folder / "not-in-manifest.png").write_bytes(b"ignored: only the manifest's images are the reference")
    write_manifest(folder / "manifest.jsonl", entries)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP model + processor (real BPE tokenizer), saved as a folder: nothing downloaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from sdlora.testing import clip_text_config as _text_encoder_config
    from sdlora.testing import clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37)
    vision |= dict(num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    config = CLIPConfig(text_config=_text_encoder_config().to_dict(), vision_config=vision, projection_dim=32)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=clip_tokenizer(folder / "tok"),
    )
    processor.save_pretrained(folder)
    return folder


def test_images_end_to_end_with_clip(dataset, tiny_clip, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photos.same_person_variants()["crop"].save(images / "a_subject.png")
    (images / "a_subject.txt").write_text("a photo of a person\n")
    photos.grace_hopper().save(images / "b_stranger.jpg")
    photos.coffee().save(images / "c_cup.png")
    out = tmp_path / "out.json"
    args = ["eval", "--reference", str(dataset), "--images", str(images), "--clip", str(tiny_clip)]
    result = runner.invoke(app, [*args, "--json", str(out), "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "face_rate" in result.output and "recognised_rate" in result.output
    data = json.loads(out.read_text())
    assert data["reference"] == [str(dataset / "0000.png"), str(dataset / "0001.png")]
    assert data["reference_faces"] == 2
    by_name = {Path(image["image"]).name: image for image in data["images"]}
    assert by_name["a_subject.png"]["recognised"] and not by_name["b_stranger.jpg"]["recognised"]
    assert by_name["c_cup.png"]["faces"] == 0
    assert data["summary"]["face_rate"] == pytest.approx(2 / 3)
    assert data["summary"]["recognised_rate"] == pytest.approx(1 / 3)
    # CLIP scores only the image that has a prompt; the summary is its value.
    fidelity = by_name["a_subject.png"]["prompt_fidelity"]
    assert -1.0 <= fidelity <= 1.0 and by_name["b_stranger.jpg"]["prompt_fidelity"] is None
    assert data["summary"]["prompt_fidelity"] == pytest.approx(fidelity)
    assert any("covers 1 of 3" in note for note in data["notes"])
    report = (tmp_path / "report" / "index.html").read_text()
    assert report.count("<img") == 3 + 2
    assert sorted(p.name for p in images.iterdir()) == ["a_subject.png", "a_subject.txt", "b_stranger.jpg", "c_cup.png"]


def _tiny_lora(base: Path, folder: Path, trigger: str | None) -> Path:
    """A LoRA made by peft directly on the tiny UNet, saved in diffusers' key format with our metadata."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # non-zero, so the LoRA changes the images
    state = {f"unet.{key}": value.contiguous() for key, value in get_peft_model_state_dict(unet).items()}
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"} | ({"sdlora.trigger_phrase": trigger} if trigger else {})
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return folder


GEN = ["--set", "generate.steps=2", "--set", "generate.size=64x64", "--set", "generate.scheduler=ddim"]


@pytest.mark.slow
def test_lora_end_to_end_on_tiny_model_without_faces(dataset, tiny_sd1, tmp_path):
    lora = _tiny_lora(tiny_sd1, tmp_path / "run", trigger="zwx person")
    out = tmp_path / "eval.json"
    args = ["eval", "--reference", str(dataset), "--lora", str(lora), "--base", str(tiny_sd1), "--n", "1"]
    result = runner.invoke(app, [*args, "--seed", "7", "--json", str(out), "--report", str(tmp_path / "r"), *GEN])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["trigger"] == "zwx person"
    prompts = [image["prompt"] for image in data["images"]]
    assert len(prompts) == 10 and all("zwx person" in p for p in prompts)
    assert any("friends" in p for p in prompts) and any("full-body" in p for p in prompts)
    assert [image["seed"] for image in data["images"]] == list(range(7, 17))
    # Random tiny images have no faces: reported as such, never a crash.
    summary = data["summary"]
    assert summary["face_rate"] == 0.0 and summary["images_with_face"] == 0
    assert summary["identity"] is None and summary["recognised_rate"] == 0.0 and summary["bleed"] is None
    assert summary["diversity"] is not None
    assert any("no face was detected" in note for note in data["notes"])
    assert any("prompt_fidelity skipped" in note for note in data["notes"])
    assert len(list((tmp_path / "r" / "images").glob("*.png"))) == 10


@pytest.mark.slow
def test_lora_prompts_file_and_trigger_fallback(dataset, tiny_sd1, tmp_path):
    lora = _tiny_lora(tiny_sd1, tmp_path / "run", trigger=None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n{trigger} on a boat\n\n")
    out = tmp_path / "eval.json"
    args = ["eval", "--reference", str(dataset), "--lora", str(lora / "pytorch_lora_weights.safetensors")]
    args += ["--base", str(tiny_sd1), "--prompts", str(prompts), "--n", "2", "--json", str(out), *GEN]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [image["prompt"] for image in data["images"]] == ["sks person on a boat"] * 2  # [prep] token + class
    assert any("no trigger phrase" in note for note in data["notes"])


@pytest.mark.slow
def test_score_checkpoint_for_training(dataset, tiny_sd1):
    from diffusers import StableDiffusionPipeline

    from sdlora.evaluation.run import face_backend, reference_set, score_checkpoint
    from sdlora.generate.render import Sampling

    backend = face_backend("dlib")
    reference = reference_set(dataset, backend)  # once per training run
    assert len(reference.embeddings) == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.set_progress_bar_config(disable=True)
    sampling = Sampling(steps=2, cfg=5.0, scheduler="ddim", width=64, height=64)
    metrics = score_checkpoint(pipe, reference, backend, ["a photo of zwx person"] * 2, [0, 1], sampling)
    assert metrics["images"] == 2 and metrics["face_rate"] == 0.0 and metrics["identity"] is None
    assert 0.0 <= metrics["diversity"] <= 1.0
    again = score_checkpoint(pipe, reference, backend, ["a photo of zwx person"] * 2, [0, 1], sampling)
    assert again == metrics  # fixed prompts and seeds: comparable across steps
    assert "editability" not in metrics  # dlib without CLIP cannot judge an edit: no number at all

    class Clip:  # sees glasses everywhere
        def score(self, pictures, texts):
            return [0.3 if "glasses" in text else 0.2 for text in texts]

    prompts = ["a photo of zwx person", "a photo of zwx person with glasses"]
    texts = ["a photo of a person", "a photo of a person with glasses"]
    edited = score_checkpoint(pipe, reference, backend, prompts, [0, 1], sampling, scorer=Clip(), clip_texts=texts)
    # CLIP prefers the glasses, but the tiny model draws no face: not the person, so not edited.
    assert edited["editability"] == 0.0 and edited["images"] == 1  # identity leaves the edit image out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "{ds}", "--lora", "{ds}"], "can't give both --images and --lora"),
        ([], "give --images DIR"),
        (["--images", "{ds}", "--prompts", "p.txt"], "--prompts only applies with --lora"),
        (["--images", "{ds}", "--reference", "/no/such/folder"], "--reference /no/such/folder: no such folder"),
        (["--images", "/no/such/images", "--reference", "{ds}"], "--images /no/such/images: no such folder"),
        (
            ["--lora", "{ds}", "--reference", "{ds}", "--base", "some-org/some-model"],
            "expected pytorch_lora_weights.safetensors or exactly one",
        ),
    ],
)
def test_cli_errors(dataset, extra, message):
    args = [part.replace("{ds}", str(dataset)) for part in extra]
    if "--reference" not in args and "give --images" not in message and "both" not in message:
        args += ["--reference", str(dataset)]
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_missing_reference(dataset):
    result = runner.invoke(app, ["eval", "--images", str(dataset)])
    assert result.exit_code == 2 and "--reference is required" in result.output


def test_insightface_without_package_or_weights_is_a_clear_error(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.insightface/models here
    result = runner.invoke(
        app, ["eval", "--reference", str(dataset), "--images", str(dataset), "--face-model", "insightface"]
    )
    assert result.exit_code == 2, result.output
    assert "--face-model insightface" in result.output and "--face-model dlib" in result.output


def test_help_warns_about_insightface_licence():
    result = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "non-commercial" in " ".join(result.output.split())


def test_lora_without_base_fails_before_loading_anything(dataset, tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["eval", "--reference", str(dataset), "--lora", str(tmp_path)])
    assert result.exit_code == 2 and "--base is required" in result.output


def test_images_folder_reads_recorded_prompts_and_skips_sheets(tmp_path):
    from PIL import Image

    from sdlora.evaluation.run import _read_images
    from sdlora.generate import pngmeta

    blank = Image.new("RGB", (16, 16))
    pngmeta.save_png(tmp_path / "0000-5.png", blank, "ignored")
    (tmp_path / "0000-5.json").write_text(json.dumps({"prompt": "zwx person on a boat", "seed": 5}))
    text = pngmeta.infotext("zwx person, oil painting", "blurry", {"Steps": 20, "Seed": 9, "Size": "16x16"})
    pngmeta.save_png(tmp_path / "0001-9.png", blank, text)
    blank.save(tmp_path / "0002.jpg")
    for sheet in ("grid.png", "compare.png", "0000-5-steps.png"):
        blank.save(tmp_path / sheet)
    images, names, prompts, seeds = _read_images(tmp_path)
    assert [Path(n).name for n in names] == ["0000-5.png", "0001-9.png", "0002.jpg"]
    assert prompts == ["zwx person on a boat", "zwx person, oil painting", None]
    assert seeds == [5, 9, None]


@pytest.mark.slow
def test_eval_renders_exactly_what_generate_renders(dataset, tiny_sd1, tmp_path):
    """`eval --lora` and `generate` load the base the same way (one dtype rule) and render through one path: the
    same prompt, seed and settings give the same pixels."""
    import numpy as np
    from PIL import Image

    lora = _tiny_lora(tiny_sd1, tmp_path / "run", trigger="zwx person")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {trigger} on a boat\n")
    args = ["eval", "--reference", str(dataset), "--lora", str(lora), "--base", str(tiny_sd1), "--n", "2"]
    args += ["--seed", "5", "--prompts", str(prompts), "--report", str(tmp_path / "r"), *GEN]
    assert runner.invoke(app, args).exit_code == 0
    gen = ["generate", "--base", str(tiny_sd1), "--lora", str(lora), "--prompt", "a photo of zwx person on a boat"]
    gen += ["--n", "2", "--seed", "5", "--batch-size", "4", "--out", str(tmp_path / "gen"), *GEN]
    result = runner.invoke(app, gen)
    assert result.exit_code == 0, result.output
    for i, seed in enumerate((5, 6)):
        evaluated = np.asarray(Image.open(tmp_path / "r" / "images" / f"{i:03d}.png").convert("RGB"))
        generated = np.asarray(Image.open(tmp_path / "gen" / f"{i:04d}-{seed}.png").convert("RGB"))
        assert evaluated.std() > 0 and np.array_equal(evaluated, generated)
