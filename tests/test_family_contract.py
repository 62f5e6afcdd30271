"""The family contract, for every family in sdlora.families.REGISTRY (a new family gets it checked with no test file
of its own): detection from a pipeline, a single-file checkpoint and a LoRA file; prompt encoding equal to the
pipeline's own; latents normalised and back; a short `sdlora train` (text encoders too) whose diffusers file
reloads pixel-identically, whose kohya file loads in diffusers with the same denoiser output, and which resumes
exactly; `sdlora generate` with the LoRA; a LoRA or a sampler of another family refused before rendering; sizes the
family can't take refused before any model loads."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from generate_helpers import max_diff
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import families, models
from sdlora.cli import app
from sdlora.config import Config
from sdlora.testing import write_single_file

# Qwen-Image-Edit's pipeline needs reference images and sdlora's processor stand-in to load: tests/test_edit.py
# checks it (detection, training, resume, reload, generate); the protocol checks below cover it too.
NAMES = [name for name in families.REGISTRY if name != "qwenedit"]
STEPS, SAMPLE_STEPS = 4, 3  # checkpoints at 2 and 4: the resume starts from step 2
runner = CliRunner()


def load(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_args(data: Path, out: Path, base: Path, *extra: str, text_encoder: bool = True) -> list[str]:
    args = ["train", str(data), str(out), "--base", str(base), "--steps", str(STEPS)]
    args += ["--resolution", "64", "--rank", "4", "--alpha", "8", "--lr", "1e-3"]
    args += ["--train-text-encoder"] if text_encoder else []  # where the family trains a text encoder
    args += ["--sample-every", str(STEPS), "--checkpoint-every", "2", "--keep-checkpoints", "2", "--name", "person"]
    args += ["--set", f"train.sample_steps={SAMPLE_STEPS}", "--set", "train.sample_prompts=['a photo of {trigger}']"]
    args += ["--set", "train.log_every=1"]
    return plain([*args, *extra])


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tiny_models, tmp_path_factory):
    """A 4-step run of `sdlora train` (text encoders trained too, checkpoints at 2 and 4) on the family's tiny model."""
    name = request.param
    root = tmp_path_factory.mktemp(f"contract-{name}")
    data, out = subject_set(root / "data"), root / "out"
    family = families.get(name)
    args = train_args(data, out, tiny_models[name], text_encoder=bool(family.trainable_text_encoders))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return families.get(name), tiny_models[name], out


