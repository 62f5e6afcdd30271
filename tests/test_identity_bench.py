"""The identity benchmark's toy world: the decoder is exact on clean renders, rejects noise, tells attributes apart."""

from __future__ import annotations

import json
import math
import random

import numpy
import pytest
from PIL import Image

from sdlora.demo.base import PACKAGED
from sdlora.faces import toyworld as world


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


@pytest.mark.slow
def test_base_builds_by_step_budgets_and_continues(tmp_path):
    """The benchmark's base builder at a micro budget: a loadable diffusers folder whose record holds the steps done;
    a time limit cuts the UNet's training short; --continue-from trains it further and records that."""
    from diffusers import StableDiffusionPipeline

    from bench.identity import base

    spec = base.BaseSpec(
        vae_steps=2, unet_steps=3, batch=4, vae_batch=2, pool=8, unet_channels=(32, 32, 64), text_layers=1, ema=0.9
    )
    folder = base.ensure_base(spec, tmp_path / "base", log=lambda _: None)
    record = json.loads((folder / "identity_base.json").read_text())
    assert record["unet_steps_done"] == 3 and record["spec"]["vae_steps"] == 2 and record["device"] == "CPU"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae.config.scaling_factor == record["vae_scale"]
    cut = base.ensure_base(spec, tmp_path / "cut", log=lambda _: None, max_seconds=1e-9)
    assert json.loads((cut / "identity_base.json").read_text())["unet_steps_done"] == 1
    # The cut build saved its state beside the folder; the same call continues it, to the uninterrupted weights.
    assert (tmp_path / "cut.progress" / "denoiser.safetensors").is_file()
    base.ensure_base(spec, tmp_path / "cut", log=lambda _: None)
    assert json.loads((cut / "identity_base.json").read_text())["unet_steps_done"] == 3
    assert not (tmp_path / "cut.progress").exists()
    resumed = StableDiffusionPipeline.from_pretrained(cut)
    for part in ("unet", "text_encoder", "vae"):
        pairs = zip(getattr(pipe, part).parameters(), getattr(resumed, part).parameters(), strict=True)
        assert all(torch_equal(a, b) for a, b in pairs), part
    assert base.held_out_subjects(folder) == base.SUBJECTS[:3]
    base.continue_base(folder, tmp_path / "more", steps=2, lr=1e-4, batch=2, log=lambda _: None)
    more = json.loads((tmp_path / "more" / "identity_base.json").read_text())
    assert [c["steps_done"] for c in more["continued"]] == [2] and more["spec"] == record["spec"]
    after = StableDiffusionPipeline.from_pretrained(tmp_path / "more")
    changed = [not torch_equal(a, b) for a, b in zip(pipe.unet.parameters(), after.unet.parameters(), strict=True)]
    assert any(changed)
    assert all(torch_equal(a, b) for a, b in zip(pipe.vae.parameters(), after.vae.parameters(), strict=True))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.detach(), b.detach())


FIXTURE = PACKAGED  # the benchmark's base, shipped in the package for `sdlora demo` (sdlora/demo/base.py)
# The smoke test's scale: the benchmark's smoke cell (subject 0, rank 16, lr 3e-3, no prior, no text encoder) for 50
# steps instead of 100, 32 seeds instead of 64, DDIM 10 steps instead of 20 (about 20 CPU-seconds instead of 36), as
# the DiT smoke test does (tests/test_identity_dit.py). Measured on the packaged base with one thread: soft agreement
# 0.443 -> 0.615 (margin 0.121) at lr 3e-3; 0.443 -> 0.443 at lr 1e-8 (a LoRA that learns nothing: the test fails);
# 25 steps gained only 0.094. The margin is three standard errors of the gain from the per-image spreads of the test's
# own two rows.
SMOKE = {"seeds": 32, "steps": 50, "sample_steps": 10}


