"""Identity metrics over a set of images: per-image scores and their summary (pure functions, no I/O).

Definitions (all distances in the face model's own units; `threshold` is its same-person distance):
- subject face of an image: the detected face closest to the reference set;
- distance: median distance of the subject face to the reference faces (a median, so one odd reference photo
  does not decide); similarity = clip(1 - distance / (2 * threshold), 0, 1), which is 0.5 at the threshold,
  ~0.83 for a typical same-person dlib distance of 0.2 and ~0.3 for a stranger at 0.85;
- recognised: distance < threshold; recognised_rate counts over ALL images (no face = not recognised);
- identity: mean similarity over images with a face (face_rate says how many those are);
- bleed: every face other than the subject face is an "other" face; bleed = other faces that match the
  subject (distance < threshold) / all other faces, pooled over the set. Group prompts are what produce other
  faces; an image of the subject with two strangers has bleed 0, with two copies of the subject 1;
- diversity: mean pairwise perceptual-hash (pHash, 64 bits) distance between the images, as a share of the
  bits: near-duplicates are < 0.1, unrelated photos ~0.5. A LoRA that memorised its photos or collapsed
  to one composition gives images that hash alike, whatever the prompt. Face embeddings are built to ignore
  pose, light and background, so their spread (face_spread, also reported) cannot see that collapse alone;
- memorised_rate: share of images within `copy_distance` pHash bits of a reference photo.
Images whose prompt asks one change ("with glasses": edits.py) are judged for it (ImageScore.edited) and left out
of these numbers (to the toy decoder, the person with the asked glasses is another person); their editability is
edits.summarise's.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy
from pydantic import BaseModel, ConfigDict, Field

from sdlora.evaluation import edits
from sdlora.faces.backends import FaceBackend, FoundFace

HASH_BITS = 64
# pHash distance at or under which an image is a copy of a reference photo: prep's duplicate default (6 bits).
COPY_DISTANCE = 6 / HASH_BITS


def _absent(value: object) -> bool:
    return value is None


class ImageScore(BaseModel):
    """Scores of one image."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="Source path (--images) or path inside the report folder (generated).")
    prompt: str | None = None
    seed: int | None = None
    faces: int = Field(description="Faces detected.")
    subject_box: tuple[int, int, int, int] | None = Field(None, description="Face closest to the reference set.")
    distance: float | None = Field(None, description="Median distance of the subject face to the reference faces.")
    similarity: float | None = Field(None, description="clip(1 - distance / (2 threshold), 0, 1); 0.5 at threshold.")
    recognised: bool = Field(False, description="distance < threshold.")
    other_faces: int = Field(0, description="Faces besides the subject face.")
    other_matches: int = Field(0, description="Other faces that match the subject (bleed).")
    reference_hash_distance: float | None = Field(None, description="pHash distance to the closest reference photo.")
    prompt_fidelity: float | None = Field(None, description="CLIP cosine similarity of image and prompt.")
    # Only on images whose prompt asks one change (edits.py); absent from the JSON elsewhere.
    edit: str | None = Field(None, exclude_if=_absent, description="The change the prompt asks for (its phrase).")
    edited: bool | None = Field(
        None, exclude_if=_absent, description="Shows the change and is still the person; absent: not judged."
    )


class Summary(BaseModel):
    """Summary numbers of one image set."""

    model_config = ConfigDict(extra="forbid")

    images: int
    images_with_face: int
    face_rate: float
    identity: float | None = Field(description="Mean similarity over images with a face.")
    identity_distance: float | None = Field(description="Mean distance over images with a face.")
    recognised_rate: float = Field(description="Share of all images whose subject face is recognised.")
    diversity: float | None = Field(description="Mean pairwise pHash distance (share of bits); None under 2 images.")
    face_spread: float | None = Field(description="Mean pairwise distance between subject faces.")
    memorised_rate: float | None = Field(description="Share of images near-duplicating a reference photo.")
    bleed: float | None = Field(description="Share of other faces matching the subject; None without other faces.")
    other_faces: int
    prompt_fidelity: float | None = Field(description="Mean CLIP similarity; None when no CLIP model was given.")


