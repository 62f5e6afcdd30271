"""Kinds of bench.robust.inputs: disk and folder failures, damaged model and LoRA files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from bench.robust import Case, Ran, snapshot
from bench.robust import _makers as make
from bench.robust.inputs import GEN, Context, error_case, judged, kind, prep_args


@kind("disk", "prep: OUT_DIR below a file")
def out_below_file(ctx: Context) -> Case:
    folder = ctx.folder("below-file")
    photos = make.photos(folder / "photos")
    (folder / "notes.txt").write_text("a file, not a folder")
    return error_case(ctx, "", prep_args(photos, folder / "notes.txt" / "out"), 2, ("notes.txt", "is a file"), folder)


@kind("disk", "prep: OUT_DIR on a full disk (1 MB tmpfs)")
def full_disk(ctx: Context) -> Case:
    folder = ctx.folder("full-disk")
    photos = make.photos(folder / "photos")
    with make.tmpfs(folder / "disk", "1m") as mounted:
        if not mounted:
            return Case("inputs", "", "", ok=False, detail="could not mount a tmpfs (needs root)")
        (folder / "disk" / "filler").write_bytes(b"\0" * 900_000)
        return error_case(ctx, "", prep_args(photos, folder / "disk" / "out"), 2, ("OUT_DIR", "MB free"), photos)


@kind("disk", "prep: OUT_DIR on a read-only file system")
def read_only(ctx: Context) -> Case:
    folder = ctx.folder("read-only")
    photos = make.photos(folder / "photos")
    with make.tmpfs(folder / "ro", "1m", readonly=True) as mounted:
        if not mounted:
            return Case("inputs", "", "", ok=False, detail="could not mount a tmpfs (needs root)")
        return error_case(ctx, "", prep_args(photos, folder / "ro" / "out"), 2, ("read-only",), photos)


@kind("disk", "generate: --out on a read-only file system", quick=False)
def generate_read_only(ctx: Context) -> Case:
    folder = ctx.folder("gen-ro")
    with make.tmpfs(folder / "ro", "1m", readonly=True) as mounted:
        if not mounted:
            return Case("inputs", "", "", ok=False, detail="could not mount a tmpfs (needs root)")
        args = ["generate", "--base", str(ctx.model), *GEN, "--out", str(folder / "ro" / "images")]
        return error_case(ctx, "", args, 1, ("read-only", "images"))


@kind("disk", "generate: --out below a file", quick=False)
def generate_below_file(ctx: Context) -> Case:
    folder = ctx.folder("gen-below-file")
    (folder / "a-file").write_text("x")
    args = ["generate", "--base", str(ctx.model), *GEN, "--out", str(folder / "a-file" / "images")]
    before = snapshot(folder)
    ran = ctx.run(*args)
    return judged("", "exit 1, one error line naming the path", ran, code=1, words=("a-file",), before=before,
                  after=snapshot(folder))  # fmt: skip


@kind("disk", "generate: --out on a full disk (1 MB tmpfs)", quick=False)
def generate_full(ctx: Context) -> Case:
    folder = ctx.folder("gen-full")
    with make.tmpfs(folder / "disk", "1m") as mounted:
        if not mounted:
            return Case("inputs", "", "", ok=False, detail="could not mount a tmpfs (needs root)")
        (folder / "disk" / "filler").write_bytes(b"\0" * 1_040_000)
        args = ["generate", "--base", str(ctx.model), *GEN, "--out", str(folder / "disk" / "images")]
        return error_case(ctx, "", args, 1, ("no space left",))


@kind("disk", "prep: OUT_DIR without write permission (as user nobody)", quick=False)
def no_permission(ctx: Context) -> Case:
    folder = ctx.folder("no-permission")
    photos = make.photos(folder / "photos")
    locked = folder / "locked"
    locked.mkdir()
    for path in (ctx.work, folder, photos, *photos.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    locked.chmod(0o555)
    if not shutil.which("setpriv"):
        return Case("inputs", "", "", ok=False, detail="setpriv not found")
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "sdlora",
               *prep_args(photos, locked / "out")]  # fmt: skip
    start = time.perf_counter()
    env = os.environ | {"HOME": str(folder), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=folder)
    ran = Ran(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
    return judged("", "exit 2, no permission to write", ran, code=2, words=("no permission",))


# ---- damaged model files


def _base_file(ctx: Context, label: str, content: bytes) -> str:
    path = ctx.folder(label) / "model.safetensors"
    path.write_bytes(content)
    return str(path)


@kind("models", "generate: 0-byte single-file --base")
def empty_base(ctx: Context) -> Case:
    args = ["generate", "--base", _base_file(ctx, "empty-base", b""), *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("model.safetensors", "empty (0 bytes)"), inprocess=True)


@kind("models", "generate: partly downloaded single-file --base")
def partial_base(ctx: Context) -> Case:
    path = make.safetensors(ctx.folder("partial-base") / "model.safetensors", tensors=8, cut=50)
    args = ["generate", "--base", str(path), *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("model.safetensors", "truncated", "download"), inprocess=True)


@kind("models", "train: pickle renamed .safetensors as --base")
def pickle_base(ctx: Context) -> Case:
    base = _base_file(ctx, "pickle-base", b"PK\x03\x04" + b"\0" * 2000)
    data = make.photos(ctx.folder("pickle-base-data"))
    args = ["train", str(data), str(ctx.work / "pickle-out"), "--base", base]
    return error_case(ctx, "", args, 2, ("a pickle", "renamed"), data, inprocess=True)


@kind("models", "eval: random bytes as a single-file --base")
def random_base(ctx: Context) -> Case:
    base = _base_file(ctx, "random-base", bytes(range(256)) * 40)
    ref, lora = make.reference_set(ctx.folder("random-base-ref")), make.lora_run(ctx.folder("random-base-lora"))
    args = ["eval", "--reference", str(ref), "--lora", str(lora), "--base", base]
    return error_case(ctx, "", args, 2, ("model.safetensors", "not a .safetensors file"), ref, inprocess=True)


@kind("models", "generate: local model folder with truncated UNet weights (no offline hint)")
def truncated_folder(ctx: Context) -> Case:
    folder = make.copy_model(ctx.model, ctx.folder("truncated-folder") / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    case = error_case(ctx, "", ["generate", "--base", str(folder), *GEN, "--out", str(ctx.work / "o")], 2,
                      ("diffusion_pytorch_model.safetensors", "truncated"), inprocess=True)  # fmt: skip
    if "offline" in case.detail:
        case.ok, case.detail = False, "offline hint for a local folder: " + case.detail
    return case


@kind("models", "generate: model folder whose VAE is only a pickle (.bin), no --allow-pickle")
def pickle_folder(ctx: Context) -> Case:
    folder = make.copy_model(ctx.model, ctx.folder("pickle-folder") / "model")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    args = ["generate", "--base", str(folder), *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("vae/", "pickle", "--allow-pickle"), inprocess=True)


@kind("models", "generate: 0-byte --lora file")
def empty_lora(ctx: Context) -> Case:
    lora = ctx.folder("empty-lora") / "face.safetensors"
    lora.write_bytes(b"")
    args = ["generate", "--base", str(ctx.model), "--lora", str(lora), *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("face.safetensors", "empty"), inprocess=True)


@kind("models", "generate: --lora with a header and no tensors")
def no_tensor_lora(ctx: Context) -> Case:
    lora = make.safetensors(ctx.folder("no-tensor-lora") / "face.safetensors", tensors=0)
    args = ["generate", "--base", str(ctx.model), "--lora", str(lora), *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("face.safetensors", "no tensors"), inprocess=True)


@kind("models", "generate: truncated --lora file")
def truncated_lora(ctx: Context) -> Case:
    lora = make.safetensors(ctx.folder("truncated-lora") / "face.safetensors", tensors=4, cut=20)
    args = ["generate", "--base", str(ctx.model), "--lora", str(lora), *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("face.safetensors", "truncated"), inprocess=True)
