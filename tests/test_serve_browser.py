"""`sdlora serve` in a real browser: Debian's headless chromium driven by playwright's Python package.

It fails (never skips) without /usr/bin/chromium: `.ci/run` installs it. The slow test clicks through the whole
workflow on the tiny model and saves a screenshot of each page into docs/ui/ (shown in the README).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serve_utils import make_workspace, photo_files, wait_for

from sdlora.serve import studio
from sdlora.serve.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "docs" / "ui"
# Flags that keep chromium off the network (no updates, sync or QUIC probes).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workspace: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "sdlora", "serve", str(workspace), "--port", str(port), *extra]
    log = (workspace.parent / f"serve-{port}.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert server.poll() is None, (workspace.parent / f"serve-{port}.log").read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    wait_for(up, 90, "the server to answer", every=0.5)
    return server, url


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("browser")
    workspace = make_workspace(root / "ws", tiny_sd1)
    server, url = start_server(workspace)
    yield workspace, url
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), "no /usr/bin/chromium: apt-get install chromium (.ci/run does)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    hosts: set[str] = set()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
    page.goto(served[1])
    page.get_by_role("tab", name="Photos").wait_for()
    yield page
    assert hosts <= {served[1].split("/")[2]}, f"the page fetched from elsewhere: {hosts}"  # nothing off the box
    page.close()


def status_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(value)
    box.press("Tab")


def fold(page, section: str) -> None:
    """Open (or close) the form's accordion of a config section."""
    page.get_by_role("button", name=re.compile(rf"^\[{section}\]")).click()


def test_page_renders_offline_and_errors_are_one_line(page, served):
    for tab in ("Photos", "Train", "Runs", "Generate", "Evaluate"):
        assert page.get_by_role("tab", name=tab).is_visible()
    page.locator("#prepare").click()
    wait_for(lambda: status_of(page, "photos-status") != "", 30, "the status line")
    assert status_of(page, "photos-status") == "error: upload photos or pick a folder under photos/ first"
    assert page.locator("text=Traceback").count() == 0
    page.get_by_role("tab", name="Train").click()
    page.locator("#setting-train-steps input").wait_for()
    assert page.locator("#toml").is_visible()


def test_files_outside_the_data_folders_are_not_served(served, tmp_path):
    workspace, url = served
    (workspace / ".sdlora-serve" / "jobs" / "x.json").write_text("{}")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG private-bytes")
    (workspace / "runs" / "out").symlink_to(tmp_path, target_is_directory=True)
    for path in (
        "/etc/passwd",
        f"{workspace}/.sdlora-serve/jobs/x.json",
        f"{workspace}/runs/../.sdlora-serve/jobs/x.json",
        f"{workspace}/runs/out/secret.png",
        str(outside),
    ):
        code, body = get(url + "gradio_api/file=" + path)
        assert code in (403, 404) and b"private-bytes" not in body, path
    for path in ("x/y/..%2F..%2F..%2F.sdlora-serve/jobs/x.json", "out/../eval/index.html", "..%2F..%2Fetc/x/passwd"):
        assert get(url + "sdlora/report/" + path)[0] == 404, path


def test_a_login_is_required_with_auth(tmp_path):
    workspace = tmp_path / "ws"
    server, url = start_server(workspace, "--auth", "ann:secret")
    try:
        assert get(url + "config")[0] == 401
        assert get(url + "sdlora/report/r/s/index.html")[0] == 401
        assert get(url + "gradio_api/file=" + str(workspace / "runs"))[0] == 401
    finally:
        stop_server(server)


