"""Train's pure parts: data order, precision choice, LR schedules, pre-flight errors through the CLI."""

from __future__ import annotations

import json

import pytest
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora import layout
from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.train import resolve_precision
from sdlora.train.data import DataOrder
from sdlora.train.optim import lr_factor


def test_data_order_is_a_function_of_step():
    order = DataOrder([(64, 64)] * 4, seed=3, flip=True, group=1)
    first_epoch = [order.batch(k)[0] for k in range(4)]
    assert sorted(i for i, _ in first_epoch) == [0, 1, 2, 3]
    assert [DataOrder([(64, 64)] * 4, 3, True, 1).batch(k) for k in range(8)] == [order.batch(k) for k in range(8)]
    assert order.batch(2) == [first_epoch[2]]  # asked again after later steps (resume): the same slots
    # one global batch of 2 (2 processes x 1, or 1 process x 2): each process takes its slice of the same list
    pairs = DataOrder([(64, 64)] * 5, seed=3, flip=False, group=2)
    assert [len(pairs.batch(k)) for k in range(6)] == [2] * 6 and pairs.per_epoch == 3


def test_bucketed_batches_hold_one_size_and_cover_every_image():
    sizes = [(64, 64), (64, 48), (48, 64), (64, 48), (64, 64), (64, 48), (64, 64)]
    order = DataOrder(sizes, seed=1, flip=False, group=2)
    assert order.per_epoch == 2 + 2 + 1  # ceil(3/2) squares, ceil(3/2) landscapes, 1 portrait
    for epoch in range(3):
        batches = [order.batch(epoch * order.per_epoch + j) for j in range(order.per_epoch)]
        assert all(len({sizes[i] for i, _ in batch}) == 1 for batch in batches)
        assert {i for batch in batches for i, _ in batch} == set(range(len(sizes)))
    assert [order.batch(k) for k in range(10)] != [DataOrder(sizes, 2, False, 2).batch(k) for k in range(10)]


def test_precision_choice():
    assert resolve_precision("auto", cuda=False, bf16_supported=False) == "no"
    assert resolve_precision("auto", cuda=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", cuda=True, bf16_supported=False) == "fp16"
    assert resolve_precision("bf16", cuda=False, bf16_supported=False) == "bf16"  # CPU autocast has bf16
    with pytest.raises(UsageError, match="no bf16 support"):
        resolve_precision("bf16", cuda=True, bf16_supported=False)
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cuda=False, bf16_supported=False)


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("constant", 0, 0.25), ("constant", 50, 1.0), ("linear", 4, 1.0), ("linear", 54, 0.5), ("cosine", 54, 0.5)],
)
def test_lr_schedules_with_warmup(schedule, step, expected):
    assert lr_factor(step, total=104, warmup=4, schedule=schedule) == pytest.approx(expected)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return subject_set(tmp_path_factory.mktemp("pre") / "data")


def run(*args):
    return CliRunner().invoke(app, ["train", *plain(args)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--resolution", "100"], "divisible by 8"),
        (["--steps", "0"], "train.steps"),
        (["--rank", "0"], "lora.rank"),
        (["--lr", "-1"], "train.learning_rate"),
        (["--mixed-precision", "fp8"], "train.mixed_precision"),
        (["--class-dir", "{tmp}/nothing"], "--class-dir"),
        (["--resume", "latest"], "no checkpoint"),
        (["--class-prompt", "a person", "--class-dir", "{tmp}"], "choose one"),
    ],
)
def test_preflight_errors_are_one_line(dataset, tiny_sd1, tmp_path, extra, message):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    result = run(dataset, tmp_path / "out", "--base", tiny_sd1, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_preflight_dataset_and_base_errors(dataset, tiny_sd1, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [
        ((tmp_path / "missing", tmp_path / "o", "--base", tiny_sd1), "dataset folder not found"),
        ((empty, tmp_path / "o", "--base", tiny_sd1), "no training images"),
        ((dataset, tmp_path / "o"), "--base is required"),
        ((dataset, tmp_path / "o", "--base", tmp_path / "model.ckpt"), "pickles"),
    ]:
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()  # nothing written before the checks pass


def test_preflight_bitsandbytes_unusable(dataset, tiny_sd1, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as on a broken install
    result = run(dataset, tmp_path / "o", "--base", tiny_sd1, "--optimizer", "adamw8bit")
    assert result.exit_code == 2 and "bitsandbytes" in result.output


def test_preflight_refuses_other_run_in_out_dir(dataset, tiny_sd1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train": {"seed": 9}}))
    result = run(dataset, out, "--base", tiny_sd1)
    assert result.exit_code == 2 and "different run" in result.output and "--overwrite" in result.output


def test_monitor_writes_metrics_and_tensorboard_scalars_and_truncates_on_resume(tmp_path, monkeypatch):
    """TensorBoard is optional (not installed here): the writer is faked to check what the monitor sends it."""
    from sdlora.train import monitor

    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append("closed")

    folders = []
    monkeypatch.setattr(monitor, "_tensorboard", lambda folder: folders.append(folder) or Writer())
    run = monitor.Monitor(tmp_path, total=4, start=0, enabled=True, cuda=False)
    run.log(2, 0.5, 1e-4)
    run.log(4, 0.25, 5e-5)
    run.close()
    assert folders == [tmp_path / "tensorboard"]
    assert calls == [("loss", 0.5, 2), ("lr", 1e-4, 2), ("loss", 0.25, 4), ("lr", 5e-5, 4), "closed"]
    records = [json.loads(line) for line in (tmp_path / layout.METRICS).read_text().splitlines()]
    assert [(r["step"], r["loss"], r["lr"]) for r in records] == [(2, 0.5, 1e-4), (4, 0.25, 5e-5)]
    resumed = monitor.Monitor(tmp_path, total=4, start=2, enabled=True, cuda=False)  # resume from step 2
    resumed.close()
    assert [json.loads(line)["step"] for line in (tmp_path / layout.METRICS).read_text().splitlines()] == [2]
    silent = monitor.Monitor(tmp_path / "other", total=4, start=0, enabled=False, cuda=False)  # not main process
    silent.log(2, 0.5, 1e-4)
    assert not (tmp_path / "other").exists() and len(folders) == 2
