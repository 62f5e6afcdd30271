"""prep(photos, out, config) -> Report: the pipeline over a folder, the decisions across photos, the outputs."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy

from sdlora import layout
from sdlora.errors import SdloraError, UsageError, printable
from sdlora.faces.dlib import face_distance
from sdlora.fsutil import atomic_dir
from sdlora.preflight import check_output_dir
from sdlora.prep import captioning, captions, contact, crops, images
from sdlora.prep.examine import Photo, Settings, examine
from sdlora.prep.manifest import MANIFEST, ManifestEntry, write_manifest
from sdlora.prep.workers import pool as workers_pool

if TYPE_CHECKING:
    from sdlora.config import Config, PrepConfig

REASONS = (
    "unreadable",
    "not_an_image",
    "too_small",
    "too_large",
    "no_face",
    "multiple_faces",
    "face_too_small",
    "blurry",
    "duplicate",
    "other_person",
)


@dataclass
class Report:
    """Every input file in name order with its fate; `kept` are the manifest entries written."""

    files: list[dict] = field(default_factory=list)
    kept: list[ManifestEntry] = field(default_factory=list)
    captions: dict | None = None  # how captions were made and what they leave out (not with the template)

    @property
    def skipped(self) -> Counter:
        return Counter(entry["reason"] for entry in self.files if entry["status"] == "skipped")

    def summary(self) -> str:
        """'kept 9, skipped 4 (2 no_face, 1 blurry, 1 duplicate)' and one line per skipped file."""
        counts = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        lines = [f"kept {len(self.kept)}, skipped {sum(self.skipped.values())}" + (f" ({counts})" if counts else "")]
        lines += [f"  {e['file']}: {e['reason']}: {e['message']}" for e in self.files if e["status"] == "skipped"]
        return "\n".join(lines)

    def to_json(self) -> str:
        summary = {"kept": len(self.kept), "skipped": dict(sorted(self.skipped.items()))}
        extra = {"captions": self.captions} if self.captions else {}
        return json.dumps({"summary": summary, **extra, "files": self.files}, indent=2, ensure_ascii=False) + "\n"


def prep(photos_dir: Path, out_dir: Path, config: Config, *, fast: bool = True, progress: bool = True) -> Report:
    """Turn the photos in `photos_dir` into a training set in `out_dir` (written whole, atomically).
    `fast=False` decodes every photo at full size (for checking that the fast path decides the same)."""
    cfg = config.prep
    photos_dir, out_dir = _check_paths(Path(photos_dir), Path(out_dir), cfg.overwrite)
    caption = captions.render_template(cfg.caption_template, cfg.token, cfg.class_word)
    files = list_inputs(photos_dir)
    # Before the slow part: a read-only, full or file-blocked OUT_DIR fails now, not after every photo.
    check_output_dir(out_dir, "OUT_DIR", need=dataset_bytes(len(files), cfg.resolution, cfg.buckets))
    captioning.check(cfg)  # --captions vlm: an unloadable captioner fails here, before any photo is processed
    edited = captioning.edited_captions(out_dir) if cfg.captions == "vlm" else {}
    settings = Settings(
        cfg.crop, cfg.resolution, cfg.face_share, cfg.max_upscale, cfg.max_pixels, fast=fast, buckets=cfg.buckets
    )
    photos = _examine_all(files, settings, _workers(cfg.workers, len(files)), progress)
    photos = _decide(photos, cfg)
    kept = [(photo, path) for photo, path in zip(photos, files, strict=True) if photo.reason is None]
    if len(kept) < cfg.min_images:
        report = _report(photos, files, captioning.Captioned([caption] * len(kept), ["template"] * len(kept)))
        raise SdloraError(
            f"only {len(report.kept)} of {len(files)} photos in {printable(photos_dir)} are usable, fewer than "
            f"--min-images {cfg.min_images}; add more clear photos of one person (or lower --min-images).\n"
            + report.summary()
        )
    report = _report(photos, files, captioning.caption_kept(kept, cfg, caption, edited, progress))
    _write(out_dir, report, photos, config)
    return report


# Bytes beside the photos' own: config.json, the report's and manifest's fixed part, file-system slack.
DATASET_FIXED = 1 << 20
PER_PHOTO_TEXT = 8 << 10  # its caption file and its lines in manifest.jsonl and prep_report.json, long paths included


def dataset_bytes(photos: int, resolution: int, buckets: bool) -> int:
    """An upper bound on the bytes a dataset of `photos` input files takes: each kept as an uncompressed RGB crop
    (PNG is smaller) and mask, with its text, and the contact sheet at 1 byte a pixel (JPEG at quality 90
    takes about a third of that). It may exceed what prep writes (PNG and JPEG compress), never fall short."""
    pixels = max(w * h for w, h in crops.buckets(resolution)) if buckets else resolution**2
    crop = 4 * pixels + 4 * resolution + 1024  # RGB + L mask, PNG's filter byte a row and headers
    # Kept and skipped rows (at most one more than all kept), with captions under the kept ones.
    sheet = math.prod(contact.sheet_size(photos, 1, contact.CAPTION_LINES))
    return photos * (crop + PER_PHOTO_TEXT) + sheet + DATASET_FIXED


def _report(photos: list[Photo], files: list[Path], captioned: captioning.Captioned) -> Report:
    """Manifest entries for the kept photos (numbered in name order, with `captioned`'s captions in that order) and
    every file's fate; each kept file's caption and where it came from too, unless captions are the template's."""
    report = Report(captions=captioned.report)
    texts, sources = iter(captioned.texts), iter(captioned.sources)
    for photo, path in zip(photos, files, strict=True):
        if photo.reason is not None:
            report.files.append(
                {"file": photo.name, "status": "skipped", "reason": photo.reason, "message": photo.message}
            )
            continue
        entry = ManifestEntry(
            image=f"images/{len(report.kept):04d}.png",
            caption=next(texts),
            source=printable(path),
            source_sha256=photo.sha256,
            source_size=photo.size,
            crop_box=photo.crop_box,
            face_box=photo.face_box,
            sharpness=photo.sharpness,
            width=photo.out_size[0],
            height=photo.out_size[1],
            mask=f"{layout.DATASET_MASKS}/{len(report.kept):04d}.png" if photo.mask else None,
        )
        report.kept.append(entry)
        report.files.append({"file": photo.name, "status": "kept", "image": entry.image})
        source = next(sources)
        if captioned.report:
            report.files[-1] |= {"caption": entry.caption, "caption_source": source}
    return report


def list_inputs(photos_dir: Path) -> list[Path]:
    """Entries directly in `photos_dir`, by name; hidden files, sub-folders and caption sidecars (IMG_1.txt
    beside IMG_1.jpg) are not inputs. Everything else is, so a stray file is reported (not_an_image) rather than
    silently lost: dangling links, link loops, pipes and devices too (unreadable, with what they are)."""
    entries = sorted(p for p in photos_dir.iterdir() if not p.name.startswith(".") and not _is_folder(p))
    photo_stems = {p.stem for p in entries if p.suffix.lower() in layout.IMAGE_SUFFIXES}
    return [p for p in entries if not (p.suffix.lower() == ".txt" and p.stem in photo_stems and p.is_file())]


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a link loop on Python versions whose is_dir raises: an input, reported as unreadable
        return False


def _check_paths(photos_dir: Path, out_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    """Check the folders and claim OUT_DIR: new, empty, or (with --overwrite) an earlier prep's dataset; never a
    folder of the user's or of another command. The claim locks it (now if it exists, else when it is written)
    and makes the writer check that nothing else wrote it meanwhile."""
    from sdlora import fsutil

    if photos_dir.exists() and not photos_dir.is_dir():
        raise UsageError(f"PHOTOS_DIR {photos_dir}: is a file, not a folder; give the folder that holds the photos")
    if not photos_dir.is_dir():
        raise UsageError(f"PHOTOS_DIR {photos_dir}: no such folder; give the folder that holds the photos")
    photos_dir, out_dir = photos_dir.resolve(), out_dir.resolve()
    if out_dir == photos_dir or photos_dir in out_dir.parents:
        raise UsageError(f"OUT_DIR {out_dir} must be outside PHOTOS_DIR {photos_dir} (prep never writes to the photos)")
    if out_dir in photos_dir.parents:
        raise UsageError(
            f"OUT_DIR {out_dir} holds PHOTOS_DIR {photos_dir}: prep would replace the photos' own folder; "
            "choose an OUT_DIR beside the photos, not above them"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {out_dir} is a file; give a folder")
    if fsutil.contents(out_dir):
        made_by = fsutil.owner(out_dir)
        if made_by != "prep":
            raise UsageError(
                f"OUT_DIR {out_dir} is not empty: it holds {fsutil.describe(out_dir)}; choose an empty or new folder "
                "(--overwrite replaces only a dataset made by `sdlora prep`)"
            )
        if not overwrite:
            raise UsageError(
                f"OUT_DIR {out_dir} is not empty; choose an empty folder or pass --overwrite to replace it"
            )
    fsutil.claim(out_dir, "prep", lock_now=out_dir.is_dir())
    if out_dir.is_dir():
        fsutil.remove_stale_temporaries(out_dir)
    return photos_dir, out_dir


def _workers(setting: int, files: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(setting or cores, files))


def _examine_all(files: list[Path], settings: Settings, workers: int, progress: bool) -> list[Photo]:
    """examine() every file, in parallel when workers > 1; results come back in the order of `files`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("prep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=Console(stderr=True), disable=not progress)
    if workers == 1:
        with bar:
            task = bar.add_task("prep", total=len(files))
            return [_advanced(bar, task, examine(path, settings)) for path in files]
    with workers_pool(workers) as pool:
        futures = [pool.submit(examine, path, settings) for path in files]
        with bar:
            task = bar.add_task("prep", total=len(files))
            return [_advanced(bar, task, future.result()) for future in futures]


def _advanced(bar, task, photo: Photo) -> Photo:
    bar.advance(task)
    return photo


def _decide(photos: list[Photo], cfg: PrepConfig) -> list[Photo]:
    """The checks that compare photos with each other: someone else, blur relative to the set, duplicates."""
    photos = _other_people(photos, cfg.other_person_distance)
    photos = _blurry(photos, cfg.blur_ratio)
    return _duplicates(photos, cfg.duplicate_distance)


def _candidates(photos: list[Photo]) -> list[int]:
    return [i for i, photo in enumerate(photos) if photo.reason is None]


def _other_people(photos: list[Photo], limit: float) -> list[Photo]:
    """Skip faces far from the set's majority identity: the largest group of faces close to one face."""
    faces = [i for i in _candidates(photos) if photos[i].embedding is not None]
    if len(faces) < 2:
        return photos
    vectors = numpy.stack([photos[i].embedding for i in faces])  # (N, 128)
    distances = numpy.linalg.norm(vectors[:, None] - vectors[None], axis=-1)  # (N, N)
    close = distances <= limit
    # Most neighbours wins; ties go to the tighter group, then to the earlier file (deterministic).
    best = min(range(len(faces)), key=lambda i: (-close[i].sum(), distances[i][close[i]].sum(), i))
    if close[best].sum() < 2:
        return photos  # nobody resembles anybody: no majority to judge by
    majority = vectors[close[best]]
    out = list(photos)
    for i in faces:
        # Median distance to the majority's faces: as strict as the pairwise threshold, robust to one odd photo.
        distance = float(numpy.median([face_distance(photos[i].embedding, member) for member in majority]))
        if distance > limit:
            message = (
                f"The face is {distance:.2f} from the person in most photos (limit {limit:g}): "
                "it looks like someone else."
            )
            out[i] = replace(photos[i], reason="other_person", message=message)
    return out


def _blurry(photos: list[Photo], ratio: float) -> list[Photo]:
    """Skip photos much less sharp than the set's median: phones differ too much for one absolute threshold."""
    indices = _candidates(photos)
    if ratio <= 0 or not indices:
        return photos
    median = float(numpy.median([photos[i].sharpness for i in indices]))
    out = list(photos)
    for i in indices:
        if photos[i].sharpness < ratio * median:
            message = (
                f"Sharpness {photos[i].sharpness:.1f} is under {ratio:.0%} of the set's median ({median:.1f}): "
                "blurry or out of focus."
            )
            out[i] = replace(photos[i], reason="blurry", message=message)
    return out


def _duplicates(photos: list[Photo], limit: int) -> list[Photo]:
    """Group photos whose perceptual hashes are within `limit` bits (transitively); keep the sharpest of each."""
    indices = _candidates(photos)
    group = {i: i for i in indices}

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for a_pos, a in enumerate(indices):
        for b in indices[a_pos + 1 :]:
            if images.hash_distance(photos[a].phash, photos[b].phash) <= limit:
                group[root(b)] = root(a)
    members: dict[int, list[int]] = {}
    for i in indices:
        members.setdefault(root(i), []).append(i)
    out = list(photos)
    for same in members.values():
        keeper = original_of([photos[i] for i in same])
        for i in same:
            if i != same[keeper]:
                kept = photos[same[keeper]]
                distance = images.hash_distance(photos[i].phash, kept.phash)
                message = (
                    f"A near-duplicate of {kept.name} (hash distance {distance}), which looks like the original "
                    f"({_why_original(kept, photos[i])}) and was kept."
                )
                out[i] = replace(photos[i], reason="duplicate", message=message)
    return out


# Duplicates within this share of the largest one's pixel count count as the same size (a crop of a few pixels).
SAME_SIZE = 0.9
# A copy noisier than the quietest one by more than this factor plus this many grey levels is an edited copy.
NOISE_FACTOR, NOISE_SLACK = 1.5, 1.0


def original_of(group: list[Photo]) -> int:
    """Index in `group` (near-duplicates) of the one most likely the real original: of the largest (a resized
    copy is smaller), those not clearly noisier than the quietest (grain and speckle are added, not removed),
    the least compressed (re-encodes have coarser JPEG quantization), then the most bytes per pixel, then
    the sharpest, then the first. Sharpness alone rewards noise and JPEG artefacts."""
    areas = [photo.size[0] * photo.size[1] if photo.size else 0 for photo in group]
    largest = [i for i in range(len(group)) if areas[i] >= SAME_SIZE * max(areas)]
    quietest = min(group[i].noise for i in largest)
    clean = [i for i in largest if group[i].noise <= NOISE_FACTOR * quietest + NOISE_SLACK]
    return min(
        clean,
        key=lambda i: (
            group[i].quantization,
            -group[i].file_bytes / max(1, areas[i]),
            -group[i].sharpness,
            i,
        ),
    )


def _why_original(kept: Photo, other: Photo) -> str:
    kept_area = kept.size[0] * kept.size[1] if kept.size else 0
    other_area = other.size[0] * other.size[1] if other.size else 0
    if other_area < SAME_SIZE * kept_area:
        return "larger"
    if other.noise > NOISE_FACTOR * kept.noise + NOISE_SLACK:
        return "less noisy"
    if other.quantization > kept.quantization:
        return "less compressed"
    return "as large, as clean and at least as sharp"


def _write(out_dir: Path, report: Report, photos: list[Photo], config: Config) -> None:
    """All outputs into a temporary folder that replaces OUT_DIR whole: a crash leaves no half-written set."""
    from sdlora.config import save

    kept_photos = [photo for photo in photos if photo.reason is None]
    with atomic_dir(out_dir) as tmp:
        (tmp / layout.DATASET_IMAGES).mkdir()
        for entry, photo in zip(report.kept, kept_photos, strict=True):
            (tmp / entry.image).write_bytes(photo.png)
            (tmp / entry.image).with_suffix(".txt").write_text(entry.caption + "\n", encoding="utf-8")
            if entry.mask:
                (tmp / layout.DATASET_MASKS).mkdir(exist_ok=True)
                (tmp / entry.mask).write_bytes(photo.mask)
        write_manifest(tmp / MANIFEST, report.kept)
        (tmp / layout.REPORT).write_text(report.to_json(), encoding="utf-8")
        skipped = [(f"{p.reason}: {p.name}", p.thumb) for p in photos if p.reason is not None]
        labels = [e.caption for e in report.kept] if report.captions else [p.name for p in kept_photos]
        lines = contact.CAPTION_LINES if report.captions else 1
        kept_tiles = [(label, p.thumb) for label, p in zip(labels, kept_photos, strict=True)]
        sheet = contact.contact_sheet(kept_tiles, skipped, lines=lines)
        (tmp / layout.CONTACT_SHEET).write_bytes(sheet)
        save(config, tmp / layout.CONFIG_JSON)
