"""Output preservation (train.preservation = "output"), timestep bias and the settings that choose them: the class
prompt, the target against the base pipeline bit for bit, the sampled timesteps, the config rules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from sdlora import objectives
from sdlora.cli import app
from sdlora.config import ConfigError, load
from sdlora.train.methods.adapters_off import adapters_off, base_prediction, encode
from sdlora.train.methods.output_preservation import class_prompt


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a photo of sks person", "a photo of person"),
        ("sks person, an astronaut smiling", "person, an astronaut smiling"),
        ("a close-up of sks, smiling", "a close-up of, smiling"),
        ("a photo of sksy person", "a photo of sksy person"),  # another word that starts like the token
        ("", ""),
    ],
)
def test_class_prompt_drops_the_trigger_token(caption, expected):
    assert class_prompt(caption, "sks") == expected


def test_class_options_imply_class_images_and_conflict_with_output():
    assert load(None, {"train.class_prompt": "a photo of a man"}).train.preservation == "class_images"
    assert load(None, {"train.class_dir": "/tmp/x", "train.preservation": "none"}).train.preservation == "class_images"
    implied = load(None, {"train.preservation": "class_images", "prep.class_word": "woman"}).train
    assert implied.class_prompt == "a photo of woman"  # what the class images show, stored with the run
    unset = load(None, {}).train  # the recommended person settings, settled in train's pre-flight
    assert unset.preservation == "auto" and unset.pivotal is None and unset.class_prompt is None
    with pytest.raises(ConfigError, match="preservation = 'output' needs no class images"):
        load(None, {"train.class_dir": "/tmp/x", "train.preservation": "output"})
    with pytest.raises(ConfigError, match="mask_prior_weight needs masked_loss"):
        load(None, {"train.mask_prior_weight": 0.5})


def test_cli_conflict_is_one_line_exit_2(tmp_path):
    args = ["train", str(tmp_path), str(tmp_path / "out"), "--preservation", "output", "--class-prompt", "a man"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "class_prompt" in lines[0], result.output


# ----------------------------------------------------------------------------------------------- timestep bias


def test_bias_none_leaves_todays_samples_bit_identical():
    ddpm = objectives.DDPM(torch.linspace(0.99, 0.01, 1000), "epsilon")
    assert objectives.with_bias(ddpm, "none", 3.0) is ddpm
    today = objectives.sample_timesteps(64, 1000, torch.Generator().manual_seed(7))
    assert torch.equal(ddpm.sample_timesteps(64, torch.Generator().manual_seed(7)), today)
    for scheme in objectives.TIMESTEP_SAMPLING:
        flow = objectives.FlowMatching(scheme)
        sigmas = objectives.sample_sigmas(64, torch.Generator().manual_seed(7), scheme, flow.shift)
        assert torch.equal(flow.sample_timesteps(64, torch.Generator().manual_seed(7)), sigmas)


@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_bias_high_and_low_means_and_ranges(strength):
    n, steps = 200_000, 1000
    high_mean, low_mean = (1 + strength) / (2 + strength), 1 / (2 + strength)  # Beta(1+s, 1) and Beta(1, 1+s)
    ddpm = objectives.DDPM(torch.linspace(0.99, 0.01, steps), "epsilon")
    for bias, mean in (("high", high_mean), ("low", low_mean)):
        t = objectives.with_bias(ddpm, bias, strength).sample_timesteps(n, torch.Generator().manual_seed(0))
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= steps - 1
        assert abs(float(t.double().mean()) / steps - mean) < 0.005, (bias, strength)
        flow = objectives.with_bias(objectives.FlowMatching("uniform"), bias, strength)
        sigmas = flow.sample_timesteps(n, torch.Generator().manual_seed(0))
        assert float(sigmas.min()) > 0 and float(sigmas.max()) < 1
        assert abs(float(sigmas.double().mean()) - mean) < 0.005, (bias, strength)
    # On another scheme the bias warps its draws: "high" moves every sigma towards 1, monotonically.
    plain = objectives.FlowMatching("shift").sample_timesteps(1000, torch.Generator().manual_seed(1))
    high = objectives.with_bias(objectives.FlowMatching("shift"), "high", strength)
    biased = high.sample_timesteps(1000, torch.Generator().manual_seed(1))
    assert bool((biased >= plain).all()) and float(biased.mean()) > float(plain.mean()) + 0.02


# ----------------------------------------------------------------------------------------------- the target


def _pipeline(family_name: str, base):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(base), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_lora(pipe, family, seed: int = 0) -> None:
    """Adapters on the denoiser and the trainable text encoders, their up weights random (LoRA's own init is
    zero, which would make a disabled and an enabled adapter agree)."""
    from sdlora.lora import peft

    generator = torch.Generator().manual_seed(seed)
    modules = [getattr(pipe, family.denoiser)] + [getattr(pipe, n) for n in family.trainable_text_encoders]
    peft.attach(modules[0], 4, 4.0, 0.0, family.denoiser_targets("attention"))
    for encoder in modules[1:]:
        peft.attach(encoder, 4, 4.0, 0.0, family.text_encoder_targets())
    for module in modules:
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
                parameter.requires_grad_(True)


@pytest.mark.slow  # three tiny pipelines, loaded twice each
@pytest.mark.parametrize("family_name", ["sd1", "sdxl", "flux"])
def test_target_is_the_base_pipelines_prediction_bit_for_bit(family_name, tiny_models):
    """What output preservation trains towards: the LoRA pipeline's prediction for the class prompt with every
    adapter off (the text encoder's too) equals a fresh base pipeline's, bit for bit; the adapters are on again
    after it, trainable as before."""
    from sdlora import families
    from sdlora.config import Config

    family = families.get(family_name)
    base, pipe = _pipeline(family_name, tiny_models[family_name]), _pipeline(family_name, tiny_models[family_name])
    _with_lora(pipe, family)
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn((2, base.vae.config.latent_channels, 8, 8), generator=generator)
    timesteps, time_ids = torch.tensor([999, 250]), torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    prompts = [class_prompt("a photo of sks person", "sks"), class_prompt("sks person, smiling", "sks")]
    with torch.no_grad():
        cond = family.encode_prompts(families.tokenizers(base, family), families.encoders(base, family), prompts)
        expected = family.predict(getattr(base, family.denoiser), noisy, timesteps, cond, time_ids)
    trained = {name: getattr(pipe, name) for name in family.trainable_text_encoders}
    run = SimpleNamespace(
        family=family,
        text_encoders=trained,
        pipe=pipe,
        config=Config(),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
    )
    base_cond = encode(run, prompts, {}, adapters=False)
    denoiser = getattr(pipe, family.denoiser)
    target = base_prediction(family, denoiser, noisy, timesteps, base_cond, time_ids, None)
    assert torch.equal(target, expected)
    # The adapters are back: the LoRA-on conditioning and prediction differ, and gradients reach the LoRA.
    lora_cond = encode(run, prompts, {}, adapters=True)
    assert not torch.equal(lora_cond["encoder_hidden_states"], base_cond["encoder_hidden_states"])
    on = family.predict(denoiser, noisy, timesteps, lora_cond, time_ids)
    assert not torch.allclose(on, expected)
    on.float().pow(2).mean().backward()
    for module in [denoiser, *trained.values()]:  # (SDXL's first encoder: its last layer feeds nothing)
        lora = [p for n, p in module.named_parameters() if "lora_" in n]
        assert lora and all(p.requires_grad for p in lora) and any(p.grad is not None for p in lora)
    assert not any(p.requires_grad for n, p in denoiser.named_parameters() if "lora_" not in n)


@pytest.mark.slow
def test_adapters_off_restores_a_disabled_adapter_as_disabled(tiny_sd1):
    from sdlora import families

    family = families.get("sd1")
    pipe = _pipeline("sd1", tiny_sd1)
    _with_lora(pipe, family)
    with adapters_off([pipe.unet]):
        with adapters_off([pipe.unet]):
            pass
        layers = [m for m in pipe.unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
        assert layers and all(layer.disable_adapters for layer in layers)  # still off inside the outer one
    assert not any(layer.disable_adapters for layer in layers)
