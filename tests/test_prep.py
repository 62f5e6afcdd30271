"""`sdlora prep` end to end on a folder of real photos: every file's fate, crops, manifest, guarantees, CLI errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import prep_photos
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora import config, fsutil
from sdlora.cli import app
from sdlora.faces.dlib import DlibFaces
from sdlora.prep import contact, images
from sdlora.prep.manifest import read_manifest
from sdlora.prep.run import prep

RESOLUTION = 256  # small crops keep the test fast; faces of the fixtures are 60-130 px wide


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return prep_photos.build(tmp_path_factory.mktemp("prep") / "photos")


@pytest.fixture(scope="module")
def before(photos) -> dict[str, tuple[str, int]]:
    return _snapshot(photos)


@pytest.fixture(scope="module")
def first(photos, before, tmp_path_factory):
    """The library run, two worker processes."""
    out = tmp_path_factory.mktemp("first") / "dataset"
    cfg = config.load(None, {"prep.resolution": RESOLUTION, "prep.workers": 2})
    return prep(photos, out, cfg, progress=False), out


@pytest.fixture(scope="module")
def second(photos, before, first, tmp_path_factory):
    """The same photos again through the CLI, one process, into a non-empty folder with --overwrite."""
    out = tmp_path_factory.mktemp("second") / "dataset"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    fsutil.write_marker(out, fsutil.new_marker("prep"))  # an earlier dataset of ours: --overwrite may replace it
    args = ["prep", str(photos), str(out), "--resolution", str(RESOLUTION), "--workers", "1", "--overwrite"]
    result = CliRunner().invoke(app, args)
    return result, out


@pytest.mark.slow
def test_every_file_gets_its_expected_fate(first):
    report, out = first
    data = json.loads((out / "report.json").read_text())
    fates = {
        entry["file"]: entry["status"] if entry["status"] == "kept" else entry["reason"] for entry in data["files"]
    }
    assert fates == prep_photos.EXPECTED  # hidden files and caption sidecars are not inputs
    for entry in data["files"]:
        if entry["status"] == "skipped":
            assert entry["message"].endswith(".") and len(entry["message"]) > 20
        else:
            assert (out / entry["image"]).is_file()
    assert data["summary"]["kept"] == 10
    assert data["summary"]["skipped"]["unreadable"] == 2 and sum(data["summary"]["skipped"].values()) == 12
    assert "kept 10, skipped 12" in report.summary()
    assert "k_reencoded.jpg: duplicate: A near-duplicate of a_original.png" in report.summary()


@pytest.mark.slow
def test_crops_centre_the_face(first):
    _, out = first
    faces = DlibFaces()
    for path in sorted((out / "images").glob("*.png")):
        with Image.open(path) as image:
            assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
            found = faces.detect(image)
        assert len(found) == 1, path.name
        box = found[0].box
        centre_x, centre_y = (box[0] + box[2]) / 2 / RESOLUTION, (box[1] + box[3]) / 2 / RESOLUTION
        assert abs(centre_x - 0.5) < 0.12, (path.name, box)
        assert 0.3 < centre_y < 0.6, (path.name, box)  # a little above the middle: headroom for the hair
        assert 0.3 < (box[2] - box[0]) / RESOLUTION < 0.7, (path.name, box)


@pytest.mark.slow
def test_manifest_fields(first, photos):
    report, out = first
    entries = read_manifest(out)
    assert entries == report.kept and len(entries) == 10
    assert [e.image for e in entries] == [f"images/{i:04d}.png" for i in range(10)]
    for entry in entries:
        source = Path(entry.source)
        assert source.parent == photos.resolve() and prep_photos.EXPECTED[source.name] == "kept"
        assert entry.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        left, top, right, bottom = entry.crop_box
        assert right - left == bottom - top and left >= 0 and top >= 0
        assert right <= entry.source_size[0] and bottom <= entry.source_size[1]
        f_left, f_top, f_right, f_bottom = entry.face_box
        assert left <= f_left < f_right <= right and top <= f_top < f_bottom <= bottom
        assert entry.sharpness > 0 and entry.width == entry.height == RESOLUTION
        assert (out / entry.image).with_suffix(".txt").read_text() == entry.caption + "\n"
    by_name = {Path(e.source).name: e for e in entries}
    assert by_name["d_exif_rotated.jpg"].source_size == (520, 460)  # stored 460x520, EXIF-rotated
    assert by_name["b_mirror.jpg"].caption == "sks person, an astronaut smiling in front of a flag"
    assert by_name["a_original.png"].caption == "a photo of sks person"


@pytest.mark.slow
def test_contact_sheet_and_config(first):
    _, out = first
    with Image.open(out / "contact_sheet.jpg") as sheet:
        assert sheet.format == "JPEG"
        # 10 kept and 12 skipped in rows of 6: 2 + 2 rows of 160 px tiles with 18 px labels, two 24 px headings.
        assert sheet.size == contact.sheet_size(10, 12) == (960, 2 * 24 + 4 * 178)
    saved = config.Config.model_validate_json((out / "config.json").read_text())
    assert (saved.prep.token, saved.prep.class_word, saved.prep.resolution) == ("sks", "person", RESOLUTION)


@pytest.mark.slow
def test_second_run_is_byte_identical(first, second):
    result, out = second
    assert result.exit_code == 0, result.output
    assert "kept 10, skipped 12" in result.output
    one, two = _files(first[1]), _files(out)
    assert "stale.txt" not in two  # --overwrite replaced the folder whole
    assert one.keys() == two.keys()
    for name in one:
        if name not in ("config.json", ".sdlora.json"):  # the marker names each run (its id and time)
            assert one[name] == two[name], name
    # config.json differs only by the worker count and --overwrite asked for.
    config_one, config_two = json.loads(one["config.json"]), json.loads(two["config.json"])
    assert (config_one["prep"].pop("workers"), config_two["prep"].pop("workers")) == (2, 1)
    assert (config_one["prep"].pop("overwrite"), config_two["prep"].pop("overwrite")) == (False, True)
    assert config_one == config_two


@pytest.mark.slow
def test_input_folder_untouched(photos, before, first, second):
    assert _snapshot(photos) == before
    assert not list(photos.parent.glob(".*.tmp"))  # no temporary folder left behind


def test_non_empty_out_dir_needs_overwrite(photos, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path)])
    assert result.exit_code == 2
    assert "is not empty" in result.output and "--overwrite" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_too_few_photos_exit_1(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    prep_photos.framing(0, 0, 512, 400).save(photos / "one.jpg")
    (photos / "two.jpg").write_text("not a photo")
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path / "out"), "--resolution", "256"])
    assert result.exit_code == 1
    assert "only 1 of 2 photos" in result.output and "--min-images 3" in result.output
    assert "two.jpg: not_an_image" in result.output
    assert not (tmp_path / "out").exists()


def test_missing_photos_dir_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["prep", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "PHOTOS_DIR" in result.output and "no such folder" in result.output


def test_photos_dir_that_is_a_file_says_so(tmp_path):
    photo = tmp_path / "IMG_1.jpg"
    photo.write_bytes(b"not a folder")
    result = CliRunner().invoke(app, ["prep", str(photo), str(tmp_path / "out")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    assert photo.read_bytes() == b"not a folder"


def test_out_dir_above_photos_dir_says_so(tmp_path):
    photos = tmp_path / "shoot" / "photos"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"x")
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path / "shoot")])
    assert result.exit_code == 2 and "holds PHOTOS_DIR" in result.output and "must be outside" not in result.output
    assert (photos / "a.jpg").read_bytes() == b"x"


def test_out_dir_inside_photos_refused(photos):
    result = CliRunner().invoke(app, ["prep", str(photos), str(photos / "dataset")])
    assert result.exit_code == 2 and "outside PHOTOS_DIR" in result.output
    assert not (photos / "dataset").exists()


def _centre_set(tmp_path: Path) -> tuple[Path, config.Config]:
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, array in (("coffee.jpg", data.coffee()), ("chelsea.png", data.chelsea()), ("rocket.webp", data.rocket())):
        Image.fromarray(array).save(photos / name)
    return photos, config.load(None, {"prep.crop": "center", "prep.resolution": 128, "prep.workers": 1})


def test_center_crop_needs_no_face(tmp_path):
    photos, cfg = _centre_set(tmp_path)
    report = prep(photos, tmp_path / "out", cfg, progress=False)
    boxes = {Path(e.source).name: e.crop_box for e in report.kept}
    # coffee 600x400, chelsea 451x300, rocket 640x427: the centred squares
    assert boxes == {
        "chelsea.png": (75, 0, 375, 300),
        "coffee.jpg": (100, 0, 500, 400),
        "rocket.webp": (106, 0, 533, 427),
    }
    assert all(e.face_box is None for e in report.kept)


def test_crash_while_writing_leaves_out_dir_as_it_was(tmp_path, monkeypatch):
    photos, cfg = _centre_set(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an older dataset")
    fsutil.write_marker(out, fsutil.new_marker("prep"))  # ours, so --overwrite may replace it
    marker = (out / ".sdlora.json").read_bytes()
    cfg = cfg.model_copy(update={"prep": cfg.prep.model_copy(update={"overwrite": True})})

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("sdlora.prep.contact.contact_sheet", crash)  # after images and manifest are written
    with pytest.raises(RuntimeError, match="disk full"):
        prep(photos, out, cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".sdlora.json", "old.txt"]
    assert (out / ".sdlora.json").read_bytes() == marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos"]  # no temporary folder left


def test_a_photo_that_breaks_a_decoder_is_skipped_not_fatal(tmp_path, monkeypatch):
    photos, cfg = _centre_set(tmp_path)
    real = images.open_photo

    def flaky(data, *args, **kwargs):
        if data[:4] == b"RIFF":  # the WebP
            raise IndexError("list index out of range")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(images, "open_photo", flaky)
    cfg = cfg.model_copy(update={"prep": cfg.prep.model_copy(update={"min_images": 2})})
    report = prep(photos, tmp_path / "out", cfg, progress=False)
    assert [e["reason"] for e in report.files if e["status"] == "skipped"] == ["unreadable"]
    assert "IndexError" in report.files[2]["message"]


@pytest.mark.slow
def test_buckets_keep_portraits_portrait(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (left, mirror) in enumerate(((60, False), (120, True), (20, True))):
        portrait = prep_photos.framing(0, 0, 512, 512, mirror=mirror).crop((left, 0, left + 340, 512))
        portrait.save(photos / f"portrait_{index}.png")  # 340x512: nearest bucket at 256 px is 192x320
    result = CliRunner().invoke(app, ["prep", str(photos), str(tmp_path / "out"), "--resolution", "256", "--buckets"])
    assert result.exit_code == 0, result.output
    report = read_manifest(tmp_path / "out")
    assert len(report) == 3
    faces = DlibFaces()
    for entry in report:
        assert (entry.width, entry.height) == (192, 320)
        left, top, right, bottom = entry.crop_box
        assert abs((right - left) / (bottom - top) - 192 / 320) < 0.02
        with Image.open(tmp_path / "out" / entry.image) as image:
            assert image.size == (192, 320)
            (face,) = faces.detect(image)
        assert abs((face.box[0] + face.box[2]) / 2 - 96) < 0.12 * 192
