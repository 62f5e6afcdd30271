"""Editability: does the LoRA's person follow a prompt that asks for one change, and keep everything else?

For each attribute the base can be asked to change (its captions name it: glasses, hair colour, hair style, eye
colour), the benchmark renders "a photo of sks person <phrase>" with a value the subject does not have, and counts
the images decoded as exactly the subject with that one attribute changed: the change shown, every other attribute
of the person (skin, the other hair attribute, eyes, glasses, background) kept. An image of the unchanged subject,
of the change on a stranger, or of the change with a second attribute lost counts as a miss.

Skin tone is the person, not an edit; the background has no caption word in the base's training captions
(base.caption), so it cannot be asked for and is not scored.

    python -m bench.identity.edits OUT/work    # editability, follow and keep of a run's saved images, per checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.faces import toyworld as world

# attribute -> the benchmark's prompt key for it (the glasses edit is the original fidelity prompt)
EDITABLE = {"glasses": "glasses", "hair": "edit_hair", "style": "edit_style", "eyes": "edit_eyes"}
_VALUES = {"hair": tuple(world.HAIR), "style": world.STYLES, "eyes": tuple(world.EYES)}


def target(subject: world.Identity, attribute: str) -> world.Identity | None:
    """The subject with `attribute` changed to the next value of the world's list (glasses: put on); None where the
    base has no word for the change (taking glasses off)."""
    if attribute == "glasses":
        return None if subject.glasses else world.Identity(**(subject.as_dict() | {"glasses": True}))
    values = _VALUES[attribute]
    now = values.index(getattr(subject, attribute))
    return world.Identity(**(subject.as_dict() | {attribute: values[(now + 1) % len(values)]}))


def phrase(changed: world.Identity, attribute: str) -> str:
    """The caption phrase that asks for `changed`'s value of `attribute` (the base's own words, base.caption)."""
    return {
        "glasses": "with glasses",
        "hair": f"with {changed.hair} hair",
        "style": f"with {changed.style} hair",
        "eyes": f"with {changed.eyes} eyes",
    }[attribute]


def prompts(subject: world.Identity, trigger: str) -> dict[str, str]:
    """{prompt key: prompt} of the subject's edits, other than glasses (the fixed "glasses" prompt asks for it)."""
    out = {}
    for attribute, key in EDITABLE.items():
        changed = target(subject, attribute)
        if changed is not None and key != "glasses":
            out[key] = f"a photo of {trigger} {phrase(changed, attribute)}"
    return out


def score(readings: dict[str, list[world.Reading]], subject: world.Identity) -> dict[str, Any]:
    """{"editability": mean over the scored attributes, "edit": {attribute: share}}: the share of a prompt's images
    decoded as exactly the asked edit of the subject. Attributes whose prompt was not rendered are None.
    Its two halves, per attribute, say which one fails: "follow", the share of valid images showing the asked value
    (whoever wears it), and "keep", the share of valid images keeping every other attribute of the subject."""
    per: dict[str, float | None] = {}
    follow: dict[str, float | None] = {}
    keep: dict[str, float | None] = {}
    for attribute, key in EDITABLE.items():
        changed, images = target(subject, attribute), readings.get(key) or []
        ok = changed is not None and images
        per[attribute] = sum(r.valid and r.identity == changed for r in images) / len(images) if ok else None
        valid = [r.identity for r in images if r.valid] if ok else []
        shown = [i for i in valid if getattr(i, attribute) == getattr(changed, attribute)]
        others = [i for i in valid if _others(i, attribute) == _others(subject, attribute)]
        follow[attribute] = len(shown) / len(images) if ok else None
        keep[attribute] = len(others) / len(images) if ok else None
    scored = [v for v in per.values() if v is not None]
    return {"editability": sum(scored) / len(scored) if scored else None, "edit": per, "follow": follow, "keep": keep}


def _others(identity: world.Identity, attribute: str) -> dict[str, Any]:
    return {k: v for k, v in identity.as_dict().items() if k != attribute}


def rescore(work: Path) -> list[str]:
    """One line per (cell, checkpoint) of a benchmark's work folder (`<cell>-s<N>/images-<step>/`, each image's
    JSON naming its prompt): editability, follow and keep from the saved images, so runs written before follow and
    keep existed can be read again without rendering."""
    import json

    from PIL import Image

    from bench.identity import base, grids, scoring

    lines = []
    for cell in sorted(p for p in Path(work).iterdir() if p.is_dir() and "-s" in p.name):
        subject = base.SUBJECTS[int(cell.name.rsplit("-s", 1)[1])]
        keys = {prompt: key for t in grids.TRIGGERS for key, prompt in grids.prompts_for(subject, t).items()}
        for folder in sorted(cell.glob("images-*"), key=lambda p: int(p.name.split("-")[1])):
            readings: dict[str, list[world.Reading]] = {}
            for meta in sorted(folder.glob("*-*.json")):
                key = keys.get(json.loads(meta.read_text()).get("prompt"))
                if key:
                    readings.setdefault(key, []).append(world.read(Image.open(meta.with_suffix(".png")).convert("RGB")))
            found = score(readings, subject)
            if found["editability"] is None:
                continue
            half = {k: scoring.mean_known(list(found[k].values())) for k in ("follow", "keep")}
            lines.append(
                f"{cell.name} {folder.name}: editability {found['editability']:.2f}, follow {half['follow']:.2f}, "
                f"keep {half['keep']:.2f} ("
                + ", ".join(
                    f"{a} {v:.2f}/{found['follow'][a]:.2f}/{found['keep'][a]:.2f}"
                    for a, v in found["edit"].items()
                    if v is not None
                )
                + ")"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    """python -m bench.identity.edits OUT/work: editability, follow and keep of a run's saved images."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("work", type=Path, help="a benchmark's work folder (OUT/work)")
    work = parser.parse_args(argv).work
    if not work.is_dir():
        parser.error(f"{work}: no such folder; give a benchmark's OUT/work")
    print("\n".join(rescore(work)))


if __name__ == "__main__":
    main()
