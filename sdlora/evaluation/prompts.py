"""The standard evaluation prompt set and how its templates become prompts and CLIP texts."""

from __future__ import annotations

from sdlora.evaluation import edits

# Portraits, full-body shots, scenes and styles test whether the face survives away from the training
# framing; the group prompts are where bleed shows (other people taking the subject's face).
STANDARD_PROMPTS = (
    "a close-up portrait photo of {trigger}, natural light",
    "a photo of {trigger} laughing, looking away from the camera",
    "a full-body photo of {trigger} standing in a park",
    "a full-body photo of {trigger} walking on a beach at sunset",
    "{trigger} in a cafe, reading a book, candid photo",
    "{trigger} as an astronaut on the moon, cinematic lighting",
    "an oil painting of {trigger}, impressionist style",
    "a pencil sketch of {trigger}",
    "{trigger} with two friends at a party",
    "a group photo of {trigger} and three colleagues in an office",
)
# The edit prompts (edits.py: one change asked) rendered after the standard ones where editability can be judged.
# Two hair colours, so that at least one is a change for anyone. No background: the toy base never saw a word
# for it (bench/identity/edits.py), so its miss would say nothing about the LoRA.
EDIT_PROMPTS = (
    "a photo of {trigger} with glasses",
    "a photo of {trigger} with blonde hair",
    "a photo of {trigger} with black hair",
)
# What CLIP reads in place of the trigger: the rare token means nothing to it.
CLIP_SUBJECT = "a person"


def expand(templates: list[str], n: int, seed: int, trigger: str) -> tuple[list[str], list[str], list[int]]:
    """(templates, prompts, seeds) with each template repeated n times; image i uses seed + i."""
    repeated = [t for t in templates for _ in range(n)]
    prompts = [t.replace("{trigger}", trigger) for t in repeated]
    return repeated, prompts, [seed + i for i in range(len(repeated))]


def clip_text(template: str) -> str:
    return template.replace("{trigger}", CLIP_SUBJECT)


def default_templates(face_model: str, clip: str | None) -> list[str]:
    """The prompts `sdlora eval --lora` and scoring during training render: the standard set, then the edit
    prompts where the face model or CLIP can judge them (never rendered only to go unjudged)."""
    return list(STANDARD_PROMPTS) + (list(EDIT_PROMPTS) if edits.judgeable(face_model, clip) else [])
