"""Benchmark `sdlora prep` on 100 synthetic 12-MP phone photos; prints photos/s and writes JSON.

Each photo is a 4000x3000 JPEG: a random smooth background with sensor-like noise and the astronaut of
scikit-image (a real face) pasted at a random size, place, mirroring and tint. The photos are generated once into
--photos and reused. `--compare` also runs the unhurried path (every JPEG decoded at full size) and checks that it
decides the same for every photo.

    PYTHONPATH=. python bench/prep.py --photos /tmp/prep-bench/photos --json bench/prep.json --compare
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy
from PIL import Image, ImageOps

SIZE = (4000, 3000)


def make_photo(index: int, folder: Path) -> Path:
    """One 12-MP JPEG, fully determined by `index`."""
    from skimage import data

    path = folder / f"IMG_{index:04d}.jpg"
    if path.exists():
        return path
    rng = numpy.random.default_rng(index)
    small = rng.uniform(40, 220, size=(3, 4, 3))  # a 4x3 colour field, enlarged into a smooth background
    background = Image.fromarray(small.astype(numpy.uint8)).resize(SIZE, Image.Resampling.BICUBIC)
    person = Image.fromarray(data.astronaut())
    if index % 2:
        person = ImageOps.mirror(person)
    side = int(rng.integers(1600, 2900))  # face ~300-520 px wide: a phone portrait at arm's length
    person = person.resize((side, side), Image.Resampling.BICUBIC)
    tint = rng.uniform(0.85, 1.15, size=3)
    person = Image.fromarray(numpy.clip(numpy.asarray(person) * tint, 0, 255).astype(numpy.uint8))
    background.paste(person, (int(rng.integers(0, SIZE[0] - side)), int(rng.integers(0, SIZE[1] - side))))
    noisy = numpy.asarray(background, dtype=numpy.int16) + rng.normal(0, 4, size=(SIZE[1], SIZE[0], 1)).astype(
        numpy.int16
    )
    Image.fromarray(numpy.clip(noisy, 0, 255).astype(numpy.uint8)).save(path, quality=90)
    return path


def run(photos: Path, fast: bool, workers: int) -> tuple[float, dict]:
    from sdlora import config
    from sdlora.prep.run import prep

    out = Path(tempfile.mkdtemp(prefix="prep-bench-")) / "dataset"
    cfg = config.load(None, {"prep.workers": workers})
    start = time.perf_counter()
    report = prep(photos, out, cfg, fast=fast, progress=False)
    seconds = time.perf_counter() - start
    manifest = {Path(entry.source).name: entry for entry in report.kept}
    shutil.rmtree(out.parent)
    return seconds, {"report": report, "manifest": manifest}


def cpu_per_photo(photos: Path, count: int) -> float:
    """CPU seconds per photo of examine() run in this process: a figure that other programs' load on the
    machine barely changes, unlike wall time."""
    from sdlora.prep.examine import Settings, detector, examine

    detector()  # model loading is a once-per-worker cost, not per photo
    settings = Settings("face", 512, 0.45, 2.0, 120_000_000)
    paths = sorted(photos.glob("*.jpg"))[:count]
    start = time.process_time()
    for path in paths:
        examine(path, settings)
    return (time.process_time() - start) / len(paths)


def compare(fast: dict, slow: dict) -> list[str]:
    """Differences in decisions, or in face/crop boxes beyond a few pixels of a 4000-px photo."""
    problems = []
    fates = {f["file"]: f.get("reason", "kept") for f in fast["report"].files}
    slow_fates = {f["file"]: f.get("reason", "kept") for f in slow["report"].files}
    problems += [
        f"{name}: fast {fates[name]} vs full {slow_fates[name]}" for name in fates if fates[name] != slow_fates[name]
    ]
    for name, entry in fast["manifest"].items():
        other = slow["manifest"].get(name)
        if other is None:
            continue
        face = numpy.abs(numpy.subtract(entry.face_box, other.face_box)).max()
        crop = numpy.abs(numpy.subtract(entry.crop_box, other.crop_box)).max()
        if face > 16 or crop > 32:
            problems.append(f"{name}: boxes differ by {face} px (face), {crop} px (crop)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path(tempfile.gettempdir()) / "sdlora-prep-bench")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--json", type=Path, default=Path("bench/prep.json"))
    parser.add_argument("--compare", action="store_true", help="also run the full-decode path and compare")
    parser.add_argument("--cpu-sample", type=int, default=10, help="photos timed in CPU seconds (0: skip)")
    args = parser.parse_args()

    args.photos.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor() as pool:
        list(pool.map(make_photo, range(args.count), [args.photos] * args.count))
    print(
        f"photos ready in {time.perf_counter() - start:.1f} s: {args.count} x {SIZE[0]}x{SIZE[1]} JPEG in {args.photos}"
    )

    load = os.getloadavg()[0]
    seconds, fast = run(args.photos, fast=True, workers=args.workers)
    report = fast["report"]
    result = {
        "photos": args.count,
        "megapixels": SIZE[0] * SIZE[1] / 1e6,
        "seconds": round(seconds, 2),
        "photos_per_s": round(args.count / seconds, 3),
        "cores": os.cpu_count(),
        "load_average_before": round(load, 2),
        "kept": len(report.kept),
        "skipped": dict(report.skipped),
    }
    print(
        f"prep: {args.count} photos in {seconds:.1f} s = {args.count / seconds:.2f} photos/s "
        f"(kept {len(report.kept)}, load average before {load:.2f} on {os.cpu_count()} cores)"
    )
    if args.cpu_sample:
        per_photo = cpu_per_photo(args.photos, args.cpu_sample)
        cores = len(os.sched_getaffinity(0))
        result.update(cpu_s_per_photo=round(per_photo, 3), cpu_bound_seconds=round(per_photo * args.count / cores, 1))
        print(
            f"CPU time: {per_photo:.2f} s per photo in one process -> {per_photo * args.count / cores:.1f} s "
            f"for {args.count} photos on {cores} idle cores"
        )
    if args.compare:
        slow_seconds, slow = run(args.photos, fast=False, workers=args.workers)
        problems = compare(fast, slow)
        result.update(full_decode_seconds=round(slow_seconds, 2), fast_matches_full=not problems, differences=problems)
        print(f"full decode: {slow_seconds:.1f} s; same decisions and boxes: {not problems}")
        for problem in problems:
            print("  " + problem)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
