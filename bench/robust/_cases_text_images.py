"""Kinds of bench.robust.inputs: odd names and text, bad images outside prep, unbounded reads, inputs that vanish,
the near-duplicate rule, terminal noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy
from PIL import Image

from bench.robust import Case, Ran, snapshot
from bench.robust import _makers as make
from bench.robust.inputs import GEN, Context, error_case, kind, prep_args, succeeded


def _report(out) -> dict:
    return json.loads((out / "report.json").read_bytes().decode("utf-8"))


@kind("names", "prep: file names not valid UTF-8, with control characters, bidi overrides and emoji")
def odd_names(ctx: Context) -> Case:
    photos = ctx.folder("odd-names") / "photos"
    photos.mkdir()
    for i, name in enumerate([b"caf\xe9.png", b"bell\x07.jpg", b"new\nline.png", b"rtl\xe2\x80\xae.png",
                              "👩‍👩‍👧 照片.png".encode(), b"\xff\xfe.txt"]):  # fmt: skip
        make.raw_name(photos, name, make.png_bytes(20 + i) if i < 5 else b"\xff\xfe not text")
    out = photos.parent / "out"
    before = snapshot(photos)
    ran = ctx.run(*prep_args(photos, out))
    problem = None
    if ran.code == 0:
        files = _report(out)["files"]
        Image.open(out / "contact_sheet.jpg").verify()
        problem = None if len(files) == 6 else f"report.json lists {len(files)} of 6 files"
    return succeeded("", "exit 0, report.json lists all 6 (escaped), contact sheet drawn", ran, problem, before,
                     snapshot(photos))  # fmt: skip


@kind("names", "prep: caption sidecar that is not UTF-8")
def latin1_caption(ctx: Context) -> Case:
    photos = make.photos(ctx.folder("latin1-caption") / "photos")
    (photos / "photo0.txt").write_bytes("un caf\xe9 avec sks person".encode("latin-1"))
    before = snapshot(photos)
    ran = ctx.run(*prep_args(photos, photos.parent / "out"))
    return succeeded("", "exit 0 (the caption template stands in)", ran, None, before, snapshot(photos))


@kind("names", "train: plain-folder caption that is not UTF-8")
def train_latin1_caption(ctx: Context) -> Case:
    data = make.photos(ctx.folder("train-latin1") / "data")
    (data / "photo1.txt").write_bytes(b"caf\xe9")
    args = ["train", str(data), str(data.parent / "out"), "--base", str(ctx.model), "--steps", "1"]
    # a usage error naming the file (exit 2, as a truncated photo), since captions share class images' reader
    return error_case(ctx, "", args, 2, ("photo1.txt", "not UTF-8"), data, inprocess=True)


@kind("names", "generate: --prompts file that is not UTF-8")
def latin1_prompts(ctx: Context) -> Case:
    prompts = ctx.folder("latin1-prompts") / "prompts.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    args = ["generate", "--base", str(ctx.model), "--prompts", str(prompts), "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("prompts.txt", "not UTF-8"), prompts.parent, inprocess=True)


@kind("names", "train: manifest.jsonl that is not UTF-8")
def latin1_manifest(ctx: Context) -> Case:
    data = make.photos(ctx.folder("latin1-manifest") / "data")
    (data / "manifest.jsonl").write_bytes(b'{"caption": "caf\xe9"}\n')
    args = ["train", str(data), str(data.parent / "out"), "--base", str(ctx.model)]
    return error_case(ctx, "", args, 2, ("manifest.jsonl", "not UTF-8"), data, inprocess=True)


@kind("names", "config: TOML file that is not UTF-8")
def latin1_toml(ctx: Context) -> Case:
    toml = ctx.folder("latin1-toml") / "my.toml"
    toml.write_bytes(b"[train]\nname = 'caf\xe9'\n")
    return error_case(ctx, "", ["config", "--config", str(toml)], 2, ("my.toml",), toml.parent)


@kind("names", "eval: prompts with [square brackets] (A1111 syntax) in --images sidecars", quick=False)
def bracket_prompts(ctx: Context) -> Case:
    folder = ctx.folder("brackets")
    ref = make.reference_set(folder / "ref")
    images = make.reference_set(folder / "images")
    prompts = ["a photo of [sks] person, [smiling:laughing:0.5]", "[/bold] unbalanced [red"]
    for path, prompt in zip(sorted(images.iterdir()), prompts, strict=True):
        path.with_suffix(".json").write_text(json.dumps({"prompt": prompt, "seed": 1}))
    json_out = folder / "eval.json"
    ran = ctx.run(
        "eval", "--reference", str(ref), "--images", str(images), "--json", str(json_out), env={"COLUMNS": "400"}
    )  # fmt: skip  (a wide table: a prompt wrapped over lines is no loss)
    missing = [p for p in prompts if p not in ran.stdout]
    problem = f"missing from the table: {missing}" if missing else None
    if ran.code == 0 and not json_out.is_file():
        problem = "--json not written"
    return succeeded("", "exit 0, every prompt in the table as written, --json written", ran, problem)


# ---- bad images outside prep


@kind("images", "eval: --images holds a truncated PNG")
def eval_truncated(ctx: Context) -> Case:
    folder = ctx.folder("eval-truncated")
    ref = make.reference_set(folder / "ref")
    images = make.reference_set(folder / "images")
    (images / "broken.png").write_bytes(make.truncated_png())
    args = ["eval", "--reference", str(ref), "--images", str(images)]
    return error_case(ctx, "", args, 1, ("broken.png", "truncated"), folder, inprocess=True)


@kind("images", "eval: --images holds a text file named .png")
def eval_not_image(ctx: Context) -> Case:
    folder = ctx.folder("eval-text")
    ref = make.reference_set(folder / "ref")
    images = make.reference_set(folder / "images")
    (images / "notes.png").write_text("not an image")
    args = ["eval", "--reference", str(ref), "--images", str(images)]
    return error_case(ctx, "", args, 1, ("notes.png", "not an image"), folder, inprocess=True)


@kind("images", "eval: --reference plain folder with a decompression bomb")
def eval_bomb(ctx: Context) -> Case:
    folder = ctx.folder("eval-bomb")
    ref = make.reference_set(folder / "ref")
    (ref / "bomb.png").write_bytes(make.png_claiming(100_000, 100_000))
    images = make.reference_set(folder / "images")
    args = ["eval", "--reference", str(ref), "--images", str(images)]
    return error_case(ctx, "", args, 2, ("bomb.png", "pixels"), folder, inprocess=True)


@kind("images", "train: plain-folder dataset with a truncated JPEG", quick=False)
def train_truncated(ctx: Context) -> Case:
    data = make.photos(ctx.folder("train-truncated") / "data")
    (data / "photo9.jpg").write_bytes(make.jpeg(make.photo(9), 90)[:300])
    args = ["train", str(data), str(data.parent / "out"), "--base", str(ctx.model), "--steps", "1",
            "--resolution", "64", "--sample-every", "0", "--eval-every", "0"]  # fmt: skip
    return error_case(ctx, "", args, 2, ("photo9.jpg",), data)


@kind("images", "generate: --init-image that is not an image")
def init_not_image(ctx: Context) -> Case:
    path = ctx.folder("init-text") / "start.jpg"
    path.write_text("hello")
    args = ["generate", "--base", str(ctx.model), *GEN, "--init-image", str(path), "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("--init-image", "start.jpg", "not a usable image"), inprocess=True)


@kind("images", "generate: --keep-face truncated PNG")
def keep_face_truncated(ctx: Context) -> Case:
    path = ctx.folder("keep-truncated") / "me.png"
    path.write_bytes(make.truncated_png(3))
    args = ["generate", "--base", str(ctx.model), *GEN, "--keep-face", str(path), "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("--keep-face", "me.png"), inprocess=True)


# ---- unbounded reads and inputs that vanish

RSS = "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"  # noqa: E501


@kind("reads", "prep: a 3 GB video and a 3 GB file named .jpg in the photo folder (peak memory)")
def huge_files(ctx: Context) -> Case:
    photos = make.photos(ctx.folder("huge") / "photos")
    make.sparse(photos / "clip.mp4", b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom", 3 * 2**30)
    make.sparse(photos / "IMG_0001.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 3 * 2**30)
    environment = os.environ | {"HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS, sys.executable, "-m", "sdlora",
                           *prep_args(photos, photos.parent / "out")],
                          capture_output=True, text=True, timeout=300, env=environment)  # fmt: skip
    ran = Ran(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
    rss = int(done.stderr.rsplit("maxrss", 1)[-1].split()[0]) * 1024 if "maxrss" in done.stderr else 0
    problem = None if rss < 1.5 * 2**30 else f"peak memory {rss / 2**30:.1f} GB"
    if ran.code == 0:
        fates = {e["file"]: e.get("reason") for e in _report(photos.parent / "out")["files"]}
        if any(fates.get(name) not in ("not_an_image", "too_large") for name in ("clip.mp4", "IMG_0001.jpg")):
            problem = f"fates {fates}"
    case = succeeded("", "exit 0, both reported, peak memory well under the files' size", ran, problem)
    case.extra = {"peak_rss_mb": round(rss / 2**20)}
    return case


@kind("reads", "prep: a FIFO, a link to /dev/zero, a dangling link and a link loop among the photos")
def special_files(ctx: Context) -> Case:
    folder = ctx.folder("special")
    photos = make.photos(folder / "photos")
    os.mkfifo(photos / "pipe.jpg")
    (photos / "zero.jpg").symlink_to("/dev/zero")
    (photos / "gone.jpg").symlink_to(folder / "nothing.jpg")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    ran = ctx.run(*prep_args(photos, folder / "out"), timeout=60)
    problem = None
    if ran.code == 0:
        fates = {e["file"]: e.get("reason") for e in _report(folder / "out")["files"]}
        lost = [n for n in ("pipe.jpg", "zero.jpg", "gone.jpg", "loop.jpg") if fates.get(n) != "unreadable"]
        problem = f"not reported as unreadable: {lost}" if lost else None
    return succeeded("", "exit 0 within 60 s, each reported unreadable with what it is", ran, problem)


# ---- the near-duplicate rule and float images


@kind("duplicates", "prep: the original among a quality-70 re-encode and a noise-speckled float TIFF")
def duplicates(ctx: Context) -> Case:
    from skimage import data

    photos = ctx.folder("duplicates") / "photos"
    photos.mkdir()
    original = Image.fromarray(data.astronaut()).resize((320, 320), Image.LANCZOS)
    (photos / "b_original.jpg").write_bytes(make.jpeg(original, 95))
    (photos / "a_q70.jpg").write_bytes(make.jpeg(original, 70))
    grey = numpy.asarray(original.convert("L"), dtype=numpy.float32) / 255
    noisy = numpy.clip(grey + numpy.random.default_rng(0).normal(0, 0.08, grey.shape), 0, 1).astype(numpy.float32)
    Image.fromarray(noisy, "F").save(photos / "c_noisy.tif")
    ran = ctx.run(*prep_args(photos, photos.parent / "out"))
    problem = None
    if ran.code == 0:
        fates = {e["file"]: e.get("reason", "kept") for e in _report(photos.parent / "out")["files"]}
        problem = None if fates.get("b_original.jpg") == "kept" else f"fates {fates}"
    return succeeded("", "exit 0, b_original.jpg kept", ran, problem)


@kind("duplicates", "prep: a float TIFF in 0..1 comes out right, not black")
def float_tiff(ctx: Context) -> Case:
    photos = ctx.folder("float") / "photos"
    photos.mkdir()
    ramp = numpy.tile(numpy.linspace(0, 1, 128, dtype=numpy.float32), (128, 1))
    Image.fromarray(ramp, "F").save(photos / "scan.tif")
    ran = ctx.run(*prep_args(photos, photos.parent / "out"))
    problem = None
    if ran.code == 0:
        mean = float(numpy.asarray(Image.open(photos.parent / "out" / "images" / "0000.png")).mean())
        problem = None if 100 < mean < 155 else f"mean grey {mean:.0f} (black is 0)"
    return succeeded("", "exit 0, the crop's mean grey near 128", ran, problem)


# ---- terminal noise


@kind("noise", "generate with a LoRA: no library bars or dumps on the terminal", quick=False)
def terminal_noise(ctx: Context) -> Case:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
    from generate_helpers import make_lora

    lora = make_lora(ctx.model, ctx.folder("noise") / "run", seed=1)
    ran = ctx.run("generate", "--base", str(ctx.model), "--lora", f"{lora}:0.5", *GEN, "--out", str(lora.parent / "o"))
    noise = [line for line in ran.stderr.splitlines() if line.strip() and not line.lstrip().startswith("images")]
    return succeeded("", "exit 0, stderr holds only our progress line", ran, f"noise: {noise[:3]}" if noise else None)
