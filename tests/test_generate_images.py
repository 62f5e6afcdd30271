"""`sdlora generate` from photos and on SDXL: keep-face on a real photo, img2img, SDXL with LoRA and refiner."""

from __future__ import annotations

import numpy as np
import pytest
from generate_helpers import make_lora, max_diff, parse_parameters, pixels
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.generate import keepface

runner = CliRunner()
FAST = ["--steps", "2", "--scheduler", "euler_a", "--cfg", "5", "--n", "1"]


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> tuple:
    """scikit-image's astronaut photo (a real face) and the landmarks our face detector finds on it."""
    from skimage import data

    from sdlora.faces.dlib import DlibFaces

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    photo = Image.fromarray(data.astronaut())
    photo.save(path)
    faces = DlibFaces().detect(photo)
    assert len(faces) == 1
    return path, photo, faces[0]


def gen(*args: str):
    return runner.invoke(app, ["generate", *FAST, *args])


def comfyui_run(out):
    """The run's ComfyUI workflow (a sound graph of built-in nodes, the same as the image's `prompt` chunk's but
    for the SaveImage prefix) and its nodes by class."""
    import json

    from sdlora.comfyui import workflow

    graph = json.loads((out / "comfyui.json").read_text())
    chunk = json.loads(Image.open(out / "0000-42.png").text["prompt"])
    assert workflow.problems(graph) == [] and workflow.problems(chunk) == []
    assert [n["class_type"] for n in chunk.values()] == [n["class_type"] for n in graph.values()]
    by_class: dict = {}
    for node in graph.values():
        by_class.setdefault(node["class_type"], []).append(node["inputs"])
    return graph, by_class


