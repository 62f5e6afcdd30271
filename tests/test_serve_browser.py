"""`sdlora serve` in a real browser: Debian's headless chromium driven by playwright's Python package.

Without /usr/bin/chromium these tests skip with one line saying so, on a newcomer's machine; under CI (CI=true,
which `.ci/run` sets and installs chromium) they fail instead, so CI never passes without them. The server-side
checks that need no browser are in test_serve_server.py and test_serve_page.py. The slow test clicks through the
whole workflow on the tiny model, counting the user's clicks and seconds from photos to a first image; with
`--screenshots DIR` it also saves a screenshot of each page there: `python tools/ui_screenshots.py` regenerates
docs/ui/ with it (plain test runs take no screenshots and never write tracked files).
"""

from __future__ import annotations

import os
import re
import time
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
    said = "".join(log.read_text(errors="replace") for log in root.glob("serve-*.log"))
    # The start-up banner: where the page is, never gradio's suggestion of share=True (which the app refuses).
    assert f"sdlora serve: the page is at {url}" in said and "share=True" not in said


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


def value_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


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
    for tab in ("1. Photos", "2. Train", "3. Runs", "4. Generate", "5. Evaluate"):  # numbered in workflow order
        assert page.get_by_role("tab", name=tab).is_visible()
    assert value_of(page, "trigger") == "sks"  # the trigger word sits beside the photos
    page.locator("#prepare").click()
    wait_for(lambda: status_of(page, "photos-status") != "", 30, "the status line")
    assert status_of(page, "photos-status") == "error: upload photos or pick a folder under photos/ first"
    assert page.locator("text=Traceback").count() == 0
    page.get_by_role("tab", name="Train").click()
    page.locator("#setting-train-steps input").wait_for()
    assert page.locator("#toml").is_visible()
    # Filled on load, before any edit: what Start would run now.
    wait_for(lambda: "[train]" in status_of(page, "toml"), 30, "the config.toml preview on load")
    fill(page, "setting-train-steps", "33")
    wait_for(lambda: re.search(r"^steps = 33$", status_of(page, "toml"), re.M), 30, "the preview of steps = 33")
    # Into the empty preset box and out again: nothing is applied, the user's 33 steps stay.
    page.locator("#preset input").click()
    page.keyboard.press("Escape")
    page.locator("#run-name").locator("input, textarea").first.click()
    time.sleep(1.5)  # what a reset would take to arrive
    assert value_of(page, "setting-train-steps") == "33"
    assert re.search(r"^steps = 33$", status_of(page, "toml"), re.M)


