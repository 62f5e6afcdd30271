"""`sdlora serve` as a boundary, unit by unit (no browser, no training): nothing outside the workspace is read, zipped,
shown or served through a symlink; form fields that name files; the port, auth-file, login and upload checks; the
queue when a job's runner dies; the one action that works for a run stopped early; one-line errors everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import zipfile

import pytest
from serve_utils import wait_for

from sdlora import fsutil
from sdlora.errors import SdloraError, UsageError
from sdlora.serve import credentials, datasets, form, runs, studio, training
from sdlora.serve.boundary import (
    CACHE_AGE_S,
    CACHE_CLEAN_S,
    LoginThrottle,
    Throttle,
    UploadLimit,
    check_port,
    clean_cache,
)
from sdlora.serve.jobs import Jobs
from sdlora.serve.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


@pytest.fixture
def secret(tmp_path):
    """A private folder outside the workspace, with a key and a PNG in it."""
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "id_rsa").write_text("PRIVATE KEY")
    (folder / "step-000001.png").write_bytes(b"\x89PNG private")
    (folder / "summary.json").write_text(json.dumps({"secret": "private"}))
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "lr": 0.1, "private": true}\n')
    return folder


# ------------------------------------------------------------------------------------------------ symlinks out


def test_a_symlinked_best_folder_is_not_zipped_nor_offered(ws, secret):
    run = ws.root / "runs" / "r"
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (run / "best").symlink_to(secret, target_is_directory=True)
    (run / "r.safetensors").symlink_to(secret / "id_rsa")
    offered = runs.downloads(ws, run)
    assert [p.name for p in offered] == ["pytorch_lora_weights.safetensors"]
    assert not (ws.state / "downloads" / "r-best.zip").exists()
    # A real best/ with a link inside: zipped without what the link points at.
    (run / "best").unlink()
    (run / "best").mkdir()
    (run / "best" / "best.json").write_text('{"step": 1}')
    (run / "best" / "key").symlink_to(secret / "id_rsa")
    (run / "best" / "sub").symlink_to(secret, target_is_directory=True)
    archive = runs.downloads(ws, run)[-1]
    with zipfile.ZipFile(archive) as opened:
        assert opened.namelist() == ["best/best.json"]
        assert all(b"PRIVATE" not in opened.read(name) for name in opened.namelist())


def test_files_behind_symlinks_in_a_run_are_not_read_or_shown(ws, secret, tmp_path):
    run = ws.root / "runs" / "r"
    run.mkdir()
    (run / "samples").symlink_to(secret, target_is_directory=True)
    for name in ("summary.json", "metrics.jsonl"):
        (run / name).symlink_to(secret / name)
    (run / "config.json").symlink_to(secret / "summary.json")
    tail = runs.Tail()
    assert not tail.update(run) and tail.samples == [] and tail.losses == []
    assert runs.summary(run) is None and runs.run_config(run) == {} and runs.last_step(run) is None
    assert runs.sample_files(run, ["step-000001.png"]) == []
    # A real samples/ folder with one real grid and one link out: only the real one is shown.
    (run / "samples").unlink()
    (run / "samples").mkdir()
    (run / "samples" / "step-000002.png").write_bytes(b"png")
    (run / "samples" / "step-000001.png").symlink_to(secret / "step-000001.png")
    assert tail.update(run) and tail.samples == ["step-000002.png"]
    assert runs.sample_files(run, ["step-000001.png", "step-000002.png"]) == [run / "samples" / "step-000002.png"]
    # Nor is a LoRA file linked out offered to Generate.
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (run / "r.safetensors").symlink_to(secret / "id_rsa")
    # (issue 33: the pickers offer the run, not its diffusers file again, as the same LoRA in another format)
    assert studio.lora_choices(ws) == ["runs/r"] and "runs/r/r.safetensors" not in studio.lora_choices(ws)
    (run / "pytorch_lora_weights.safetensors").unlink()  # without it, the run's other files are offered: not the link
    assert studio.lora_choices(ws) == []


def test_prep_refuses_photos_linked_from_outside(ws, secret, monkeypatch):
    started = []
    monkeypatch.setattr(datasets, "run_sdlora", lambda *args, **kwargs: started.append(args))
    photos = ws.root / "photos" / "me"
    photos.mkdir()
    (photos / "IMG_0001.jpg").write_bytes(b"jpeg")
    (photos / "IMG_0002.png").symlink_to(secret / "step-000001.png")
    with pytest.raises(UsageError, match=r"photos/me/IMG_0002.png: a link to outside photos/"):
        datasets.prepare(ws, "me", "me")
    assert not started and not (ws.root / "datasets" / "me").exists()


def test_dataset_files_linked_from_outside_are_not_read(ws, secret):
    folder = ws.root / "datasets" / "d"
    folder.mkdir()
    (folder / "manifest.jsonl").symlink_to(secret / "metrics.jsonl")
    with pytest.raises(UsageError, match="a link to elsewhere"):
        datasets.view(ws, "d")


def test_every_text_setting_of_the_form_is_checked_as_what_it_holds():
    text = {s.key for s in form.settings() if s.kind in ("text", "lines")}
    classes = [set(training.PATH_SETTINGS), set(training.NAME_SETTINGS), set(training.TEXT_SETTINGS)]
    assert set().union(*classes) == text, "a new text setting: say in training.py whether it names a path"
    assert sum(len(c) for c in classes) == len(text)


def test_form_fields_that_name_files_stay_inside(ws, tmp_path):
    (ws.root / "models" / "m").mkdir()
    (ws.root / "models" / "clip").mkdir()
    values = form.values_of(None)
    for key in training.PATH_SETTINGS:
        for bad in ("/etc", str(tmp_path), "../outside", "~/x"):
            with pytest.raises(UsageError, match=rf"^{key}: .*refused"):
                training.preview(ws, None, "models/m", values | {key: bad})
    text = training.preview(ws, None, "models/m", values | {"eval.clip": "models/clip"})
    assert f'clip = "{ws.root / "models" / "clip"}"' in text
    assert 'clip = "openai/clip-vit-base-patch32"' in training.preview(
        ws, None, "models/m", values | {"eval.clip": "openai/clip-vit-base-patch32"}
    )
    with pytest.raises(UsageError, match="train.name: .* not a plain file name"):
        training.preview(ws, None, "models/m", values | {"train.name": "../../x"})


# ------------------------------------------------------------------------------------------------ login, port, uploads


def test_an_auth_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "auth"
    path.write_text("ann:one\n")
    path.chmod(0o644)
    with pytest.raises(UsageError, match=rf"^--auth-file {path}: other users can read it \(mode 644\); chmod 600"):
        credentials("0.0.0.0", None, path)
    path.chmod(0o600)
    assert credentials("0.0.0.0", None, path) == [("ann", "one")]


def test_failed_logins_lock_a_client_out_for_longer_each_time():
    now = [1000.0]
    throttle = Throttle(free=3, cap=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait("1.2.3.4") == 0
        throttle.record("1.2.3.4", ok=False)
    waits = []
    for _ in range(8):
        waits.append(throttle.wait("1.2.3.4"))
        now[0] += waits[-1]
        throttle.record("1.2.3.4", ok=False)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
    assert throttle.wait("5.6.7.8") == 0  # per client
    now[0] += 60
    throttle.record("1.2.3.4", ok=True)
    assert throttle.wait("1.2.3.4") == 0


def _asgi(middleware_of, path: str, headers: list | None = None, client: str = "9.9.9.9") -> tuple[int, dict, bytes]:
    """One POST through an ASGI middleware in front of an app that answers 400 (a wrong password) or 200."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"Incorrect credentials."})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [], "client": (client, 1)}
    asyncio.run(middleware_of(app)(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_the_login_route_answers_429_during_a_lockout():
    throttle = Throttle(free=2)
    statuses = [_asgi(lambda app: LoginThrottle(app, throttle), "/login")[0] for _ in range(3)]
    assert statuses == [400, 400, 429]
    status, headers, body = _asgi(lambda app: LoginThrottle(app, throttle), "/gradio_api/login/")
    assert status == 429 and int(headers[b"retry-after"]) >= 1 and b"too many failed logins from 9.9.9.9" in body
    assert _asgi(lambda app: LoginThrottle(app, throttle), "/login", client="8.8.8.8")[0] == 400
    assert _asgi(lambda app: LoginThrottle(app, throttle), "/gradio_api/upload")[0] == 400  # only logins


def test_uploads_are_refused_when_the_cache_is_full(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "old.jpg").write_bytes(b"x" * 600)

    def limited(app):
        return UploadLimit(app, cache, limit=1000)

    assert _asgi(limited, "/gradio_api/upload", [(b"content-length", b"300")])[0] == 400  # passed on
    status, _, body = _asgi(limited, "/gradio_api/upload", [(b"content-length", b"500")])
    assert status == 413 and b"the upload cache is full" in body
    assert _asgi(limited, "/gradio_api/upload")[0] == 411  # a size it does not say can't be bounded


def test_the_upload_cache_is_bounded_and_cleaned(tmp_path):
    from sdlora.serve.app import build

    cache = tmp_path / "cache"
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "old.jpg").write_bytes(b"x" * 100)
    os.utime(cache / "abc" / "old.jpg", (time.time() - 7200,) * 2)
    (cache / "new").mkdir()
    (cache / "new" / "new.jpg").write_bytes(b"y")
    assert clean_cache(cache, age=3600) == 100  # an earlier server's leftovers
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == ["new", "new/new.jpg"]
    ws = Workspace.open(tmp_path / "ws")
    assert build(ws, Jobs(ws)).delete_cache == (CACHE_CLEAN_S, CACHE_AGE_S)  # gradio cleans its own files


def test_a_port_in_use_or_out_of_range_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SdloraError, match=rf"^--port {port}: already in use on 127.0.0.1 .* --port N$"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again
    for bad in (0, 99999, -1):
        with pytest.raises(UsageError, match=rf"^--port {bad}: not a port; give one from 1 to 65535"):
            check_port("127.0.0.1", bad)


# ------------------------------------------------------------------------------------------------ the queue


class Sleeping(Jobs):
    """Jobs whose command is a process that sleeps until it is stopped (a training, without the training)."""

    def command(self, job):
        return [sys.executable, "-c", "import time; time.sleep(120)"]


def _trainer_pid(jobs: Jobs, run: str) -> int:
    """The pid of a job's training process (the runner's child), once it runs."""
    import psutil

    runner = psutil.Process(jobs.latest_for(run).pid)
    wait_for(lambda: bool(runner.children()), 30, "the runner to start its command")
    time.sleep(0.5)  # the runner records its child right after starting it
    return runner.children()[0].pid


def test_the_queue_holds_while_a_training_whose_runner_died_still_runs(ws):
    jobs = Sleeping(ws)
    first = jobs.submit("runs/a", "datasets/d", ["train"])
    jobs.submit("runs/b", "datasets/d", ["train"])
    trainer = _trainer_pid(jobs, "runs/a")
    try:
        os.kill(first.pid, signal.SIGKILL)  # the runner dies; its training goes on
        wait_for(lambda: jobs._children[first.pid].poll() is not None, 30, "the runner to die")
        jobs.tick()
        assert jobs.state(jobs.latest_for("runs/a")) == "running"
        assert jobs.state(jobs.latest_for("runs/b")) == "queued"  # never two trainings at once
        assert jobs.stop("runs/a").startswith("runs/a: stopping")  # Stop reaches the training itself
        wait_for(lambda: jobs.state(jobs.latest_for("runs/a")) == "ended", 30, "the training to stop")
        jobs.tick()
        assert jobs.state(jobs.latest_for("runs/b")) == "running"
    finally:
        for pid in (trainer, jobs.latest_for("runs/b").pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed(ws):
    jobs = Sleeping(ws)
    (ws.root / "datasets" / "d").mkdir()
    (ws.root / "models" / "m").mkdir()
    training.start(ws, jobs, "d", "early", None, "models/m", form.values_of(None))
    _trainer_pid(jobs, "runs/early")
    (ws.root / "runs" / "early").mkdir()  # train made its folder, then...
    fsutil.write_marker(ws.root / "runs" / "early", fsutil.new_marker("train"))
    jobs.stop("runs/early")  # ... Stop came while the model loaded
    wait_for(lambda: runs.status(ws, jobs, "early").state != "running", 30, "the run to stop")
    stopped = runs.status(ws, jobs, "early")
    assert stopped.line() == "early: stopped (before its first checkpoint; Resume starts it again from step 0)"
    with pytest.raises(UsageError, match="already exists; choose another name"):
        training.start(ws, jobs, "d", "early", None, "models/m", form.values_of(None))
    assert training.resume(ws, jobs, "early") == "runs/early: resumed"
    argv = jobs.latest_for("runs/early").argv
    assert argv[-2:] == ["--resume", "latest"] and argv[argv.index("--config") + 1].endswith("early.config.toml")
    jobs.stop("runs/early")


def test_a_run_stopped_before_it_wrote_anything_can_be_started_again(ws):
    jobs = Sleeping(ws)
    (ws.root / "datasets" / "d").mkdir()
    (ws.root / "models" / "m").mkdir()
    training.start(ws, jobs, "d", "early", None, "models/m", form.values_of(None))
    _trainer_pid(jobs, "runs/early")
    jobs.stop("runs/early")
    wait_for(lambda: runs.status(ws, jobs, "early").state != "running", 30, "the run to stop")
    assert runs.status(ws, jobs, "early").detail == "before its first checkpoint; nothing was written: Start it again"
    assert training.start(ws, jobs, "d", "early", None, "models/m", form.values_of(None)).startswith("early: running")
    jobs.stop("runs/early")


# ------------------------------------------------------------------------------------------------ one-line errors


def test_an_error_line_after_terminal_codes_is_found(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "error: an earlier, unrelated line\n"
        " 50%|#####     | 2/4 [00:01<00:01]\r\x1b[2K\x1b[31merror: base: no such model\x1b[0m\n"
        "\x1b[?25h"
    )
    assert runs.error_line(log) == "error: base: no such model"


def test_every_handler_of_the_page_shows_one_line_errors(ws):
    from sdlora.serve.app import build

    demo = build(ws, Jobs(ws))
    handlers = [block.fn for block in demo.fns.values() if block.fn is not None]
    assert len(handlers) >= 10
    unguarded = [getattr(fn, "__name__", fn) for fn in handlers if not getattr(fn, "guarded", False)]
    assert unguarded == [], "every handler goes through page.guarded"


def test_handler_errors_are_the_cli_s_one_line_message(ws):
    import gradio as gr

    from sdlora.serve.page import guarded

    @guarded(2)
    def with_status():
        raise FileNotFoundError(2, "No such file or directory", str(ws.root / "models"))

    message, rest = with_status()
    assert message.startswith(f"error: {ws.root / 'models'}: no such file or folder") and "\n" not in message

    @guarded(None)
    def without_status():
        raise KeyError("x")

    with pytest.raises(gr.Error) as raised:
        without_status()
    assert raised.value.message.startswith("error: unexpected KeyError: 'x'; this is a bug in sdlora")
    from sdlora.serve.app import build

    demo = build(ws, Jobs(ws))
    (ws.root / "models").rmdir()  # the refresh of the lists: a missing folder is a one-line error, not 'Error'
    refresh = next(block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "refresh")
    with pytest.raises(gr.Error) as raised:
        refresh()
    assert raised.value.message.startswith(f"error: {ws.root / 'models'}: no such file or folder")
