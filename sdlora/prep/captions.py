"""Captions and the trigger phrase: the template for plain photos, sidecar texts made to contain the trigger."""

from __future__ import annotations

import re
from pathlib import Path

from sdlora.errors import UsageError


def trigger_phrase(token: str, class_word: str) -> str:
    """The words that name the person in captions and prompts, e.g. 'sks person'."""
    return f"{token} {class_word}".strip()


def render_template(template: str, token: str, class_word: str) -> str:
    """The caption template with {token} and {class_word} filled in; it must contain the trigger phrase."""
    try:
        caption = template.format(token=token, class_word=class_word)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(
            f"prep.caption_template {template!r}: only {{token}} and {{class_word}} may appear in braces ({exc})"
        ) from None
    if trigger_phrase(token, class_word) not in caption:
        raise UsageError(
            f"prep.caption_template {template!r} must contain '{{token}} {{class_word}}' so captions name the person"
        )
    return caption


def with_trigger(text: str, token: str, class_word: str) -> str:
    """A user's caption made to contain the trigger phrase: kept as is if it does; else the first whole-word
    class word becomes the trigger ('a man smiling' -> 'a sks man smiling'); else the trigger is prefixed."""
    text = " ".join(text.split())
    trigger = trigger_phrase(token, class_word)
    if trigger in text:
        return text
    if class_word:
        pattern = re.compile(rf"\b{re.escape(class_word)}\b")
        if pattern.search(text):
            return pattern.sub(trigger, text, count=1)
    return f"{trigger}, {text}" if text else trigger


def sidecar_of(photo: Path) -> Path:
    """`IMG_0001.jpg` -> `IMG_0001.txt` in the same folder."""
    return photo.with_suffix(".txt")


def read_sidecar(photo: Path) -> str | None:
    """The caption text next to `photo`, or None when there is none (or it is empty or not UTF-8 text)."""
    path = sidecar_of(photo)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None
