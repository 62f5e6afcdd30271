"""Photos -> dataset for the page: uploads into photos/, `sdlora prep` into datasets/, what it kept and dropped,
and edits (exclude a crop, change a caption) written as a new dataset folder; photos are never touched."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora import layout
from sdlora.errors import UsageError
from sdlora.fsutil import atomic_dir
from sdlora.serve.commands import CommandFailed, Progress, run_sdlora
from sdlora.serve.runs import log_tail
from sdlora.serve.workspace import CAPTION_SUFFIXES, MAX_UPLOAD_FILES, PHOTO_SUFFIXES, Workspace, sanitise_name

# prep's reasons (report.json), in words for the page.
REASONS = {
    "unreadable": "could not be read",
    "not_an_image": "not an image",
    "too_small": "too small",
    "too_large": "too large",
    "no_face": "no face found",
    "multiple_faces": "more than one person",
    "face_too_small": "face too small",
    "blurry": "blurry",
    "duplicate": "near-duplicate",
    "other_person": "someone else",
}


@dataclass
class DatasetView:
    name: str
    kept: list[tuple[Path, str, str]] = field(default_factory=list)  # (image, caption, manifest image name)
    dropped: list[tuple[Path | None, str, str, str]] = field(default_factory=list)  # (photo, file, reason, message)
    contact_sheet: Path | None = None

    resolution: int = 0  # of the crops (prep's config.json)

    def summary(self) -> str:
        hint = resolution_hint([message for *_, message in self.dropped], self.resolution) if self.resolution else ""
        return f"{self.name}: kept {len(self.kept)}, dropped {len(self.dropped)}" + (f"; {hint}" if hint else "")


def save_uploads(workspace: Workspace, files: list[Path], set_name: str) -> Path:
    """Copy uploaded photos (and .txt captions) into a new photos/SET_NAME; type, size and count are checked
    first, so a refused upload leaves nothing behind."""
    if not files:
        raise UsageError("no photos uploaded")
    if len(files) > MAX_UPLOAD_FILES:
        raise UsageError(f"{len(files)} files: at most {MAX_UPLOAD_FILES} per upload")
    allowed = PHOTO_SUFFIXES | CAPTION_SUFFIXES
    existing = workspace.path(sanitise_name(set_name), "photos")
    if existing.is_dir() and _digests(sorted(existing.iterdir())) == _digests([Path(f) for f in files]):
        return existing  # the same photos again (a second Prepare, e.g. at another resolution): no copy
    folder = workspace.new_folder("photos", set_name)
    staging = workspace.state / "uploads" / f"{folder.name}-{time.time_ns()}"
    try:
        for path in files:
            workspace.take_upload(Path(path), staging, allowed, original_name=Path(path).name)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# prep's caption policies (`sdlora prep --captions`): template (the trigger sentence), vlm (a captioning model,
# `--captioner MODEL`), keep (the .txt files beside the photos). Empty: prep's own default.
CAPTION_POLICIES = ("", "template", "vlm", "keep")


def caption_options(workspace: Workspace, policy: str | None, captioner: str | None) -> list[str]:
    """prep's --captions / --captioner options for the page's choices; nothing for empty ones (prep decides). The
    captioner is a hub id or a model in the workspace (or the --models folder), checked like a base model."""
    if policy and policy not in CAPTION_POLICIES:
        raise UsageError(f"captions {policy!r}: choose one of {', '.join(p for p in CAPTION_POLICIES if p)}")
    try:
        model = workspace.model_ref(captioner) if (captioner or "").strip() else ""
    except UsageError as exc:
        raise UsageError(f"captioner: {exc}") from None
    return [*(["--captions", policy] if policy else []), *(["--captioner", model] if model else [])]


def _digests(paths: list[Path]) -> list[str]:
    """The sorted SHA-256 of the files' bytes: two uploads of the same photos match whatever their names."""
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file())


def prepare(
    workspace: Workspace,
    photos: str,
    dataset: str,
    *,
    token: str = "sks",
    class_word: str = "person",
    resolution: int = 512,
    extra: list[str] | None = None,
    progress: Progress | None = None,
) -> DatasetView:
    """`sdlora prep photos/PHOTOS datasets/DATASET` as a child process; returns what it kept and dropped."""
    source = workspace.path(photos, "photos")
    if not source.is_dir():
        raise UsageError(f"photos/{photos}: no such folder")
    for entry in sorted(source.iterdir()):  # prep reads what the links point at: none may lead out
        try:
            workspace.inside(entry, "photos")
        except UsageError:
            raise UsageError(
                f"photos/{source.name}/{entry.name}: a link to outside photos/ in the workspace; copy the photo in "
                "instead of linking it"
            ) from None
    target = workspace.new_folder("datasets", dataset)
    args = ["prep", str(source), str(target), "--token", sanitise_name(token, "sks"), "--class-word", class_word]
    args += ["--resolution", str(int(resolution)), *(extra or [])]
    try:
        run_sdlora(workspace, args, "prep", progress)
    except CommandFailed as exc:
        hint = resolution_hint(log_tail(exc.log, 1000), int(resolution))
        raise UsageError(f"{exc}" + (f" {hint}" if hint else "")) from None
    return view(workspace, target.name)


_ENLARGING = re.compile(r"face is only \d+ px wide: .*enlarging ([0-9.]+)x \(limit ([0-9.]+)x\)")


