"""The standard evaluation prompt set and how its templates become prompts and CLIP texts."""

from __future__ import annotations

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
# What CLIP reads in place of the trigger: the rare token means nothing to it.
CLIP_SUBJECT = "a person"


def expand(templates: list[str], n: int, seed: int, trigger: str) -> tuple[list[str], list[str], list[int]]:
    """(templates, prompts, seeds) with each template repeated n times; image i uses seed + i."""
    repeated = [t for t in templates for _ in range(n)]
    prompts = [t.replace("{trigger}", trigger) for t in repeated]
    return repeated, prompts, [seed + i for i in range(len(repeated))]


def clip_text(template: str) -> str:
    return template.replace("{trigger}", CLIP_SUBJECT)
