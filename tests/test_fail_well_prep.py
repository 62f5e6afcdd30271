"""Issue 17 in prep: bounded reads, inputs that vanished (links, pipes, devices), file names that are not valid
UTF-8 or hold control characters, the near-duplicate rule on re-encodes and noise, float images, the output
folder checked before the slow part."""

from __future__ import annotations

import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora import config
from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.prep import images
from sdlora.prep.examine import Settings, examine
from sdlora.prep.run import list_inputs, prep

SETTINGS = Settings("center", 64, 0.45, 2.0, 10_000)  # max_pixels 10k: files over ~64 MB are never read


def _photo(seed: int, side: int = 96) -> Image.Image:
    """A textured picture (smooth blobs and edges, like a photo) that hashes unlike other seeds."""
    rng = numpy.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3)).astype(numpy.uint8)
    image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    return image


def _centre_cfg(**prep):
    values = {"prep.crop": "center", "prep.resolution": 64, "prep.workers": 1, "prep.min_images": 1}
    return config.load(None, values | {f"prep.{k}": v for k, v in prep.items()})


@pytest.mark.slow
def test_a_huge_non_image_is_refused_after_reading_its_header(tmp_path):
    video = tmp_path / "clip.mp4"
    with open(video, "wb") as handle:  # sparse: 200 MB on paper, nothing on disk
        handle.write(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom")
        handle.truncate(200 * 1024 * 1024)
    fake = tmp_path / "holiday.jpg"  # the same, named like a photo, with a JPEG's magic
    with open(fake, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
        handle.truncate(200 * 1024 * 1024)
    tracemalloc.start()
    photos = [examine(video, SETTINGS), examine(fake, Settings("center", 64, 0.45, 2.0, 100_000_000))]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak  # reading either whole costs 200 MB
    assert photos[0].reason == "too_large" and photos[1].reason in ("not_an_image", "unreadable")
    small = Settings("center", 64, 0.45, 2.0, 100_000_000)
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 5000)
    assert examine(video, small).reason == "not_an_image"


def test_links_pipes_and_devices_are_reported_not_lost(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        _photo(i).save(photos / f"good{i}.png")
    (photos / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    (photos / "zero.jpg").symlink_to("/dev/zero")  # reading it whole never ends
    os.mkfifo(photos / "pipe.jpg")  # opening it for reading blocks until a writer comes
    (photos / "sub").mkdir()
    names = [p.name for p in list_inputs(photos)]
    assert names == ["dangling.jpg", "good0.png", "good1.png", "loop.jpg", "pipe.jpg", "zero.jpg"]
    report = prep(photos, tmp_path / "out", _centre_cfg(), progress=False)
    fates = {e["file"]: (e.get("reason"), e.get("message", "")) for e in report.files}
    assert fates["dangling.jpg"][0] == "unreadable" and "dangling symbolic link" in fates["dangling.jpg"][1]
    assert "link loop" in fates["loop.jpg"][1]
    assert "named pipe" in fates["pipe.jpg"][1]
    assert "a device" in fates["zero.jpg"][1]
    written = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert len(written["files"]) == 6


def test_names_not_utf8_or_with_control_characters(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    raw = [b"caf\xe9.png", b"bell\x07.png", b"new\nline.png", "照片.png".encode(), b"bad\xff\xfe.txt"]
    for i, name in enumerate(raw):
        with open(os.path.join(os.fsencode(photos), name), "wb") as handle:
            if name.endswith(b".png"):
                _photo(10 + i).save(handle, format="PNG")
            else:
                handle.write(b"\xff\xfe not text")
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path / "out"), "--crop", "center",
                                      "--resolution", "64", "--workers", "1", "--min-images", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_bytes().decode("utf-8"))
    names = sorted(e["file"] for e in report["files"])
    assert names == ["bad\\xff\\xfe.txt", "bell\\x07.png", "caf\\xe9.png", "new\\x0aline.png", "照片.png"]
    Image.open(tmp_path / "out" / "contact_sheet.jpg").verify()
    manifest = (tmp_path / "out" / "manifest.jsonl").read_bytes().decode("utf-8")
    assert "caf\\\\xe9.png" in manifest  # the source path, escaped (JSON doubles the backslash)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_duplicates_keep_the_original_not_the_noisy_or_reencoded_copy(tmp_path):
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    original = Image.fromarray(data.astronaut()).resize((384, 384), Image.Resampling.LANCZOS)
    (photos / "b_original.jpg").write_bytes(_jpeg(original, 95))
    (photos / "a_quality70.jpg").write_bytes(_jpeg(original, 70))  # sharper by the Laplacian: blocking artefacts
    (photos / "c_quality50.jpg").write_bytes(_jpeg(original, 50))
    rng = numpy.random.default_rng(0)
    grey = numpy.asarray(original.convert("L"), dtype=numpy.float32) / 255.0
    speckled = numpy.clip(grey + rng.normal(0, 0.08, grey.shape), 0, 1).astype(numpy.float32)
    Image.fromarray(speckled, "F").save(photos / "d_noisy_float.tif")  # lossless, so least compressed too
    for i in range(4):  # clean copies, smaller
        original.resize((300 - 10 * i,) * 2, Image.Resampling.LANCZOS).save(photos / f"e_small{i}.png")
    report = prep(photos, tmp_path / "out", _centre_cfg(), progress=False)
    fates = {e["file"]: e.get("reason", "kept") for e in report.files}
    assert fates == {name: "duplicate" for name in fates} | {"b_original.jpg": "kept"}, fates
    messages = {e["file"]: e["message"] for e in report.files if e["status"] == "skipped"}
    assert "less noisy" in messages["d_noisy_float.tif"] and "less compressed" in messages["a_quality70.jpg"]
    assert "larger" in messages["e_small0.png"]


def test_noise_level_is_robust_to_edges_and_sees_speckle():
    clean = numpy.full((128, 128), 64, numpy.uint8)
    clean[:, 64:] = 192  # one hard edge
    assert images.noise_level(Image.fromarray(clean)) < 0.5
    noisy = numpy.clip(clean + numpy.random.default_rng(1).normal(0, 10, clean.shape), 0, 255).astype(numpy.uint8)
    assert 7 < images.noise_level(Image.fromarray(noisy)) < 13
    assert images.sharpness(Image.fromarray(noisy)) > images.sharpness(Image.fromarray(clean)) / 10


def test_float_images_in_0_to_1_are_not_black(tmp_path):
    ramp = numpy.tile(numpy.linspace(0, 1, 64, dtype=numpy.float32), (64, 1))
    Image.fromarray(ramp, "F").save(tmp_path / "float.tif")
    rgb = images.read_image(tmp_path / "float.tif")
    assert rgb.mode == "RGB" and abs(float(numpy.asarray(rgb).mean()) - 127.5) < 2
    big = numpy.tile(numpy.linspace(0, 255, 64, dtype=numpy.float32), (64, 1))  # 0..255 floats stay as they were
    assert abs(float(numpy.asarray(images.to_rgb(Image.fromarray(big, "F"))).mean()) - 127.5) < 2


def test_out_dir_checked_before_the_slow_part(tmp_path, monkeypatch):
    from sdlora.preflight import check_output_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="which is a file, not a folder"):
        check_output_dir(blocker / "out", "OUT_DIR")
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UsageError, match="only 0 MB free"):
        check_output_dir(tmp_path / "out", "OUT_DIR")
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(1).save(photos / "a.png")
    monkeypatch.setattr("sdlora.prep.run._examine_all", lambda *a: pytest.fail("photos processed before the check"))
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path / "out")])
    assert result.exit_code == 2 and "free" in result.stderr and "Traceback" not in result.output


