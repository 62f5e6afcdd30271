"""Issue 15, nothing lost, in real (tiny) training runs: verified checkpoints and resume fallbacks, legacy OUT_DIRs,
settings a resume may change, NaN weights, missed evaluations, a crash before the first checkpoint, leftovers."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_utils import plain, subject_set
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.train import checkpoint

pytestmark = pytest.mark.slow
STEPS = 4
runner = CliRunner()


def train_args(data: Path, out: Path, base: Path, *extra: str) -> list[str]:
    args = ["train", str(data), str(out), "--base", str(base), "--steps", str(STEPS), "--resolution", "64"]
    args += ["--rank", "4", "--lr", "1e-3", "--checkpoint-every", "1", "--keep-checkpoints", "4"]
    return plain([*args, "--sample-every", "0", "--set", "train.log_every=1", "--name", "astro", *extra])


def same_lora(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(bool((left[k] == right[k]).all()) for k in left)


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_sd1):
    """An uninterrupted run: what every resumed run must equal."""
    old = os.umask(0o022)
    root = tmp_path_factory.mktemp("straight")
    data = subject_set(root / "data")
    out = root / "out"
    result = runner.invoke(app, train_args(data, out, tiny_sd1))
    os.umask(old)
    assert result.exit_code == 0, result.output
    return {"data": data, "out": out, "base": tiny_sd1}


def resumable_copy(straight, tmp_path: Path, keep_up_to: int) -> Path:
    """The straight run as a kill after checkpoint `keep_up_to` left it."""
    out = tmp_path / "out"
    shutil.copytree(straight["out"], out)
    for folder in checkpoint.step_folders(out):
        if checkpoint.step_of(folder) > keep_up_to:
            shutil.rmtree(folder)
    for name in ("pytorch_lora_weights.safetensors", "astro.safetensors"):
        (out / name).unlink()
    return out


def test_markers_records_permissions_and_no_lock_left(straight):
    out = straight["out"]
    marker = json.loads((out / ".sdlora.json").read_text())
    assert marker["command"] == "train" and marker["run_id"] and marker["created"] and marker["version"]
    assert not (out / ".sdlora.lock").exists()
    record = json.loads((out / "checkpoints" / "step-000004" / "complete.json").read_text())
    assert record["step"] == 4 and record["lora_finite"] is True
    assert (
        record["files"]["lora_state.safetensors"]
        == (out / "checkpoints/step-000004/lora_state.safetensors").stat().st_size
    )
    for name in ("pytorch_lora_weights.safetensors", "astro.safetensors", "config.json", "config.toml"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name  # a UI running as another user can read them


DAMAGE = {
    "lora_state missing": lambda f: (f / "lora_state.safetensors").unlink(),
    "lora_state truncated": lambda f: (f / "lora_state.safetensors").write_bytes(
        (f / "lora_state.safetensors").read_bytes()[:100]
    ),
    "lora_state empty": lambda f: (f / "lora_state.safetensors").write_bytes(b""),
    "optimizer missing": lambda f: (f / "optimizer.bin").unlink(),
    "scheduler truncated": lambda f: (f / "scheduler.bin").write_bytes((f / "scheduler.bin").read_bytes()[:10]),
    "trainer_state unreadable": lambda f: (f / "trainer_state.json").write_text('{"st'),
    "trainer_state missing": lambda f: (f / "trainer_state.json").unlink(),
    "record unreadable": lambda f: (f / "complete.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_latest_skips_a_damaged_newest_checkpoint(straight, tmp_path, damage):
    out = resumable_copy(straight, tmp_path, keep_up_to=3)
    DAMAGE[damage](out / "checkpoints" / "step-000003")
    said = []
    assert checkpoint.resolve_resume(out, "latest", say=said.append) == out / "checkpoints" / "step-000002"
    assert said[0].startswith("note: --resume latest skipped step-000003 (") and "step-000002" in said[-1]


def test_resume_past_damage_and_a_torn_metrics_line_equals_the_uninterrupted_run(straight, tmp_path):
    out = resumable_copy(straight, tmp_path, keep_up_to=3)
    DAMAGE["lora_state truncated"](out / "checkpoints" / "step-000003")
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')  # what a crash mid-write leaves
    (out / "checkpoints" / ".step-000004.tmp").mkdir()  # and a killed checkpoint write
    result = runner.invoke(app, train_args(straight["data"], out, straight["base"], "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert "skipped step-000003" in result.output
    assert same_lora(out / "pytorch_lora_weights.safetensors", straight["out"] / "pytorch_lora_weights.safetensors")
    assert steps_logged(out) == [1, 2, 3, 4]
    assert not (out / "checkpoints" / ".step-000004.tmp").exists()


def test_an_earlier_versions_out_dir_without_marker_still_resumes(straight, tmp_path):
    out = resumable_copy(straight, tmp_path, keep_up_to=2)
    (out / ".sdlora.json").unlink()
    for folder in checkpoint.step_folders(out):
        (folder / "complete.json").unlink()  # checkpoints of an earlier version have no completion record
    result = runner.invoke(app, train_args(straight["data"], out, straight["base"], "--resume", "latest"))
    assert result.exit_code == 0, result.output
    assert same_lora(out / "astro.safetensors", straight["out"] / "astro.safetensors")
    assert json.loads((out / ".sdlora.json").read_text())["command"] == "train"  # adopted


def test_after_a_crash_before_any_checkpoint_the_advice_works(straight, tmp_path):
    out = resumable_copy(straight, tmp_path, keep_up_to=0)
    shutil.rmtree(out / "checkpoints")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1, "lr": 0.001, "seconds_per_step": 1}\n')
    again = runner.invoke(app, train_args(straight["data"], out, straight["base"]))
    assert again.exit_code == 2 and "--resume latest" in again.output and "from step 0" in again.output
    resumed = runner.invoke(app, train_args(straight["data"], out, straight["base"], "--resume", "latest"))
    assert resumed.exit_code == 0, resumed.output
    assert same_lora(out / "astro.safetensors", straight["out"] / "astro.safetensors")
    assert steps_logged(out) == [1, 2, 3, 4]


def test_a_resume_may_lower_the_learning_rate_and_says_what_may_not_change(straight, tmp_path):
    out = resumable_copy(straight, tmp_path, keep_up_to=2)
    refused = runner.invoke(
        app, train_args(straight["data"], out, straight["base"], "--resume", "latest", "--seed", "3")
    )
    assert refused.exit_code == 2 and "train.seed" in refused.output and "can't change at a resume" in refused.output
    assert "learning rates" in refused.output
    lower = train_args(straight["data"], out, straight["base"], "--resume", "latest", "--lr", "1e-4", "--steps", "5")
    result = runner.invoke(app, lower)
    assert result.exit_code == 0, result.output
    assert "learning rates from this run's settings: 0.0001" in result.output
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3, 1e-3, 1e-4, 1e-4, 1e-4]
    assert not same_lora(out / "checkpoints/step-000004/lora_state.safetensors",
                         straight["out"] / "checkpoints/step-000004/lora_state.safetensors")  # fmt: skip


def poison_weights_at(monkeypatch, step: int) -> None:
    """The update of optimisation step `step` (1-based) breaks a LoRA weight; its loss, computed before, is fine."""
    from sdlora.train import run as run_module

    real = run_module.optimisation_step

    def step_then_poison(run, index):
        loss = real(run, index)
        if index + 1 == step:
            run.params[0].data.fill_(float("nan"))
        return loss

    monkeypatch.setattr(run_module, "optimisation_step", step_then_poison)


def test_nan_weights_stop_the_run_naming_a_checkpoint_that_is_really_good(straight, tmp_path, monkeypatch):
    out = tmp_path / "out"
    poison_weights_at(monkeypatch, 3)
    result = runner.invoke(app, train_args(straight["data"], out, straight["base"]))
    assert result.exit_code == 1 and "NaN/inf" in result.output, result.output
    good = out / "checkpoints" / "step-000002"
    assert f"last good checkpoint {good} has finite weights" in result.output
    assert [p.name for p in checkpoint.step_folders(out)] == ["step-000001", "step-000002"]  # no NaN checkpoint
    assert checkpoint.verify(good) is None
    monkeypatch.undo()
    advised = shlex.split(result.output.split("resume it with a lower --lr: ")[1].splitlines()[0])
    assert advised[:2] == ["sdlora", "train"] and "--resume" in advised
    again = runner.invoke(app, advised[1:])  # the command the error gave, as it is
    assert again.exit_code == 0, again.output
    assert checkpoint.verify(out / "checkpoints" / "step-000004") is None


def test_nan_weights_at_the_first_step_write_no_checkpoint_and_advise_a_fresh_start(straight, tmp_path, monkeypatch):
    out = tmp_path / "out"
    poison_weights_at(monkeypatch, 1)
    result = runner.invoke(app, train_args(straight["data"], out, straight["base"]))
    assert result.exit_code == 1 and "no checkpoint with finite weights" in result.output, result.output
    assert checkpoint.step_folders(out) == [] and "--overwrite" in result.output


def fake_scoring(monkeypatch) -> None:
    """Identity scoring without faces or rendering: a score that is a function of the LoRA weights, so a row
    scored from other weights would differ."""
    from sdlora.evaluation.metrics import Summary

    def score(pipe, reference, backend, prompts, seeds, *args, **kwargs):
        from peft.utils import get_peft_model_state_dict

        total = sum(float(v.abs().sum()) for v in get_peft_model_state_dict(pipe.unet).values())
        fields = {"identity": total % 1, "diversity": 0.5, "face_rate": 1.0, "recognised_rate": 1.0}
        return Summary(images=1, images_with_face=1, identity_distance=0.3, face_spread=0.1, memorised_rate=0.0,
                       bleed=None, other_faces=0, prompt_fidelity=None, **fields).model_dump()  # fmt: skip

    monkeypatch.setattr("sdlora.evaluation.run.score_checkpoint", score)
    monkeypatch.setattr("sdlora.evaluation.run.face_backend", lambda name: object())
    monkeypatch.setattr("sdlora.evaluation.run.reference_set", lambda folder, backend, loaded=None: object())


def test_a_kill_between_checkpoint_and_evaluation_loses_no_score(straight, tmp_path, monkeypatch):
    from sdlora.train import identity

    fake_scoring(monkeypatch)
    args = ["--eval-every", "1", "--set", "train.sample_steps=1"]
    whole = tmp_path / "whole"
    assert runner.invoke(app, train_args(straight["data"], whole, straight["base"], *args)).exit_code == 0
    real = identity.evaluate_step

    def killed_at_2(evaluation, run, step, write_loras):
        if step == 2:
            raise SystemExit(137)  # the process died after checkpoint 2 was saved, before its evaluation
        return real(evaluation, run, step, write_loras)

    monkeypatch.setattr(identity, "evaluate_step", killed_at_2)
    out = tmp_path / "out"
    first = runner.invoke(app, train_args(straight["data"], out, straight["base"], *args))
    assert first.exit_code == 137 and (out / "checkpoints" / "step-000002").is_dir()
    monkeypatch.setattr(identity, "evaluate_step", real)
    resumed = runner.invoke(app, train_args(straight["data"], out, straight["base"], *args, "--resume", "latest"))
    assert resumed.exit_code == 0, resumed.output
    assert "step 2 was checkpointed but not evaluated" in resumed.output
    assert identity.read_eval_rows(out) == identity.read_eval_rows(whole)
    assert [row["step"] for row in identity.read_eval_rows(out)] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text()) | {"best_dir": ""} == json.loads(
        (whole / "summary.json").read_text()
    ) | {"best_dir": ""}
