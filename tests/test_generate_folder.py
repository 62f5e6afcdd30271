"""Issue 28, generate's output folder and size: a run into a folder of earlier images adds its own beside them
(after an interrupted run too) and never writes over a file; jobs are made lazily, a huge request is refused up
front, the sheets are bounded; an unset size is the base's own, for every family."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import pytest
from generate_helpers import make_lora
from PIL import Image
from test_nothing_lost_render import interrupt_on_call
from typer.testing import CliRunner

from sdlora import fsutil
from sdlora.cli import app
from sdlora.config import load
from sdlora.generate import jobs, with_native_size
from sdlora.generate.output import Sheet, Writer, first_free
from sdlora.generate.render import native_size

runner = CliRunner()
FAST = ["--steps", "2", "--size", "64x64", "--scheduler", "ddim"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def gen(tiny_sd1: Path, out: Path, *args: str) -> str:
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "a photo", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_runs_into_one_folder_add_their_images_beside_the_earlier_ones(tiny_sd1, tmp_path, monkeypatch):
    """An interrupted run, then two full ones, into one folder: every earlier file stays as it was (bytes), each
    run's images are numbered after the earlier ones, and its config and grid are named after its first image."""
    out = tmp_path / "out"
    interrupt_on_call(monkeypatch, "sdlora.generate", 2)  # Ctrl-C during the second batch
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "a photo", "--n", "4",
                                 "--batch-size", "2", *FAST, "--out", str(out)])  # fmt: skip
    assert result.exit_code == 130, result.output
    monkeypatch.undo()
    interrupted = snapshot(out)
    kept = [".sdlora.json", "0000-42.json", "0000-42.png", "0001-43.json", "0001-43.png", "config.json"]
    assert sorted(interrupted) == kept

    gen(tiny_sd1, out, "--n", "2", "--seed", "42", *FAST)  # the same seeds: the same names today's code would use
    second = snapshot(out)
    assert {name: second[name] for name in interrupted} == interrupted
    assert sorted(set(second) - set(interrupted)) == [
        "0002-42.json", "0002-42.png", "0003-43.json", "0003-43.png", "comfyui-0002.json", "config-0002.json",
        "grid-0002.png",
    ]  # fmt: skip
    record = json.loads((out / "0003-43.json").read_text())
    assert record["index"] == 3 and record["seed"] == 43  # remade alone with --seed 43 --n 1

    gen(tiny_sd1, out, "--n", "2", "--seed", "7", *FAST)
    third = snapshot(out)
    assert {name: third[name] for name in second} == second
    assert sorted(set(third) - set(second)) == [
        "0004-7.json", "0004-7.png", "0005-8.json", "0005-8.png", "comfyui-0004.json", "config-0004.json",
        "grid-0004.png",
    ]  # fmt: skip
    assert json.loads((out / ".sdlora.json").read_text())["command"] == "generate"


def test_numbering_starts_after_every_number_in_use(tmp_path):
    assert first_free(tmp_path / "new") == 0
    for name in ("0000-42.png", "0007-1.json", "grid-0009.png", "notes.txt", "12345-3-steps.png", "0020x.png"):
        (tmp_path / name).write_bytes(b"x")
    assert first_free(tmp_path) == 12346
    (tmp_path / "12345-3-steps.png").unlink()
    assert first_free(tmp_path) == 10  # grid-0009.png: a deleted run's sheet keeps its number taken


