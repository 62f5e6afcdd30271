"""The captions of a prep run's kept photos (prep.captions): the template, each photo's own IMG.txt, or a
vision-language model's answers through the caption policy; and the part of report.json that says why.

What the user wrote always wins: an IMG.txt beside a photo, and (with `vlm`) a caption edited in the dataset that
OUT_DIR already holds (by hand or in the web app), matched by the photo's hash. Every caption holds the trigger.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora import layout
from sdlora.errors import UsageError, printable
from sdlora.prep import captioner, captions, policy

if TYPE_CHECKING:
    from sdlora.prep.examine import Photo
    from sdlora.settings import PrepConfig

EDITS = "edits.json"  # the web app's record of a dataset's edited captions (serve/datasets.py)


@dataclass
class Captioned:
    """One caption per kept photo, where each came from, and report.json's "captions" section (None: template)."""

    texts: list[str]
    sources: list[str]  # template | sidecar | edited | vlm | fallback (the captioner's answer could not be read)
    report: dict | None = None


def check(cfg: PrepConfig) -> None:
    """Before any photo is processed: with `vlm`, the captioner must be loadable (one-line error otherwise)."""
    if cfg.captions == "vlm":
        captioner.check(cfg.captioner)


def edited_captions(out_dir: Path) -> dict[str, str]:
    """{source photo sha256: caption} of the captions a user changed in the dataset OUT_DIR holds: those the web
    app's edits.json lists, and any images/NNNN.txt whose text differs from the manifest's caption."""
    manifest = Path(out_dir) / layout.MANIFEST
    if not manifest.is_file():
        return {}
    from sdlora.prep.manifest import read_manifest

    try:
        entries = read_manifest(manifest)
    except UsageError:
        return {}
    changed: set[str] = set()
    try:
        note = json.loads((Path(out_dir) / EDITS).read_text(encoding="utf-8"))
        changed = set(note.get("captions_changed") or {}) if isinstance(note, dict) else set()
    except (OSError, ValueError):
        pass
    edited = {}
    for entry in entries:
        text = captions.read_sidecar(Path(out_dir) / entry.image)  # images/0003.txt beside images/0003.png
        if entry.image in changed:
            edited[entry.source_sha256] = entry.caption
        elif text is not None and " ".join(text.split()) != " ".join(entry.caption.split()):
            edited[entry.source_sha256] = text
    return edited


def caption_kept(
    kept: list[tuple[Photo, Path]], cfg: PrepConfig, template: str, edited: dict[str, str], progress: bool
) -> Captioned:
    """Captions for the kept (photo, source path) pairs, in order."""
    own = [captions.read_sidecar(path) for _, path in kept]
    if cfg.captions == "keep":
        missing = [printable(captions.sidecar_of(path)) for (_, path), text in zip(kept, own, strict=True) if not text]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UsageError(
                f"--captions keep: no caption file {', '.join(missing[:3])}{more}; write one beside each photo "
                "(IMG_1.txt beside IMG_1.jpg) or use --captions template or vlm"
            )
    texts = [captions.with_trigger(text, cfg.token, cfg.class_word) if text else template for text in own]
    sources = ["sidecar" if text else "template" for text in own]
    if cfg.captions == "template":
        return Captioned(texts, sources)
    if cfg.captions == "keep":
        return Captioned(texts, sources, {"mode": "keep"})
    return _vlm(kept, cfg, template, edited, texts, sources, progress)


def _vlm(
    kept: list[tuple[Photo, Path]],
    cfg: PrepConfig,
    template: str,
    edited: dict[str, str],
    texts: list[str],
    sources: list[str],
    progress: bool,
) -> Captioned:
    """Ask the captioner about every kept crop (cached), decide over the set, caption the photos without a user's."""
    from PIL import Image

    from sdlora.models import device, inference_dtype

    items = [(hashlib.sha256(photo.png).hexdigest(), Image.open(io.BytesIO(photo.png))) for photo, _ in kept]
    folder = Path(cfg.caption_cache).expanduser() if cfg.caption_cache else Path.home() / ".cache/sdlora/captions"
    cache = captioner.AnswerCache(folder, cfg.captioner)

    def load() -> captioner.Captioner:
        return captioner.Captioner(cfg.captioner, device(), inference_dtype(), cfg.caption_max_tokens)

    raw = captioner.answer_all(items, cache, load, cfg.caption_batch_size, progress)
    answers = [captioner.parse_answer(text) for text in raw]
    decisions = policy.decide([a for a in answers if a], cfg.caption_policy, cfg.caption_constant_share)
    for i, (photo, _) in enumerate(kept):
        if sources[i] == "sidecar":
            continue
        if photo.sha256 in edited:
            texts[i], sources[i] = captions.with_trigger(edited[photo.sha256], cfg.token, cfg.class_word), "edited"
        elif answers[i] is None:
            sources[i] = "fallback"  # gibberish or no JSON: the template, which holds the trigger
        else:
            texts[i], sources[i] = policy.compose(template, policy.phrases(answers[i], decisions)), "vlm"
    report = {
        "mode": "vlm",
        "captioner": cfg.captioner,
        "policy": cfg.caption_policy,
        "constant_share": cfg.caption_constant_share,
        "sources": dict(sorted(Counter(sources).items())),
        "left_out": {d.feature: d.reason for d in decisions if not d.described and d.value is not None},
        "named": {d.feature: d.reason for d in decisions if d.described},
        "features": [d.as_dict() for d in decisions],
        "unreadable_answers": [photo.name for (photo, _), a in zip(kept, answers, strict=True) if a is None],
    }
    return Captioned(texts, sources, report)
