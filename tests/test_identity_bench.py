"""The identity benchmark's toy world: the decoder is exact on clean renders, rejects noise, tells attributes apart."""

from __future__ import annotations

import math
import random

import numpy
import pytest
from PIL import Image

from bench.identity import world


def test_decoder_reads_clean_renders_exactly():
    rng = random.Random(3)
    identities = world.all_identities()
    assert len(identities) == 1152
    samples = [rng.choice(identities) for _ in range(300)]
    exact = sum(world.decode(world.render(i, rng)) == i for i in samples)
    assert exact >= 0.97 * len(samples)
    # Without jitter every identity of the world decodes exactly.
    assert all(world.decode(world.render(i, rng, jitter=False)) == i for i in identities[::7])


def test_decoder_rejects_noise_and_flat_images():
    gen = numpy.random.default_rng(0)
    images = [gen.integers(0, 256, (64, 64, 3), dtype=numpy.uint8) for _ in range(40)]
    images += [gen.normal(128, 40, (64, 64, 3)).clip(0, 255).astype(numpy.uint8) for _ in range(40)]
    images += [numpy.full((64, 64, 3), gen.integers(0, 256, 3), numpy.uint8) for _ in range(40)]
    assert sum(world.decode(Image.fromarray(a)) is not None for a in images) == 0


def test_decoder_tells_attributes_apart():
    rng = random.Random(5)
    plain = world.Identity("tan", "red", "long", "green", False, "mint")
    for attribute, value in (("glasses", True), ("style", "tall"), ("eyes", "blue"), ("hair", "black")):
        changed = world.Identity(**(plain.as_dict() | {attribute: value}))
        found = world.decode(world.render(changed, rng))
        assert found == changed
        assert world.agreement(found, plain) == pytest.approx(5 / 6)


# A base smaller than base.TINY for the smoke test, trained in the test on TINY_WORLD (step budgets, so a
# loaded machine takes longer but gets the same base).
SMOKE_BASE = dict(
    vae_steps=400,
    unet_steps=800,
    batch=16,
    vae_batch=8,
    pool=400,
    vae_channels=(8, 16, 16),
    unet_channels=(16, 32, 32),
    text_width=32,
    text_layers=1,
    lr=2e-3,
    ema=0.99,
)

# The tiny world: six identities that differ from the subject in skin, hair, style and background, so a base
# trained for a minute already draws them, and moving toward the subject is the LoRA's doing.
TINY_WORLD = [
    world.Identity(skin, hair, style, "brown", False, background)
    for skin, hair, style, background in (
        ("pale", "black", "short", "sky"),
        ("dark", "blonde", "tall", "grey"),
        ("brown", "blue", "short", "lilac"),
        ("pale", "blonde", "short", "grey"),
        ("dark", "black", "tall", "lilac"),
        ("brown", "black", "short", "sky"),
    )
]


@pytest.mark.slow
def test_smoke_lora_moves_decoded_attributes_toward_the_subject(tmp_path, monkeypatch):
    """A tiny base trained here on the tiny world, then the benchmark's own code path (prep -> train -> generate ->
    decode) for one subject: the LoRA must move the decoded attributes toward the subject.

    Measure: mean attribute agreement with the subject (nearest-prototype reading of every image, six
    attributes; the benchmark's soft_agreement). Margin: 3 standard errors of the difference between the LoRA's
    and the base's means, from the per-image spread measured in this very run (soft_agreement_sd).
    """
    import torch

    from bench.identity import base, run

    torch.set_num_threads(1)
    monkeypatch.setattr(base, "training_identities", lambda: TINY_WORLD)
    base_dir = base.ensure_base(base.BaseSpec(**SMOKE_BASE), tmp_path / "base", log=lambda _: None)
    subject = base.SUBJECTS[0]
    scale = run.Scale(photos=8, seeds=24, sample_steps=8, checkpoints=(150,), batch_size=4)
    setting = run.Setting(prior=False, text_encoder=True, rank=8, lr=1e-2)
    (after,) = run.run_subject(base_dir, subject, setting, scale, tmp_path / "run")
    (before,) = run.base_rows(base_dir, [subject], scale, tmp_path / "base-run")
    assert after["step"] == 150
    n = scale.seeds
    stderr = math.sqrt(before["soft_agreement_sd"] ** 2 / n + after["soft_agreement_sd"] ** 2 / n)
    gain = after["soft_agreement"] - before["soft_agreement"]
    assert gain > 3 * stderr, (before["soft_agreement"], after["soft_agreement"], stderr)
