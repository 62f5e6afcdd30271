"""Base-model loading: families from configs, pickle refusal, clear errors for bad paths."""

from __future__ import annotations

import shutil

import pytest

from sdlora import hub, models
from sdlora.errors import SdloraError, UsageError


@pytest.mark.parametrize(
    "family, version, arch",
    [
        ("sd1", "sd_v1", "stable-diffusion-v1/lora"),
        ("sd2", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
        ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ],
)
def test_family_detected_from_configs(tiny_models, family, version, arch):
    pipe = models.load_pipeline(str(tiny_models[family]))
    info = models.model_info(pipe)
    assert info.family == family
    assert info.kohya_base_version == version
    assert info.modelspec_architecture == arch
    assert info.vae_scale_factor == 8


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickles_refused_without_opt_in(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="--allow-pickle"):
        models.check_base(str(path), allow_pickle=False)
    models.check_base(str(path), allow_pickle=True)  # allowed: the check passes, loading is the user's call


def test_bad_paths(tmp_path):
    with pytest.raises(UsageError, match="required"):
        models.check_base(None, allow_pickle=False)
    with pytest.raises(UsageError, match="no such file"):
        models.check_base(str(tmp_path / "missing.safetensors"), allow_pickle=False)
    with pytest.raises(UsageError, match="not a diffusers folder"):
        models.check_base(str(tmp_path), allow_pickle=False)


def test_unknown_hub_id_offline_is_one_clear_error():
    with pytest.raises(SdloraError, match="could not load base model 'nobody/no-such-model'"):
        models.load_pipeline("nobody/no-such-model")


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Online mode with a hub that refuses connections (a closed local port): what a machine without network sees."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    hub._hub_problem.cache_clear()
    yield
    hub._hub_problem.cache_clear()


def test_wrong_base_fails_fast_with_the_real_reason(hub_unreachable):
    """Issue 28: an unreachable hub cost ~55 s of 'Retrying...' and then blamed a missing model_index.json."""
    import time

    for base, words in [
        ("someone/no-such-model", "the hub can't be reached"),
        ("models/sd15/unet", "no such file or folder, and not a hub id"),
        ("./sd15", "no such file or folder"),
    ]:
        start = time.monotonic()
        with pytest.raises(UsageError, match=words) as caught:
            models.load_pipeline(base)
        assert time.monotonic() - start < 5, base
        assert "\n" not in str(caught.value) and "model_index.json" not in str(caught.value)
        with pytest.raises(UsageError, match=words):
            models.check_base(base, allow_pickle=False)  # the pre-flight of train and eval says it too


def test_wrong_base_offline_says_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UsageError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE=1"):
        models.check_base("someone/no-such-model", allow_pickle=False)
    assert time.monotonic() - start < 2


def test_cached_base_loads_when_the_hub_is_unreachable(hub_unreachable, tiny_sd1, tmp_path, monkeypatch):
    """Not over-refusing: a model in the local cache loads from it at once, without the hub."""
    import time

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd1, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    assert hub.resolve("someone/tiny") == str(snapshot)
    assert time.monotonic() - start < 5
    assert models.load_pipeline("someone/tiny").unet is not None


def test_replacement_vae_from_folder(tiny_sd1, tmp_path):
    """--vae replaces the base's VAE with the given one's weights (a VAE folder, or a pipeline folder's vae/)."""
    import torch

    from sdlora.testing import build_tiny_pipeline

    other = build_tiny_pipeline("sd1", seed=7)
    other.vae.save_pretrained(tmp_path / "vae-only")
    other.save_pretrained(tmp_path / "pipeline")
    base = models.load_pipeline(str(tiny_sd1))
    for vae in (tmp_path / "vae-only", tmp_path / "pipeline"):
        pipe = models.load_pipeline(str(tiny_sd1), vae=str(vae))
        weights = pipe.vae.state_dict()
        assert all(torch.equal(weights[k], v) for k, v in other.vae.state_dict().items()), vae
        assert not all(torch.equal(weights[k], v) for k, v in base.vae.state_dict().items())
        assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters(), strict=True))
