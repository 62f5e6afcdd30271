"""Editability: does the LoRA's person follow a prompt that asks for one change, and stay the person?

An edit prompt is a prompt that asks for exactly one change by a known phrase ("with glasses", "with blonde hair",
"on a grey background": EDITS). Its image is *edited* when it shows the asked change and is still the subject.
How "shows the change" is judged depends on what can read it, and nothing is guessed where nothing can:
- a face model that reads attributes (the toy world's decoder, `--face-model toy`): the image reads as exactly
  the subject with that one attribute changed (an image of the change on someone else, of the unchanged subject,
  or with a second attribute lost is a miss). A prompt asking for what the subject already has is no edit of
  this person and is not judged;
- real faces (dlib, insightface) with a CLIP model (`--clip`): the subject is recognised (face distance under
  the threshold) and CLIP matches the image better to the prompt than to the same prompt without the phrase.
  CLIP cannot know the person's own hair colour: asking for what they already have counts as shown;
- real faces without CLIP: not judged; editability is None (no number, no column, no panel).

editability = edited / judged edit images. Identity, bleed and the other identity numbers are computed over the
images whose prompt asks no edit (an image with the asked glasses is, to the toy decoder, another person).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy
from pydantic import BaseModel, ConfigDict, Field

from sdlora.faces import toyworld as world


@dataclass(frozen=True)
class Edit:
    """One change a prompt can ask for: its words, and the attribute and value a face model that reads
    attributes checks (the toy world's names)."""

    phrase: str
    attribute: str
    value: Any


# Every phrase recognised as an edit (in eval's prompts, a --prompts file or the recorded prompts of --images):
# the words the toy world's base learned from its captions, and its backgrounds (which any real model can draw).
EDITS = (
    Edit("with glasses", "glasses", True),
    *(Edit(f"with {colour} hair", "hair", colour) for colour in world.HAIR),
    *(Edit(f"with {style} hair", "style", style) for style in world.STYLES),
    *(Edit(f"with {colour} eyes", "eyes", colour) for colour in world.EYES),
    *(Edit(f"on a {name} background", "background", name) for name in world.BACKGROUND),
)


def find(prompt: str | None) -> Edit | None:
    """The one edit `prompt` asks for; None for no edit or for several (two changes are no one-change edit)."""
    if not prompt:
        return None
    found = [edit for edit in EDITS if re.search(rf"(?<!\w){re.escape(edit.phrase)}(?!\w)", prompt, re.IGNORECASE)]
    return found[0] if len(found) == 1 else None


def without(text: str, edit: Edit) -> str:
    """`text` with the edit's phrase taken out: the prompt CLIP compares the edit against."""
    plain = re.sub(rf"\s*(?<!\w){re.escape(edit.phrase)}(?!\w)", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+([,.])", r"\1", plain).strip()


def judge_of(backend: Any, clip: bool) -> str | None:
    """How edits are judged with this face model: 'attributes' (it reads them), 'clip', or None (not at all)."""
    if hasattr(backend, "edit_target"):
        return "attributes"
    return "clip" if clip else None


def judgeable(face_model: str, clip: str | None) -> bool:
    """Whether editability can be measured with these settings (before any model loads): whether to render
    prompts.EDIT_PROMPTS at all."""
    return face_model == "toy" or bool(clip)


def subject_of(embeddings: Sequence[numpy.ndarray]) -> numpy.ndarray | None:
    """The subject as an attribute-reading face model sees it: the commonest reading of the reference photos."""
    readable = [tuple(e.tolist()) for e in embeddings if not numpy.isnan(numpy.asarray(e, float)).any()]
    if not readable:
        return None
    return numpy.asarray(Counter(readable).most_common(1)[0][0])


def judge(
    edit: Edit,
    backend: Any,
    subject: numpy.ndarray | None,
    face: numpy.ndarray | None,
    recognised: bool,
    prefers: bool | None,
) -> bool | None:
    """Whether one image of an edit prompt is edited (module docstring); None where it is not judged. `face` is
    the image's subject face embedding (None: no face), `prefers` CLIP's preference for the prompt with the edit."""
    if hasattr(backend, "edit_target"):
        target = backend.edit_target(subject, edit.attribute, edit.value) if subject is not None else None
        if target is None:
            return None  # the subject already looks like that: nothing to change
        return face is not None and backend.distance(face, target) == 0
    if prefers is None:
        return None
    return bool(recognised and prefers)


# What editability means and what good looks like (eval's table and report; metrics.READINGS for the others).
READING = (
    "share of the images of prompts asking one change (with glasses, a hair colour, ...) that show it and are "
    "still the person ({judge}); - unmeasured",
    "0.6 or more; near 0 the LoRA draws its photos whatever the prompt asks (overfit)",
)
JUDGED_BY = {
    "attributes": "the face model reads every attribute: exactly the person with that one change",
    "clip": "recognised by the face model, and CLIP prefers the prompt to it without the change",
}


class EditSummary(BaseModel):
    """Editability of a scored set: only where it was judged."""

    model_config = ConfigDict(extra="forbid")

    editability: float = Field(description="Share of the judged edit images that show the change and keep the person.")
    images: int = Field(description="Edit images judged.")
    edited: int = Field(description="Of those, the ones that show the change and keep the person.")
    judge: str = Field(description="attributes (the face model reads them) or clip (CLIP and face recognition).")
    by_edit: dict[str, float] = Field(description="Editability of each asked change (its phrase).")


def summarise(scores: Sequence[Any], judge_name: str | None) -> EditSummary | None:
    """The edit summary of per-image scores (metrics.ImageScore: `edit`, `edited`); None when none was judged."""
    judged = [(score.edit, score.edited) for score in scores if score.edit and score.edited is not None]
    if not judged or judge_name is None:
        return None
    by_edit: dict[str, list[bool]] = {}
    for phrase, verdict in judged:
        by_edit.setdefault(phrase, []).append(verdict)
    shown = sum(verdict for _, verdict in judged)
    return EditSummary(
        editability=shown / len(judged),
        images=len(judged),
        edited=shown,
        judge=judge_name,
        by_edit={phrase: sum(v) / len(v) for phrase, v in by_edit.items()},
    )


def note(scores: Sequence[Any], summary: EditSummary | None, face_model: str) -> str | None:
    """Why editability is missing although edits were asked (a line for eval's notes); None otherwise."""
    if summary is not None or not any(score.edit for score in scores):
        return None
    if face_model == "toy":
        return "editability: every edit prompt asks for what the subject already has; nothing to judge"
    return f"editability not measured: with --face-model {face_model} the asked change is judged by CLIP (--clip)"
