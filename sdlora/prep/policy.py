"""The caption policy: from a captioner's per-photo answers, which features a caption names and why.

What a caption names is what the LoRA does *not* bind to the trigger. So with the `variable` policy a caption
names what changes between photos (clothing, setting, pose, glasses on some photos) and leaves out what stays the
same on the person (hair, eyes, skin, glasses worn in every photo): those are the identity the trigger should learn.
Which person features are constant is decided over the whole set, from the answers, not from a word list:

- a *person* feature with a value (hair colour, eye colour, ...) is constant when its most common value is given
  in at least `share` of the photos that answer it;
- a *person* feature that comes and goes (glasses, a hat, a beard, jewellery) is constant when present in at least
  `share` of all photos; otherwise it is named in the photos that show it;
- *scene* features (clothing, setting, pose, expression, lighting, framing) are never identity: always named.

`full` names every feature of every photo (the usual auto-caption). Pure functions, no model, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# Each feature the captioner is asked for, and its kind: "person" (may be identity), "presence" (a person feature
# that comes and goes), "scene" (never identity). The order is the order of the phrases in a caption.
FEATURES: dict[str, str] = {
    "hair_colour": "person",
    "hair_style": "person",
    "eye_colour": "person",
    "skin": "person",
    "facial_hair": "presence",
    "glasses": "presence",
    "headwear": "presence",
    "accessories": "presence",
    "clothing": "scene",
    "expression": "scene",
    "pose": "scene",
    "setting": "scene",
    "lighting": "scene",
    "framing": "scene",
}
POLICIES = ("variable", "full")
# Answers that mean "not there / not seen" rather than a value.
ABSENT = {"", "none", "no", "n/a", "na", "null", "nil", "unknown", "not visible", "not applicable", "false", "nothing"}
# Words that do not change what a value means ("wearing a red hat" = "red hat") when values are compared.
FILLER = {"a", "an", "the", "with", "wearing", "wears", "has", "have", "is", "in", "of", "and", "on", "their", "his"}
MAX_WORDS = 8  # per phrase: a caption must stay inside CLIP's 77 tokens


@dataclass(frozen=True)
class Decision:
    """One feature's fate over the set: named in captions or left out, and why (report.json lists these)."""

    feature: str
    kind: str
    described: bool
    share: float  # of the photos: the most common value's (person), present (presence), answered (scene)
    value: str | None  # the most common value as the captioner said it (None: never seen)
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def clean(value: object) -> str | None:
    """An answer's value as a short phrase, or None when it says "absent" (None, "none", "no glasses", false)."""
    if value is None or value is False:
        return None
    if value is True:
        return "yes"
    if isinstance(value, list | tuple):
        parts = [part for part in (clean(v) for v in value) if part]
        return ", ".join(parts) if parts else None
    text = " ".join(str(value).replace("\n", " ").split()).strip(" .,;:")
    if text.lower() in ABSENT or re.match(r"^(no|none|without|not)\b", text.lower()):
        return None
    return " ".join(text.split()[:MAX_WORDS])


def key(value: str) -> str:
    """What two values are compared by: lower case, no punctuation or filler words, word order ignored."""
    words = re.findall(r"[a-z0-9]+", value.lower())
    return " ".join(sorted(w for w in words if w not in FILLER))


def decide(answers: list[dict], policy: str = "variable", share: float = 0.75) -> list[Decision]:
    """Every feature's decision over the set of `answers` (one dict a photo, feature -> value; clean() applied)."""
    if policy not in POLICIES:
        raise ValueError(f"caption policy {policy!r}: choose {' or '.join(POLICIES)}")
    decisions = []
    for feature, kind in FEATURES.items():
        values = [v for v in (clean(a.get(feature)) for a in answers) if v]
        counts: dict[str, list[str]] = {}
        for value in values:
            counts.setdefault(key(value), []).append(value)
        common = max(counts.values(), key=len) if counts else []
        value = common[0] if common else None
        n = len(answers)
        if kind == "presence":
            seen = len(values) / n if n else 0.0
        elif kind == "person":
            seen = len(common) / len(values) if values else 0.0
        else:
            seen = len(values) / n if n else 0.0
        decisions.append(Decision(feature, kind, *_fate(kind, policy, seen, share, len(values), n, common)))
    return decisions


def _fate(
    kind: str, policy: str, seen: float, share: float, answered: int, photos: int, common: list[str]
) -> tuple[bool, float, str | None, str]:
    """(described, share, value, reason) of one feature."""
    value = common[0] if common else None
    if not answered:
        return False, 0.0, None, "not seen in any photo"
    if policy == "full":
        return True, seen, value, "policy 'full': every feature is named"
    if kind == "scene":
        return True, seen, value, "scene feature (clothing, setting, pose, ...): never identity, named where seen"
    if kind == "presence":
        count = f"present in {answered} of {photos} photos"
        if seen >= share:
            return False, seen, value, f"{count} (>= {share:.0%}): part of the person, left out"
        return True, seen, value, f"{count} (< {share:.0%}): comes and goes, named where present"
    count = f"'{value}' in {len(common)} of {answered} photos that show it"
    if seen >= share:
        return False, seen, value, f"{count} (>= {share:.0%}): constant, identity, left out"
    return True, seen, value, f"{count} (< {share:.0%}): varies, named in each photo"


def phrases(answer: dict, decisions: list[Decision]) -> list[str]:
    """The phrases one photo's caption adds: its own values of the described features, in FEATURES order."""
    out = []
    for decision in decisions:
        value = clean(answer.get(decision.feature)) if decision.described else None
        if value and value.lower() not in (p.lower() for p in out):
            out.append(value)
    return out


def compose(base: str, extra: list[str], sep: str = ", ") -> str:
    """The caption: `base` (the template, which holds the trigger) followed by the phrases."""
    return base + sep + sep.join(extra) if extra else base