def test_free_space_estimate_fits_the_set_not_a_fixed_64_mb(tmp_path, monkeypatch):
    """Issue 28: six photos at 64 px asked for ~67 MB and refused a 20 MB volume. The estimate follows the photos'
    count and the resolution, bounds what prep really writes (noise: PNG can't shrink it), and refuses below it."""
    import shutil

    from sdlora.prep.run import dataset_bytes

    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(6):
        noise = numpy.random.default_rng(seed).integers(0, 256, (96, 96, 3)).astype(numpy.uint8)
        Image.fromarray(noise).save(photos / f"{seed}.png")
    need = dataset_bytes(6, 64, buckets=False)
    assert need < 4e6 and dataset_bytes(12, 64, False) > need and dataset_bytes(6, 128, False) > need
    assert dataset_bytes(6, 64, buckets=True) >= need
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=20_000_000))
    report = prep(photos, tmp_path / "out", _centre_cfg(blur_ratio=0), progress=False)
    assert len(report.kept) == 6
    written = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written <= need
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path / "out2"), "--resolution", "64"])
    assert result.exit_code == 2 and "MB free" in result.stderr and "Traceback" not in result.output


def test_read_image_outside_prep_names_the_file(tmp_path):
    bad = tmp_path / "frame.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UsageError, match="frame.png: not a usable image"):
        images.read_image(bad, "--init-image")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UsageError, match="named pipe"):
        images.read_image(tmp_path / "pipe.png")
    with pytest.raises(UsageError, match="frame.png: not a usable image"):
        images.check_images([tmp_path / "ok.png", bad][1:])
    assert Path(tmp_path / "pipe.png").exists()
