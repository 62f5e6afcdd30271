"""Property-based fuzzing (hypothesis) of the image loader, the manifest reader and file names, for
bench.robust.inputs. Each property runs in this process and records every input that raised something other
than the one expected error type: that would be a traceback for the user."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Magic numbers of the formats Pillow (and pillow-heif) identify: a valid start with a random body reaches the
# decoders' inner code, where damaged files break them.
MAGIC = (
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",  # JPEG
    b"\xff\xd8\xff\xe1",  # JPEG with EXIF
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",  # PNG
    b"GIF89a",
    b"GIF87a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",  # WebP
    b"\x00\x00\x00\x18ftypheic",  # HEIC
    b"\x00\x00\x00\x1cftypavif",  # AVIF
    b"P6\n",  # PPM
    b"\x00\x00\x01\x00",  # ICO
    b"8BPS",  # PSD
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
    b"qoif",  # QOI
    b"\xff\x4f\xff\x51",  # J2K codestream
    b"DDS ",
)
MAX_PIXELS = 4_000_000  # small, so a random header claiming a big image is refused, not decoded for seconds
EXAMPLES = {"quick": 40, "full": 300}


def _run(prop: Callable, strategy, examples: int) -> dict:
    """Run `prop(value)` over `examples` generated values; {'examples', 'failures': [repr of bad inputs]}."""
    failures: list[str] = []
    count = [0]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def check(value):
        count[0] += 1
        try:
            prop(value)
        except Exception as exc:  # noqa: BLE001 - what we count
            failures.append(f"{type(exc).__name__}: {exc} <- {value!r}"[:300])

    check()
    return {"examples": count[0], "failures": failures}


def image_bodies() -> st.SearchStrategy[bytes]:
    return st.tuples(st.sampled_from(MAGIC), st.binary(max_size=3000)).map(lambda pair: pair[0] + pair[1])


def fuzz_image_loader(work: Path, quick: bool, random_bytes: bool = False) -> dict:
    """read_image (datasets, eval, keep-face) on magic + random body, or on random bytes: only UsageError."""
    from sdlora.errors import UsageError
    from sdlora.prep.images import read_image

    path = work / "fuzz.img"

    def prop(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(UsageError):
            read_image(path, "--fuzz", max_pixels=MAX_PIXELS)

    strategy = st.binary(max_size=4000) if random_bytes else image_bodies()
    return _run(prop, strategy, EXAMPLES["quick" if quick else "full"])


def _json_values():
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )


VALID_ENTRY = {
    "image": "images/0000.png",
    "caption": "a photo of sks person",
    "source": "/photos/a.jpg",
    "source_sha256": "0" * 64,
    "source_size": [640, 480],
    "crop_box": [0, 0, 480, 480],
    "face_box": None,
    "sharpness": 1.0,
    "width": 512,
    "height": 512,
}


def manifest_texts() -> st.SearchStrategy[bytes]:
    """Random bytes, lines of random JSON, and valid entries with one field replaced by a random value."""
    mutated = st.tuples(st.sampled_from(sorted(VALID_ENTRY)), _json_values()).map(
        lambda kv: json.dumps(VALID_ENTRY | {kv[0]: kv[1]}).encode()
    )
    lines = st.lists(_json_values().map(lambda v: json.dumps(v).encode()) | mutated, min_size=1, max_size=4)
    return st.binary(max_size=2000) | lines.map(lambda ls: b"\n".join(ls))


def fuzz_manifest_reader(work: Path, quick: bool) -> dict:
    from sdlora.errors import UsageError
    from sdlora.prep.manifest import read_manifest

    path = work / "manifest.jsonl"

    def prop(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(UsageError):
            read_manifest(path)

    return _run(prop, manifest_texts(), EXAMPLES["quick" if quick else "full"])


def file_names() -> st.SearchStrategy[bytes]:
    """Any byte string a Linux file name can be (no '/', no NUL), valid UTF-8 or not."""
    return (
        st.binary(min_size=1, max_size=60)
        .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
        .filter(lambda b: b not in (b".", b".."))
    )


def fuzz_names(work: Path, quick: bool) -> dict:
    """Random names through list_inputs, examine, report.json, the summary and the contact sheet."""
    from bench.robust._makers import png_bytes
    from sdlora.prep import contact
    from sdlora.prep.examine import Settings, examine
    from sdlora.prep.run import Report, list_inputs

    settings_ = Settings("center", 64, 0.45, 2.0, MAX_PIXELS)
    body = png_bytes(1)

    def prop(name: bytes) -> None:
        with tempfile.TemporaryDirectory(dir=work) as folder:
            with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
                handle.write(body)
            photos = [examine(path, settings_) for path in list_inputs(Path(folder))]
            report = Report(files=[{"file": p.name, "status": "skipped", "reason": "x", "message": ""} for p in photos])
            report.to_json().encode("utf-8")
            report.summary().encode("utf-8")
            contact.contact_sheet([(p.name, p.thumb) for p in photos], [(f"x: {p.name}", None) for p in photos])

    return _run(prop, file_names(), EXAMPLES["quick" if quick else "full"] // 2)


def fuzzed_folder(folder: Path, count: int, seed: int) -> Path:
    """A photo folder of `count` files with random names and magic + random bodies, plus 3 real photos: what a
    real `sdlora prep` run over damaged files meets (seeded, so the same folder every time)."""
    from bench.robust._makers import photos

    rng = random.Random(seed)
    photos(folder)
    for i in range(count):
        name = bytes(rng.choice([*range(1, 47), *range(48, 256)]) for _ in range(rng.randint(1, 24)))
        if name.startswith(b"."):
            name = b"_" + name
        data = rng.choice(MAGIC) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
        with open(os.path.join(os.fsencode(folder), name + b"-%d" % i), "wb") as handle:
            handle.write(data)
    return folder


def timed(function: Callable[[], dict]) -> tuple[dict, float]:
    start = time.perf_counter()
    return function(), time.perf_counter() - start
