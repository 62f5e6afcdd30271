"""manifest.jsonl round trip, errors, and the SDXL micro-conditioning derived from it."""

from __future__ import annotations

import pytest

from sdlora.errors import UsageError
from sdlora.prep.manifest import ManifestEntry, read_manifest, write_manifest


def _entry(**overrides) -> ManifestEntry:
    data = dict(
        image="images/0000.png",
        caption="a photo of sks person",
        source="/photos/IMG_1.jpg",
        source_sha256="ab" * 32,
        source_size=(3000, 4000),
        crop_box=(500, 1000, 2500, 3000),
        face_box=(1200, 1600, 1800, 2300),
        sharpness=120.5,
        width=1024,
        height=1024,
    )
    data.update(overrides)
    return ManifestEntry(**data)


def test_roundtrip(tmp_path):
    entries = [_entry(), _entry(image="images/0001.png", face_box=None)]
    write_manifest(tmp_path / "manifest.jsonl", entries)
    assert read_manifest(tmp_path) == entries


def test_micro_conditioning_in_output_pixels():
    entry = _entry()  # a 2000-px crop scaled to 1024: factor 0.512
    assert entry.crop_top_left == (512, 256)
    assert entry.original_size == (2048, 1536)


def test_bad_line_names_file_and_line(tmp_path):
    write_manifest(tmp_path / "manifest.jsonl", [_entry()])
    with (tmp_path / "manifest.jsonl").open("a") as handle:
        handle.write('{"image": "x.png"}\n')
    with pytest.raises(UsageError, match=r"manifest.jsonl:2: not a valid manifest entry"):
        read_manifest(tmp_path)
