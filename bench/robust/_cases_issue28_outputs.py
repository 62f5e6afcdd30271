"""Kinds of bench.robust.inputs from issue 28 about what the commands write and where: generate into a folder of
earlier images (whole and cut short), `demo --overwrite` over a user's photos, a request for a billion images, `serve`
on a taken or impossible port, and the web app's downloads next to a symlink out of the run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.robust import Case, Ran, snapshot
from bench.robust import _makers as make
from bench.robust.inputs import Context, error_case, judged, kind, succeeded

GEN_SMALL = ["--prompt", "x", "--n", "2", "--batch-size", "2", "--steps", "2", "--size", "64x64"]
HUGE_SECONDS, HUGE_MB = 10.0, 500  # a refused billion-image request: well under these (0.4 s, 55 MB measured)


def _images(folder: Path) -> dict[int, list[str]]:
    """{image number: its file names} of a generate folder."""
    from sdlora import layout

    found: dict[int, list[str]] = {}
    for path in sorted(folder.iterdir()):
        if match := layout.GENERATED.match(path.name):
            found.setdefault(int(match.group(1)), []).append(path.name)
    return found


def _beside(ctx: Context, out: Path, label: str, before: dict[str, str]) -> Case:
    """Run generate (two images) into `out`, which holds an earlier run's files (`before`): exit 0, those files
    byte-identical, two new images numbered after every earlier one."""
    earlier = _images(out)
    ran = ctx.run("generate", "--base", str(ctx.model), *GEN_SMALL, "--out", str(out), inprocess=True)
    after = snapshot(out)
    new = {number: names for number, names in _images(out).items() if number not in earlier}
    problem = None
    pngs = [name for names in new.values() for name in names if name.endswith(".png")]
    if len(pngs) != 2:
        problem = f"{len(pngs)} new images, expected 2 ({sorted(new)})"
    elif min(new) <= max(earlier, default=-1):
        problem = f"new images numbered {sorted(new)}, not after the earlier {sorted(earlier)}"
    expected = f"exit 0, every earlier file byte-identical, two new images numbered after them ({label})"
    case = succeeded("", expected, ran, problem, before, after)
    if case.ok:
        case.detail = f"images {sorted(new)} beside the earlier {sorted(earlier)}, {len(before)} earlier files kept"
    return case


@kind("outputs", "generate --out: a folder of an earlier generate's images (a third run beside two)")
def generate_beside(ctx: Context) -> Case:
    out = ctx.folder("generate-beside") / "images"
    for _ in range(2):
        first = ctx.run("generate", "--base", str(ctx.model), *GEN_SMALL, "--out", str(out), inprocess=True)
        if first.code != 0:
            return succeeded("", "the earlier runs succeed", first, "an earlier run failed")
    return _beside(ctx, out, "after two whole runs", snapshot(out))


@kind("outputs", "generate --out: a folder where a generate was cut short (last image without its record)")
def generate_beside_cut(ctx: Context) -> Case:
    """A run stopped between an image and its record, before its sheet: what an interrupted run leaves."""
    out = ctx.folder("generate-beside-cut") / "images"
    first = ctx.run("generate", "--base", str(ctx.model), *GEN_SMALL, "--out", str(out), inprocess=True)
    if first.code != 0:
        return succeeded("", "the earlier run succeeds", first, "the earlier run failed")
    last = max(_images(out))
    for name in _images(out)[last]:
        if name.endswith(".json"):
            (out / name).unlink()
    for name in ("grid.png", "grid-0000.png"):
        (out / name).unlink(missing_ok=True)
    return _beside(ctx, out, "after a cut run", snapshot(out))


@kind("outputs", "generate --out: a folder where a generate was killed with -9 mid-run", quick=False)
def generate_beside_killed(ctx: Context) -> Case:
    out = ctx.folder("generate-beside-killed") / "images"
    command = [sys.executable, "-m", "sdlora", "generate", "--base", str(ctx.model), "--prompt", "x", "--n", "200",
               "--batch-size", "1", "--steps", "2", "--size", "64x64", "--out", str(out)]  # fmt: skip
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "0002-44.png").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None:
        return Case("inputs", "", "", ok=False, detail="generate ended before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from sdlora import layout

    # What the killed run finished is the user's now; its half-written temporaries and lock are sdlora's own.
    before = {rel: digest for rel, digest in snapshot(out).items() if layout.GENERATED.match(rel)}
    return _beside(ctx, out, "after a run killed with -9", before)


def _demo_folder(ctx: Context, label: str, photos_marked: bool) -> tuple[Path, Path]:
    """OUT of an earlier demo (its marker) whose photos/ holds a photo of the user's: in a folder without the
    demo's marker, or as a stray file beside the demo's own."""
    from sdlora import fsutil

    out = ctx.folder(label) / "demo"
    photos = out / "photos"
    photos.mkdir(parents=True)
    fsutil.write_marker(out, fsutil.new_marker("demo"))
    if photos_marked:
        fsutil.write_marker(photos, fsutil.new_marker("demo"))
    make.photo(7).save(photos / "my-wedding.jpg")
    return out, photos


@kind("outputs", "demo OUT --overwrite: OUT/photos/ holds the user's photo (no demo marker)")
def demo_photos_foreign(ctx: Context) -> Case:
    out, photos = _demo_folder(ctx, "demo-photos-foreign", photos_marked=False)
    return error_case(ctx, "", ["demo", str(out), "--overwrite"], 2, (str(photos), "--overwrite replaces only"),
                      out, inprocess=True)  # fmt: skip


@kind("outputs", "demo OUT --overwrite: the demo's OUT/photos/ holds a stray photo of the user's")
def demo_photos_stray(ctx: Context) -> Case:
    out, photos = _demo_folder(ctx, "demo-photos-stray", photos_marked=True)
    return error_case(ctx, "", ["demo", str(out), "--overwrite"], 2, (str(photos), "my-wedding.jpg", "move them"),
                      out, inprocess=True)  # fmt: skip


@kind("numbers", "generate: 10,000 prompts x --n 100000 (a billion images) refused at once, in little memory")
def generate_huge(ctx: Context) -> Case:
    folder = ctx.folder("generate-huge")
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"a photo of sks person, take {i}\n" for i in range(10_000)))
    args = ["generate", "--base", str(ctx.model), "--prompts", str(prompts), "--n", "100000", "--out",
            str(folder / "o")]  # fmt: skip
    before = snapshot(folder)
    ran, megabytes = _measured(args, timeout=60)
    case = judged("", f"exit 2 within {HUGE_SECONDS:.0f} s under {HUGE_MB} MB, one line with the count and the limit",
                  ran, code=2, words=("1,000,000,000 images", "100,000", "--n"), before=before,
                  after=snapshot(folder))  # fmt: skip
    problems = [case.detail] if not case.ok else []
    if ran.seconds > HUGE_SECONDS:
        problems.append(f"took {ran.seconds:.1f} s")
    if megabytes > HUGE_MB:
        problems.append(f"peak memory {megabytes} MB")
    if (folder / "o").exists():
        problems.append("--out was created")
    case.ok = not problems and not case.traceback
    case.detail = "; ".join(problems) or f"{case.detail} ({ran.seconds:.1f} s, {megabytes} MB)"
    case.extra = {"peak_mb": megabytes}
    return case


# Run sdlora from a small launcher that reports its peak memory: a child forked from this process (torch loaded)
# would count this process's memory as its own (Linux keeps the larger high-water mark across exec).
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "sdlora", *sys.argv[1:]])
_, status, usage = os.wait4(child.pid, 0)
sys.stderr.write(f"\\npeak-rss-kb {usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _measured(args: list[str], timeout: float) -> tuple[Ran, int]:
    """Run `python -m sdlora ARGS` offline: what it printed, and its peak resident memory in MB."""
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, errors="replace",
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return Ran(None, stdout, stderr, time.perf_counter() - start), 0
    seconds = time.perf_counter() - start
    stderr, _, peak = stderr.rstrip("\n").rpartition("\npeak-rss-kb ")
    return Ran(proc.returncode, stdout, stderr, seconds), int(peak) // 1024 if peak.isdigit() else 0


@kind("serve", "serve --port N: a port another program listens on")
def serve_port_taken(ctx: Context) -> Case:
    workspace = ctx.folder("serve-port-taken") / "ws"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        case = error_case(ctx, "", ["serve", str(workspace), "--port", str(port)], 1,
                          (f"--port {port}", "already in use", "choose another port"), inprocess=True)  # fmt: skip
    return _no_workspace(case, workspace)


@kind("serve", "serve --port 99999: no port at all")
def serve_port_impossible(ctx: Context) -> Case:
    workspace = ctx.folder("serve-port-99999") / "ws"
    case = error_case(ctx, "", ["serve", str(workspace), "--port", "99999"], 2, ("--port 99999", "1 to 65535"),
                      inprocess=True)  # fmt: skip
    return _no_workspace(case, workspace)


def _no_workspace(case: Case, workspace: Path) -> Case:
    """A refused serve made no workspace: the port is checked before anything is created."""
    if workspace.exists():
        case.ok = False
        case.detail = f"{case.detail}; the workspace was created though serve was refused"
    return case


@kind("serve", "web app downloads: a run whose best/ and a .safetensors are symlinks out of the workspace")
def serve_download_symlinks(ctx: Context) -> Case:
    from sdlora.serve import runs
    from sdlora.serve.workspace import Workspace

    folder = ctx.folder("serve-download-symlinks")
    secret = folder.resolve() / "home"  # the user's files outside the workspace
    (secret / "keys").mkdir(parents=True)
    (secret / "keys" / "id_ed25519").write_text("PRIVATE KEY\n")
    make.safetensors(secret / "other.safetensors")
    ws = Workspace.open(folder / "ws")
    run = ws.root / "runs" / "mine"
    run.mkdir()
    make.safetensors(run / runs.DIFFUSERS_FILE)
    (run / "best").symlink_to(secret / "keys", target_is_directory=True)
    (run / "stolen.safetensors").symlink_to(secret / "other.safetensors")
    before = snapshot(secret)
    start = time.perf_counter()
    offered = [path.name for path in runs.downloads(ws, run)]
    ran = Ran(0, "", "", time.perf_counter() - start)
    zips = sorted(p.name for p in (ws.state / "downloads").glob("*")) if (ws.state / "downloads").exists() else []
    problem = None
    if offered != [runs.DIFFUSERS_FILE] or zips:
        problem = f"offered {offered}, zipped {zips}; expected only {runs.DIFFUSERS_FILE}"
    expected = "only the run's own LoRA offered; best/ (a link out) not zipped, the linked file not offered"
    return succeeded("", expected, ran, problem, before, snapshot(secret))
