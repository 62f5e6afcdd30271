"""`sdlora serve`: the page's functions on the tiny model (upload -> prep -> train -> stop/resume -> eval; generate
in test_serve_browser.py), runs found from disk, the train form generated from the config, and the safety checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from serve_utils import QUICK, STALL, activity, make_workspace, photo_files, wait_for
from typer.testing import CliRunner

from sdlora import config
from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.serve import credentials, datasets, form, runs, studio, training
from sdlora.serve.jobs import Jobs
from sdlora.serve.workspace import MAX_UPLOAD_BYTES, PHOTO_SUFFIXES, Workspace, sanitise_name

runner = CliRunner()


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


# ------------------------------------------------------------------------------------------------ safety


def test_non_local_host_without_auth_is_refused_before_anything_starts(tmp_path):
    workspace = tmp_path / "ws"
    result = runner.invoke(app, ["serve", str(workspace), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host 0.0.0.0") and "--auth" in lines[0]
    assert not workspace.exists()  # refused before the workspace (or a server) was made


def test_auth_settings():
    assert credentials("127.0.0.1", None, None) is None
    assert credentials("localhost", None, None) is None
    assert credentials("0.0.0.0", "ann:secret", None) == [("ann", "secret")]
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(UsageError, match="USER:PASSWORD"):
            credentials("0.0.0.0", bad, None)


def test_auth_file(tmp_path):
    path = tmp_path / ".auth"
    path.write_text("# who may log in\nann:one\nbob:two\n")
    path.chmod(0o600)  # readable by others is refused (test_serve_boundary.py)
    assert credentials("10.0.0.5", None, path) == [("ann", "one"), ("bob", "two")]
    with pytest.raises(UsageError, match="both"):
        credentials("0.0.0.0", "a:b", path)
    with pytest.raises(UsageError, match="can't read"):
        credentials("0.0.0.0", None, tmp_path / "missing")


def test_serve_without_the_extra_says_how_to_install_it(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'gradio' else real(name, *a)\n"
        "from sdlora.cli import app\n"
        f"app(['serve', {str(tmp_path / 'ws')!r}], prog_name='sdlora')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == 'error: the web app needs the ui extra: pip install "sdlora[ui]"'


def test_paths_outside_the_workspace_are_refused(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (ws.root / "runs" / "link").symlink_to(outside, target_is_directory=True)
    for bad in ("../outside", "runs/../../outside", str(outside), "/etc/passwd", "~/x", "runs/link", "runs/link/s"):
        with pytest.raises(UsageError, match="refused"):
            ws.path(bad)
    with pytest.raises(UsageError, match="refused"):
        ws.path("link", "runs")
    with pytest.raises(UsageError, match="refused"):
        studio.generate(ws, "runs/link", "a photo of {trigger}")
    with pytest.raises(UsageError, match="refused"):
        datasets.view(ws, "../runs")
    assert "link" not in ws.subfolders("runs")  # a symlink out is not listed either
    assert ws.path("runs/x") == ws.root / "runs" / "x"


def test_crafted_upload_names_are_sanitised_and_types_and_sizes_limited(ws, tmp_path):
    assert sanitise_name("../../etc/passwd") == "passwd"
    assert sanitise_name("..") == "untitled"
    assert sanitise_name("C:\\Users\\me\\photo 1.JPG") == "photo-1.JPG"
    assert sanitise_name(".bashrc") == "bashrc"
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"\xff\xd8 not checked here")
    target = ws.root / "photos" / "set"
    saved = ws.take_upload(photo, target, PHOTO_SUFFIXES, original_name="../../../../tmp/evil.jpg")
    assert saved == target / "evil.jpg" and saved.is_file()
    assert not (tmp_path / "evil.jpg").exists()
    script = tmp_path / "x.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="not an accepted file type"):
        ws.take_upload(script, target, PHOTO_SUFFIXES)
    big = tmp_path / "big.png"
    with big.open("wb") as handle:
        handle.truncate(MAX_UPLOAD_BYTES + 1)
    with pytest.raises(UsageError, match="upload limit"):
        ws.take_upload(big, target, PHOTO_SUFFIXES)
    # A refused file in an upload leaves no half photo set behind.
    with pytest.raises(UsageError, match="not an accepted file type"):
        datasets.save_uploads(ws, [photo, script], "mixed")
    assert not (ws.root / "photos" / "mixed").exists()


def test_base_model_choices(ws):
    (ws.root / "models" / "mine").mkdir()
    assert ws.base_models() == ["models/mine"]
    assert ws.model_ref("models/mine") == str(ws.root / "models" / "mine")
    assert ws.model_ref("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    for bad in ("/opt/model", "../model", "models/../../x"):
        with pytest.raises(UsageError, match="refused"):
            ws.model_ref(bad)


# ------------------------------------------------------------------------------------------------ the form


def test_the_train_form_is_generated_from_the_config_fields():
    settings = {s.key: s for s in form.settings()}
    for section in form.SECTIONS:
        model = config.Config.model_fields[section].annotation
        for name, info in model.model_fields.items():
            key = f"{section}.{name}"
            if key not in form.MANAGED:
                assert settings[key].description == info.description
    assert settings["train.optimizer"].kind == "choice" and "prodigy" in settings["train.optimizer"].choices
    assert settings["train.sample_prompts"].kind == "lines"
    assert settings["train.min_snr_gamma"].optional and settings["train.min_snr_gamma"].kind == "float"
    assert [s.key for s in form.settings()[: len(form.MAIN)]] == list(form.MAIN)
    # An optional switch is a choice with "unset" (blank): a checkbox would turn the base's default into false.
    pivotal = settings["train.pivotal"]
    assert pivotal.kind == "choice" and pivotal.choices == ("", "true", "false") and pivotal.default == ""
    assert settings["train.preservation"].default == "auto"


def test_the_shown_toml_is_the_config_that_runs(ws):
    (ws.root / "models" / "m").mkdir()
    values = form.values_of(None) | {"train.steps": 7, "train.sample_prompts": "a\nb {trigger}", "lora.rank": 8}
    text = training.preview(ws, None, "models/m", values)
    path = ws.root / "c.toml"
    path.write_text(text)
    loaded = config.load(path)
    assert loaded.train.steps == 7 and loaded.lora.rank == 8 and loaded.train.sample_prompts == ["a", "b {trigger}"]
    assert loaded.model.base == str(ws.root / "models" / "m")
    assert loaded.train.resume is None and not loaded.train.overwrite
    assert loaded.train.pivotal is None and loaded.train.preservation == "auto"  # left to train's pre-flight
    for shown, value in (("true", True), ("false", False)):
        path.write_text(training.preview(ws, None, "models/m", values | {"train.pivotal": shown}))
        assert config.load(path).train.pivotal is value
    with pytest.raises(UsageError, match="train.steps"):
        training.preview(ws, None, "models/m", values | {"train.steps": -1})
    with pytest.raises(UsageError, match="refused"):
        training.preview(ws, None, "models/m", values | {"train.class_dir": "/etc"})


def test_presets_fill_the_form():
    presets = training.presets()
    assert "person_sd15.toml" in presets
    values = form.values_of(presets["person_sd15.toml"])
    expected = config.load(presets["person_sd15.toml"])
    assert values["train.steps"] == expected.train.steps and values["lora.rank"] == expected.lora.rank
    assert values["train.pivotal"] == "true" and expected.train.pivotal is True  # the preset's recommended switch
    assert values["train.preservation"] == "class_images"


# ------------------------------------------------------------------------------------------------ runs from disk


def test_runs_started_from_the_command_line_are_found_from_their_files(ws):
    jobs = Jobs(ws)
    top = ws.root / "runs"
    (top / "done").mkdir()
    (top / "done" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (top / "done" / "done.safetensors").write_bytes(b"x")
    (top / "done" / "config.json").write_text(json.dumps({"train": {"steps": 4}}))
    (top / "done" / "metrics.jsonl").write_text('{"step": 4, "loss": 0.1, "lr": 0.001, "seconds_per_step": 0.5}\n')
    (top / "half" / "checkpoints" / "step-000002").mkdir(parents=True)
    (top / "half" / "config.toml").write_text("[train]\nsteps = 4\n")
    (top / "live").mkdir()
    (top / "live" / ".sdlora.lock").write_text(json.dumps({"pid": os.getpid()}))
    (top / "dead").mkdir()
    (top / "dead" / ".sdlora.lock").write_text(json.dumps({"pid": 2**22 + 12345}))
    assert set(runs.run_names(ws, jobs)) == {"done", "half", "live", "dead"}
    states = {name: runs.status(ws, jobs, name) for name in runs.run_names(ws, jobs)}
    assert states["done"].state == "finished" and (states["done"].step, states["done"].total) == (4, 4)
    assert states["half"].state == "stopped" and "resumable" in states["half"].detail
    assert states["live"].state == "running"
    assert states["dead"].state == "stopped"
    assert [p.name for p in runs.downloads(ws, top / "done")] == [
        "pytorch_lora_weights.safetensors",
        "done.safetensors",
    ]
    with pytest.raises(UsageError, match="choose its dataset"):
        training.resume(ws, jobs, "half")


def test_best_step_without_best_json_follows_pick_best(tmp_path):
    """A run whose best/best.json can't be read: the page shows the step sdlora train's rule keeps (recognised rate
    first, with the run's floors), not the highest identity."""
    from sdlora.evaluation.checkpoints import pick_best

    folder = tmp_path / "run"
    folder.mkdir()
    scores = [  # step 2 has the highest identity, step 3 is recognised far more often; step 4 bleeds
        {"step": 2, "eval": {"identity": 0.99, "recognised_rate": 0.20, "bleed": 0.0, "images": 64}},
        {"step": 3, "eval": {"identity": 0.95, "recognised_rate": 0.80, "bleed": 0.0, "images": 64}},
        {"step": 4, "eval": {"identity": 0.97, "recognised_rate": 0.95, "bleed": 0.5, "images": 64}},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    (folder / "config.json").write_text(json.dumps({"eval": {"min_diversity": 0.0, "max_bleed": 0.1}}))
    tail = runs.Tail()
    tail.update(folder)
    assert runs.best_step(tail, folder) == 3 == pick_best([{"step": s["step"], **s["eval"]} for s in scores], 0, 0.1)[0]
    (folder / "config.json").write_text("{damaged")  # no floors: bleed no longer rules step 4 out
    assert runs.best_step(tail, folder) == 4
    (folder / "best").mkdir()
    (folder / "best" / "best.json").write_text(json.dumps({"step": 2}))  # what best/ holds wins
    assert runs.best_step(tail, folder) == 2


def test_the_live_tail_reads_only_new_lines_and_new_samples(tmp_path):
    folder = tmp_path / "run"
    (folder / "samples").mkdir(parents=True)
    metrics = folder / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0, "lr": 0.1, "seconds_per_step": 0.5}\n{"step": 2, "lo')
    tail = runs.Tail()
    assert tail.update(folder) and [r["step"] for r in tail.losses] == [1]
    offset = tail.offset
    assert not tail.update(folder) and tail.offset == offset  # a half-written line waits
    with metrics.open("a") as handle:
        handle.write('ss": 0.9, "lr": 0.1, "seconds_per_step": 0.5}\n{"step": 2, "eval": {"identity": 0.4}}\n')
    (folder / "samples" / "step-000002.png").write_bytes(b"png")
    assert tail.update(folder)
    assert [r["step"] for r in tail.losses] == [1, 2] and tail.evals[0]["eval"]["identity"] == 0.4
    assert tail.samples == ["step-000002.png"]
    assert tail.speed(10) == "step 2/10, loss 0.9000, 2.00 it/s, ETA 0:00:04"
    assert not tail.update(folder)
    metrics.write_text('{"step": 1, "loss": 1.0, "lr": 0.1, "seconds_per_step": 0.5}\n')  # a resume truncated it
    assert tail.update(folder) and [r["step"] for r in tail.losses] == [1]


def test_a_failed_run_shows_its_error_line_and_a_second_start_queues(ws):
    jobs = Jobs(ws)
    (ws.root / "datasets" / "d").mkdir()
    (ws.root / "models" / "m").mkdir()
    values = form.values_of(None) | QUICK
    # The base is an empty folder: train fails at once with one error line.
    training.start(ws, jobs, "d", "bad", None, "models/m", values)
    training.start(ws, jobs, "d", "second", None, "models/m", values)
    assert runs.status(ws, jobs, "second").state == "queued"
    assert "second" in runs.run_names(ws, jobs)
    wait_for(
        lambda: runs.status(ws, jobs, "bad").state == "failed", STALL, "the bad run to fail", progress=activity(ws.root)
    )
    failed = runs.status(ws, jobs, "bad")
    assert failed.detail.startswith("error: ") and "Traceback" not in failed.detail
    assert "bad" in runs.run_names(ws, jobs)  # listed with its error line, folder or not (issue 33)
    jobs.tick()  # the queue moves on without the page
    assert runs.status(ws, jobs, "second").state in ("running", "failed")
    wait_for(
        lambda: runs.status(ws, jobs, "second").state == "failed",
        STALL,
        "the second run to fail",
        progress=activity(ws.root),
    )
    # A new server process (fresh Jobs) knows the same runs from disk.
    assert runs.status(ws, Jobs(ws), "bad").line() == failed.line()
    # Its name is free again, also when train had made its folder (train replaces it: --overwrite); a run with a
    # checkpoint keeps its name.
    (ws.root / "runs" / "bad").mkdir(exist_ok=True)
    training.start(ws, jobs, "d", "bad", None, "models/m", values)
    assert jobs.latest_for("runs/bad").argv[-1] == "--overwrite"
    (ws.root / "runs" / "kept" / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(UsageError, match="already exists"):
        training.start(ws, jobs, "d", "kept", None, "models/m", values)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_upload_prep_train_stop_resume_eval(tmp_path, tiny_sd1):
    ws = Workspace.open(make_workspace(tmp_path / "ws", tiny_sd1))
    jobs = Jobs(ws)
    seen: list[float | None] = []
    view = datasets.prepare(
        ws,
        datasets.save_uploads(ws, photo_files(tmp_path / "camera"), "me").name,
        "me",
        resolution=64,
        progress=lambda fraction, text: seen.append(fraction),
    )
    assert len(view.kept) == 3 and all(caption == "a photo of sks person" for _, caption, _ in view.kept)
    # IMG_0008 is the quality-70 re-encode of IMG_0001: prep keeps the original (issue 17's duplicate rule)
    assert {(file, reason) for _, file, reason, _ in view.dropped} == {
        ("IMG_0008.jpg", "near-duplicate"),
        ("IMG_0010.jpg", "no face found"),
    }
    assert all(photo is not None and photo.is_file() for photo, *_ in view.dropped)
    assert 1.0 in seen  # the progress bar of prep reached the page
    before = {p: p.read_bytes() for p in (ws.root / "photos" / "me").iterdir()}
    edited = datasets.save_edits(ws, "me", "me-edited", ["images/0001.png"], {"images/0000.png": "sks person smiling"})
    assert [c for _, c, _ in edited.kept] == ["sks person smiling", "a photo of sks person"]
    assert {p: p.read_bytes() for p in (ws.root / "photos" / "me").iterdir()} == before
    assert len(datasets.view(ws, "me").kept) == 3  # the source dataset is untouched

    values = form.values_of(None) | QUICK
    training.start(ws, jobs, "me", "lora", None, "models/tiny-sd1", values)
    assert runs.run_names(ws, jobs) == ["lora"]
    folder = ws.root / "runs" / "lora"
    tail = runs.Tail()
    wait_for(
        lambda: tail.update(folder) or bool(tail.losses), STALL, "the first metrics line", progress=activity(ws.root)
    )
    assert runs.status(ws, jobs, "lora").state == "running"
    assert training.stop(ws, jobs, "lora").endswith("checkpoint is written)")
    wait_for(
        lambda: runs.status(ws, jobs, "lora").state != "running", STALL, "the run to stop", progress=activity(ws.root)
    )
    stopped = runs.status(ws, jobs, "lora")
    assert stopped.state == "stopped" and stopped.step < 4, stopped
    assert runs.checkpoints(folder) and not (folder / runs.DIFFUSERS_FILE).exists()

    training.resume(ws, jobs, "lora")

    def at_last_step() -> bool:
        tail.update(folder)
        return tail.losses[-1]["step"] == 4

    wait_for(at_last_step, STALL, "the resumed run's last step", progress=activity(ws.root))
    wait_for(
        lambda: runs.status(ws, jobs, "lora").state != "running",
        STALL,
        "the resumed run to end",
        progress=activity(ws.root),
    )
    assert runs.status(ws, jobs, "lora").line() == "lora: finished step 4/4"
    tail.update(folder)  # the last identity score and sample came after the last loss line
    assert [r["step"] for r in tail.losses] == [1, 2, 3, 4]  # progress moved, the resume continued the run
    assert tail.evals and tail.samples[-1] == "step-000004.png"
    offered = [p.name for p in runs.downloads(ws, folder)]
    # The defaults train with pivotal tuning: its embeddings file goes with the kohya file to A1111/ComfyUI.
    assert offered == ["pytorch_lora_weights.safetensors", "lora.safetensors", "lora_emb.safetensors", "lora-best.zip"]
    assert runs.summary(folder)["best_step"] == runs.best_step(tail, folder)

    assert studio.lora_choices(ws)[0] == "runs/lora"
    # studio.generate with a run's LoRA (n=2, steps=4, compare) is checked where the page's Generate button calls
    # it with those values: test_serve_browser.py::test_click_through_the_workflow (one render less here).
    result = studio.evaluate(ws, "lora", "me-edited", n=1)
    assert result.summary["images"] > 0
    assert (ws.root / result.report).is_file() and result.report.startswith("runs/lora/eval/")


@pytest.mark.slow
def test_a_run_survives_the_server_and_stop_reaches_it(tmp_path, tiny_sd1):
    """A run started by one server process is listed, stopped and resumed by another (the first one gone)."""
    ws = Workspace.open(make_workspace(tmp_path / "ws", tiny_sd1))
    from train_utils import subject_set

    subject_set(ws.root / "datasets" / "d")
    script = (
        "import sys, json\n"
        "from sdlora.serve.workspace import Workspace\nfrom sdlora.serve.jobs import Jobs\n"
        "from sdlora.serve import training, form\n"
        f"ws = Workspace.open({str(ws.root)!r})\n"
        "values = form.values_of(None) | json.loads(sys.argv[1])\n"
        "print(training.start(ws, Jobs(ws), 'd', 'long', None, 'models/tiny-sd1', values))\n"
    )
    values = QUICK | {"train.steps": 100000, "train.sample_every": 0, "train.eval_every": 0}
    values["train.checkpoint_every"] = 0
    server = subprocess.run([sys.executable, "-c", script, json.dumps(values)], capture_output=True, text=True)
    assert server.returncode == 0, server.stderr
    jobs = Jobs(ws)  # "the restarted server"
    folder = ws.root / "runs" / "long"
    wait_for(lambda: (runs.last_step(folder) or 0) >= 2, STALL, "training to run", progress=activity(ws.root))
    assert runs.status(ws, jobs, "long").state == "running"
    job = jobs.latest_for("runs/long")
    assert os.getpgid(job.pid) == job.pid  # its own session and process group
    jobs.stop("runs/long")
    wait_for(
        lambda: runs.status(ws, jobs, "long").state != "running", STALL, "the run to stop", progress=activity(ws.root)
    )
    assert jobs.returncode(jobs.latest_for("runs/long")) == 128 + signal.SIGTERM
    assert runs.status(ws, jobs, "long").state == "stopped" and runs.checkpoints(folder)
