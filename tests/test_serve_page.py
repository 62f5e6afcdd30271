"""`sdlora serve`, what the page shows and runs, without a browser (issue 33): the real error line and a resolution
that keeps too-small faces, failed runs listed and their names freed, an ETA that is not thrown by scoring steps,
progress before step 1, the LoRA pickers, the options Generate and Evaluate pass on, and the read-only models folder.
The browser half (preview, presets, preselection, numbered steps) is in test_serve_browser.py."""

from __future__ import annotations

import json
import shutil

import pytest
from serve_utils import QUICK
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.errors import UsageError
from sdlora.serve import datasets, form, runs, studio, training
from sdlora.serve.jobs import Jobs
from sdlora.serve.launch import banner
from sdlora.serve.workspace import Workspace


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "ws")


# The end of a real `sdlora prep` log of the demo photos at 512 px (rich hides the cursor while its bar draws).
PREP_LOG = (
    "\x1b[?25l\r\x1b[2Kprep \u2501\u2501\u2501\u2501 10/10 0:00:00\n"
    "\x1b[?25herror: only 2 of 10 photos in photos/me are usable, fewer than --min-images 3; add more clear photos "
    "of one person (or lower --min-images).\n"
    "kept 2, skipped 8 (7 face_too_small, 1 no_face)\n"
    "  IMG_0001.jpg: face_too_small: The face is only 93 px wide: its crop would need enlarging 2.5x (limit 2x).\n"
    "  IMG_0009.jpg: face_too_small: The face is only 80 px wide: its crop would need enlarging 2.9x (limit 2x).\n"
    "  IMG_0010.jpg: no_face: No face was found (the detector needs a roughly frontal face).\n"
)


def test_the_real_error_line_and_a_resolution_that_keeps_small_faces(tmp_path):
    log = tmp_path / "prep.log"
    log.write_text(PREP_LOG)
    assert runs.error_line(log).startswith("error: only 2 of 10 photos in photos/me are usable")
    # 512 * 2 / (2.9 + 0.05) = 347 -> 320, a multiple of 64 that keeps the smaller face too.
    hint = datasets.resolution_hint(runs.log_tail(log, 100), 512)
    assert hint == "2 faces are too small for 512 px crops: Prepare at resolution 320 keeps them."
    assert datasets.resolution_hint(["IMG_1.jpg: no_face: No face was found"], 512) == ""
    far = "The face is only 20 px wide: its crop would need enlarging 9.0x (limit 2x)."
    assert datasets.resolution_hint([far], 512).endswith("the face fills more of the frame (closer, or cropped).")
    view = datasets.DatasetView("me", dropped=[(None, "IMG_1.jpg", "face too small", far)], resolution=64)
    assert view.summary().startswith("me: kept 0, dropped 1; 1 face is too small for 64 px crops: use photos")


def test_a_typo_under_models_is_no_hub_id(ws):
    values = form.values_of(None) | QUICK
    (ws.root / "datasets" / "d").mkdir()
    # Refused at Start, not tried on the hub for a minute (the failed run listed, its name freed: test_serve.py).
    with pytest.raises(UsageError, match="models/toy-bse: no such model"):
        training.start(ws, Jobs(ws), "d", "typo", None, "models/toy-bse", values)
    assert ws.model_ref("owner/model") == "owner/model"


def test_the_eta_ignores_scoring_steps_and_progress_shows_the_phases_before_step_1(tmp_path):
    tail = runs.Tail()
    tail.losses = [{"step": s, "loss": 0.5, "seconds_per_step": 2.0} for s in range(1, 10)]
    tail.losses.append({"step": 10, "loss": 0.5, "seconds_per_step": 60.0})  # identity was scored at step 10
    assert tail.speed(100).endswith("0.50 it/s, ETA 0:03:00")  # 90 steps at 2 s, not at 60 s
    folder = tmp_path / "run"
    (folder / "class_images").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"num_class_images": 100}}))
    for i in range(48):
        (folder / "class_images" / f"class-{i:05d}.png").write_bytes(b"png")
    assert runs.phase(folder, None) == "class images 48/100"
    log = tmp_path / "job.log"
    log.write_text("$ sdlora train ...\nloading the base model\r\x1b[2Kcaching latents 3/10\n")
    assert runs.log_tail(log) == ["$ sdlora train ...", "caching latents 3/10"]
    assert runs.phase(tmp_path / "none", log) == "before step 1: caching latents 3/10"


def test_the_lora_pickers_offer_final_and_best_without_embeddings_or_duplicates(ws):
    run = ws.root / "runs" / "me"
    (run / "best").mkdir(parents=True)
    for name in ("pytorch_lora_weights.safetensors", "me.safetensors", "me_emb.safetensors"):
        (run / name).write_bytes(b"x")
        (run / "best" / name).write_bytes(b"x")
    (run / "best" / "best.json").write_text(json.dumps({"step": 40, "eval": {"identity": 0.6234}}))
    assert studio.lora_labels(ws) == [
        ("me: final", "runs/me"),
        ("me: best (step 40, identity 0.623)", "runs/me/best"),
    ]