@pytest.mark.parametrize("name", NAMES)
def test_detected_from_the_pipeline_and_a_single_file(name, tiny_models, tmp_path):
    family = families.get(name)
    assert families.detect(load(tiny_models[name])) is family
    path = write_single_file(tiny_models[name], tmp_path / f"{name}.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert families.detect_checkpoint(keys) is family
    assert families.detect_checkpoint({"lora_unet_x.lora_down.weight"}) is None


@pytest.mark.parametrize("name", NAMES)
def test_prompt_encoding_equals_the_pipelines_own(name, tiny_models):
    family, pipe = families.get(name), load(tiny_models[name])
    prompts = ["a photo of sks person", "a cat"]
    with torch.no_grad():
        ours = family.encode_prompts(families.tokenizers(pipe, family), families.encoders(pipe, family), prompts)
        kwargs = {"do_classifier_free_guidance": False, "device": torch.device("cpu"), "num_images_per_prompt": 1}
        accepted = inspect.signature(pipe.encode_prompt).parameters
        theirs = pipe.encode_prompt(prompts, **{k: v for k, v in kwargs.items() if k in accepted})
    tensors = [t for t in theirs if isinstance(t, torch.Tensor)]
    rows = [t for x in theirs if isinstance(x, list) for t in x]  # a ragged family's (L_i, D) per prompt (Z-Image)
    if rows:  # ours keeps them zero-padded to one length, with a mask of the real tokens
        length = max(value.shape[1] for value in ours.values())
        tensors.append(torch.stack([torch.nn.functional.pad(row, (0, 0, 0, length - len(row))) for row in rows]))
        tensors.append(torch.stack([torch.arange(length) < len(row) for row in rows]))
    for key, value in ours.items():
        assert any(t.shape == value.shape and torch.equal(t, value) for t in tensors), f"{name}: {key} differs"


@pytest.mark.slow
def test_trained_files_say_their_family_and_reload_pixel_identically(trained):
    from sdlora.generate.render import Sampling, make_grid, render_images

    family, base, out = trained
    diffusers_file, kohya_file = out / "pytorch_lora_weights.safetensors", out / "person.safetensors"
    for path in (diffusers_file, kohya_file):
        with safe_open(str(path), framework="pt") as handle:
            assert families.detect_lora(handle.metadata()) == family.name
    pipe = load(base)
    pipe.load_lora_weights(str(out))
    # The sample grid's settings as the run resolved them (a family may have its own sampler and guidance).
    config = Config.model_validate_json((out / "config.json").read_text())
    sampling = Sampling.for_training(families.with_defaults(config, family, pipe))
    assert (sampling.steps, sampling.width, sampling.height) == (SAMPLE_STEPS, 64, 64)
    assert sampling.scheduler in family.samplers
    images = render_images(pipe, ["a photo of sks person"], [42], sampling)
    sample = np.asarray(Image.open(out / "samples" / f"step-{STEPS:06d}.png").convert("RGB"))
    assert sample.std() > 0
    assert np.array_equal(np.asarray(make_grid(images, cols=1)), sample)


@pytest.mark.slow
def test_kohya_file_loads_in_diffusers_with_the_same_denoiser_output(trained):
    family, base, out = trained
    outputs = []
    for path in (out / "pytorch_lora_weights.safetensors", out / "person.safetensors"):
        pipe = load(base)
        pipe.load_lora_weights(str(path))
        generator = torch.Generator().manual_seed(0)
        noisy = torch.randn(1, 4, 8, 8, generator=generator)
        with torch.no_grad():
            cond = family.encode_prompts(families.tokenizers(pipe, family), families.encoders(pipe, family), ["x"])
            micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            outputs.append(family.predict(getattr(pipe, family.denoiser), noisy, torch.tensor([500]), cond, micro))
    base_pipe = load(base)
    with torch.no_grad():
        cond = family.encode_prompts(
            families.tokenizers(base_pipe, family), families.encoders(base_pipe, family), ["x"]
        )
        plain = family.predict(getattr(base_pipe, family.denoiser), noisy, torch.tensor([500]), cond, micro)
    assert (outputs[0] - outputs[1]).abs().max() < 1e-4
    assert (outputs[0] - plain).abs().max() > 1e-4, "the LoRA must change the output for this check to mean anything"


@pytest.mark.slow
def test_resume_from_step_2_equals_the_uninterrupted_run(trained, tmp_path):
    family, base, out = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("pytorch_lora_weights.safetensors", "person.safetensors"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:06d}")
    shutil.rmtree(resumed / "samples")
    text_encoder = bool(family.trainable_text_encoders)
    args = train_args(out.parent / "data", resumed, base, "--resume", "latest", text_encoder=text_encoder)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    straight = load_file(str(out / "pytorch_lora_weights.safetensors"))
    again = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == again.keys()
    assert max((straight[k] - again[k]).abs().max().item() for k in straight) <= 1e-6, family.name
    assert max(straight[k].abs().max().item() for k in straight if "lora_B" in k) > 0  # it trained
    records = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_generate_with_the_lora_renders_the_training_sample_and_compares(trained, tmp_path):
    family, base, out = trained
    args = ["generate", "--base", str(base), "--lora", str(out), "--prompt", "a photo of sks person", "--n", "1"]
    args += ["--size", "64x64", "--steps", str(SAMPLE_STEPS), "--compare", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    image = tmp_path / "0000-42.png"
    assert max_diff(image, out / "samples" / f"step-{STEPS:06d}.png") == 0, family.name
    # The image carries its ComfyUI workflow: the run's kohya file (what ComfyUI reads) at strength 1.
    from sdlora.comfyui import workflow

    graph = json.loads(Image.open(image).text["prompt"])
    assert workflow.problems(graph) == []
    (lora,) = [n["inputs"] for n in graph.values() if n["class_type"].startswith("LoraLoader")]
    assert (lora["lora_name"], lora["strength_model"]) == ("person.safetensors", 1.0)
    compare = Image.open(tmp_path / "compare.png")
    assert compare.size == (128, 64)
    assert max_diff(compare.crop((64, 0, 128, 64)), image) == 0
    assert max_diff(compare.crop((0, 0, 64, 64)), image) > 0  # the LoRA changes the image


@pytest.mark.slow
def test_comfyui_workflow_renders_the_sample_grid_as_the_run_did(trained):
    """person.comfyui.json: built-in nodes only, the run's LoRA file at strength 1 and the grid's resolved sampler,
    steps, size and seed (a family's own sampler and guidance included)."""
    from sdlora.comfyui import workflow
    from sdlora.generate.render import Sampling, for_family

    family, base, out = trained
    graph = json.loads((out / "person.comfyui.json").read_text())
    assert workflow.problems(graph) == []
    config = Config.model_validate_json((out / "config.json").read_text())
    pipe = load(base)
    sampling = for_family(Sampling.for_training(families.with_defaults(config, family, pipe)), family, pipe)
    by_class = {n["class_type"]: n["inputs"] for n in graph.values()}
    if "KSampler" in by_class:
        (inputs,) = [n["inputs"] for n in graph.values() if n["class_type"] == "KSampler"]
        assert (inputs["steps"], inputs["seed"]) == (SAMPLE_STEPS, config.generate.seed)
        assert (inputs["sampler_name"], inputs["scheduler"]) == workflow.SAMPLERS[sampling.scheduler][:2]
    else:  # the family's schedule is a sigmas node (klein's Flux2Scheduler): SamplerCustomAdvanced
        (sigmas,) = [n["inputs"] for n in graph.values() if "steps" in n["inputs"]]
        assert (sigmas["steps"], by_class["RandomNoise"]["noise_seed"]) == (SAMPLE_STEPS, config.generate.seed)
        assert by_class["KSamplerSelect"]["sampler_name"] == workflow.SAMPLERS[sampling.scheduler][0]
    (lora,) = [n["inputs"] for n in graph.values() if n["class_type"].startswith("LoraLoader")]
    assert (lora["lora_name"], lora["strength_model"]) == ("person.safetensors", 1.0)
    assert any(n["inputs"].get("text") == "a photo of sks person" for n in graph.values())
    latent = next(n["inputs"] for n in graph.values() if n["class_type"].startswith("Empty"))
    assert (latent["width"], latent["height"]) == (64, 64)


@pytest.fixture(scope="session")
def random_loras(tiny_models, tmp_path_factory):
    """A random-weight LoRA (r=4) on each family's denoiser attention, in diffusers format with our family metadata,
    made lazily."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = make_random_lora(name, tiny_models[name], tmp_path_factory.mktemp(f"lora-{name}"))
            return self[name]

    return Lazy()


def make_random_lora(name: str, base: Path, out: Path) -> Path:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    family, pipe = families.get(name), load(base)
    denoiser = getattr(pipe, family.denoiser)
    torch.manual_seed(1)
    targets = family.denoiser_targets("attention")
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    type(pipe).save_lora_weights(
        out,
        **{f"{family.denoiser}_lora_layers": get_peft_model_state_dict(denoiser)},
        **{f"{family.denoiser}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()},
    )
    path = out / "pytorch_lora_weights.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"sdlora.family": name, "format": "pt"})
    return out


@pytest.mark.slow  # ~4 s a family: the quick run keeps its 3-minute budget
@pytest.mark.parametrize("name", NAMES)
def test_loras_and_samplers_of_other_families_refused_before_rendering(name, tiny_models, random_loras, tmp_path):
    from sdlora.generate.render import SCHEDULERS

    family, out = families.get(name), tmp_path / "out"
    for other in (n for n in NAMES if n != name):
        result = runner.invoke(app, ["generate", "--base", str(tiny_models[other]), "--prompt", "x", "--lora",
                                     str(random_loras[name]), "--out", str(out)])  # fmt: skip
        assert result.exit_code == 2 and f"made for {name}, but the base model is {other}" in result.output
        assert not out.exists()
    foreign = next(s for s in SCHEDULERS if s not in family.samplers)
    result = runner.invoke(app, ["generate", "--base", str(tiny_models[name]), "--prompt", "x", "--scheduler",
                                 foreign, "--out", str(out)])  # fmt: skip
    choose = ", ".join(family.samplers)
    assert result.exit_code == 2, result.output
    assert f"not a sampler for {family.label} bases; choose {choose}" in result.output
    assert not out.exists()


@pytest.mark.parametrize("name", NAMES)
def test_sizes_the_family_cannot_take_fail_in_one_line_before_any_model_loads(name, tiny_models, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the size check")

    monkeypatch.setattr(models, "load_pipeline", no_loading)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    family = families.get(name)
    multiple, base, data = family.size_multiple, str(tiny_models[name]), subject_set(tmp_path / "data")
    # Past the config's own rule (multiples of 8) where the family's is stricter; else the config's rule refuses.
    side = 512 + 8 if multiple > 8 else 516
    result = runner.invoke(app, ["train", str(data), str(tmp_path / "out"), "--base", base, "--resolution", str(side)])
    assert result.exit_code == 2, result.output
    if multiple > 8:
        expected = f"error: --resolution: {family.label} takes sizes that are multiples of {multiple} ({side} is not)"
    else:
        expected = f"error: config: train.resolution: must be divisible by 8 (got {side})"
    assert result.output.strip() == f"{expected}; try 512"
    if multiple > 8:
        sets = ["--set", f"train.resolutions=[512, {side + 256}]"]
        result = runner.invoke(app, ["train", str(data), str(tmp_path / "out"), "--base", base, *sets])
        assert result.exit_code == 2, result.output
        assert f"train.resolutions: {family.label} takes sizes that are multiples of {multiple}" in result.output
    gen = ["generate", "--base", base, "--prompt", "x", "--size", f"512x{side}", "--out", str(tmp_path / "gen")]
    result = runner.invoke(app, gen)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    assert f"512x{side}" in result.output or f"({side} is not)" in result.output
    if multiple > 8:
        assert f"--size: {family.label} takes sizes that are multiples of {multiple} ({side} is not)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "gen").exists()
    assert models.check_sizes(Config().model, [("--size", 512)]) is None  # suits every family: no look needed


@pytest.mark.parametrize("name", NAMES)
def test_latents_normalised_for_the_denoiser_and_back(name, tiny_models):
    family, pipe = families.get(name), load(tiny_models[name])
    channels = pipe.vae.config.get("latent_channels") or pipe.vae.config.z_dim  # Qwen-Image's video VAE: z_dim
    latents = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    normalised = family.normalize_latents(pipe.vae, latents)
    assert normalised.shape == latents.shape and not torch.equal(normalised, latents)
    torch.testing.assert_close(family.denormalize_latents(pipe.vae, normalised), latents)


def protocol_members() -> set[str]:
    """Every attribute and method the Family protocol declares (its concern groups included)."""
    members: set[str] = set()
    for cls in families.Family.__mro__:
        if cls.__module__ == families.__name__:
            members |= {m for m in vars(cls) if not m.startswith("_")} | set(vars(cls).get("__annotations__", {}))
    return members


@pytest.mark.parametrize("name", list(families.REGISTRY))
def test_the_family_object_has_every_member_of_the_protocol(name):
    family = families.get(name)
    assert not sorted(m for m in protocol_members() if not hasattr(family, m))


def test_every_family_member_the_code_uses_is_declared():
    """`family.<member>` anywhere in sdlora/ is declared by the protocol (a `family` that is a name string, or
    `family.py` in a docstring, aside)."""
    import re

    root = Path(families.__file__).parents[1]
    used = set()
    for path in root.rglob("*.py"):
        used |= set(re.findall(r"\bfamily\.([a-z_]+)\b", path.read_text(encoding="utf-8")))
    used = {member for member in used if member != "py" and not hasattr(str, member)}
    assert len(used) > 20 and used - protocol_members() == set()
