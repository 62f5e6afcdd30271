"""manifest.jsonl: one JSON object per kept image, the contract between `prep` and `train`; and the rule that a
dataset's paths (the manifest's entries, a plain folder's images and captions) stay inside its folder."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdlora.errors import UsageError, printable
from sdlora.fsutil import atomic_write_text
from sdlora.layout import MANIFEST

Box = tuple[int, int, int, int]
MAX_SIDE = 65536  # px: no output image is larger  # (left, top, right, bottom) in source pixels, after EXIF rotation


class ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    image: str = Field(description="Output image, relative to the dataset folder.")
    caption: str
    source: str = Field(description="Path of the original photo.")
    source_sha256: str
    source_size: tuple[int, int] = Field(description="[width, height] of the original after EXIF rotation.")
    crop_box: Box = Field(description="Region of the original that became the output image.")
    face_box: Box | None = Field(None, description="Detected face in the original (None with --crop center).")
    sharpness: float
    width: int = Field(gt=0, le=MAX_SIDE)
    height: int = Field(gt=0, le=MAX_SIDE)
    mask: str | None = Field(
        None, description="Soft face-and-hair mask of the image (masks/NNNN.png, same size); None without a face."
    )
    control: str | None = Field(None, description="Edit training: the control image the image is made from.")

    @field_validator("image", "mask", "control")
    @classmethod
    def _inside_dataset(cls, value: str | None) -> str | None:
        """A relative path inside the dataset folder (a damaged or hand-edited manifest can say anything)."""
        if value is None:
            return value
        parts = PurePosixPath(value.replace("\\", "/")).parts
        if not value or "\x00" in value or value.startswith(("/", "\\")) or ".." in parts or ":" in value:
            raise ValueError(f"{value!r} must be a relative path inside the dataset folder")
        return value

    @field_validator("source_size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) <= 0:
            raise ValueError(f"source_size {list(value)} must be positive")
        return value

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL micro-conditioning: (top, left) of the crop, in output-image pixels."""
        scale = self.width / max(1, self.crop_box[2] - self.crop_box[0])
        return round(self.crop_box[1] * scale), round(self.crop_box[0] * scale)

    @property
    def original_size(self) -> tuple[int, int]:
        """SDXL micro-conditioning: (height, width) of the source as if scaled like the crop."""
        scale = self.width / max(1, self.crop_box[2] - self.crop_box[0])
        return round(self.source_size[1] * scale), round(self.source_size[0] * scale)


def write_manifest(path: Path, entries: Iterable[ManifestEntry]) -> None:
    lines = [entry.model_dump_json() for entry in entries]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# A manifest line is a few hundred bytes; this bounds what a damaged or wrong file makes us read.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Entries of `path` (a manifest.jsonl or the dataset folder holding it); errors name file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    where = printable(path)
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise UsageError(f"{where}: too large for a manifest; re-run `sdlora prep`")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text (byte {exc.start}); re-run `sdlora prep`") from None
    except OSError as exc:
        raise UsageError(f"{where}: could not be read ({exc.strerror or exc}); re-run `sdlora prep`") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(ManifestEntry.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError, RecursionError) as exc:
            if isinstance(exc, ValidationError):  # the field and why, not pydantic's "1 validation error" header
                error = exc.errors()[0]
                field = ".".join(str(part) for part in error["loc"]) or "entry"
                reason = printable(f"{field}: {error['msg'].removeprefix('Value error, ')}")[:200]
            else:
                reason = printable((str(exc).splitlines() or [type(exc).__name__])[0])[:200]
            raise UsageError(f"{where}:{number}: not a valid manifest entry ({reason}); re-run `sdlora prep`") from None
    return entries


def confined(dataset_dir: Path, entry: str) -> Path:
    """`dataset_dir / entry`, refused unless it stays inside the dataset folder: no absolute path, no '..', no
    symlink that leads out (symlinks within the folder are fine). A dataset is data and must not read the rest of
    the machine."""
    dataset_dir = Path(dataset_dir)
    relative = Path(entry)
    where = f"{dataset_dir / MANIFEST}: entry {entry!r}" if (dataset_dir / MANIFEST).is_file() else None
    where = where or f"{dataset_dir / entry}"
    if relative.is_absolute() or ".." in relative.parts:
        raise UsageError(f"{where}: must be a path inside the dataset folder (no absolute path or '..'); re-run prep")
    path = dataset_dir / relative
    root = dataset_dir.resolve()
    if root not in path.resolve().parents:
        raise UsageError(
            f"{where}: leads outside the dataset folder (to {path.resolve()}); copy the image into {dataset_dir}"
        )
    return path