# Every summary number: what it means and what good looks like (the terminal table and the HTML report show
# these; "{threshold}" is the face model's same-person distance). The one place these readings are written.
READINGS: dict[str, tuple[str, str]] = {
    "images": ("images scored", "20 or more give steady shares"),
    "images_with_face": ("images in which the face model found a face", "all of them, for portrait prompts"),
    "face_rate": (
        "share of all images with a face (a face the model can't read counts too; it is never recognised)",
        "1.0 for portrait prompts",
    ),
    "identity": (
        "mean similarity of the subject's face to the reference photos, over the images with a face: "
        "1 the same face, 0.5 exactly at the same-person distance {threshold}, 0 at twice that",
        "above 0.5; well-learned real people score ~0.8 with dlib",
    ),
    "identity_distance": (
        "mean face distance to the reference photos, over the images with a face (the face model's units)",
        "under {threshold}, the same-person distance",
    ),
    "recognised_rate": (
        "share of ALL images whose face is within {threshold} of the reference photos: the same person "
        "(no face or an unreadable one counts as not recognised, so it can be low while identity is high)",
        "high: 0.7 or more is a well-learned person",
    ),
    "diversity": (
        "mean pairwise pHash distance between the images, as a share of the 64 bits",
        "above 0.3 (varied pictures); under 0.1 the images are near-copies of each other",
    ),
    "face_spread": (
        "mean pairwise face distance between the images' subject faces",
        "under {threshold} (one person) yet above 0 (varied pose and expression)",
    ),
    "memorised_rate": (
        "share of images that are near-copies (within 6 of 64 pHash bits) of a reference photo",
        "0; above it the LoRA reproduces its training photos (train fewer steps or at a lower learning rate)",
    ),
    "bleed": (
        "share of the other faces (group prompts) that look like the subject; - when no image had another face",
        "about 0: the person does not leak into everyone",
    ),
    "other_faces": ("faces besides the subject's face, over all images", "only where prompts ask for other people"),
    "prompt_fidelity": (
        "mean CLIP similarity of image and prompt; - without --clip",
        "close to the base model's on the same prompts; a drop means the LoRA overrides the prompts",
    ),
}


def reading(key: str, threshold: float) -> tuple[str, str]:
    """(what the number `key` means, what good looks like), with the face model's threshold filled in."""
    meaning, good = READINGS[key]
    return meaning.format(threshold=f"{threshold:.3g}"), good.format(threshold=f"{threshold:.3g}")


@dataclass(frozen=True)
class Reference:
    """The reference set, computed once: identity embeddings and perceptual hashes of the photos."""

    embeddings: list[numpy.ndarray]  # one (D,) per reference photo with a face
    hashes: list[numpy.ndarray] = field(default_factory=list)  # (64,) bool pHash bits per photo
    images: list[str] = field(default_factory=list)
    faceless: list[str] = field(default_factory=list)  # reference photos where no face was found


def build_reference(images: Sequence, names: Sequence[str], backend: FaceBackend) -> Reference:
    """Embed the largest face of each reference photo and hash each photo (once per run)."""
    embeddings, faceless = [], []
    for image, name in zip(images, names, strict=True):
        faces = backend.faces(image)
        if faces:
            embeddings.append(faces[0].embedding)  # prep crops hold one face; the largest is the subject
        else:
            faceless.append(name)
    return Reference(embeddings, [phash_bits(image) for image in images], list(names), faceless)


def score_images(
    images: Sequence,
    names: Sequence[str],
    reference: Reference,
    backend: FaceBackend,
    threshold: float,
    *,
    prompts: Sequence[str | None] | None = None,
    seeds: Sequence[int | None] | None = None,
    fidelity: Sequence[float | None] | None = None,
    preferences: Sequence[bool | None] | None = None,
    progress=None,
) -> tuple[list[ImageScore], Summary]:
    """Score each PIL image against the reference set, then summarise. `progress(i)` after each image.

    Images whose prompt asks one change (edits.find) are judged for it (`preferences[i]`: CLIP prefers the prompt
    with the change) and left out of the summary, unless every image is one (edits.py says why)."""
    count = len(images)
    prompts = prompts or [None] * count
    seeds = seeds or [None] * count
    fidelity = fidelity or [None] * count
    preferences = preferences or [None] * count
    subject = edits.subject_of(reference.embeddings)
    scores, subjects, hashes = [], [], []
    for i, image in enumerate(images):
        faces = backend.faces(image)
        found = score_faces(faces, reference, backend, threshold)
        bits = phash_bits(image)
        hashes.append(bits)
        nearest = min((hash_distance(bits, ref) for ref in reference.hashes), default=None)
        face = _subject_embedding(faces, found.get("subject_box"))
        edit = edits.find(prompts[i])
        recognised = bool(found.get("recognised"))
        edited = edits.judge(edit, backend, subject, face, recognised, preferences[i]) if edit else None
        scores.append(
            ImageScore(
                image=names[i],
                prompt=prompts[i],
                seed=seeds[i],
                reference_hash_distance=nearest,
                prompt_fidelity=fidelity[i],
                edit=edit.phrase if edit else None,
                edited=edited,
                **found,
            )
        )
        subjects.append(face)
        if progress is not None:
            progress(i)
    kept = [i for i, score in enumerate(scores) if score.edit is None] or list(range(count))
    pick = [scores[i] for i in kept], [subjects[i] for i in kept], [hashes[i] for i in kept]
    return scores, summarise(*pick, backend, COPY_DISTANCE)