@pytest.mark.slow
def test_click_through_the_workflow(page, served, tmp_path, request):
    """Photos -> Train -> Runs -> Generate -> Evaluate in the page, with the user's clicks and seconds from photos to
    a first image (`actions`: what a user does; `faster`: what the test adds to train in seconds on a CPU), and a
    screenshot of each page with --screenshots. Each wait follows the work (files written, steps, progress bars):
    a busy machine is waited for, a hung command fails."""
    workspace = served[0]
    wanted = request.config.getoption("--screenshots")
    shots = Path(wanted) if wanted else None

    def shot(name: str) -> None:
        if shots is not None:
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / name), full_page=True)

    busy = activity(workspace)
    actions, faster, started = 0, 0, time.monotonic()
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in photo_files(tmp_path / "camera")])
    page.locator("#prepare").click()  # at the default 512 px, as a user does first
    actions += 2
    wait_for(
        lambda: status_of(page, "photos-status").startswith(("me:", "error")), STALL, "prep", every=0.5, progress=busy
    )
    failed = status_of(page, "photos-status")
    # The real error, and the resolution that keeps the small faces (the demo's faces are ~93 px wide).
    assert failed.startswith("error: prep failed: only 1 of 5 photos in "), failed
    assert failed.endswith("3 faces are too small for 512 px crops: Prepare at resolution 384 keeps them."), failed
    fill(page, "prep-resolution", "64")  # the hint's 384 px, lowered further to train in seconds on a CPU
    page.locator("#prepare").click()  # the same upload: its photo set is reused
    actions += 2
    wait_for(lambda: status_of(page, "photos-status") != failed, STALL, "prep at 64 px", every=0.5, progress=busy)
    assert status_of(page, "photos-status") == "me: kept 3, dropped 2"
    assert page.locator("#kept img").count() == 3 and page.locator("#dropped img").count() == 2
    assert page.get_by_text("no face found").first.is_visible()

    def thumbnails() -> set[str]:
        sources = page.locator("#edits img").evaluate_all("images => images.map(image => image.src)")
        return {source.rsplit("/", 1)[-1] for source in sources if "gradio_api/file=" in source}

    wait_for(lambda: thumbnails() == {"0000.png", "0001.png", "0002.png"}, 30, "the crops in the caption table")
    shot("1-photos.png")

    page.get_by_role("tab", name="Train").click()
    actions += 1
    # The dataset just prepared is chosen, the run named after it, the only base model picked.
    wait_for(lambda: value_of(page, "train-dataset") == "me", 30, "the prepared dataset")
    assert value_of(page, "run-name") == "me-lora"
    assert value_of(page, "base") == "models/tiny-sd1"
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
    faster += 14
    expected = ("sample_steps = 4", "log_every = 1", "eval_every = 4", "n = 1", "steps = 4", "checkpoint_every = 2")
    wait_for(lambda: all(line in status_of(page, "toml") for line in expected), 30, "the config.toml preview")
    shown = status_of(page, "toml")  # quick edits, and the preview is the last one's
    page.locator("#start").click()
    actions += 1
    wait_for(lambda: "me-lora" in status_of(page, "train-status"), STALL, "the run to start", progress=busy)
    ran = (workspace / ".sdlora-serve" / "jobs" / "me-lora.config.toml").read_text(encoding="utf-8")
    assert ran == shown  # the preview was exactly what Start ran
    fold(page, "train")  # fold the long form again for the screenshot
    fold(page, "eval")
    shot("2-train.png")

    page.get_by_role("tab", name="Runs").click()  # the run just started is the one shown
    actions += 1
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
    captions = page.locator("#samples").inner_text()
    assert captions.index("step-000004") < captions.index("step-000002")  # newest first
    offered = ("pytorch_lora_weights", "me-lora-best")  # the diffusers LoRA, best/ zipped (and the kohya file)
    wait_for(lambda: all(name in page.locator("#files").inner_text() for name in offered), 30, "the downloads")
    # The kohya file and, as the defaults train with pivotal tuning, its embeddings for A1111/ComfyUI.
    assert page.locator("#files").inner_text().count(".safetensors") == 3
    assert "me-lora_emb" in page.locator("#files").inner_text()
    assert "loss" in status_of(page, "run-speed")
    table = page.locator("#run-table").inner_text()
    assert "final" in table and "best (step 4, " in table, table
    assert "sdlora train" in status_of(page, "run-log")  # the log's tail
    shot("3-runs.png")

    page.get_by_role("tab", name="Generate").click()
    actions += 1
    wait_for(lambda: value_of(page, "gen-lora") == "me-lora: final", 30, "the newest run's LoRA")
    page.locator("#gen-lora input").click()  # the picker: final and best, no _emb file, no second format
    options = [text.replace("\u2713", "").strip() for text in page.get_by_role("option").all_inner_texts()]
    assert options[0] == "me-lora: final" and options[1].startswith("me-lora: best (step ") and len(options) == 2
    page.keyboard.press("Escape")
    fill(page, "gen-n", "2")
    fill(page, "gen-steps", "4")
    faster += 2
    page.locator("#generate").click()
    actions += 1
    wait_for(
        lambda: status_of(page, "gen-status").startswith(("wrote", "error")),
        STALL,
        "generate",
        every=0.5,
        progress=busy,
    )
    assert status_of(page, "gen-status").startswith("wrote 2 image(s) to images/")
    assert page.locator("#gen-gallery img").count() == 2
    seconds = time.monotonic() - started
    print(f"\nphotos -> first image: {actions} user actions (+{faster} CPU-speed settings), {seconds:.0f} s")
    # The page's defaults (seed 42, the base's own guidance, compare on) with n=2, steps=4: studio.generate's folder, as
    # test_serve.py's end-to-end test checked it when it rendered the same call itself.
    folder = workspace / status_of(page, "gen-status").removeprefix("wrote 2 image(s) to ")
    images = studio.images_of(Workspace.open(workspace), folder)
    assert [p.name for p, _ in images.images] == ["0000-42.png", "0001-43.png"]
    assert "prompt: a photo of sks person, seed: 42" in images.images[0][1]
    assert images.compare is not None and images.grid is not None
    assert page.get_by_text("base model (left) / LoRA (right)").is_visible()
    shot("4-generate.png")

    page.get_by_role("tab", name="Evaluate").click()
    wait_for(lambda: value_of(page, "eval-run") == "me-lora", 30, "the newest finished run")
    choose(page, "eval-reference", "me")
    page.locator("#evaluate").click()
    wait_for(
        lambda: status_of(page, "eval-status").startswith(("scored", "error")), STALL, "eval", every=0.5, progress=busy
    )
    # The run's own eval settings (its n = 1 and face model): 10 prompts, one image each.
    assert status_of(page, "eval-status").startswith("scored 10 images")
    summary = page.locator("#eval-summary").inner_text()
    assert "what it means" in summary and "identity" in summary  # the report's explained summary, not raw JSON
    shot("5-evaluate.png")
    with page.expect_popup() as popup:
        page.locator("#report-link").click()
    report = popup.value
    report.wait_for_load_state()
    assert "sdlora eval" in report.title().lower() or report.locator("img").count() > 0
    report.close()
