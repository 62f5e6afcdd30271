"""Nothing lost (issue 15): careless commands never touch a user's or another command's files, and training killed
with SIGKILL at random moments (between a checkpoint and its evaluation too) resumes to the uninterrupted result.

`cases(work, quick)` runs everything through the real CLI in subprocesses on a tiny random SD 1.x model. The
interruption trials run `python bench/robust/lost.py train ...`: the CLI with identity scoring replaced by a fast
score computed from the LoRA weights (no faces needed, yet a step scored from other weights would differ), which
also waits 0.3 s so that a kill can land between a checkpoint and its evaluation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the interruption trials' trainer)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.robust import Case, Ran, modified, sdlora, snapshot

GROUP = "lost"
STEPS = 5
ROOT = Path(__file__).resolve().parents[2]


# --- the world the cases run in -------------------------------------------------------------------------------------


class World:
    """A tiny base, photos, a dataset, an uninterrupted reference run and folders a user cares about."""

    def __init__(self, work: Path) -> None:
        from sdlora import fsutil, testing

        self.work = work
        self.holder: subprocess.Popen | None = None  # a live process holding a lock (see _lock_checks)
        self.base = testing.save_tiny_pipeline("sd1", work / "base")
        self.photos = _photos(work / "photos")
        self.dataset = _photos(work / "dataset")
        fsutil.write_marker(self.dataset, fsutil.new_marker("prep"))
        (self.dataset / "config.json").write_text(json.dumps({"prep": {"token": "sks", "class_word": "person"}}))
        self.reference = work / "reference"
        done = trainer(self.dataset, self.reference, self.base)
        if done.code != 0:
            raise RuntimeError(f"the reference run failed: {done.stderr[-2000:]}")

    def thesis(self, name: str) -> Path:
        """A folder of the user's that sdlora never wrote."""
        folder = self.work / name
        (folder / "src").mkdir(parents=True)
        (folder / "thesis.tex").write_text("\\documentclass{article}")
        (folder / "src" / "main.py").write_text("print('mine')")
        (folder / "samples").mkdir()
        (folder / "samples" / "figure.png").write_bytes(b"not really a png")
        (folder / "config.json").write_text('{"tool": "latexmk"}')
        return folder


def _photos(folder: Path) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    for i, (left, top, side) in enumerate([(140, 30, 200), (120, 10, 240), (160, 50, 170), (100, 0, 280)]):
        crop = photo.crop((left, top, left + side, top + side)).resize((64, 64), Image.LANCZOS)
        crop.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a photo of sks person")
    return folder


def train_args(dataset: Path, out: Path, base: Path, *extra: str) -> list[str]:
    args = [str(dataset), str(out), "--base", str(base), "--steps", str(STEPS), "--resolution", "64", "--rank", "4"]
    args += ["--lr", "1e-3", "--checkpoint-every", "1", "--keep-checkpoints", "10", "--sample-every", "0"]
    return [*args, "--eval-every", "1", "--name", "astro", "--set", "train.log_every=1", *extra]