def _subject_embedding(faces: Sequence[FoundFace], box) -> numpy.ndarray | None:
    return next((f.embedding for f in faces if f.box == box), None)


def similarity(distance: float, threshold: float) -> float:
    return float(min(1.0, max(0.0, 1.0 - distance / (2.0 * threshold))))


def phash_bits(image) -> numpy.ndarray:
    """(64,) bool perceptual hash of a PIL image."""
    import imagehash

    return numpy.asarray(imagehash.phash(image).hash, dtype=bool).reshape(-1)


def hash_distance(a: numpy.ndarray, b: numpy.ndarray) -> float:
    """Share of differing pHash bits: 0 identical, ~0.5 unrelated."""
    return float(numpy.count_nonzero(a != b)) / HASH_BITS


def score_faces(
    faces: Sequence[FoundFace], reference: Reference, backend: FaceBackend, threshold: float
) -> dict[str, object]:
    """Subject face, its distance/similarity, and bleed counts of one image's faces."""
    if not faces:
        return {"faces": 0}
    distances = [statistics.median(backend.distance(f.embedding, r) for r in reference.embeddings) for f in faces]
    subject = int(numpy.argmin(distances))
    others = [f for i, f in enumerate(faces) if i != subject]
    matches = sum(1 for f in others if backend.distance(f.embedding, faces[subject].embedding) < threshold)
    return {
        "faces": len(faces),
        "subject_box": faces[subject].box,
        "distance": distances[subject],
        "similarity": similarity(distances[subject], threshold),
        "recognised": distances[subject] < threshold,
        "other_faces": len(others),
        "other_matches": matches,
    }


def summarise(
    scores: Sequence[ImageScore],
    subject_embeddings: Sequence[numpy.ndarray | None],
    hashes: Sequence[numpy.ndarray],
    backend: FaceBackend,
    copy_distance: float,
) -> Summary:
    """Aggregate per-image scores; `subject_embeddings[i]` is image i's subject face (None without a face)."""
    count = len(scores)
    with_face = [s for s in scores if s.faces]
    others = sum(s.other_faces for s in scores)
    subjects = [e for e in subject_embeddings if e is not None]
    fidelity = [s.prompt_fidelity for s in scores if s.prompt_fidelity is not None]
    ref_dists = [s.reference_hash_distance for s in scores if s.reference_hash_distance is not None]
    return Summary(
        images=count,
        images_with_face=len(with_face),
        face_rate=len(with_face) / count if count else 0.0,
        identity=_mean([s.similarity for s in with_face]),
        identity_distance=_mean([s.distance for s in with_face]),
        recognised_rate=sum(s.recognised for s in scores) / count if count else 0.0,
        diversity=_mean_pairwise(list(hashes), hash_distance),
        face_spread=_mean_pairwise(subjects, backend.distance),
        memorised_rate=(sum(d <= copy_distance for d in ref_dists) / len(ref_dists)) if ref_dists else None,
        bleed=sum(s.other_matches for s in scores) / others if others else None,
        other_faces=others,
        prompt_fidelity=_mean(fidelity),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present) / len(present)) if present else None


def _mean_pairwise(items: list, distance) -> float | None:
    pairs = list(itertools.combinations(items, 2))
    return float(sum(distance(a, b) for a, b in pairs) / len(pairs)) if pairs else None
