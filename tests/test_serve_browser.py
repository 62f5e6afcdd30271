"""`sdlora serve` in a real browser: Debian's headless chromium driven by playwright's Python package.

Without /usr/bin/chromium these tests skip with one line saying so, on a newcomer's machine; under CI (CI=true,
which `.ci/run` sets and installs chromium) they fail instead, so CI never passes without them. The server-side
checks that need no browser are in test_serve_server.py. The slow test clicks through the whole workflow on the
tiny model and takes a screenshot of each page into a temporary folder, or into `--screenshots DIR`:
docs/ui/screenshots.sh regenerates the README's screenshots with it (tests never write tracked files).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from serve_utils import STALL, activity, make_workspace, photo_files, start_server, stop_server, wait_for

from sdlora.serve import studio
from sdlora.serve.workspace import Workspace

CHROMIUM = Path("/usr/bin/chromium")
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


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sd1):
    root = tmp_path_factory.mktemp("browser")
    workspace = make_workspace(root / "ws", tiny_sd1)
    server, url = start_server(workspace)
    yield workspace, url
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        missing = "no /usr/bin/chromium for the browser tests: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)  # CI installs it: there a missing browser is a broken set-up, not a skip
        pytest.skip(missing)
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


@pytest.mark.slow  # a real browser and server (~10 s): outside the quick run's 3 minutes
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


@pytest.mark.slow
def test_click_through_the_workflow(page, served, tmp_path, request):
    """Photos -> Train -> Runs -> Generate -> Evaluate in the page, a screenshot of each (for docs/ui/). Each wait
    follows the work (files written, steps, progress bars): a busy machine is waited for, a hung command fails."""
    workspace = served[0]
    shots = Path(request.config.getoption("--screenshots") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    busy = activity(workspace)
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in photo_files(tmp_path / "camera")])
    fill(page, "prep-resolution", "64")
    page.locator("#prepare").click()
    wait_for(
        lambda: status_of(page, "photos-status").startswith(("me:", "error")), STALL, "prep", every=0.5, progress=busy
    )
    assert status_of(page, "photos-status") == "me: kept 3, dropped 2"
    assert page.locator("#kept img").count() == 3 and page.locator("#dropped img").count() == 2
    assert page.get_by_text("no face found").first.is_visible()
    page.screenshot(path=str(shots / "1-photos.png"), full_page=True)

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
    wait_for(lambda: "me-lora" in status_of(page, "train-status"), STALL, "the run to start", progress=busy)
    fold(page, "train")  # fold the long form again for the screenshot
    fold(page, "eval")
    page.screenshot(path=str(shots / "2-train.png"), full_page=True)

    page.get_by_role("tab", name="Runs").click()
    page.locator("#refresh-runs").click()
    choose(page, "run", "me-lora")
    wait_for(
        lambda: "me-lora: running" in status_of(page, "run-status"), STALL, "the run to show as running", progress=busy
    )
    wait_for(
        lambda: status_of(page, "run-status") == "me-lora: finished step 4/4",
        STALL,
        "the run to end",
        every=1,
        progress=busy,
    )
    wait_for(lambda: page.locator("#samples img").count() == 2, 30, "the sample grids")
    offered = ("pytorch_lora_weights", "me-lora-best")  # the diffusers LoRA, best/ zipped (and the kohya file)
    wait_for(lambda: all(name in page.locator("#files").inner_text() for name in offered), 30, "the downloads")
    # The kohya file and, as the defaults train with pivotal tuning, its embeddings for A1111/ComfyUI.
    assert page.locator("#files").inner_text().count(".safetensors") == 3
    assert "me-lora_emb" in page.locator("#files").inner_text()
    assert "loss" in status_of(page, "run-speed")
    page.screenshot(path=str(shots / "3-runs.png"), full_page=True)

    page.get_by_role("tab", name="Generate").click()
    choose(page, "gen-lora", "runs/me-lora")
    fill(page, "gen-n", "2")
    fill(page, "gen-steps", "4")
    page.locator("#generate").click()
    wait_for(
        lambda: status_of(page, "gen-status").startswith(("wrote", "error")),
        STALL,
        "generate",
        every=0.5,
        progress=busy,
    )
    assert status_of(page, "gen-status").startswith("wrote 2 image(s) to images/")
    assert page.locator("#gen-gallery img").count() == 2
    # The page's defaults (seed 42, the base's own guidance, compare on) with n=2, steps=4: studio.generate's folder, as
    # test_serve.py's end-to-end test checked it when it rendered the same call itself.
    folder = workspace / status_of(page, "gen-status").removeprefix("wrote 2 image(s) to ")
    images = studio.images_of(Workspace.open(workspace), folder)
    assert [p.name for p, _ in images.images] == ["0000-42.png", "0001-43.png"]
    assert "prompt: a photo of sks person, seed: 42" in images.images[0][1]
    assert images.compare is not None and images.grid is not None
    page.screenshot(path=str(shots / "4-generate.png"), full_page=True)

    page.get_by_role("tab", name="Evaluate").click()
    choose(page, "eval-run", "me-lora")
    choose(page, "eval-reference", "me")
    page.locator("#evaluate").click()
    wait_for(
        lambda: status_of(page, "eval-status").startswith(("scored", "error")), STALL, "eval", every=0.5, progress=busy
    )
    assert status_of(page, "eval-status").startswith("scored 10 images")
    page.screenshot(path=str(shots / "5-evaluate.png"), full_page=True)
    with page.expect_popup() as popup:
        page.locator("#report-link").click()
    report = popup.value
    report.wait_for_load_state()
    assert "sdlora eval" in report.title().lower() or report.locator("img").count() > 0
    report.close()
