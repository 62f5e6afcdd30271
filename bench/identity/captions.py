"""The caption study of the identity benchmark (issue 31): what captions should say for the trigger to learn the person.

The toy world knows every attribute of every render, so its "captioner" is exact. The subject's photos vary as a
user's do: glasses on a third of them, the background changing; the person (skin, hair colour, hair style, eyes)
stays the same. Three caption variants train the same LoRA on the same photos:

- `trigger`: "a photo of sks person" on every photo;
- `full`: every attribute named (sdlora's caption policy "full"): "... with red hair and with long hair and ...";
- `variable`: sdlora's "variable" policy decided over the set by `sdlora.prep.policy` (the code prep runs): only
  what varies, here the glasses where worn and the background.

The metrics that matter here are about the person, not the exact render (backgrounds and glasses vary on purpose):
`person` = share of "a photo of sks person" images that are a valid person with the subject's skin, hair colour,
hair style and eyes; `person_bleed` the same on "a photo of a person"; `person_edit` = "... with glasses" images
that are the subject's person wearing glasses; `trigger_glasses` = share of the valid trigger images wearing glasses
(the photos had a third: a trigger that learned glasses as identity draws them more often).

python -m bench.identity --base B3 --grid captions --steps 400 800 --seeds 64 --jobs 2 --out OUT
"""

from __future__ import annotations

from pathlib import Path

from sdlora.faces import toyworld as world
from sdlora.prep import policy

VARIANTS = ("trigger", "full", "variable")
# A lever of the bar search (issue 32), not a variant of the study: the subject's own photos (unchanged, as the
# methods grid trains on), every other caption naming 1-3 of the subject's true attributes in the base's phrasing
# ("a photo of sks person with red hair and with brown eyes"), so that the trigger is learned beside the attribute
# words instead of in place of them.
NAMED = "named"
NAMED_FULL = "named_full"  # the other end: every caption names every true attribute of the photo
NAMED3 = "named3"  # three captions in four name 1-3 attributes, as three in four of the base's own captions do
PERSON = ("skin", "hair", "style", "eyes")  # what stays the same on the subject in every photo
GLASSES_EVERY = 3  # every third photo wears glasses


def photo_set(subject: world.Identity, count: int) -> list[world.Identity]:
    """The subject as a user photographs them: glasses on every third photo, the background cycling through all."""
    backgrounds = list(world.BACKGROUND)
    return [
        world.Identity(
            subject.skin,
            subject.hair,
            subject.style,
            subject.eyes,
            i % GLASSES_EVERY == GLASSES_EVERY - 1,
            backgrounds[i % len(backgrounds)],
        )
        for i in range(count)
    ]


def answer(identity: world.Identity) -> dict[str, str | None]:
    """The exact captioner's answer for one render, in the phrases the toy base was trained on."""
    return {
        "hair_colour": f"with {identity.hair} hair",
        "hair_style": f"with {identity.style} hair",
        "eye_colour": f"with {identity.eyes} eyes",
        "skin": f"{identity.skin} skin",
        "glasses": "with glasses" if identity.glasses else None,
        "setting": f"with a {identity.background} background",
    }


def captions(variant: str, identities: list[world.Identity], base: str) -> tuple[list[str], list[dict]]:
    """(one caption a photo, the policy's decisions) for a caption variant; `base` holds the trigger."""
    if variant == "trigger":
        return [base] * len(identities), []
    if variant in (NAMED, NAMED_FULL, NAMED3):
        return named(identities, base, full=variant == NAMED_FULL, every=4 if variant == NAMED3 else 2), []
    if variant not in VARIANTS:
        raise ValueError(f"caption variant {variant!r}: choose from {', '.join(VARIANTS)}")
    answers = [answer(i) for i in identities]
    decisions = policy.decide(answers, "full" if variant == "full" else "variable")
    # The toy base's captions join attribute phrases with " and " after the class phrase.
    texts = [" ".join([base, " and ".join(policy.phrases(a, decisions))]).strip() for a in answers]
    return texts, [d.as_dict() for d in decisions]


def named(identities: list[world.Identity], base: str, seed: int = 0, full: bool = False, every: int = 2) -> list[str]:
    """The `named` lever's captions: `base` on every `every`-th photo from the first, `base` with 1-3 of the photo's
    attribute phrases (skin and glasses included, as the base's captions) on the others, joined as the base's
    captions join them; `full`: every photo's caption with all of its phrases."""
    import random

    rng = random.Random(seed)
    texts = []
    for i, identity in enumerate(identities):
        words = identity.caption_words()
        if full:
            chosen = words
        elif i % every:
            chosen = rng.sample(words, rng.randint(1, min(3, len(words))))
        else:
            chosen = []
        texts.append(" ".join([base, " and ".join(chosen)]).strip())
    return texts


def write_sidecars(folder: Path, texts: list[str]) -> None:
    """0000.txt beside 0000.png, ...: the captions prep reads (a sidecar is the user's caption)."""
    for i, text in enumerate(texts):
        (folder / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")


def is_person(reading: world.Reading, subject: world.Identity) -> bool:
    return reading.valid and all(getattr(reading.identity, a) == getattr(subject, a) for a in PERSON)


def person_metrics(readings: dict[str, list[world.Reading]], subject: world.Identity) -> dict[str, float | None]:
    """The person-level metrics above, from decoder readings by prompt key (identity, class, glasses)."""

    def share(items: list[world.Reading], test) -> float | None:
        return sum(1 for r in items if test(r)) / len(items) if items else None

    ident, cls, glasses = readings.get("identity", []), readings.get("class", []), readings.get("glasses", [])
    valid = [r for r in ident if r.valid]
    return {
        "person": share(ident, lambda r: is_person(r, subject)),
        "person_bleed": share(cls, lambda r: is_person(r, subject)),
        "person_edit": share(glasses, lambda r: is_person(r, subject) and r.identity.glasses),
        "trigger_glasses": share(valid, lambda r: r.identity.glasses),
    }


# glasses_rate (scoring.score): share of the "with glasses" images that are a valid person wearing glasses, anyone.
METRICS = ("person", "person_bleed", "class_validity", "person_edit", "glasses_rate", "trigger_glasses", "validity")


def table(rows: list[dict], seeds: int) -> str:
    """Markdown: mean over subjects ± binomial standard error (sqrt(sum p(1-p)/seeds) / subjects) per (setting, step).
    `trigger_glasses` is a share of the valid images, so its error is left out."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["step"]), []).append(row)
    lines = ["| setting | step | subjects | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 3)]
    for (setting, step), members in groups.items():
        cells = []
        for key in METRICS:
            values = [m[key] for m in members if m.get(key) is not None]
            if not values:
                cells.append("-")
                continue
            mean = sum(values) / len(values)
            error = (sum(v * (1 - v) / seeds for v in values) ** 0.5) / len(values)
            cells.append(f"{100 * mean:.0f}%" if key == "trigger_glasses" else f"{100 * mean:.0f} ± {100 * error:.0f}%")
        lines.append(f"| {setting} | {step} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """python -m bench.identity.captions RESULTS.json: the caption study's table with standard errors."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--subject", type=int, help="this subject's rows alone (default: the mean over subjects)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    rows = [r for r in results["rows"] if args.subject in (None, r["subject"])]
    print(table(rows, results["scale"]["seeds"]))


if __name__ == "__main__":
    main()