def resolution_hint(lines: list[str], resolution: int) -> str:
    """'7 faces are too small for 512 px crops: Prepare at resolution 384 keeps them.' from prep's face_too_small
    lines (or report messages), else ''. A crop's enlargement scales with the resolution; the printed factor is
    rounded to 0.1, so 0.05 is added before rounding the resolution down to a multiple of 64."""
    needed = []
    for line in lines:
        found = _ENLARGING.search(line)
        if found:
            needed.append((float(found.group(1)) + 0.05, float(found.group(2))))
    if not needed:
        return ""
    keeps = min(math.floor(resolution * limit / factor / 64) * 64 for factor, limit in needed)
    what = f"{len(needed)} face{'s are' if len(needed) > 1 else ' is'} too small for {resolution} px crops"
    if keeps < 256:
        return f"{what}: use photos where the face fills more of the frame (closer, or cropped)."
    return f"{what}: Prepare at resolution {keeps} keeps {'them' if len(needed) > 1 else 'it'}."


def view(workspace: Workspace, name: str) -> DatasetView:
    """A dataset's kept crops with captions and its dropped photos with their reasons (manifest + report)."""
    folder = workspace.path(name, "datasets")
    entries = read_manifest(folder)
    settings = _read_json(workspace, folder / layout.CONFIG_JSON)
    resolution = settings.get("resolution") or (settings.get("prep") or {}).get("resolution") or 0
    result = DatasetView(folder.name, resolution=int(resolution) if isinstance(resolution, int | float) else 0)
    for entry in entries:
        result.kept.append((workspace.inside(folder / entry["image"], "datasets"), entry["caption"], entry["image"]))
    photos = _photo_folder(workspace, entries)
    report = _read_json(workspace, folder / layout.REPORT).get("files", [])
    for item in report:
        if item.get("status") != "skipped":
            continue
        photo = None
        if photos is not None and (photos / item["file"]).is_file():
            photo = next(iter(workspace.within([photos / item["file"]], "photos")), None)
        reason = REASONS.get(item.get("reason", ""), item.get("reason", ""))
        result.dropped.append((photo, item["file"], reason, item.get("message", "")))
    if (folder / layout.CONTACT_SHEET).is_file():
        result.contact_sheet = workspace.inside(folder / layout.CONTACT_SHEET, "datasets")
    return result


def save_edits(
    workspace: Workspace, name: str, new_name: str, exclude: list[str], captions: dict[str, str]
) -> DatasetView:
    """A new dataset folder from `name` without the `exclude`d crops (manifest image names) and with `captions`
    ({image name: caption}) changed. The source dataset and the photos stay as they are."""
    source = workspace.path(name, "datasets")
    target = workspace.new_folder("datasets", new_name)
    entries = read_manifest(source)
    known = {entry["image"] for entry in entries}
    unknown = sorted((set(exclude) | set(captions)) - known)
    if unknown:
        raise UsageError(f"{unknown[0]}: not an image of dataset {source.name}")
    kept = [dict(entry) for entry in entries if entry["image"] not in set(exclude)]
    if not kept:
        raise UsageError("every crop is excluded; keep at least one")
    with atomic_dir(target) as tmp:
        for entry in kept:
            text = " ".join(captions.get(entry["image"], entry["caption"]).split())
            if not text:
                raise UsageError(f"{entry['image']}: the caption is empty")
            entry["caption"] = text
            image = workspace.inside(source / entry["image"], "datasets")
            (tmp / entry["image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, tmp / entry["image"])
            (tmp / entry["image"]).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        lines = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in kept)
        (tmp / layout.MANIFEST).write_text(lines, encoding="utf-8")
        for extra in (layout.CONFIG_JSON, layout.REPORT):
            found = workspace.within([source / extra], "datasets")
            if found and found[0].is_file():
                shutil.copyfile(found[0], tmp / extra)
        note = {"edited_from": f"datasets/{source.name}", "excluded": sorted(exclude), "captions_changed": captions}
        (tmp / "edits.json").write_text(json.dumps(note, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return view(workspace, target.name)


def read_manifest(folder: Path) -> list[dict]:
    path = folder / layout.MANIFEST
    if not path.is_file():
        raise UsageError(f"datasets/{folder.name}: no manifest.jsonl (not made by prep)")
    if path.resolve().parent != folder.resolve():
        raise UsageError(f"datasets/{folder.name}/{layout.MANIFEST}: a link to elsewhere; refused")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise UsageError(f"datasets/{folder.name}/{layout.MANIFEST}: damaged ({exc}); prepare it again") from None


def _photo_folder(workspace: Workspace, entries: list[dict]) -> Path | None:
    """The photo folder prep read (from the manifest's sources), when it is inside the workspace."""
    for entry in entries:
        try:
            return workspace.inside(Path(entry["source"]).parent, "photos")
        except (UsageError, KeyError, OSError):
            continue
    return None


def _read_json(workspace: Workspace, path: Path) -> dict:
    """A JSON table of a dataset, or {} (missing, damaged, or a link out of datasets/)."""
    try:
        found = json.loads(workspace.inside(path, "datasets").read_text(encoding="utf-8"))
    except (OSError, ValueError, UsageError):
        return {}
    return found if isinstance(found, dict) else {}
