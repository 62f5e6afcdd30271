"""manifest.jsonl: one JSON object per kept image, the contract between `prep` and `train`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdlora.errors import UsageError
from sdlora.fsutil import atomic_write_text
from sdlora.layout import MANIFEST

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in source pixels, after EXIF rotation


class ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(description="Output image, relative to the dataset folder.")
    caption: str
    source: str = Field(description="Path of the original photo.")
    source_sha256: str
    source_size: tuple[int, int] = Field(description="[width, height] of the original after EXIF rotation.")
    crop_box: Box = Field(description="Region of the original that became the output image.")
    face_box: Box | None = Field(None, description="Detected face in the original (None with --crop center).")
    sharpness: float
    width: int
    height: int

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


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Entries of `path` (a manifest.jsonl or the dataset folder holding it); errors name file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(ManifestEntry.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            reason = str(exc).splitlines()[0]
            raise UsageError(f"{path}:{number}: not a valid manifest entry ({reason}); re-run `sdlora prep`") from None
    return entries
