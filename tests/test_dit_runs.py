"""The DiT families (Z-Image, and FLUX.2 [klein] once it is in the registry) through the CLI, as SD and Flux.1 are
in test_train_process.py, test_flux_process.py, test_flux_single_file.py and test_flux_generate.py: SIGTERM leaves
a checkpoint that resumes exactly; 2 processes (torchrun, gloo) equal 1 with the same global batch; a single-file
base trains and renders like its folder; generate with --compare, --save-steps, A1111-readable parameters,
--init-image and --keep-face (or the one-line refusal where diffusers has no such pipeline for the family); `sdlora
eval` renders what generate renders. One trained run per family is shared; every test here is in the full suite
only (the quick run has each feature's quick check on SD)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from generate_helpers import max_diff, parse_parameters, pixels
from PIL import Image
from safetensors.torch import load_file
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import families
from sdlora.cli import app

ROOT = Path(__file__).resolve().parents[1]
DIT = [name for name in ("zimage", "klein") if name in families.REGISTRY]
# Whether the family renders from a photo with a strength (img2img) and with a mask (inpainting): Z-Image through
# diffusers' AutoPipelineFor*, klein through its own inpainting pipeline (Flux2KleinInpaintPipeline). A family
# without one refuses --init-image / --keep-face in one line (test_keep_face_without_an_inpainting_pipeline...).
IMG2IMG = {"zimage": True, "klein": True}
INPAINTING = {"zimage": True, "klein": True}
PROMPT = "a photo of sks person"
# Two torch threads for the in-process runs (conftest's two_torch_threads): the single file's pixels equal the folder's.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("two_torch_threads")]
runner = CliRunner()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def common(base: Path | str, *extra: str) -> list[str]:
    """The plain LoRA of these tests (the resume's command line leaves the choices out: they are in config.toml)."""
    args = ["--base", str(base), "--resolution", "64", "--rank", "4", "--alpha", "8", "--lr", "1e-3"]
    return [*args, "--sample-every", "0", "--seed", "1", "--name", "person", "--no-pivotal", "--preservation", "none",
            *extra]  # fmt: skip


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return subject_set(tmp_path_factory.mktemp("dit-data") / "data")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("dit-photo") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module", params=DIT)
def trained(request, tiny_models, dataset, tmp_path_factory) -> tuple[str, Path, Path]:
    """2 steps of batch 2 on the family's tiny model, checkpoint at step 2: the one-process side of the DDP test and
    the LoRA every generate test renders with. (name, base folder, output folder)."""
    name, out = request.param, tmp_path_factory.mktemp(f"dit-{request.param}") / "out"
    invoke("train", dataset, out, *common(tiny_models[name], "--steps", "2", "--batch-size", "2"),
           "--checkpoint-every", "2")  # fmt: skip
    return name, tiny_models[name], out


def last_line(result) -> str:
    """The one `error:` line (after the loading bars diffusers may show), with no traceback before it."""
    assert "Traceback" not in result.output and result.output.count("error:") == 1, result.output
    return result.output.strip().splitlines()[-1]


def gen(base: Path, out: Path, *args: str):
    args = ["generate", "--base", str(base), "--size", "64x64", "--n", "1", *args, "--out", str(out)]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def rendered(trained, tmp_path_factory) -> Path:
    """`sdlora generate` of PROMPT with the trained LoRA (seed 42, 3 steps, 64x64), --compare and --save-steps 1:
    the image the single-file, eval and web-app tests must reproduce."""
    name, base, lora = trained
    out = tmp_path_factory.mktemp(f"dit-render-{name}")
    invoke("generate", "--base", base, "--size", "64x64", "--n", "1", "--prompt", PROMPT, "--lora", lora, "--steps",
           "3", "--save-steps", "1", "--compare", "--out", out)  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("name", DIT)
def test_sigterm_checkpoint_resumes_exactly(name, tiny_models, dataset, tmp_path):
    """SIGTERM mid-run: exit 143, one checkpoint, the resume command printed; that command continues the run to the
    same LoRA as an uninterrupted run of as many steps."""
    base, out = tiny_models[name], tmp_path / "out"
    command = [sys.executable, "-m", "sdlora", "train", str(dataset), str(out), *common(base)]
    command += ["--steps", "100000", "--checkpoint-every", "0", "--set", "train.log_every=1"]
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    [checkpoint] = (out / "checkpoints").iterdir()
    assert (checkpoint / "lora_state.safetensors").is_file()
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert step >= 2
    resume = f"--config {out / 'config.toml'} --resume latest"
    assert f"stopped after step {step}; checkpoint saved" in stderr and resume in stderr
    invoke("train", dataset, out, *resume.split(), "--steps", str(step + 1), "--checkpoint-every", "0")
    records = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert records == list(range(1, step + 2))
    straight = tmp_path / "straight"
    invoke("train", dataset, straight, *common(base), "--steps", str(step + 1), "--checkpoint-every", "0")
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name


def test_two_processes_equal_one_with_the_same_global_batch(trained, dataset, tmp_path):
    name, base, one = trained
    port = str(29571 + DIT.index(name))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    args = [*common(base), "--steps", "2", "--batch-size", "1", "--checkpoint-every", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "sdlora", "train", str(dataset), str(tmp_path / "two"), *args],
        env={**env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "effective batch 1 x 1 accumulation x 2 processes = 2" in two.stdout
    a = load_file(str(one / "checkpoints" / "step-000002" / "lora_state.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-000002" / "lora_state.safetensors"))
    assert a.keys() == b.keys()
    moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-4  # the runs trained (lora_B starts at zero)
    # Equal up to float summation order (a batch mean vs an all-reduce average), as for SD and Flux.1.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05 * moved, name
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000002"]  # rank 0 wrote


# --------------------------------------------------------------------------------------------- single file


def test_single_file_base_trains_and_renders_like_its_folder(trained, rendered, dataset, tmp_path):
    """`--base file.safetensors --set model.single_file_config=FOLDER`: the same LoRA as from the folder, and the
    same pixels when rendering on it."""
    from sdlora.testing import write_single_file

    name, folder, expected = trained
    path = write_single_file(folder, tmp_path / f"{name}.safetensors")
    config = ["--set", f"model.single_file_config='{folder}'"]
    out = tmp_path / "out"
    invoke("train", dataset, out, *common(path, "--steps", "2", "--batch-size", "2"), "--checkpoint-every", "0",
           *config)  # fmt: skip
    a = load_file(str(expected / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    result = gen(path, tmp_path / "single", "--prompt", PROMPT, "--steps", "3", "--lora", str(expected), *config)
    assert result.exit_code == 0, result.output
    assert max_diff(tmp_path / "single" / "0000-42.png", rendered / "0000-42.png") == 0


# --------------------------------------------------------------------------------------------- generate


def test_compare_filmstrip_and_a1111_parameters(trained, rendered):
    family = families.get(trained[0])
    image = rendered / "0000-42.png"
    compare = Image.open(rendered / "compare.png")
    assert compare.size == (128, 64)
    assert max_diff(compare.crop((64, 0, 128, 64)), image) == 0
    assert max_diff(compare.crop((0, 0, 64, 64)), image) > 0  # the LoRA changes the image
    strip = Image.open(rendered / "0000-42-steps.png")  # x0 after steps 1, 2 and 3
    assert strip.size == (3 * 64, 64)
    last = strip.crop((128, 0, 192, 64))
    assert max_diff(last, image) <= 2  # at the last step x0 is the image itself
    assert max_diff(strip.crop((0, 0, 64, 64)), last) > 5
    record = json.loads((rendered / "0000-42.json").read_text())
    assert Image.open(image).text["parameters"] == record["parameters"]
    prompt, negative, settings = parse_parameters(record["parameters"])
    assert prompt == f"{PROMPT} <lora:person:1>" and negative == ""
    assert (settings["Steps"], settings["Sampler"], settings["Seed"], settings["Size"]) == ("3", "Euler", "42", "64x64")
    assert float(settings[family.guidance_label or "CFG scale"]) == record["cfg"]
    assert settings["Lora hashes"] == f'"person: {record["loras"][0]["hash"][:12]}"'


def test_init_image_and_keep_face(trained, rendered, photo, tmp_path):
    """img2img from the photo, and the photo's own face kept with the rest repainted by the family's inpainting
    pipeline; where diffusers has no such pipeline, one line and nothing written."""
    from sdlora.faces.dlib import DlibFaces
    from sdlora.generate import keepface

    name, base, lora = trained
    family = families.get(name)
    i2i, kf = tmp_path / "i2i", tmp_path / "kf"
    result = gen(base, i2i, "--prompt", PROMPT, "--lora", str(lora), "--steps", "3", "--init-image", str(photo),
                 "--strength", "0.4")  # fmt: skip
    if IMG2IMG.get(name, False):
        assert result.exit_code == 0, result.output
        # The tiny VAE is random (it does not reconstruct photos): the photo, not only the seed, made the image.
        # (Strength 0.4: one of the 3 steps; the tiny klein, repainting the whole image, forgets the photo in two.)
        assert max_diff(i2i / "0000-42.png", rendered / "0000-42.png") > 20
    else:
        assert result.exit_code == 2 and not i2i.exists(), result.output
        refused = f"error: --init-image: diffusers has no img2img pipeline for {family.label} bases"
        assert last_line(result).startswith(refused)
    result = gen(base, kf, "--prompt", "a person in a garden", "--steps", "2", "--size", "128x128", "--lora",
                 str(lora), "--keep-face", str(photo))  # fmt: skip
    if not INPAINTING.get(name, False):
        assert result.exit_code == 2 and not kf.exists(), result.output
        refused = f"error: --keep-face: diffusers has no inpainting pipeline for {family.label} bases"
        assert last_line(result).startswith(refused)
        return
    assert result.exit_code == 0, result.output
    original = Image.open(photo)
    face = DlibFaces().detect(original)[0]
    fitted, mask = keepface.prepare(original, face.landmarks, 128, 128)
    core, outside = np.asarray(mask) == 255, np.asarray(mask) == 0
    out = pixels(kf / "0000-42.png")
    assert core.sum() > 150 and (out[core] == pixels(fitted)[core]).all()  # the photo's own face
    assert np.abs(out[outside] - pixels(fitted)[outside]).mean() > 20  # the rest repainted by the family


def test_keep_face_without_an_inpainting_pipeline_is_one_line(tiny_models, photo, tmp_path, monkeypatch):
    """A family diffusers has no inpainting pipeline for: one `error:` line before anything renders, never
    AutoPipeline's ValueError. Z-Image's entry taken out of diffusers' table stands in for such a family."""
    from diffusers.pipelines import auto_pipeline

    monkeypatch.delitem(auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING, "z-image")
    out = tmp_path / "out"
    result = gen(tiny_models["zimage"], out, "--prompt", "a person", "--steps", "2", "--keep-face", str(photo))
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        "error: --keep-face: diffusers has no inpainting pipeline for Z-Image bases (ZImagePipeline); "
        "render without --keep-face"
    )
    assert not out.exists()


# --------------------------------------------------------------------------------------------- eval


def test_eval_renders_exactly_what_generate_renders(trained, rendered, dataset, tmp_path):
    """`sdlora eval --lora` on the trained output: the family's own sampler and guidance (the config it reads never
    saw the base), the same pixels as `generate` with the same prompt, seed and settings, and its summary."""
    name, base, lora = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {trigger}\n")
    report, scores = tmp_path / "report", tmp_path / "eval.json"
    invoke("eval", "--reference", dataset, "--lora", lora, "--base", base, "--n", "1", "--seed", "42", "--prompts",
           prompts, "--report", report, "--json", scores, "--set", "generate.steps=3", "--set",
           "generate.size=64x64")  # fmt: skip
    data = json.loads(scores.read_text())
    assert [(image["prompt"], image["seed"]) for image in data["images"]] == [(PROMPT, 42)]
    assert data["summary"]["images"] == 1 and data["summary"]["face_rate"] is not None
    evaluated = report / "images" / "000.png"
    assert pixels(evaluated).std() > 0 and max_diff(evaluated, rendered / "0000-42.png") == 0, name


# --------------------------------------------------------------------------------------------- web app


def test_the_web_apps_generate_renders_with_the_bases_own_guidance(trained, rendered, tmp_path, monkeypatch):
    """The page's Generate (studio.generate) with the run's LoRA and the guidance field left empty: the base's own
    guidance (it sent the page's 7 to every base, CFG on a distilled Turbo), the CLI's pixels. The command the page
    builds runs in this process (the page's child process is test_serve_browser.py's)."""
    import shutil

    from sdlora.serve import studio
    from sdlora.serve.workspace import Workspace

    monkeypatch.setattr(studio, "run_sdlora", lambda workspace, args, label, progress=None: invoke(*args))
    name, base, lora = trained
    ws = Workspace.open(tmp_path / "ws")
    shutil.copytree(base, ws.root / "models" / name)
    shutil.copytree(lora, ws.root / "runs" / "me", ignore=shutil.ignore_patterns("checkpoints"))
    images = studio.generate(ws, "runs/me", "a photo of {trigger}", base=f"models/{name}", n=1, steps=3, size="64x64")
    [(png, words)] = images.images
    assert png.name == "0000-42.png" and "seed: 42" in words
    record = json.loads((rendered / "0000-42.json").read_text())
    assert json.loads(png.with_suffix(".json").read_text())["cfg"] == record["cfg"]
    assert record["cfg"] != 7.0  # the family's own (Z-Image Base 5, klein base 4), not the page's old 7
    assert max_diff(png, rendered / "0000-42.png") == 0