@pytest.mark.slow
def test_click_through_the_workflow(page, served, tmp_path):
    """Photos -> Train -> Runs -> Generate -> Evaluate in the page, a screenshot of each in docs/ui/."""
    workspace = served[0]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in photo_files(tmp_path / "camera")])
    fill(page, "prep-resolution", "64")
    page.locator("#prepare").click()
    wait_for(lambda: status_of(page, "photos-status").startswith(("me:", "error")), 120, "prep", every=0.5)
    assert status_of(page, "photos-status") == "me: kept 3, dropped 2"
    assert page.locator("#kept img").count() == 3 and page.locator("#dropped img").count() == 2
    assert page.get_by_text("no face found").first.is_visible()
    page.screenshot(path=str(SHOTS / "1-photos.png"), full_page=True)

    page.get_by_role("tab", name="Train").click()
    choose(page, "train-dataset", "me")
    choose(page, "base", "models/tiny-sd1")
    for key, value in {"train-steps": "4", "train-resolution": "64", "lora-rank": "4", "lora-alpha": "4"}.items():
        fill(page, f"setting-{key}", value)
    fill(page, "setting-train-checkpoint_every", "2")
    fill(page, "setting-train-sample_every", "2")
    page.locator("#more-settings").get_by_text("All other settings").click()
    fold(page, "train")
    fill(page, "setting-train-sample_steps", "4")
    fill(page, "setting-train-log_every", "1")
    fill(page, "setting-train-eval_every", "4")
    fold(page, "eval")
    fill(page, "setting-eval-n", "1")
    wait_for(lambda: "sample_steps = 4" in status_of(page, "toml"), 30, "the config.toml preview")
    assert "steps = 4" in status_of(page, "toml")
    page.locator("#start").click()
    wait_for(lambda: "me-lora" in status_of(page, "train-status"), 60, "the run to start")
    fold(page, "train")  # fold the long form again for the screenshot
    fold(page, "eval")
    page.screenshot(path=str(SHOTS / "2-train.png"), full_page=True)

    page.get_by_role("tab", name="Runs").click()
    page.locator("#refresh-runs").click()
    choose(page, "run", "me-lora")
    wait_for(lambda: "me-lora: running" in status_of(page, "run-status"), 60, "the run to show as running")
    wait_for(lambda: status_of(page, "run-status") == "me-lora: finished step 4/4", 240, "the run to end", every=1)
    wait_for(lambda: page.locator("#samples img").count() == 2, 30, "the sample grids")
    offered = ("pytorch_lora_weights", "me-lora-best")  # the diffusers LoRA, best/ zipped (and the kohya file)
    wait_for(lambda: all(name in page.locator("#files").inner_text() for name in offered), 30, "the downloads")
    # The kohya file and, as the defaults train with pivotal tuning, its embeddings for A1111/ComfyUI.
    assert page.locator("#files").inner_text().count(".safetensors") == 3
    assert "me-lora_emb" in page.locator("#files").inner_text()
    assert "loss" in status_of(page, "run-speed")
    page.screenshot(path=str(SHOTS / "3-runs.png"), full_page=True)

    page.get_by_role("tab", name="Generate").click()
    choose(page, "gen-lora", "runs/me-lora")
    fill(page, "gen-n", "2")
    fill(page, "gen-steps", "4")
    page.locator("#generate").click()
    wait_for(lambda: status_of(page, "gen-status").startswith(("wrote", "error")), 120, "generate", every=0.5)
    assert status_of(page, "gen-status").startswith("wrote 2 image(s) to images/")
    assert page.locator("#gen-gallery img").count() == 2
    # The page's defaults (seed 42, cfg 7, compare on) with n=2, steps=4: studio.generate's folder, as
    # test_serve.py's end-to-end test checked it when it rendered the same call itself.
    folder = workspace / status_of(page, "gen-status").removeprefix("wrote 2 image(s) to ")
    images = studio.images_of(Workspace.open(workspace), folder)
    assert [p.name for p, _ in images.images] == ["0000-42.png", "0001-43.png"]
    assert "prompt: a photo of sks person, seed: 42" in images.images[0][1]
    assert images.compare is not None and images.grid is not None
    page.screenshot(path=str(SHOTS / "4-generate.png"), full_page=True)

    page.get_by_role("tab", name="Evaluate").click()
    choose(page, "eval-run", "me-lora")
    choose(page, "eval-reference", "me")
    page.locator("#evaluate").click()
    wait_for(lambda: status_of(page, "eval-status").startswith(("scored", "error")), 180, "eval", every=0.5)
    assert status_of(page, "eval-status").startswith("scored 10 images")
    page.screenshot(path=str(SHOTS / "5-evaluate.png"), full_page=True)
    with page.expect_popup() as popup:
        page.locator("#report-link").click()
    report = popup.value
    report.wait_for_load_state()
    assert "sdlora eval" in report.title().lower() or report.locator("img").count() > 0
    report.close()
