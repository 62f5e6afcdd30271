"""`sdlora compare`: routes given as folders of toy-world images with known identity are ranked right; bad route
specs fail in one line before anything renders; a rendered route on the tiny SD pipeline (slow)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.compare.routes import parse_route, parse_routes
from sdlora.errors import UsageError
from sdlora.faces import toyworld as world

SUBJECT = world.Identity("tan", "red", "long", "green", True, "mint")


def _renders(folder, identities, count, seed):
    """`count` jittered renders cycling through `identities`, each with a caption (the prompt eval reads)."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(count):
        world.render(identities[i % len(identities)], rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a photo of the person")
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The reference photos of SUBJECT and three routes' images: the subject itself (new jitter), the subject with
    one attribute changed (hair colour), and strangers (every attribute changed)."""
    root = tmp_path_factory.mktemp("toy-compare")
    one_off = dataclasses.replace(SUBJECT, hair="blue")
    strangers = [world.Identity("pale", "black", "short", "blue", False, "sky"),
                 world.Identity("dark", "blonde", "tall", "brown", False, "lilac")]  # fmt: skip
    return {
        "reference": _renders(root / "reference", [SUBJECT], 4, seed=1),
        "same": _renders(root / "same", [SUBJECT], 6, seed=2),
        "one-off": _renders(root / "one-off", [one_off], 6, seed=3),
        "strangers": _renders(root / "strangers", strangers, 6, seed=4),
    }


def _compare(*args):
    return CliRunner().invoke(app, ["compare", *args])


def test_folders_are_ranked_by_identity(toy, tmp_path):
    out = tmp_path / "out"
    routes = [f"strangers:folder={toy['strangers']}", f"one-off:folder={toy['one-off']}", f"folder={toy['same']}"]
    result = _compare("--reference", str(toy["reference"]), "--face-model", "toy", "--out", str(out),
                      *(arg for route in routes for arg in ("--route", route)))  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "sdlora.compare/1" and report["face_model"] == "toy"
    ranked = [(r["rank"], r["label"]) for r in report["routes"]]
    assert ranked == [(1, "folder"), (2, "one-off"), (3, "strangers")]
    same, one_off, strangers = (r["summary"] for r in report["routes"])
    assert same["recognised_rate"] == 1.0 and same["identity"] == 1.0
    assert one_off["recognised_rate"] == 0.0 and one_off["identity"] == pytest.approx(1 - (1 / 6) / (2 / 6))
    assert strangers["identity"] == 0.0 and strangers["images"] == 6
    assert all(r["seconds_per_image"] is None for r in report["routes"])  # folders are not rendered
    page = (out / "report.html").read_text()
    assert '<meta name="generator" content="sdlora compare">' in page
    assert page.index(">folder</a>") < page.index(">one-off</a>") < page.index(">strangers</a>")
    for route in report["routes"]:
        with Image.open(out / route["sheet"]) as sheet:
            assert sheet.size == (6 * 128, 128)  # a contact sheet of the 6 images (up to 8 a row)
    assert json.loads((out / ".sdlora.json").read_text())["command"] == "compare"
    # A rerun into its own folder replaces the report; a folder compare did not write is refused.
    again = _compare("--reference", str(toy["reference"]), "--face-model", "toy", "--out", str(out),
                     "--route", f"folder={toy['same']}")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert [r["label"] for r in json.loads((out / "report.json").read_text())["routes"]] == ["folder"]
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["folder.jpg"]
    refused = _compare("--reference", str(toy["reference"]), "--out", str(toy["same"]), "--route", "folder=.")
    assert refused.exit_code == 2 and "error: --out" in refused.output


def test_route_specs():
    route = parse_route("big:lora=runs/a:0.8,base=models/sd15")
    assert (route.label, route.kind, route.value, route.base) == ("big", "lora", "runs/a:0.8", "models/sd15")
    route = parse_route("api=me.jpg,model=gpt-image-1.5")
    assert (route.label, route.kind, route.value, route.model) == ("api", "api", "me.jpg", "gpt-image-1.5")
    assert [r.label for r in parse_routes(["folder=a", "folder=b", "x:folder=c"])] == ["folder", "folder-2", "x"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("runs/a", "write KIND=VALUE"),
        ("lorra=runs/a", "unknown route kind 'lorra'"),
        ("a b:folder=x", "the label 'a b' must be"),
        ("folder=x,model=m", ",model= applies to api routes"),
        ("api=x,base=b", ",base= applies to lora, keepface and reference routes"),
    ],
)
def test_bad_route_specs(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_route(spec)


def test_bad_routes_fail_before_rendering(toy, tmp_path, monkeypatch):
    """Every route is checked before the first renders: the lora route is never rendered when a later one is bad."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    photo = toy["same"] / "000.png"
    common = ["--reference", str(toy["reference"]), "--face-model", "toy", "--out", str(tmp_path / "out")]
    cases = [
        (["--route", f"folder={tmp_path / 'missing'}"], "is not a folder of images"),
        (["--route", f"lora={tmp_path / 'missing'}"], "--lora"),
        (["--route", f"keepface={toy['same']}", "--base", "x"], "give one photo for keep-face"),
        (["--route", f"reference={photo}"], "no base model; give --base MODEL"),
        (["--route", f"api={photo}"], "OPENAI_API_KEY is not set"),
        (["--route", f"x:folder={toy['same']}", "--route", f"x:folder={toy['one-off']}"], "used twice"),
        ([], "give at least one --route"),
    ]
    for args, message in cases:
        result = _compare(*common, "--route", f"folder={toy['same']}", *args) if args else _compare(*common)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
        assert message in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_rendered_lora_route_on_the_tiny_pipeline(tiny_sd1, toy, tmp_path):
    """A lora route renders through generate into OUT/routes/LABEL (records and all), is timed and scored."""
    from generate_helpers import make_lora

    lora = make_lora(tiny_sd1, tmp_path / "lora", seed=1, metadata={"sdlora.trigger_phrase": "zwx person"})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {trigger}\n")
    out = tmp_path / "out"
    result = _compare("--reference", str(toy["reference"]), "--face-model", "toy", "--base", str(tiny_sd1),
                      "--prompts", str(prompts), "--seeds", "2", "--route", f"lora={lora}",
                      "--route", f"folder={toy['same']}", "--out", str(out),
                      "--set", "generate.steps=2", "--set", "generate.size=64x64")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rendered = next(r for r in report["routes"] if r["kind"] == "lora")
    assert rendered["folder"] == str(out / "routes" / "lora") and rendered["summary"]["images"] == 2
    assert rendered["seconds_per_image"] > 0 and rendered["base"] == str(tiny_sd1)
    record = json.loads((out / "routes" / "lora" / "0001-1.json").read_text())
    assert record["prompt"] == "a photo of zwx person" and record["seed"] == 1 and record["steps"] == 2
    assert [r["label"] for r in report["routes"]] == ["folder", "lora"]  # the toy subject beats random renders
    # keep-face's photo is checked for a face (dlib's) with the other routes, before any route renders
    toy_photo = toy["same"] / "000.png"
    result = _compare("--reference", str(toy["reference"]), "--base", str(tiny_sd1), "--out", str(tmp_path / "o2"),
                      "--route", f"lora={lora}", "--route", f"keepface={toy_photo}")  # fmt: skip
    assert result.exit_code == 2 and "no face found in" in result.output and not (tmp_path / "o2").exists()


def test_api_route_goes_through_the_engine(toy, tmp_path, monkeypatch):
    """An api route is `generate --engine openai` with the comparison's prompts ({trigger}: 'the person')."""
    from test_api_engine import KEY, EditServer

    server = EditServer()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a photo of {trigger} on the moon\n")
        out = tmp_path / "out"
        result = _compare("--reference", str(toy["reference"]), "--face-model", "toy", "--prompts", str(prompts),
                          "--seeds", "2", "--route", f"api={toy['same'] / '000.png'},model=gpt-image-1.5",
                          "--out", str(out))  # fmt: skip
        assert result.exit_code == 0, result.output
    finally:
        server.close()
    (request,) = server.requests
    assert request["fields"]["prompt"] == "a photo of the person on the moon"
    assert request["fields"]["model"] == "gpt-image-1.5" and request["fields"]["n"] == "2"
    (route,) = json.loads((out / "report.json").read_text())["routes"]
    assert route["kind"] == "api" and route["summary"]["images"] == 2 and route["seconds_per_image"] > 0
    assert json.loads((out / "routes" / "api" / "0000-0.json").read_text())["engine"] == "openai"