@pytest.mark.slow
def test_keep_face_keeps_the_photos_face_and_repaints_the_rest(tiny_sd1, astronaut, tmp_path):
    path, photo, face = astronaut
    lora = make_lora(tiny_sd1, tmp_path / "lora", seed=6)
    result = gen("--base", str(tiny_sd1), "--prompt", "a person in a garden", "--size", "128x128", "--lora",
                 str(lora), "--compare", "--keep-face", str(path), "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == 0, result.output
    out = pixels(tmp_path / "out" / "0000-42.png")
    base = pixels(Image.open(tmp_path / "out" / "compare.png").crop((0, 0, 128, 128)))
    fitted, mask = keepface.prepare(photo, face.landmarks, 128, 128)
    mask_a, photo_a = np.asarray(mask), pixels(fitted)
    core, outside = mask_a == 255, mask_a == 0
    # The core is the face: it holds the face box's centre and lies inside the box grown upward for the forehead.
    scale = 128 / 512
    left, top, right, bottom = (v * scale for v in face.box)
    ys, xs = np.nonzero(core)
    assert core.sum() > 150 and core[int((top + bottom) / 2), int((left + right) / 2)]
    assert xs.min() >= left - 2 and xs.max() <= right + 2 and ys.max() <= bottom + 2
    brows, nose_tip = face.landmarks[17:27, 1].min() * scale, face.landmarks[33, 1] * scale
    assert brows - ys.min() > 0.3 * (nose_tip - brows)  # the forehead above the brows is covered too
    for image in (out, base):  # with the LoRA, and the base model beside it
        assert (image[core] == photo_a[core]).all()  # exactly the photo's own pixels
        assert np.abs(image[outside] - photo_a[outside]).mean() > 20  # everything else repainted
    assert np.abs(out[outside] - base[outside]).mean() > 3  # the LoRA changed the repainted part
    assert 0 < mask_a.astype(float).mean() / 255 < 0.3
    # ComfyUI's inputs: the fitted photo and the mask of what is repainted (the face's mask inverted).
    assert (pixels(tmp_path / "out" / "comfyui-input.png") == photo_a).all()
    assert (np.asarray(Image.open(tmp_path / "out" / "comfyui-mask.png")) == 255 - mask_a).all()
    _, nodes = comfyui_run(tmp_path / "out")
    assert nodes["LoadImage"] == [{"image": "comfyui-input.png"}]
    assert nodes["LoadImageMask"] == [{"image": "comfyui-mask.png", "channel": "red"}]
    assert len(nodes["SetLatentNoiseMask"]) == len(nodes["ImageCompositeMasked"]) == 1


def test_keep_face_without_a_face_is_one_clear_error(tiny_sd1, tmp_path):
    blank = tmp_path / "wall.png"
    Image.new("RGB", (256, 256), (120, 110, 100)).save(blank)
    result = gen("--base", str(tiny_sd1), "--prompt", "x", "--size", "64x64", "--keep-face", str(blank),
                 "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == 1
    assert f"--keep-face {blank}: no face found" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_img2img_uses_the_init_image(tiny_sd1, astronaut, tmp_path):
    from skimage import data

    path, _, _ = astronaut
    other = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(other)
    common = ["--base", str(tiny_sd1), "--prompt", "a portrait", "--size", "64x64", "--steps", "4"]
    for name, args in {"a": ["--init-image", str(path)], "b": ["--init-image", str(other)], "t": []}.items():
        result = gen(*common, *args, "--strength", "0.5", "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output
    png = "0000-42.png"
    assert Image.open(tmp_path / "a" / png).size == (64, 64)
    assert max_diff(tmp_path / "a" / png, tmp_path / "b" / png) > 10  # a different photo, a different image
    assert max_diff(tmp_path / "a" / png, tmp_path / "t" / png) > 10
    settings = parse_parameters(Image.open(tmp_path / "a" / png).text["parameters"])[2]
    assert settings["Denoising strength"] == "0.5"
    fitted = keepface.fit(Image.open(path).convert("RGB"), 64, 64)[0]
    assert (pixels(tmp_path / "a" / "comfyui-input.png") == pixels(fitted)).all()  # the photo as sdlora used it
    assert not (tmp_path / "a" / "comfyui-mask.png").exists() and not (tmp_path / "t" / "comfyui-input.png").exists()
    _, nodes = comfyui_run(tmp_path / "a")
    assert nodes["LoadImage"] == [{"image": "comfyui-input.png"}] and len(nodes["VAEEncode"]) == 1
    assert [k["denoise"] for k in nodes["KSampler"]] == [0.5] and "EmptyLatentImage" not in nodes


@pytest.mark.slow
def test_sdxl_with_lora_and_refiner(tiny_sdxl, tmp_path):
    lora = make_lora(tiny_sdxl, tmp_path / "xl-lora", seed=5, metadata={"sdlora.trigger_phrase": "zwx"})
    common = ["--base", str(tiny_sdxl), "--prompt", "{trigger} smiling", "--size", "64x64", "--lora", str(lora)]
    for name, extra in {"plain": [], "refined": ["--refiner", str(tiny_sdxl)]}.items():
        result = gen(*common, *extra, "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output
    png = "0000-42.png"
    assert Image.open(tmp_path / "refined" / png).size == (64, 64)
    assert max_diff(tmp_path / "plain" / png, tmp_path / "refined" / png) > 5
    prompt, _, settings = parse_parameters(Image.open(tmp_path / "refined" / png).text["parameters"])
    assert prompt.startswith("zwx smiling") and settings["Refiner"] == tiny_sdxl.name
    _, nodes = comfyui_run(tmp_path / "refined")
    names = [n["ckpt_name"] for n in nodes["CheckpointLoaderSimple"]]
    assert names == [f"{tiny_sdxl.name}.safetensors"] * 2  # the base, and the refiner (the same tiny model here)
    (refine,) = nodes["KSamplerAdvanced"]
    assert (refine["steps"], refine["start_at_step"], refine["noise_seed"]) == (4, 3, 42)  # max(2, ceil(1 / 0.3))


def test_refiner_refused_on_sd1(tiny_sd1, tmp_path):
    result = gen("--base", str(tiny_sd1), "--prompt", "x", "--refiner", str(tiny_sd1), "--out", str(tmp_path))
    assert result.exit_code == 2 and "a refiner pass is for SDXL bases" in result.output


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    """A tiny SD 1.x inpainting model: its UNet takes 9 channels (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from sdlora.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    components = {**pipe.components, "unet": UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})}
    folder = tmp_path_factory.mktemp("inpaint") / "sd1-inpainting"
    StableDiffusionInpaintPipeline(**components).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_keep_face_with_a_9_channel_inpainting_model(tiny_inpainting, astronaut, tmp_path):
    path, photo, face = astronaut
    args = ["--base", str(tiny_inpainting), "--prompt", "a person", "--size", "96x96", "--out", str(tmp_path)]
    result = gen(*args)
    assert result.exit_code == 2 and "inpainting model (9-channel UNet): use it with --keep-face" in result.output
    result = gen(*args, "--keep-face", str(path))
    assert result.exit_code == 0, result.output
    out = pixels(tmp_path / "0000-42.png")
    fitted, mask = keepface.prepare(photo, face.landmarks, 96, 96)
    mask_a, photo_a = np.asarray(mask), pixels(fitted)
    assert (mask_a == 255).sum() > 80
    assert (out[mask_a == 255] == photo_a[mask_a == 255]).all()
    assert np.abs(out[mask_a == 0] - photo_a[mask_a == 0]).mean() > 20
    _, nodes = comfyui_run(tmp_path)  # the model takes the mask and masked photo: InpaintModelConditioning
    assert [c["noise_mask"] for c in nodes["InpaintModelConditioning"]] == [False] and "SetLatentNoiseMask" not in nodes


@pytest.mark.slow
def test_sdxl_kohya_file_matches_diffusers_file_and_is_refused_on_sd1(tiny_sd1, tiny_sdxl, tmp_path):
    """Our kohya export (SGM key names) renders like the diffusers-format file, and its shapes give it away."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from safetensors.torch import save_file

    from sdlora.lora.kohya import kohya_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(tiny_sdxl))
    torch.manual_seed(7)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    kohya = tmp_path / "xl_kohya.safetensors"
    save_file(kohya_state_dict(pipe.unet, [], "sdxl", dtype=torch.float32), str(kohya))  # no metadata: shapes only
    diffusers_dir = make_lora(tiny_sdxl, tmp_path / "xl-diffusers", seed=7)
    common = ["--base", str(tiny_sdxl), "--prompt", "a face", "--size", "64x64"]
    for name, lora in {"kohya": kohya, "diffusers": diffusers_dir}.items():
        result = gen(*common, "--lora", str(lora), "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output
    assert gen(*common, "--out", str(tmp_path / "base")).exit_code == 0
    png = "0000-42.png"
    assert max_diff(tmp_path / "kohya" / png, tmp_path / "diffusers" / png) <= 2
    assert max_diff(tmp_path / "kohya" / png, tmp_path / "base" / png) > 5
    result = gen("--base", str(tiny_sd1), "--prompt", "x", "--lora", str(kohya), "--out", str(tmp_path / "no"))
    assert result.exit_code == 2 and "64-wide text features" in result.output
