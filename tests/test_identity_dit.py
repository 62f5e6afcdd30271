"""The identity benchmark's DiT (Z-Image) base: the builder (step budgets, a cut build resumes to the same weights),
its packaging (one small file, restored to the same renders) and the smoke test that a LoRA learns on it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdlora.demo.base import PACKAGED_DIT

# The DiT smoke test's scale: subject 0, the UNet smoke test's setting (rank 16, lr 3e-3, no prior, no text encoder)
# for 25 steps instead of 100, 32 seeds instead of 64, flow Euler 10 steps instead of 20, so that it costs about 30
# CPU-seconds. On the packaged base (6,127 steps), the subject called "zqx person", it measured 0.333 -> 0.833
# (margin 0.140); at lr 1e-8 0.333 -> 0.333 (docs/identity-benchmark.md).
DIT_SMOKE = {"seeds": 32, "steps": 25, "sample_steps": 10}


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
    # A continuation (a cut build's cooldown) trains the saved weights on, resumable in the same way.
    more = dit.continue_dit(whole, tmp_path / "more", steps=2, lr=1e-3, **quiet)
    again = dit.continue_dit(whole, tmp_path / "again", steps=2, lr=1e-3, max_seconds=1e-9, **quiet)
    assert json.loads((again / "identity_base.json").read_text())["unet_steps_done"] == dit.TINY.unet_steps + 1
    dit.continue_dit(whole, tmp_path / "again", steps=2, lr=1e-3, **quiet)
    done = json.loads((more / "identity_base.json").read_text())
    assert done["unet_steps_done"] == dit.TINY.unet_steps + 2 and done["spec"] == record["spec"]
    assert [(c["steps"], c["lr"], c["steps_done"]) for c in done["continued"]] == [(2, 1e-3, 2)]
    c, d = ZImagePipeline.from_pretrained(more), ZImagePipeline.from_pretrained(again)
    pairs = list(zip(c.transformer.parameters(), d.transformer.parameters(), strict=True))
    assert all(torch.equal(x, y) for x, y in pairs)
    assert not all(
        torch.equal(x, y) for x, y in zip(a.transformer.parameters(), c.transformer.parameters(), strict=True)
    )


def test_dit_base_packs_into_one_file_and_its_restore_renders_the_same_images(tmp_path):
    """A DiT base folder (the family's tiny Z-Image under a DiT record) through the fixture's export and restore:
    the configs, record and tokenizer come back, every weight and trained token row equal. The file stores fp16, so
    the folder's weights are fp16 values here (an fp32 folder comes back within fp16 rounding: docs); then a
    fixed-seed render of the restored base equals the folder's, to the bit."""
    from dataclasses import asdict

    import numpy
    from diffusers import ZImagePipeline

    from bench.identity import base, dit, fixture
    from sdlora.families.zimage.tiny import tiny_zimage_pipeline

    pipe = tiny_zimage_pipeline()
    for part in (pipe.transformer, pipe.text_encoder, pipe.vae):
        for tensor in part.state_dict().values():
            tensor.copy_(tensor.half().float())  # what the file can hold
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "identity_base.json").write_text(json.dumps({"spec": asdict(dit.TINY), "unet_steps_done": 4}))
    fixture.export(folder, tmp_path / "dit.safetensors")
    restored = fixture.restore(tmp_path / "dit.safetensors", tmp_path / "restored")
    assert base.is_flow(restored) and base.held_out_subjects(restored) == base.SUBJECTS[:3]
    for name in ("model_index.json", "identity_base.json", "transformer/config.json", "vae/config.json"):
        assert (restored / name).read_text() == (folder / name).read_text(), name
    a, b = ZImagePipeline.from_pretrained(folder), ZImagePipeline.from_pretrained(restored)
    prompt = "a photo of sks person"
    assert a.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True) == (
        b.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    )
    ids = fixture.trained_token_ids(a.tokenizer, chat=True)
    table = "embed_tokens.weight"  # its untrained rows are drawn afresh: only the trained ones travel
    assert 20 < len(ids) < len(a.tokenizer) and a.tokenizer.pad_token_id in ids
    for part in ("transformer", "vae", "text_encoder"):
        left, right = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left if k != table), part
    assert torch.equal(a.text_encoder.state_dict()[table][ids], b.text_encoder.state_dict()[table][ids])
    assert not torch.equal(a.text_encoder.state_dict()[table], b.text_encoder.state_dict()[table])

    def render(p):
        generator = torch.Generator().manual_seed(3)
        options = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "np"}
        return p(prompt, generator=generator, **options).images

    assert numpy.array_equal(render(a), render(b))


@pytest.mark.slow
def test_lora_on_the_packaged_dit_base_moves_decoded_attributes_toward_the_subject(tmp_path):
    """The UNet smoke test's code path (renders as photos -> `prep` -> `train` -> `generate` -> decoder) on the
    packaged DiT base, given to the benchmark as the file: the LoRA raises the soft agreement of "a photo of zqx
    person" with the subject above the base's by more than three standard errors of that difference at this test's
    seeds, from the per-image spreads of the two rows measured here (not a constant: the base is re-packaged as its
    build goes on). With lr 1e-8 (a LoRA that learns nothing) the gain is 0.000 and the test fails."""
    from bench.identity import base, run

    folder = run.base_folder(PACKAGED_DIT, tmp_path / "base")
    assert base.is_flow(folder) and base.held_out_subjects(folder) == base.SUBJECTS[:3]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark's jobs run: two threads beside the other pytest worker spin on 2 cores
    try:
        before, after = run.smoke(folder, tmp_path, **DIT_SMOKE)
    finally:
        torch.set_num_threads(threads)
    spread = math.hypot(before["soft_agreement_sd"], after["soft_agreement_sd"])
    margin = 3 * spread / math.sqrt(DIT_SMOKE["seeds"])
    gain = after["soft_agreement"] - before["soft_agreement"]
    print(f"soft agreement {before['soft_agreement']:.3f} -> {after['soft_agreement']:.3f}, margin {margin:.3f}")
    assert gain > margin, (before["soft_agreement"], after["soft_agreement"], margin)


def test_the_dit_worlds_trigger_is_a_word_its_base_never_trained_on(tmp_path):
    """On the DiT base the benchmark names the subject "zqx person": Qwen's byte tokenizer reads "sks" as trained
    bytes (the base draws glasses on it), while no caption the base trained on holds z, q or x."""
    from safetensors import safe_open

    from bench.identity import grids, run
    from sdlora.demo.base import DIT
    from sdlora.families.offline_text import qwen_tokenizer

    folder = run.base_folder(PACKAGED_DIT, tmp_path / "base")
    config = run.make_config(folder, run.SMOKE, grids.Scale(), None)
    assert grids.trigger_of(config) == "zqx person"
    assert grids.prompts_for(run.base.SUBJECTS[0], grids.trigger_of(config))["identity"] == "a photo of zqx person"
    with safe_open(str(PACKAGED_DIT), "pt") as handle:
        trained = set(handle.get_tensor(DIT.embedding + ".ids").tolist())
    tokenizer = qwen_tokenizer()
    assert not set(tokenizer("zqx").input_ids) & trained
    assert set(tokenizer("sks").input_ids) <= trained