def test_later_runs_sheets_are_sheets_to_eval(tmp_path):
    """eval --images over a folder of two runs scores the images, not grid-0002.png or compare-0002.png."""
    from sdlora.evaluation.run import _read_images

    for name in ("0000-42.png", "0001-43.png", "grid.png", "grid-0002.png", "compare-0002.png", "0002-7-steps.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [Path(p).name for p in _read_images(tmp_path)[1]] == ["0000-42.png", "0001-43.png"]


def test_overwrite_replaces_only_what_generate_wrote(tmp_path):
    """generate(..., overwrite=True), the demo's rerun: the earlier runs' images, settings, configs and sheets go;
    a file of the user's in the folder stays, and numbering starts at 0 again."""
    out = tmp_path / "out"
    out.mkdir()
    fsutil.write_marker(out, fsutil.new_marker("generate"))
    ours = ["0000-42.png", "0000-42.json", "0001-43-steps.png", "config.json", "grid.png", "compare-0002.png"]
    ours += ["comfyui.json", "comfyui-0004.json"]
    for name in [*ours, "notes.txt", "favourite.png"]:
        (out / name).write_bytes(b"x")
    writer = Writer(out, load(None, {}), [], overwrite=True)
    with fsutil.lock(out, "generate"):
        writer.start()
    assert sorted(fsutil.contents(out)) == ["favourite.png", "notes.txt"]
    assert writer.first == 0 and writer.path("grid.png") == out / "grid.png"


def test_files_are_published_without_replacing(tmp_path, monkeypatch):
    """The writers generate uses never write over an existing file, with hard links or (file systems without
    them) without."""
    path = tmp_path / "0000-42.png"
    path.write_bytes(b"the user's")
    with pytest.raises(FileExistsError):
        fsutil.atomic_write_bytes(path, b"new", replace=False)
    with pytest.raises(FileExistsError), fsutil.atomic_path(path, replace=False) as tmp:
        tmp.write_bytes(b"new")
    monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no hard links")))
    with pytest.raises(FileExistsError):
        fsutil.atomic_write_bytes(path, b"new", replace=False)
    fsutil.atomic_write_bytes(tmp_path / "new.png", b"new", replace=False)
    assert path.read_bytes() == b"the user's" and (tmp_path / "new.png").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000-42.png", "new.png"]  # no temporaries left


def test_huge_request_is_refused_up_front_and_jobs_are_lazy(tiny_sd1, tmp_path, monkeypatch):
    """10,000 prompts x --n 100000 once built a billion jobs and ran out of memory after 3 minutes."""
    monkeypatch.setattr("sdlora.generate.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(10_000)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompts", str(prompts), "--n", "100000",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "10000 prompt(s) x --n 100000 = 1,000,000,000 images" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()

    endless = jobs([f"p{i}" for i in range(10_000)], 100_000, seed=5, first=3)  # a generator: nothing built yet
    first = list(islice(endless, 3))
    assert [(j.index, j.prompt, j.seed) for j in first] == [(3, "p0", 5), (4, "p0", 6), (5, "p0", 7)]


def test_sheets_are_bounded():
    """100 prompts x 4 at 512 px made a 2048x51200 px grid (58 MB): a sheet keeps whole rows up to 4096 px a side."""
    grid = Sheet(cols=4, total=400, cell=(512, 512))
    assert (grid.cols, grid.capacity) == (4, 32)
    tile = Image.new("RGB", (512, 512), (200, 10, 10))
    for _ in range(400):
        grid.add(tile)
    assert grid.canvas.size == (2048, 4096) and grid.count == 32
    wide = Sheet(cols=100_000, total=100_000, cell=(64, 64))
    assert (wide.cols, wide.capacity) == (64, 64 * 64)
    small = Sheet(cols=2, total=2, cell=(64, 64))
    assert (small.cols, small.capacity) == (2, 2)  # the grids of small runs are as before
    huge = Sheet(cols=2, total=8, cell=(4096, 4096), min_cols=2)  # compare: base | LoRA, whatever the size
    assert (huge.cols, huge.capacity) == (2, 2)


@pytest.mark.slow
def test_long_run_grid_and_compare_show_the_first_images(tiny_sd1, tmp_path, monkeypatch, caplog):
    """Past the bound the grid holds the first whole rows and says so in one line; --compare renders the base
    model only for the pairs its sheet shows."""
    monkeypatch.setattr("sdlora.generate.output.MAX_SHEET_SIDE", 128)
    lora = make_lora(tiny_sd1, tmp_path / "lora", seed=1)
    calls = interrupt_on_call(monkeypatch, "sdlora.generate", 99)  # counts the images of each render call
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        gen(tiny_sd1, out, "--n", "5", "--batch-size", "5", "--lora", str(lora), "--compare", *FAST)
    assert calls == [2, 5]  # the base model for the 2 pairs compare.png shows, then the 5 images
    assert Image.open(out / "grid.png").size == (128, 128)  # 2 images a row, 2 rows: 4 of the 5
    assert Image.open(out / "compare.png").size == (128, 128)  # 2 rows of base | LoRA
    assert "grid.png shows the first 4 of the 5 images" in caplog.text
    assert "compare.png shows the first 2 of the 5 pairs" in caplog.text
    assert len(list(out.glob("000?-*.png"))) == 5


def test_native_size_of_every_family():
    """The size diffusers' own pipeline defaults to, read from the loaded pipeline: SD 1.x/2.x from the UNet's
    sample_size, SDXL and Flux from default_sample_size, later families from their transformer."""
    from sdlora import testing

    assert native_size(testing.build_tiny_pipeline("sd1")) == (64, 64)  # sample_size 8 x 8
    assert native_size(testing.build_tiny_pipeline("sdxl")) == (64, 64)
    assert native_size(testing.build_tiny_pipeline("flux")) == (1024, 1024)  # FluxPipeline's 128 x 8
    later = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(sample_size=(96, 64))), vae_scale_factor=8
    )
    assert native_size(later) == (512, 768)  # (height, width) latents -> (width, height) pixels
    assert native_size(SimpleNamespace()) is None


def test_the_users_size_wins_over_the_native_one():
    from sdlora import testing

    pipe = testing.build_tiny_pipeline("sd1")
    assert with_native_size(load(None, {}), pipe).generate.size == "64x64"
    assert with_native_size(load(None, {"generate.size": "96x64"}), pipe).generate.size == "96x64"
    assert with_native_size(load(None, {}, ["generate.size='512x512'"]), pipe).generate.size == "512x512"


@pytest.mark.slow
def test_generate_defaults_to_the_toy_bases_own_size(tmp_path):
    """The demo's toy base draws 64 px people: with no --size, generate renders 64x64 (it rendered 512x512, and the
    base images alone took 14 minutes)."""
    from sdlora.demo.base import restore_packaged

    base = restore_packaged(tmp_path / "toy-base")
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--base", str(base), "--prompt", "a photo of a person", "--n", "2",
                                 "--steps", "2", "--scheduler", "ddim", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(out / "0000-42.png").size == (64, 64)
    assert json.loads((out / "config.json").read_text())["generate"]["size"] == "64x64"
    settings = Image.open(out / "0001-43.png").text["parameters"]
    assert "Size: 64x64" in settings