def test_fixture_export_restore_round_trip(tmp_path):
    """Exporting a restored base and restoring it again gives the same weights and trained token rows (the export
    is what rebuilds the fixture when the benchmark's base changes)."""
    from diffusers import StableDiffusionPipeline

    from bench.identity import fixture

    first = fixture.restore(FIXTURE, tmp_path / "first")
    fixture.export(first, tmp_path / "again.safetensors")
    second = fixture.restore(tmp_path / "again.safetensors", tmp_path / "second")
    a, b = StableDiffusionPipeline.from_pretrained(first), StableDiffusionPipeline.from_pretrained(second)
    ids = fixture.trained_token_ids(a.tokenizer)
    table = "embeddings.token_embedding.weight"  # its untrained rows are drawn afresh: only the trained ones travel
    for part in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert left.keys() == right.keys()
        assert all(torch_equal(left[k], right[k]) for k in left if k != table), part
    assert torch_equal(a.text_encoder.state_dict()[table][ids], b.text_encoder.state_dict()[table][ids])
    assert (second / "identity_base.json").read_text() == (first / "identity_base.json").read_text()
    assert (
        len(ids) > 10
        and a.tokenizer("a photo of sks person").input_ids == b.tokenizer("a photo of sks person").input_ids
    )


@pytest.mark.slow
def test_lora_moves_decoded_attributes_toward_the_subject(tmp_path):
    """The benchmark's code path end to end (renders as photos -> `prep` -> `train` -> `generate` -> decoder) on its
    base (the packaged one): after 50 steps the images of "a photo of sks person" agree with the subject on more of the
    six attributes than the base's images do, by more than three standard errors of that difference at this test's
    32 seeds, from the per-image spreads of the two rows measured here (SMOKE). With lr 1e-8 the gain is 0.000 and
    the test fails."""
    from bench.identity import fixture, run

    before, after = run.smoke(fixture.restore(FIXTURE, tmp_path / "base"), tmp_path, **SMOKE)
    spread = math.hypot(before["soft_agreement_sd"], after["soft_agreement_sd"])
    margin = 3 * spread / math.sqrt(SMOKE["seeds"])
    gain = after["soft_agreement"] - before["soft_agreement"]
    print(f"soft agreement {before['soft_agreement']:.3f} -> {after['soft_agreement']:.3f}, margin {margin:.3f}")
    assert gain > margin, (before["soft_agreement"], after["soft_agreement"], margin)