def trainer(dataset: Path, out: Path, base: Path, *extra: str, timeout: float = 300) -> Ran:
    """`sdlora train` with the fast scorer (see the module docstring), to the end."""
    command = [sys.executable, str(Path(__file__).resolve()), "train", *train_args(dataset, out, base, *extra)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(), errors="replace")
    except subprocess.TimeoutExpired:
        return Ran(None, "", "", time.perf_counter() - start)
    return Ran(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- careless commands ----------------------------------------------------------------------------------------------


def _refused(world: World, name: str, args: list[str], code: int, guarded: list[Path], words: str) -> Case:
    """Run a command that must be refused with one `error:` line (containing `words`) and touch nothing."""
    before = {folder: snapshot(folder) for folder in guarded}
    ran = sdlora(*args, timeout=180)
    changed = sum(modified(before[folder], snapshot(folder)) for folder in guarded)
    ok = ran.code == code and words in ran.error_line and not ran.traceback and changed == 0
    return Case(
        GROUP,
        name,
        f"exit {code}, one error line naming it, nothing touched",
        ok,
        ran.code,
        ran.traceback,
        ran.code is None,
        changed,
        round(ran.seconds, 1),
        ran.error_line or ran.stderr[-300:],
    )


def careless_commands(world: World, quick: bool) -> list[Case]:
    base, data, ref = str(world.base), str(world.dataset), world.reference
    tiny = ["--base", base, "--resolution", "64", "--steps", "2", "--eval-every", "0", "--sample-every", "0"]
    gen = ["generate", "--base", base, "--prompt", "x", "--steps", "2", "--size", "64x64", "--n", "1"]
    outside = world.work / "elsewhere"
    checks: list[tuple[str, list[str], int, list[Path], str]] = [
        ("prep --overwrite into a folder with a thesis", ["prep", str(world.photos), str(world.thesis("p")),
         "--overwrite"], 2, [world.work / "p", world.photos], "did not write"),
        ("train --overwrite into a folder with a thesis", ["train", data, str(world.thesis("t")), *tiny,
         "--overwrite"], 2, [world.work / "t", world.dataset], "did not write"),
        ("generate --out DATASET", [*gen, "--out", data], 2, [world.dataset], "sdlora prep"),
        ("generate --out TRAIN_OUT_DIR", [*gen, "--out", str(ref)], 2, [ref], "sdlora train"),
        ("train DATASET DATASET --overwrite", ["train", data, data, *tiny, "--overwrite"], 2, [world.dataset],
         "inputs"),
        ("eval --json DATASET/manifest.jsonl", ["eval", "--reference", data, "--images", str(world.photos),
         "--json", f"{data}/manifest.jsonl"], 2, [world.dataset], "dataset"),
        ("eval --report DATASET", ["eval", "--reference", data, "--images", str(world.photos), "--report", data],
         2, [world.dataset], "sdlora prep"),
        ("prep into a train OUT_DIR with --overwrite", ["prep", str(world.photos), str(ref), "--overwrite"], 2,
         [ref], "sdlora train"),
        ("train --name ../../x", ["train", data, str(world.work / "n1"), *tiny, "--name", "../../x"], 2,
         [world.work], "plain file name"),
        ("train --name lora_state", ["train", data, str(world.work / "n2"), *tiny, "--name", "lora_state"], 2,
         [world.work], "lora_state.safetensors"),
        ("train --set train.name='../x'", ["train", data, str(world.work / "n3"), *tiny, "--set",
         "train.name='../x'"], 2, [world.work], "plain file name"),
    ]  # fmt: skip
    checks += _dataset_checks(world, tiny, outside)
    checks += _lock_checks(world, gen)
    if quick:
        checks = checks[::3]
    return [_refused(world, *check) for check in checks]


def _dataset_checks(world: World, tiny: list[str], outside: Path) -> list:
    from sdlora.prep.manifest import ManifestEntry, write_manifest

    _photos(outside)
    checks = []
    for kind, image in (("an absolute path", str(outside / "img0.png")), ("'..'", "../elsewhere/img0.png")):
        folder = world.work / f"manifest-{len(checks)}"
        _photos(folder)
        entry = ManifestEntry(
            image=image,
            caption="a photo of sks person",
            source="x",
            source_sha256="0" * 64,
            source_size=(64, 64),
            crop_box=(0, 0, 64, 64),
            sharpness=1.0,
            width=64,
            height=64,
        )
        write_manifest(folder / "manifest.jsonl", [entry])
        checks.append(
            (
                f"manifest entry with {kind}",
                ["train", str(folder), str(world.work / f"o{kind[:3]}"), *tiny],
                2,
                [outside],
                "dataset folder",
            )
        )
    linked = world.work / "linked"
    _photos(linked)
    (linked / "zz.png").symlink_to(outside / "img0.png")
    checks.append(
        (
            "dataset symlink out of the folder",
            ["train", str(linked), str(world.work / "ol"), *tiny],
            2,
            [outside],
            "outside the dataset",
        )
    )
    return checks


def _lock_checks(world: World, gen: list[str]) -> list:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    busy = world.work / "busy"
    busy.mkdir()
    record = {"pid": holder.pid, "command": "train", "started": "now", "started_at": time.time()}
    (busy / ".sdlora.lock").write_text(json.dumps(record))
    world.holder = holder  # ended in cases()
    return [
        ("second train into a folder in use", ["train", str(world.dataset), str(busy), "--base", str(world.base)], 1,
         [busy], f"pid {holder.pid}"),
        ("generate into a folder in use", [*gen, "--out", str(busy)], 1, [busy], f"pid {holder.pid}"),
        ("prep into a folder in use", ["prep", str(world.photos), str(busy)], 1, [busy], f"pid {holder.pid}"),
    ]  # fmt: skip


def nan_lora(world: World) -> Case:
    import torch
    from safetensors.torch import save_file

    lora = world.work / "nan.safetensors"
    weights = torch.zeros(4, 32)
    weights[0, 0] = float("nan")
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": weights}, str(lora))
    out = world.work / "nan-out"
    ran = sdlora("generate", "--base", str(world.base), "--lora", str(lora), "--prompt", "x", "--out", str(out))
    ok = ran.code == 2 and "NaN/inf" in ran.error_line and not out.exists()
    return Case(
        GROUP,
        "generate with a LoRA holding NaN",
        "exit 2 before rendering, nothing written",
        ok,
        ran.code,
        ran.traceback,
        ran.code is None,
        0,
        round(ran.seconds, 1),
        ran.error_line,
    )


def generate_interrupted(world: World) -> Case:
    """Ctrl-C in a long generate keeps every finished image (with its sidecar)."""
    out = world.work / "long"
    command = [sys.executable, "-m", "sdlora", "generate", "--base", str(world.base), "--prompt", "a photo", "--n",
               "200", "--batch-size", "1", "--steps", "2", "--size", "64x64", "--out", str(out)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "0001-43.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    kept = sorted(out.glob("*.png"))
    whole = all((p.with_suffix(".json")).is_file() for p in kept[:-1]) and all(_png_ok(p) for p in kept)
    ok = proc.returncode == 130 and len(kept) >= 2 and whole and "kept the" in stderr
    return Case(
        GROUP,
        "Ctrl-C during a long generate",
        "exit 130, every finished image kept",
        ok,
        proc.returncode,
        "Traceback" in stderr,
        False,
        0,
        round(time.perf_counter() - start, 1),
        f"{len(kept)} images kept; {stderr.strip().splitlines()[-1] if stderr.strip() else ''}",
    )


def _png_ok(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except OSError:
        return False


# --- interruptions ---------------------------------------------------------------------------------------------------


def same_run(out: Path, reference: Path) -> str:
    """'' when `out` holds what the uninterrupted `reference` run wrote (LoRA tensors, loss and eval records,
    best/), else what differs."""
    from safetensors.torch import load_file

    for name in ("pytorch_lora_weights.safetensors", "astro.safetensors", "best/astro.safetensors"):
        if not (out / name).is_file():
            return f"{name} missing"
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        if a.keys() != b.keys() or any(not bool((a[k] == b[k]).all()) for k in a):
            return f"{name} differs"
    if _records(out) != _records(reference):
        return "metrics.jsonl records differ"
    for name, key in (("best/best.json", "step"), ("summary.json", "best_step")):
        if (
            not (out / name).is_file()
            or json.loads((out / name).read_text())[key] != json.loads((reference / name).read_text())[key]
        ):
            return f"{name} differs"
    return ""


def checkpoint_folders(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


def _records(out: Path) -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [
        (r["step"], r.get("loss"), r.get("lr"), json.dumps(r.get("eval"), sort_keys=True))
        for r in map(json.loads, lines)
    ]


def _moment(rng: random.Random, kind: str, out: Path) -> Callable[[], bool]:
    """When to kill: a predicate polled every 10 ms."""
    step = rng.randint(1, STEPS)
    if kind == "between checkpoint and evaluation":
        return lambda: (out / "checkpoints" / f"step-{step:06d}").is_dir() and not _evaluated(out, step)
    if kind == "during training":
        delay = rng.uniform(0, 0.4)
        started: list[float] = []

        def after_step() -> bool:
            if not started and _logged(out) >= step - 1:
                started.append(time.monotonic())
            return bool(started) and time.monotonic() - started[0] >= delay

        return after_step
    at = time.monotonic() + rng.uniform(0.5, 12.0)  # start-up, model loading, anything
    return lambda: time.monotonic() >= at


def _evaluated(out: Path, step: int) -> bool:
    path = out / "metrics.jsonl"
    return path.is_file() and f'{{"step": {step}, "eval"' in path.read_text(errors="replace")


def _logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text(errors="replace").count('"loss"') if path.is_file() else 0


def trial(world: World, number: int, kind: str, rng: random.Random) -> Case:
    out = world.work / f"kill-{number:02d}"
    command = [sys.executable, str(Path(__file__).resolve()), "train", *train_args(world.dataset, out, world.base)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    due = _moment(rng, kind, out)
    while proc.poll() is None and not due():
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = sorted(p.name for p in checkpoint_folders(out))
    resumed = trainer(world.dataset, out, world.base, "--resume", "latest")
    if resumed.code == 2 and "drop --resume" in resumed.error_line:  # killed before the run had written anything
        resumed = trainer(world.dataset, out, world.base)
    differs = same_run(out, world.reference) if resumed.code == 0 else f"resume exited {resumed.code}"
    caught_up = "checkpointed but not evaluated" in resumed.stdout
    where = f"killed with checkpoints {left[-1] if left else 'none'}{', a score caught up' if caught_up else ''}"
    return Case(
        "interrupt",
        f"kill -9 {kind} (trial {number})",
        "the resumed run equals the uninterrupted one",
        not differs and resumed.code == 0,
        resumed.code,
        resumed.traceback,
        resumed.code is None,
        0,
        round(time.perf_counter() - start, 1),
        differs or (where if killed else "finished before the kill"),
        {"killed": killed, "checkpoints_left": left, "evaluation_caught_up": caught_up},
    )


KINDS = ("between checkpoint and evaluation", "during training", "at a random time")


def cases(work: Path, quick: bool) -> list[Case]:
    world = World(work)
    try:
        results = careless_commands(world, quick)
    finally:
        if world.holder is not None:
            world.holder.kill()
            world.holder.wait()
    results += [nan_lora(world), generate_interrupted(world)]
    rng = random.Random(15)
    trials = 4 if quick else 21
    results += [trial(world, i, KINDS[i % len(KINDS)], rng) for i in range(trials)]
    shutil.rmtree(work / "base", ignore_errors=True)
    return results


# --- the interruption trials' trainer ------------------------------------------------------------------------------


def _fast_scoring() -> None:
    """Identity scoring as a function of the LoRA weights, with a 0.3 s pause (a window for the kills)."""
    import sdlora.evaluation.run as evaluation
    from sdlora.evaluation.metrics import Summary

    def score(pipe, reference, backend, prompts, seeds, *args, **kwargs):
        from peft.utils import get_peft_model_state_dict

        time.sleep(0.3)
        total = sum(float(v.double().abs().sum()) for v in get_peft_model_state_dict(pipe.unet).values())
        fields = {"identity": (total * 1000) % 1, "diversity": 0.5, "face_rate": 1.0, "recognised_rate": 1.0}
        return Summary(
            images=1,
            images_with_face=1,
            identity_distance=0.3,
            face_spread=0.1,
            memorised_rate=0.0,
            bleed=None,
            other_faces=0,
            prompt_fidelity=None,
            **fields,
        ).model_dump()

    evaluation.score_checkpoint = score
    evaluation.face_backend = lambda name: object()
    evaluation.reference_set = lambda folder, backend, loaded=None: object()


if __name__ == "__main__":
    _fast_scoring()
    from sdlora.cli import app

    app(prog_name="sdlora")
