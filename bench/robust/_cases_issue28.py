"""Kinds of bench.robust.inputs from issue 28: a small set on a small disk, a --base that can't be found (offline,
hub unreachable, a path with a typo), a single file with another family's config, and prep killed with -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.robust import Case, Ran, snapshot
from bench.robust import _makers as make
from bench.robust.inputs import GEN, Context, error_case, judged, kind, prep_args, succeeded

# Online, with a hub that refuses connections (a closed local port): a machine without network, made certain.
UNREACHABLE = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


@kind("disk", "prep: six photos at 64 px on a 20 MB disk (tmpfs) fit")
def small_disk(ctx: Context) -> Case:
    folder = ctx.folder("small-disk")
    photos = make.photos(folder / "photos", count=6)
    with make.tmpfs(folder / "disk", "20m") as mounted:
        if not mounted:
            return Case("inputs", "", "", ok=False, detail="could not mount a tmpfs (needs root)")
        before = snapshot(photos)
        ran = ctx.run(*prep_args(photos, folder / "disk" / "out"), inprocess=True)
        kept = len(list((folder / "disk" / "out" / "images").glob("*.png")))
        problem = None if kept == 6 else f"{kept} of 6 crops written"
        return succeeded("", "exit 0, six crops written", ran, problem, before, snapshot(photos))


@kind("models", "generate: hub id neither cached nor reachable (HF_HUB_OFFLINE=1)")
def base_offline(ctx: Context) -> Case:
    args = ["generate", "--base", "someone/no-such-model", *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("no-such-model", "not in the local Hugging Face cache", "HF_HUB_OFFLINE"),
                      inprocess=True)  # fmt: skip


@kind("models", "generate: hub id, hub unreachable: fails at once, no retries", quick=False)
def base_unreachable(ctx: Context) -> Case:
    args = ["generate", "--base", "someone/no-such-model", *GEN, "--out", str(ctx.work / "o")]
    ran = ctx.run(*args, env=UNREACHABLE)
    case = judged("", "exit 2, one line: the hub can't be reached; no 'Retrying'", ran, code=2,
                  words=("no-such-model", "the hub can't be reached", "not in the local cache"))  # fmt: skip
    if "Retrying" in ran.stderr or "model_index.json" in ran.error_line:
        case.ok, case.detail = False, f"retried or blamed model_index.json: {ran.error_line}"
    return case


@kind("models", "generate: --base that is a path with a typo (models/sd15/unet)")
def base_typo(ctx: Context) -> Case:
    args = ["generate", "--base", "models/sd15/unet", *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("models/sd15/unet", "no such file or folder"), inprocess=True)


@kind("models", "generate: SD 1.x single file with a Flux.1 model.single_file_config", quick=False)
def single_file_other_family(ctx: Context) -> Case:
    import torch
    from safetensors.torch import save_file

    from sdlora import testing

    folder = ctx.folder("sd1-file-flux-config")
    flux = testing.save_tiny_pipeline("flux", folder / "flux")
    base = folder / "sd1.safetensors"  # the keys of an SD 1.x LDM checkpoint
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(base))
    args = ["generate", "--base", str(base), "--set", f"model.single_file_config='{flux}'", *GEN, "--out",
            str(folder / "o")]  # fmt: skip
    return error_case(ctx, "", args, 2, ("sd1.safetensors", "SD 1.x", "is Flux.1"), folder)


@kind("processes", "prep: kill -9 mid-run leaves no worker process behind", quick=False)
def prep_killed(ctx: Context) -> Case:
    folder = ctx.folder("prep-killed")
    photos = make.photos(folder / "photos", count=1)
    make.photo(0, side=1600).save(photos / "photo0.png", compress_level=0)
    for i in range(1, 24):  # copies: each is examined whole before duplicates are found
        shutil.copy(photos / "photo0.png", photos / f"copy{i:02d}.png")
    args = prep_args(photos, folder / "out")
    args[args.index("--workers") + 1] = "2"
    environment = os.environ | {"HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sdlora", *args], env=environment,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    below: set[int] = set()
    deadline = time.monotonic() + 120
    while len(below) < 4 and proc.poll() is None and time.monotonic() < deadline:
        below = _descendants(proc.pid)  # resource tracker, forkserver, two workers
        time.sleep(0.05)
    if proc.poll() is not None:
        return Case("inputs", "", "", ok=False, detail="prep ended before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until = time.monotonic() + 5
    while _alive(below) and time.monotonic() < wait_until:
        time.sleep(0.1)
    left = _alive(below)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    ran = Ran(0, "", "", time.perf_counter() - start)
    problem = f"{len(left)} of {len(below)} processes still running 5 s after prep was killed" if left else None
    return succeeded("", "every worker, the forkserver and the resource tracker exit within 5 s", ran, problem)


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _descendants(pid: int) -> set[int]:
    parents = {int(p.name): _state(int(p.name)) for p in Path("/proc").glob("[0-9]*")}
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, state in parents.items():
            if state is not None and state[1] == parent and state[0] != "Z" and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (state := _state(pid)) is not None and state[0] != "Z"}