def test_generate_and_evaluate_pass_the_page_s_options_and_the_run_s_settings(ws, monkeypatch, tmp_path):
    ran: list[list[str]] = []

    def fake(workspace, args, label, progress=None):
        ran.append(args)
        if "--json" in args:
            (tmp_path / "eval.json").write_text(json.dumps({"summary": {"images": 1}}))
            shutil.copy(tmp_path / "eval.json", args[args.index("--json") + 1])

    monkeypatch.setattr(studio, "run_sdlora", fake)
    run = ws.root / "runs" / "me"
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (run / "config.json").write_text(json.dumps({"model": {"base": str(ws.root / "models")}, "train": {}}))
    (run / "config.toml").write_text('[eval]\nface_model = "toy"\n')
    kwargs = {"weight": 0.7, "negative": "blurry", "size": "512x768", "sampler": "euler_a", "n": 1}
    studio.generate(ws, "runs/me", "a photo of {trigger}", **kwargs)
    args = ran[-1]
    assert f"{run}:0.7" in args and args[args.index("--negative") + 1] == "blurry"
    assert args[args.index("--size") + 1] == "512x768" and args[args.index("--scheduler") + 1] == "euler_a"
    with pytest.raises(UsageError, match="WIDTHxHEIGHT"):
        studio.generate(ws, "runs/me", "a photo of {trigger}", size="big")
    (ws.root / "datasets" / "ref").mkdir()
    assert studio.evaluate(ws, "me", "ref").summary == {"images": 1}
    args = ran[-1]
    assert args[args.index("--config") + 1] == str(run / "config.toml")  # the run's face model and eval settings
    assert "--n" not in args and not any(a.startswith("eval.face_model") for a in args)
    shutil.rmtree(run / "eval")  # the next evaluation may start within the same second
    studio.evaluate(ws, "me", "ref", n=2, face_model="dlib")
    assert ran[-1][ran[-1].index("--n") + 1] == "2" and "eval.face_model=dlib" in ran[-1]
    explained = studio.Evaluation({"identity": 0.61, "images": 10}, [], "r", "j", threshold=0.6).explained()
    identity = next(row for row in explained if row[0] == "identity")
    assert identity[1] == "0.610" and identity[2] and identity[3]  # the number, what it means, what good is


def test_a_read_only_models_folder_and_links_in_it_are_checked(tmp_path):
    models = tmp_path / "shared-models"
    (models / "sd15").mkdir(parents=True)
    (models / "x.safetensors").write_bytes(b"x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (models / "out").symlink_to(outside, target_is_directory=True)  # a link out of the models folder
    ws = Workspace.open(tmp_path / "ws", models)
    (ws.root / "models" / "linked").symlink_to(models / "sd15", target_is_directory=True)
    (ws.root / "models" / "away").symlink_to(outside, target_is_directory=True)
    assert ws.base_models() == ["models/linked", str(models / "sd15"), str(models / "x.safetensors")]
    assert ws.model_ref("models/linked") == str(models / "sd15")
    assert ws.model_ref(str(models / "x.safetensors")) == str(models / "x.safetensors")
    for bad in ("models/away", str(models / "out"), str(outside), "/etc"):
        with pytest.raises(UsageError, match="refused"):
            ws.model_ref(bad)
    with pytest.raises(UsageError, match="--models"):
        Workspace.open(tmp_path / "ws", tmp_path / "missing")
    assert not list(models.rglob("*.tmp")) and sorted(p.name for p in models.iterdir()) == [
        "out",
        "sd15",
        "x.safetensors",
    ]


def test_serve_help_and_banner(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    shown = " ".join(result.output.split())
    assert 'pip install "sdlora[ui]"' in shown and "--models" in shown
    text = banner("127.0.0.1", 7860, Workspace.open(tmp_path / "ws"))
    assert "http://127.0.0.1:7860/" in text and "share" not in text


def test_the_same_upload_again_reuses_its_photo_set(ws, tmp_path):
    photos = []
    for i in range(2):
        photos.append(tmp_path / f"p{i}.jpg")
        photos[-1].write_bytes(bytes([i]) * 10)
    first = datasets.save_uploads(ws, photos, "me")
    assert datasets.save_uploads(ws, photos, "me") == first  # a second Prepare of the same photos
    with pytest.raises(UsageError, match="already exists"):
        datasets.save_uploads(ws, photos[:1], "me")  # other photos under the name: refused as before


def test_the_caption_choices_pass_prep_s_own_options(ws):
    # `sdlora prep --captions template|vlm|keep --captioner MODEL` (the captions issue); empty: prep's defaults.
    assert datasets.caption_options(ws, "", "") == []
    assert datasets.caption_options(ws, "vlm", "owner/captioner") == [
        "--captions",
        "vlm",
        "--captioner",
        "owner/captioner",
    ]
    (ws.root / "models" / "cap").mkdir()
    assert datasets.caption_options(ws, "keep", "models/cap") == [
        "--captions",
        "keep",
        "--captioner",
        str(ws.root / "models" / "cap"),
    ]
    with pytest.raises(UsageError, match="captioner: .*refused"):
        datasets.caption_options(ws, "vlm", "../elsewhere")
    with pytest.raises(UsageError, match="choose one of template, vlm, keep"):
        datasets.caption_options(ws, "magic", "")