@pytest.mark.slow
def test_benchmark_main_filters_the_grid_and_keeps_the_subject_number(tmp_path):
    """`python -m bench.identity` at a micro scale on the fixture base: --rank/--lr pick the grid's cells, two
    spawned jobs run them, and --only-subject 1 records subject 1 (not its position in the list); two sampling steps
    (--sample-steps) instead of 20, as nothing here reads the images' quality."""
    from bench.identity import fixture, run

    folder = fixture.restore(FIXTURE, tmp_path / "base")
    out = tmp_path / "out"
    argv = ["--base", str(folder), "--out", str(out), "--grid", "full", "--rank", "4", "--lr", "0.001"]
    run.main([*argv, "--only-subject", "1", "--steps", "1", "2", "--seeds", "2", "--jobs", "2", "--sample-steps", "2"])
    results = json.loads((out / "results.json").read_text())
    assert results["scale"]["sample_steps"] == 2
    rows = results["rows"]
    assert {r["subject"] for r in rows} == {1}
    expected = {f"prior={p} te={t} r4 lr0.001" for p in ("on", "off") for t in ("on", "off")}
    assert {r["setting"] for r in rows} == expected | {"base"}
    assert sorted(r["step"] for r in rows if r["setting"] != "base") == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(0 <= r["soft_agreement"] <= 1 for r in rows)
    assert (out / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        run.main([*argv[:6], "--rank", "5"])
    # --base-only: the base's checks and step-0 rows, no LoRA trained
    alone = tmp_path / "alone"
    run.main(["--base", str(folder), "--out", str(alone), "--base-only", "--seeds", "2", "--sample-steps", "2"])
    results = json.loads((alone / "results.json").read_text())
    assert {r["setting"] for r in results["rows"]} == {"base"} and len(results["rows"]) == 3  # its three subjects
    assert 0 <= results["base"]["class_validity"] <= 1 and results["base"]["reconstruction_exact"] > 0.9
    assert sorted(p.name for p in (alone / "work").iterdir()) == ["base-images"]


def test_runs_start_subject_by_subject_or_setting_by_setting():
    from bench.identity import grids, run

    subjects = dict(enumerate(run.base.SUBJECTS[:2]))
    a, b = grids.FLOW[:2]
    order = [(i, setting.name) for i, _, setting in run.run_order(subjects, [a, b])]
    assert order == [(0, a.name), (0, b.name), (1, a.name), (1, b.name)]
    order = [(i, setting.name) for i, _, setting in run.run_order(subjects, [a, b], by_setting=True)]
    assert order == [(0, a.name), (1, a.name), (0, b.name), (1, b.name)]


def test_editability_counts_the_asked_change_with_everything_else_kept(tmp_path):
    """Scripted renders with known attributes: the asked edit of the subject counts; the unchanged subject, the
    edit with the background also changed, or the edit on a stranger do not."""
    from bench.identity import edits, grids, scoring

    rng = random.Random(9)
    subject = world.Identity("tan", "red", "long", "green", False, "mint")
    prompts = grids.prompts_for(subject)
    assert prompts["edit_hair"] == "a photo of sks person with blue hair"
    assert prompts["edit_style"] == "a photo of sks person with tall hair"
    assert prompts["edit_eyes"] == "a photo of sks person with brown eyes"
    asked = {a: edits.target(subject, a) for a in edits.EDITABLE}
    good = {key: [world.render(asked[a], rng) for _ in range(4)] for a, key in edits.EDITABLE.items()}
    metrics = scoring.score({"identity": [world.render(subject, rng)], **good}, subject)
    assert metrics["editability"] == 1.0 and metrics["fidelity"] == 1.0
    assert metrics["edit"] == dict.fromkeys(edits.EDITABLE, 1.0)
    stranger = world.Identity("dark", "blonde", "tall", "blue", False, "lilac")
    bad = {
        "glasses": [world.render(subject, rng)] * 2,  # the change not shown
        "edit_hair": [world.render(world.Identity(**(asked["hair"].as_dict() | {"background": "sky"})), rng)],
        "edit_style": [world.render(world.Identity(**(stranger.as_dict() | {"style": "tall"})), rng)],
        "edit_eyes": [world.render(asked["eyes"], rng), world.render(subject, rng)],  # one of two
    }
    metrics = scoring.score({"identity": [world.render(subject, rng)], **bad}, subject)
    assert metrics["edit"] == {"glasses": 0.0, "hair": 0.0, "style": 0.0, "eyes": 0.5}
    assert metrics["editability"] == pytest.approx(0.125)
    # which half fails: the prompt ignored (glasses: the subject kept, nothing shown), the rest of the person lost
    # (hair: shown, the background lost; style: shown on a stranger), both kept (eyes: one of two shows the change)
    assert metrics["follow"] == {"glasses": 0.0, "hair": 1.0, "style": 1.0, "eyes": 0.5}
    assert metrics["keep"] == {"glasses": 1.0, "hair": 0.0, "style": 0.0, "eyes": 1.0}
    # a run's saved images are scored again from their folder (each image's JSON names its prompt)
    folder = tmp_path / "cell-s0" / "images-100"
    folder.mkdir(parents=True)
    for n, (prompt, who) in enumerate([(prompts["edit_hair"], asked["hair"]), (prompts["edit_eyes"], subject)]):
        world.render(who, rng).save(folder / f"{n:04d}-{n}.png")
        (folder / f"{n:04d}-{n}.json").write_text(json.dumps({"prompt": prompt}))
    (line,) = edits.rescore(tmp_path)
    assert line.startswith(
        "cell-s0 images-100: editability 0.50, follow 0.50, keep 1.00 (hair 1.00/1.00/1.00, eyes 0.00"
    )
    with pytest.raises(SystemExit):  # the command names a folder that is not there in one line, no traceback
        edits.main([str(tmp_path / "nope")])
    # a subject who already wears glasses cannot be asked to take them off (no caption word): not scored
    assert edits.target(world.Identity(**(subject.as_dict() | {"glasses": True})), "glasses") is None
