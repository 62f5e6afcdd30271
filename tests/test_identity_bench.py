"""The identity benchmark's toy world: the decoder is exact on clean renders, rejects noise, tells attributes apart."""

from __future__ import annotations

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
