"""Issue 31: `prep --captions template|vlm|keep`, the caption policy over a set, the captioner's cache and errors.

A tiny Idefics3 vision-language model built from configs (byte-level tokenizer, Pillow image processor: no download,
no torchvision) runs through `sdlora prep --captions vlm`; its answers are gibberish, so the fallback must keep the
trigger. The policy is tested on scripted answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora import config
from sdlora.cli import app
from sdlora.prep import captioner, captioning, contact, policy
from sdlora.prep.run import prep

TRIGGER = "sks person"


def build_tiny_vlm(folder: Path) -> Path:
    """A 1-layer Idefics3 (SmolVLM's architecture) with a byte-level tokenizer and a chat template, saved as a
    folder that AutoProcessor and AutoModelForImageTextToText load offline."""
    import torch
    import transformers as tf
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(ByteLevel.alphabet())} | {"<|endoftext|>": 256}
    end = "<|endoftext|>"
    tokenizer = tf.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=end, pad_token=end)
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    template = (
        "{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    size = {"longest_edge": 32}
    images = tf.Idefics3ImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
    processor = tf.Idefics3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=template
    )
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = small | {"model_type": "llama", "num_key_value_heads": 2, "vocab_size": len(tokenizer)}
    text |= {"max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": 256}
    cfg = tf.Idefics3Config(
        vision_config=small | {"image_size": 32, "patch_size": 8},
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    tf.Idefics3ForConditionalGeneration(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")


def _photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir()
    for seed in range(count):
        small = numpy.random.default_rng(seed).integers(0, 256, (6, 6, 3)).astype(numpy.uint8)
        Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC).save(folder / f"IMG_{seed}.png")
    return folder


def _args(photos: Path, out: Path, cache: Path, *more: str) -> list[str]:
    sets = ["prep.crop=center", "prep.resolution=64", "prep.workers=1", "prep.min_images=1"]
    sets += [f"prep.caption_cache={cache}", "prep.caption_batch_size=2", "prep.caption_max_tokens=12"]
    return ["prep", str(photos), str(out), *more, *(x for s in sets for x in ("--set", s))]


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~5 s quiet (transformers' VLM classes, a tiny model built and run)
def test_vlm_captions_end_to_end_with_a_tiny_model_and_the_cache(tmp_path, tiny_vlm, monkeypatch):
    photos, out, cache = _photos(tmp_path / "photos"), tmp_path / "out", tmp_path / "cache"
    (photos / "IMG_1.txt").write_text("a man on a bike")  # the user's own caption: kept, never replaced
    args = _args(photos, out, cache, "--captions", "vlm", "--captioner", str(tiny_vlm))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(TRIGGER in e["caption"] for e in entries)
    report = json.loads((out / "report.json").read_text())
    by_file = {f["file"]: f for f in report["files"]}
    assert by_file["IMG_1.png"]["caption"] == "sks person, a man on a bike"
    assert by_file["IMG_1.png"]["caption_source"] == "sidecar"
    # Gibberish from random weights: no JSON, so the template (with the trigger) stands in, and the report says so.
    assert {by_file[n]["caption_source"] for n in ("IMG_0.png", "IMG_2.png")} <= {"fallback", "vlm"}
    assert report["captions"]["mode"] == "vlm" and report["captions"]["captioner"] == str(tiny_vlm)
    assert len(list(cache.glob("*.json"))) == 3  # one answer per kept crop, the sidecar photo's too
    with Image.open(out / "contact_sheet.jpg") as sheet:
        assert sheet.size == contact.sheet_size(3, 0, contact.CAPTION_LINES)
    # Again: every answer comes from the cache; the model is neither loaded nor asked.
    monkeypatch.setattr(captioner, "Captioner", lambda *a, **k: pytest.fail("captioner loaded again"))
    again = CliRunner().invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()] == entries


def test_an_unloadable_captioner_is_one_line_before_any_photo(tmp_path, monkeypatch):
    import sdlora.prep.run as run

    photos = _photos(tmp_path / "photos")
    monkeypatch.setattr(run, "examine", lambda *a, **k: pytest.fail("a photo was processed"))
    not_vlm = tmp_path / "bert"
    not_vlm.mkdir()
    (not_vlm / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for name, says in ((tmp_path / "nope", "could not load"), (not_vlm, "not a vision-language model")):
        args = _args(photos, tmp_path / "out", tmp_path / "cache", "--captions", "vlm", "--captioner", str(name))
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --captioner") and says in lines[0], result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- the policy

ANSWERS = [  # five photos: same hair (said two ways), eyes unsure, glasses on two, a hat on all, clothes change
    {"hair_colour": "short red hair", "eye_colour": "green eyes", "glasses": "round glasses", "headwear": "red cap"},
    {"hair_colour": "red short hair", "eye_colour": "green eyes", "glasses": None, "headwear": "a red cap"},
    {"hair_colour": "Short red hair.", "eye_colour": "blue eyes", "glasses": "no glasses", "headwear": "red cap"},
    {"hair_colour": "short red hair", "eye_colour": "green eyes", "glasses": "round glasses", "headwear": "red cap"},
    {"hair_colour": "short red hair", "eye_colour": "blue eyes", "glasses": "none", "headwear": "red cap"},
]
for number, answer in enumerate(ANSWERS):
    answer |= {"clothing": "white t-shirt", "setting": f"place {number}", "skin": None}


def test_variable_policy_leaves_out_what_is_constant_over_the_set_and_names_what_varies():
    decisions = {d.feature: d for d in policy.decide(ANSWERS, "variable", 0.75)}
    assert not decisions["hair_colour"].described and decisions["hair_colour"].share == 1.0  # 5 of 5, word order
    assert "5 of 5" in decisions["hair_colour"].reason and "identity, left out" in decisions["hair_colour"].reason
    assert decisions["eye_colour"].described and decisions["eye_colour"].share == 0.6  # 3 of 5 < 75%: varies
    assert decisions["glasses"].described and "present in 2 of 5" in decisions["glasses"].reason
    assert not decisions["headwear"].described and "part of the person" in decisions["headwear"].reason
    assert decisions["clothing"].described and "never identity" in decisions["clothing"].reason  # constant, scene
    assert not decisions["skin"].described and decisions["skin"].reason == "not seen in any photo"
    texts = [policy.compose("a photo of sks person", policy.phrases(a, list(decisions.values()))) for a in ANSWERS]
    assert texts[0] == "a photo of sks person, green eyes, round glasses, white t-shirt, place 0"
    assert texts[1] == "a photo of sks person, green eyes, white t-shirt, place 1"  # no glasses: not named
    assert all(TRIGGER in t and "red hair" not in t and "cap" not in t for t in texts)
    full = policy.decide(ANSWERS, "full")
    assert all(d.described for d in full if d.value is not None)
    assert "red hair" in policy.compose("x", policy.phrases(ANSWERS[0], full))
    # A stricter share: green eyes (3 of 5) are still not constant; at 0.6 they are.
    assert not {d.feature: d for d in policy.decide(ANSWERS, "variable", 0.6)}["eye_colour"].described


def test_answers_are_parsed_robustly():
    parse = captioner.parse_answer
    assert parse('```json\n{"hair_color": "red", "glasses": null,}\n```') == {"hair_colour": "red", "glasses": None}
    assert parse("Sure! {'clothing': 'blue coat', 'unknown_key': 1} Hope this helps.") == {"clothing": "blue coat"}
    assert parse("hair colour: black\n- setting: a beach\nnonsense") == {"hair_colour": "black", "setting": "a beach"}
    assert parse(",\x1f\u00e9 garbage without structure") is None
    assert policy.clean("No hat") is None and policy.clean(["gold ring", "none"]) == "gold ring"
    assert captioner.cache_key("a" * 64, "m1") != captioner.cache_key("a" * 64, "m2")
    assert captioner.cache_key("a" * 64, "m1") != captioner.cache_key("a" * 64, "m1", "another prompt")


# ----------------------------------------------------------------------------------------------- user text wins


class Scripted:
    """A captioner that answers from a list (by photo order) and counts what it was asked."""

    asked = 0

    def __init__(self, answers: list[dict]) -> None:
        self.answers = answers

    def __call__(self, *args, **kwargs) -> Scripted:
        return self

    def ask(self, images: list) -> list[str]:
        start = Scripted.asked
        Scripted.asked += len(images)
        return [json.dumps(a) for a in self.answers[start : start + len(images)]]


def _cfg(tmp_path: Path, **prep_values) -> config.Config:
    values = {"prep.crop": "center", "prep.resolution": 64, "prep.workers": 1, "prep.min_images": 1}
    values |= {"prep.caption_cache": str(tmp_path / "cache"), "prep.captions": "vlm"}
    return config.load(None, values | {f"prep.{k}": v for k, v in prep_values.items()})


def test_scripted_answers_through_prep_and_edited_captions_are_never_overwritten(tmp_path, monkeypatch):
    photos, out = _photos(tmp_path / "photos", 5), tmp_path / "out"
    monkeypatch.setattr(captioning.captioner, "check", lambda name: None)
    monkeypatch.setattr(captioning.captioner, "Captioner", Scripted(ANSWERS))
    Scripted.asked = 0
    report = prep(photos, out, _cfg(tmp_path), progress=False)
    assert Scripted.asked == 5
    assert [e.caption for e in report.kept][1] == "a photo of sks person, green eyes, white t-shirt, place 1"
    saved = json.loads((out / "report.json").read_text())["captions"]
    assert set(saved["left_out"]) == {"hair_colour", "headwear"} and "5 of 5" in saved["left_out"]["hair_colour"]
    assert saved["sources"] == {"vlm": 5}
    # The user edits one caption by hand and the web app changes another (its edits.json); a new vlm run keeps both.
    (out / "images" / "0002.txt").write_text("sks person laughing at a joke\n")
    lines = (out / "manifest.jsonl").read_text().splitlines()
    edited = json.loads(lines[3]) | {"caption": "a photo of sks person in the rain"}
    lines[3] = json.dumps(edited)
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (out / "edits.json").write_text(json.dumps({"captions_changed": {"images/0003.png": edited["caption"]}}))
    again = prep(photos, out, _cfg(tmp_path, overwrite=True), progress=False)
    assert Scripted.asked == 5  # cached
    captions = [e.caption for e in again.kept]
    assert captions[2] == "sks person laughing at a joke" and captions[3] == "a photo of sks person in the rain"
    assert captions[1] == report.kept[1].caption
    assert json.loads((out / "report.json").read_text())["captions"]["sources"] == {"edited": 2, "vlm": 3}


def test_keep_needs_every_kept_photo_captioned_and_template_is_unchanged(tmp_path):
    photos = _photos(tmp_path / "photos")
    (photos / "IMG_0.txt").write_text("a woman reading")
    with pytest.raises(Exception, match=r"--captions keep: no caption file .*IMG_1\.txt, .*IMG_2\.txt"):
        prep(photos, tmp_path / "out", _cfg(tmp_path, captions="keep"), progress=False)
    (photos / "IMG_1.txt").write_text("sks person at work")
    (photos / "IMG_2.txt").write_text("on holiday")
    report = prep(photos, tmp_path / "out", _cfg(tmp_path, captions="keep"), progress=False)
    assert [e.caption for e in report.kept] == [
        "sks person, a woman reading",
        "sks person at work",
        "sks person, on holiday",
    ]
    template = prep(photos, tmp_path / "t", _cfg(tmp_path, captions="template"), progress=False)
    assert "captions" not in json.loads((tmp_path / "t" / "report.json").read_text())
    assert [e.caption for e in template.kept] == [e.caption for e in report.kept]


# ----------------------------------------------------------------------------------------------- the benchmark's


def test_the_toy_worlds_exact_captions_follow_the_policy():
    from bench.identity import captions as study
    from sdlora.demo.base import SUBJECTS

    photos = study.photo_set(SUBJECTS[0], 12)
    assert sum(p.glasses for p in photos) == 4 and len({p.background for p in photos}) == 4
    variable, decisions = study.captions("variable", photos, "a photo of sks person")
    assert variable[2] == "a photo of sks person with glasses and with a lilac background"
    assert all("hair" not in t and "eyes" not in t and "skin" not in t for t in variable)
    left_out = {d["feature"] for d in decisions if not d["described"] and d["value"]}
    assert left_out == {"hair_colour", "hair_style", "eye_colour", "skin"}
    full, _ = study.captions("full", photos, "a photo of sks person")
    assert all("with red hair" in t and "tan skin" in t for t in full)
    assert study.captions("trigger", photos, "a photo of sks person")[0] == ["a photo of sks person"] * 12
    row = {"setting": "captions=variable", "step": 300, "person": 0.5, "person_bleed": 0.0, "trigger_glasses": 0.25}
    lines = study.table([row, row | {"person": 0.7}], seeds=64).splitlines()
    assert lines[2].startswith("| captions=variable | 300 | 2 | 60 ± 4% | 0 ± 0% | - | - | - | 25% |")
