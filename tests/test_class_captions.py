"""Ready class images with their own captions (train.class_dir's IMG.txt): the caption a class image trains with,
the pre-flight refusal of a caption that names the trigger word, and the identity benchmark's class_captions cell."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.train.methods.class_images import class_examples


def class_folder(folder, captions: dict[int, str]):
    """Three 64 px class images, class-0000{i}.png, with the IMG.txt of `captions` (image index: text)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(folder / f"class-{i:05d}.png")
    for i, text in captions.items():
        (folder / f"class-{i:05d}.txt").write_text(text, encoding="utf-8")
    return folder


def test_a_class_image_trains_with_its_own_caption_else_the_class_prompt(tmp_path):
    from sdlora.train.batches import Batches, ImageSet
    from sdlora.train.data import Example

    folder = class_folder(tmp_path / "class", {1: "a photo of a person with glasses\n"})
    captions = [e.caption for e in class_examples(folder, "a photo of person", 3)]
    assert captions == ["a photo of person", "a photo of a person with glasses", "a photo of person"]
    assert [e.caption for e in class_examples(folder, "a photo of person", 2, sidecars=False)] == [
        "a photo of person"
    ] * 2
    # Their conditioning is cached (a staged family's, before set-up), and the set-up line counts them.
    from sdlora.config import load
    from sdlora.train.methods.class_images import METHOD
    from sdlora.train.setup import _class_count

    config = load(None, {"train.class_dir": str(folder), "train.num_class_images": 3})
    assert set(METHOD.cached_prompts(config, None)) == set(captions)
    line = _class_count(config, class_examples(folder, "a photo of person", 3))
    assert line == " + 3 class images (1 with their own caption)"
    # The micro-batches pair the subject's images with the class images, each under its own caption.
    vae = SimpleNamespace(config={}, device=torch.device("cpu"), dtype=torch.float32)
    vae.encode = lambda pixels: SimpleNamespace(latent_dist=SimpleNamespace(mean=pixels[:, :1, ::8, ::8]))
    family = SimpleNamespace(normalize_latents=lambda _vae, latents: latents)
    subject = ImageSet([Example(folder / "class-00000.png", "a photo of sks person")], 64, False, vae, True, family)
    classes = ImageSet(class_examples(folder, "a photo of person", 3), 64, False, vae, True, family)
    objective = SimpleNamespace(sample_timesteps=lambda n, _generator: torch.zeros(n, dtype=torch.long))
    settings = dict(seed=0, batch_size=1, num_processes=1, rank=0, noise_offset=0.0, caption_dropout=0.0)
    batches = Batches(subject, classes, text_cache=None, objective=objective, **settings)
    drawn = [batches.micro_batch(k, torch.device("cpu")).prompts for k in range(3)]
    assert {prompts[0] for prompts in drawn} == {"a photo of sks person"}
    assert sorted(prompts[1] for prompts in drawn) == sorted(captions)  # one epoch of the 3 class images


def test_a_class_caption_naming_the_trigger_word_fails_before_training(tiny_sd1, tmp_path):
    dataset = subject_set(tmp_path / "data")
    folder = class_folder(tmp_path / "class", {0: "a photo of a person", 2: "a photo of SKS person, smiling"})
    args = plain([dataset, tmp_path / "out", "--base", tiny_sd1, "--class-dir", folder, "--steps", "1"])
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert str(folder / "class-00002.txt") in lines[0] and "'sks'" in lines[0]
    assert not (tmp_path / "out").exists()  # refused in the pre-flight, before any model loads
    (folder / "class-00002.txt").write_bytes(b"a photo of a person \xff")
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2 and f"{folder / 'class-00002.txt'}: not UTF-8 text (byte 0x" in result.output


def test_the_class_captions_cell_names_each_renders_attributes(tmp_path):
    from bench.identity import grids, run
    from sdlora.faces import toyworld as world

    subject = world.all_identities()[0]
    folder = run.class_renders(subject, 4, tmp_path / "class", seed=7, captions="attributes")
    for i in range(4):
        found = world.decode(Image.open(folder / f"{i:04d}.png"))
        assert found is not None and found != subject
        words = (["with glasses"] if found.glasses else []) + [f"with {found.hair} hair", f"with {found.style} hair"]
        words += [f"with {found.eyes} eyes", f"{found.skin} skin"]
        text = (folder / f"{i:04d}.txt").read_text()
        assert text.startswith("a photo of a person with ")
        assert sorted(text.removeprefix("a photo of a person ").split(" and ")) == sorted(words)
    plain_renders = run.class_renders(subject, 4, tmp_path / "plain", seed=7)
    assert not list(plain_renders.glob("*.txt"))
    article = run.class_renders(subject, 4, tmp_path / "article", seed=7, captions="article")
    assert [(article / f"{i:04d}.txt").read_text() for i in range(4)] == ["a photo of a person"] * 4
    cell = grids.combine("pivotal+class_captions")
    assert cell.prior and cell.class_captions == "attributes" and dict(cell.options)["train.pivotal"] is True
    assert not grids.combine("pivotal+class_images").class_captions
    assert grids.combine("pivotal+class_images+class_article").class_captions == "article"


def test_the_named_lever_captions_half_the_subjects_photos_with_its_true_attributes(tmp_path):
    """`named` (a lever of the bar search): the subject's own photos, unchanged; every other caption adds 1-3 of the
    photo's true attribute phrases to the trigger's caption, and prep keeps them (the trigger kept in each)."""
    import json

    from bench.identity import captions, grids, run
    from sdlora.faces import toyworld as world

    subject = world.all_identities()[5]
    cell = grids.combine("pivotal+class_images+named")
    assert cell.captions == captions.NAMED and cell.prior and dict(cell.options)["train.pivotal"] is True
    assert grids.combine("pivotal+class_images").captions == ""
    base = tmp_path / "base"
    base.mkdir()
    (base / "identity_base.json").write_text(json.dumps({"spec": {"kind": "sd1", "held_out": 3}}))
    config = run.make_config(base, cell, grids.Scale(photos=6), None)
    dataset = run.prep_subject(subject, tmp_path, config, grids.Scale(photos=6), seed=11, captions=cell.captions)
    texts = json.loads((tmp_path / "captions.json").read_text())["captions"]
    trigger = grids.prompts(grids.trigger_of(config))["identity"]
    assert texts[0::2] == [trigger] * 3
    for text in texts[1::2]:
        words = text.removeprefix(trigger + " ").split(" and ")
        assert text.startswith(trigger + " ") and 1 <= len(words) <= 3 and set(words) <= set(subject.caption_words())
    for photo in sorted((tmp_path / "photos").glob("*.png")):
        assert world.decode(Image.open(photo)) == subject
    kept = sorted(p.read_text().strip() for p in dataset.rglob("*.txt"))
    assert kept == sorted(texts)
    full = captions.named([subject] * 2, "a photo of sks person", full=True)  # `named_full`: every phrase, always
    assert full == ["a photo of sks person " + " and ".join(subject.caption_words())] * 2
    assert grids.combine("pivotal+named_full").captions == captions.NAMED_FULL
    three = captions.named([subject] * 8, "t", every=4)  # `named3`: the first of every four bare, as the base's
    assert [text == "t" for text in three] == [True, False, False, False] * 2
    assert grids.combine("pivotal+named3").captions == captions.NAMED3
    with pytest.raises(ValueError, match="caption the photos differently"):
        grids.combine("named+named_full")
