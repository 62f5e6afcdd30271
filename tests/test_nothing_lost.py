"""Issue 15, nothing lost: ownership markers, locks, names, dataset confinement, atomic folders, permissions,
metrics reading, progress lines. The checks here run before any model loads, so they are fast."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import subject_set
from typer.testing import CliRunner

from sdlora import fsutil
from sdlora.cli import app
from sdlora.errors import SdloraError, UsageError

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def thesis(folder: Path) -> Path:
    """A user's folder that sdlora never wrote: what --overwrite must not delete."""
    (folder / "src").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "src" / "main.py").write_text("print('mine')")
    (folder / "samples").mkdir()
    (folder / "samples" / "figure.png").write_bytes(b"png")
    (folder / "config.json").write_text(json.dumps({"tool": "latexmk"}))
    (folder / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    return folder


def dataset_with_marker(folder: Path) -> Path:
    subject_set(folder)
    fsutil.write_marker(folder, fsutil.new_marker("prep"))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return dataset_with_marker(tmp_path_factory.mktemp("lost") / "data")


# --- 1. --overwrite never deletes a folder that is not ours -------------------------------------------------------


def test_prep_overwrite_refuses_a_users_folder(tmp_path):
    photos = subject_set(tmp_path / "photos")
    out = thesis(tmp_path / "project")
    before = snapshot(out)
    result = runner.invoke(app, ["prep", str(photos), str(out), "--overwrite"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert str(out) in result.output and "files sdlora did not write" in result.output
    assert snapshot(out) == before


def test_train_overwrite_refuses_a_users_folder(dataset, tiny_sd1, tmp_path):
    out = thesis(tmp_path / "project")
    before = snapshot(out)
    result = runner.invoke(app, ["train", str(dataset), str(out), "--base", str(tiny_sd1), "--overwrite"])
    assert result.exit_code == 2 and str(out) in result.output and "did not write" in result.output, result.output
    assert snapshot(out) == before


def test_prep_refuses_another_commands_folder_even_with_overwrite(tmp_path):
    photos = subject_set(tmp_path / "photos")
    out = tmp_path / "run"
    out.mkdir()
    fsutil.write_marker(out, fsutil.new_marker("train"))
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    before = snapshot(out)
    result = runner.invoke(app, ["prep", str(photos), str(out), "--overwrite"])
    assert result.exit_code == 2 and "sdlora train" in result.output
    assert snapshot(out) == before


# --- 2. one command's output never rewrites another's ------------------------------------------------------------


def test_generate_refuses_a_dataset_and_a_train_out_dir(dataset, tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setattr("sdlora.generate.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fsutil.write_marker(run_dir, fsutil.new_marker("train"))
    for folder, owner in ((dataset, "prep"), (run_dir, "train")):
        before = snapshot(folder)
        result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--out", str(folder)])
        assert result.exit_code == 2 and f"sdlora {owner}" in result.output, result.output
        assert snapshot(folder) == before


def test_generate_refuses_a_folder_of_user_files(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setattr("sdlora.generate.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    out = thesis(tmp_path / "pictures")
    before = snapshot(out)
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--out", str(out)])
    assert result.exit_code == 2 and "did not write" in result.output
    assert snapshot(out) == before


def test_train_refuses_the_dataset_as_out_dir(dataset, tiny_sd1):
    before = snapshot(dataset)
    for out in (dataset, dataset / "lora"):
        result = runner.invoke(app, ["train", str(dataset), str(out), "--base", str(tiny_sd1), "--overwrite"])
        assert result.exit_code == 2 and "inputs" in result.output, result.output
    assert snapshot(dataset) == before


def test_eval_json_and_report_never_write_into_a_dataset(dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    before = snapshot(dataset)
    base = ["eval", "--reference", str(dataset), "--images", str(images)]
    for extra in (
        ["--json", str(dataset / "manifest.jsonl")],
        ["--json", str(dataset / "new.json")],
        ["--report", str(dataset)],
        ["--report", str(dataset / "report")],
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and "dataset" in result.output, (extra, result.output)
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}')
    result = runner.invoke(app, [*base, "--json", str(other)])
    assert result.exit_code == 2 and "not an `sdlora eval` result" in result.output
    assert snapshot(dataset) == before and other.read_text() == '{"mine": true}'


# --- 5. names are names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (["--name", "../../x"], "plain file name"),
        (["--name", "sub/x"], "plain file name"),
        (["--name", ".hidden"], "plain file name"),
        (["--set", "train.name='../escape'"], "plain file name"),
        (["--name", "lora_state"], "would replace the training state"),
        (["--name", "pytorch_lora_weights"], "would replace the run's diffusers-format"),
        (["--name", "PyTorch_Lora_Weights"], "would replace the run's diffusers-format"),
    ],
)
def test_name_is_a_plain_file_name_that_collides_with_nothing(dataset, tiny_sd1, tmp_path, how, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(dataset), str(out), "--base", str(tiny_sd1), *how])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists() and not (tmp_path / "escape.safetensors").exists()


def test_out_dir_named_like_a_run_file_needs_a_name(dataset, tiny_sd1, tmp_path):
    out = tmp_path / "lora_state"
    result = runner.invoke(app, ["train", str(dataset), str(out), "--base", str(tiny_sd1)])
    assert result.exit_code == 2 and "OUT_DIR's name" in result.output and "--name" in result.output
    assert not out.exists()


# --- 6. a dataset reads only its own files ------------------------------------------------------------------------


def manifest_set(folder: Path, image: str) -> Path:
    from sdlora.prep.manifest import ManifestEntry, write_manifest

    subject_set(folder)
    # model_construct: written as a hand-edited or downloaded manifest would be, without the writer's own checks
    entry = ManifestEntry.model_construct(
        face_box=None,
        image=image,
        caption="a photo of sks person",
        source="x.png",
        source_sha256="0" * 64,
        source_size=(64, 64),
        crop_box=(0, 0, 64, 64),
        sharpness=1.0,
        width=64,
        height=64,
    )
    write_manifest(folder / "manifest.jsonl", [entry])
    return folder


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink_out", "plain_symlink_out"])
def test_dataset_entries_stay_inside_the_folder(tmp_path, kind):
    from sdlora.train.data import load_examples

    outside = subject_set(tmp_path / "elsewhere") / "img0.png"
    data = tmp_path / "data"
    if kind == "dotdot":
        manifest_set(data, "../elsewhere/img0.png")
    elif kind == "absolute":
        manifest_set(data, str(outside))
    elif kind == "symlink_out":
        manifest_set(data, "link.png")
        (data / "link.png").symlink_to(outside)
    else:
        subject_set(data)
        (data / "zz.png").symlink_to(outside)
    with pytest.raises(UsageError, match="inside the dataset|outside the dataset"):
        load_examples(data, "a photo")


def test_symlinks_within_the_dataset_are_fine(tmp_path):
    from sdlora.train.data import load_examples

    data = manifest_set(tmp_path / "data", "link.png")
    (data / "link.png").symlink_to(data / "img0.png")
    assert [e.image.name for e in load_examples(data, "a photo")] == ["link.png"]


# --- 7. one writer per folder --------------------------------------------------------------------------------------


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def fake_lock(folder: Path, pid: int, command: str = "train") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "command": command, "started": "now", "started_at": time.time()}
    (folder / ".sdlora.lock").write_text(json.dumps(record))


def test_a_second_writer_gets_the_holders_pid(dataset, tiny_sd1, tmp_path, other_process):
    out = tmp_path / "out"
    out.mkdir()
    fake_lock(out, other_process.pid)
    for args in (
        ["train", str(dataset), str(out), "--base", str(tiny_sd1), "--resume", "latest"],
        ["train", str(dataset), str(out), "--base", str(tiny_sd1)],
        ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--out", str(out)],
        ["prep", str(dataset), str(out)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert f"pid {other_process.pid}" in result.output and result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == [".sdlora.lock"]


def test_stale_lock_after_kill_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "out"
    fake_lock(folder, dead.pid)  # what kill -9 leaves
    with fsutil.lock(folder, "generate"):
        record = json.loads((folder / ".sdlora.lock").read_text())
        assert record["pid"] == os.getpid() and record["command"] == "generate" and "started" in record
        # another process sees this one as the live holder
        code = f"from pathlib import Path; from sdlora import fsutil; print(fsutil.holder(Path({str(folder)!r})))"
        seen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert f"'pid': {os.getpid()}" in seen
    assert not (folder / ".sdlora.lock").exists()


def test_a_new_folder_written_meanwhile_is_not_replaced(tmp_path):
    """Two preps into one new folder: the second one's claim saw no folder, so it refuses to replace the first's."""
    out = tmp_path / "new"
    fsutil.claim(out, "prep", lock_now=False)
    out.mkdir()  # the other prep finished first
    fsutil.write_marker(out, fsutil.new_marker("prep"))
    (out / "manifest.jsonl").write_text("theirs\n")
    with pytest.raises(SdloraError, match="written by another command"), fsutil.atomic_dir(out) as tmp:
        (tmp / "manifest.jsonl").write_text("mine\n")
    assert (out / "manifest.jsonl").read_text() == "theirs\n"


def test_atomic_dir_replaces_contents_in_place_and_keeps_marker_and_lock(tmp_path):
    folder = tmp_path / "mount"  # stands for a mount point: the folder itself is never renamed
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    fsutil.write_marker(folder, fsutil.new_marker("eval"))
    inode = folder.stat().st_ino
    with fsutil.lock(folder, "eval"), fsutil.atomic_dir(folder) as tmp:
        (tmp / "new").mkdir()
        (tmp / "new" / "a.txt").write_text("new")
    assert folder.stat().st_ino == inode
    assert sorted(p.name for p in folder.iterdir()) == [".sdlora.json", "new"]
    with pytest.raises(RuntimeError), fsutil.atomic_dir(folder) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")
    assert sorted(p.name for p in folder.iterdir()) == [".sdlora.json", "new"]


# --- 10. leftovers and permissions ---------------------------------------------------------------------------------


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fsutil.atomic_write_text(tmp_path / "config.json", "{}")
        assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        fsutil.atomic_write_text(tmp_path / "lora.json", "{}")
        assert (tmp_path / "lora.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".step-000003.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-000003.tmp" / "optimizer.bin").write_bytes(b"x")
    (tmp_path / ".config.json.k2j3.tmp").write_text("{")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".step-000002.png.tmp.png").write_bytes(b"x")
    (tmp_path / ".sdlora-new.abc.tmp").mkdir()
    (tmp_path / "keep.png").write_bytes(b"x")
    fsutil.remove_stale_temporaries(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["checkpoints", "keep.png", "samples"]


# --- 4. metrics.jsonl readers and the progress line ----------------------------------------------------------------


def test_metrics_reader_tolerates_a_torn_last_line(tmp_path):
    from sdlora.train.identity import read_eval_rows
    from sdlora.train.monitor import Monitor, read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 1, "eval": {"identity": 0.4}}\n{"step": 2, "lo')
    assert [r["step"] for r in read_records(path)] == [1, 1]
    assert read_eval_rows(tmp_path) == [{"step": 1, "identity": 0.4}]
    Monitor(tmp_path, total=4, start=1, enabled=True, cuda=False, stream=io.StringIO()).close()
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(SdloraError, match="metrics.jsonl:2"):
        read_records(path)


def test_plain_progress_line_when_stdout_is_not_a_terminal(tmp_path):
    from sdlora.train.monitor import Monitor

    stream = io.StringIO()
    monitor = Monitor(tmp_path, total=3, start=0, enabled=True, cuda=False, stream=stream, plain_every=0.0)
    monitor.advance()
    monitor.log(1, 0.25, 1e-4)
    monitor.advance()
    monitor.print("a message")
    monitor.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 1/3 loss - it/s ") and " ETA 0:00:" in lines[0]
    assert lines[1].startswith("step 2/3 loss 0.2500 it/s ") and lines[2] == "a message"
    quiet = io.StringIO()
    monitor = Monitor(tmp_path / "b", total=100, start=0, enabled=True, cuda=False, stream=quiet)
    monitor.advance()
    monitor.close()
    assert quiet.getvalue() == ""  # at most one line per ~30 s


# --- 3. finite numbers only ---------------------------------------------------------------------------------------


def test_a_lora_with_nan_weights_is_refused_before_rendering(dataset, tiny_sd1, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "nan.safetensors"
    weights = torch.zeros(4, 32)
    weights[0, 0] = float("nan")
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": weights}, str(lora))
    monkeypatch.setattr("sdlora.generate.render.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    monkeypatch.setattr("sdlora.generate.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["generate", "--base", str(tiny_sd1), "--lora", str(lora), "--prompt", "x", "--out", str(out)]
    )
    assert result.exit_code == 2 and "NaN/inf" in result.output and not out.exists(), result.output
    args = ["eval", "--reference", str(dataset), "--lora", str(lora), "--base", str(tiny_sd1)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "NaN/inf" in result.output, result.output


def test_full_disk_is_found_before_any_model_loads(tiny_sd1, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr("sdlora.generate.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--out", str(out)])
    assert result.exit_code == 2 and "MB free" in result.output and not out.exists(), result.output


def test_unwritable_out_is_found_before_any_model_loads(tiny_sd1, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fsutil.FolderLock, "_create", refuse)  # as on a read-only folder (tests run as root here)
    monkeypatch.setattr("sdlora.generate.load_for_rendering", lambda *a: pytest.fail("a model loaded"))
    out = tmp_path / "out"
    out.mkdir()
    result = runner.invoke(app, ["generate", "--base", str(tiny_sd1), "--prompt", "x", "--out", str(out)])
    assert result.exit_code == 2 and "not writable" in result.output, result.output
