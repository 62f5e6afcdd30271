"""The identity benchmark's DiT (Z-Image) base builder: step budgets, and a cut build resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_dit_base_builds_by_steps_and_a_cut_build_resumes_to_the_same_weights(tmp_path):
    from diffusers import ZImagePipeline

    from bench.identity import base, dit

    quiet = {"log": lambda _: None}
    whole = dit.ensure_dit(dit.TINY, tmp_path / "whole", **quiet)
    record = json.loads((whole / "identity_base.json").read_text())
    assert record["unet_steps_done"] == dit.TINY.unet_steps and record["spec"]["kind"] == "zimage"
    assert base.held_out_subjects(whole) == base.SUBJECTS[:3] and base.is_flow(whole)
    cut = dit.ensure_dit(dit.TINY, tmp_path / "cut", max_seconds=1e-9, **quiet)
    assert json.loads((cut / "identity_base.json").read_text())["unet_steps_done"] == 1
    assert (tmp_path / "cut.progress" / "denoiser.safetensors").is_file()
    dit.ensure_dit(dit.TINY, tmp_path / "cut", **quiet)  # the same call again continues the cut build
    assert json.loads((cut / "identity_base.json").read_text())["unet_steps_done"] == dit.TINY.unet_steps
    assert not (tmp_path / "cut.progress").exists()
    a, b = ZImagePipeline.from_pretrained(whole), ZImagePipeline.from_pretrained(cut)
    for part in ("transformer", "text_encoder", "vae"):
        pairs = zip(getattr(a, part).parameters(), getattr(b, part).parameters(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs), part
    assert a.vae.config.shift_factor == record["vae_shift"] and a.scheduler.config.shift == dit.TINY.shift
