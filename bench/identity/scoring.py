"""The identity benchmark's metrics: the decoder's reading of one image set (`score`), and the mean of known values."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.identity import captions as caption_study
from bench.identity import edits
from sdlora.faces import toyworld as world


def score(images: dict[str, list[Any]], subject: world.Identity) -> dict[str, Any]:
    """Decoder metrics of one image set ({prompt key: PIL images or paths}); see docs/identity-benchmark.md. The
    metrics of a prompt key missing from `images` are None (the identity prompt's images are always needed)."""
    from PIL import Image

    def readings(key: str) -> list[world.Reading]:
        return [world.read(Image.open(i) if isinstance(i, str | Path) else i) for i in images.get(key, [])]

    ident, cls, glasses = readings("identity"), readings("class"), readings("glasses")
    edit_readings = {key: readings(key) for key in edits.EDITABLE.values()}
    valid = [r.identity for r in ident if r.valid]
    with_glasses = world.Identity(**(subject.as_dict() | {"glasses": True}))
    result = {
        "exact": _share(ident, lambda r: r.valid and r.identity == subject),
        "validity": _share(ident, lambda r: r.valid),
        "attribute_accuracy": sum(world.agreement(v, subject) for v in valid) / len(valid) if valid else None,
        "per_attribute": {
            a: (sum(getattr(v, a) == getattr(subject, a) for v in valid) / len(valid) if valid else None)
            for a in world.ATTRIBUTES
        },
        # Over every image, valid or not: the nearest-prototype guess (the smoke test's signal on weak models).
        "soft_agreement": sum(world.agreement(r.identity, subject) for r in ident) / len(ident),
        "soft_agreement_sd": _sd([world.agreement(r.identity, subject) for r in ident]),
        "bleed": _share(cls, lambda r: r.valid and r.identity == subject),
        "class_soft_agreement": sum(world.agreement(r.identity, subject) for r in cls) / len(cls) if cls else None,
        "class_validity": _share(cls, lambda r: r.valid),
        "fidelity": _share(glasses, lambda r: r.valid and r.identity == with_glasses),
        "glasses_rate": _share(glasses, lambda r: r.valid and r.identity.glasses),
        "glasses_validity": _share(glasses, lambda r: r.valid),
        **edits.score(edit_readings, subject),
    }
    result.update(caption_study.person_metrics({"identity": ident, "class": cls, "glasses": glasses}, subject))
    return result


def _share(readings: list[world.Reading], test) -> float | None:
    return sum(1 for r in readings if test(r)) / len(readings) if readings else None


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def mean_known(values: list[float | None]) -> float:
    """The mean of the values that are not None (nan when none is)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else float("nan")
