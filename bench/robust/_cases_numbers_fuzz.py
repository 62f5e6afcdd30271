"""Kinds of bench.robust.inputs: out-of-range numbers, messages that misled, an interrupt, and fuzzing."""

from __future__ import annotations

import json

from bench.robust import Case, _fuzz, snapshot
from bench.robust import _makers as make
from bench.robust.inputs import GEN, GROUP, Context, error_case, interrupt_train, judged, kind, prep_args, succeeded

NUMBERS = [
    ("train --lr inf", ["train", "d", "o", "--lr", "inf"], "train.learning_rate"),
    ("train --lr nan", ["train", "d", "o", "--lr", "nan"], "train.learning_rate"),
    ("generate --cfg nan", ["generate", *GEN, "--cfg", "nan", "--out", "o"], "generate.cfg"),
    ("train --resolution 100000", ["train", "d", "o", "--resolution", "100000"], "train.resolution"),
    ("generate --seed -1", ["generate", *GEN, "--seed", "-1", "--out", "o"], "generate.seed"),
    ("generate --steps 100000", ["generate", "--prompt", "x", "--steps", "100000", "--out", "o"], "generate.steps"),
    ("generate --size 99992x64", ["generate", "--prompt", "x", "--size", "99992x64", "--out", "o"], "generate.size"),
    ("prep --workers 100000", ["prep", "p", "o", "--workers", "100000"], "prep.workers"),
    ("--set lora.alpha=inf", ["config", "--set", "lora.alpha=inf"], "lora.alpha"),
    ("--set generate.n=10**9", ["config", "--set", "generate.n=1000000000"], "generate.n"),
    ("--set train.seed=2**70", ["config", "--set", "train.seed=1180591620717411303424"], "train.seed"),
]


def _number_kind(label: str, args: list[str], key: str) -> None:
    @kind("numbers", f"{label}: refused before anything runs")
    def case(ctx: Context) -> Case:
        folder = ctx.folder("numbers")
        return error_case(ctx, "", [str(folder / a) if a in ("d", "o", "p") else a for a in args], 2, (key,))


for _label, _args, _key in NUMBERS:
    _number_kind(_label, _args, _key)


@kind("numbers", "config file saying model.allow_pickle = true")
def pickle_in_file(ctx: Context) -> Case:
    toml = ctx.folder("pickle-toml") / "shared.toml"
    toml.write_text("[model]\nallow_pickle = true\n")
    return error_case(ctx, "", ["config", "--config", str(toml)], 2, ("shared.toml", "only be given on the command"))


@kind("numbers", "--set model.allow_pickle=true")
def pickle_in_set(ctx: Context) -> Case:
    return error_case(ctx, "", ["config", "--set", "model.allow_pickle=true"], 2, ("--allow-pickle",))


# ---- messages that misled


@kind("messages", "generate --lora run:abc (the scale is not a number)")
def lora_abc(ctx: Context) -> Case:
    run = make.lora_run(ctx.folder("lora-abc") / "run")
    args = ["generate", "--base", str(ctx.model), "--lora", f"{run}:abc", *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("'abc'", "not a number"), inprocess=True)


@kind("messages", "generate --lora run:nan")
def lora_nan(ctx: Context) -> Case:
    run = make.lora_run(ctx.folder("lora-nan") / "run")
    args = ["generate", "--base", str(ctx.model), "--lora", f"{run}:nan", *GEN, "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("finite number",), inprocess=True)


@kind("messages", "generate --prompts empty file (not 'no such file')")
def empty_prompts(ctx: Context) -> Case:
    prompts = ctx.folder("empty-prompts") / "prompts.txt"
    prompts.write_text("")
    args = ["generate", "--base", str(ctx.model), "--prompts", str(prompts), "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("prompts.txt", "empty"), inprocess=True)


@kind("messages", "generate --prompts /dev/null (a device, not 'no such file')")
def device_prompts(ctx: Context) -> Case:
    args = ["generate", "--base", str(ctx.model), "--prompts", "/dev/null", "--out", str(ctx.work / "o")]
    return error_case(ctx, "", args, 2, ("/dev/null", "not a regular file"), inprocess=True)


@kind("messages", "prep PHOTOS_DIR is a file")
def photos_is_file(ctx: Context) -> Case:
    folder = ctx.folder("photos-file")
    (folder / "photo.jpg").write_bytes(make.jpeg(make.photo(1), 90))
    return error_case(ctx, "", prep_args(folder / "photo.jpg", folder / "out"), 2, ("photo.jpg",), folder)


@kind("messages", "train interrupted with Ctrl-C: not printed as an error", quick=False)
def interrupt(ctx: Context) -> Case:
    data = make.photos(ctx.folder("interrupt") / "data")
    ran = interrupt_train(ctx, data, data.parent / "out")
    problem = None
    if ran.code != 130:
        problem = f"exit {ran.code}, expected 130"
    elif "error:" in ran.stderr or "stopped after step" not in ran.stderr:
        problem = f"stderr: {ran.stderr.strip().splitlines()[-1:]}"
    case = succeeded("", "exit 130, 'stopped after step N; checkpoint saved', no 'error:'", ran, None)
    case.ok, case.detail = problem is None and not ran.traceback, problem or "ok"
    return case


# ---- property-based fuzzing (hypothesis) and the real commands on fuzzed inputs


def _fuzz_case(name: str, outcome: dict, seconds: float) -> Case:
    failures = outcome["failures"]
    return Case(
        group=GROUP,
        name=name,
        expected="only our error type, for every generated input",
        ok=not failures,
        traceback=bool(failures),
        seconds=round(seconds, 2),
        detail=f"{outcome['examples']} examples, {len(failures)} failures" + (f": {failures[0]}" if failures else ""),
        extra={"examples": outcome["examples"], "failures": failures[:10]},
    )


@kind("fuzz", "image loader: valid magic numbers with random bodies (hypothesis)")
def fuzz_magic(ctx: Context) -> Case:
    return _fuzz_case("", *_fuzz.timed(lambda: _fuzz.fuzz_image_loader(ctx.folder("fuzz-magic"), ctx.quick)))


@kind("fuzz", "image loader: random bytes (hypothesis)")
def fuzz_bytes(ctx: Context) -> Case:
    folder = ctx.folder("fuzz-bytes")
    return _fuzz_case("", *_fuzz.timed(lambda: _fuzz.fuzz_image_loader(folder, ctx.quick, random_bytes=True)))


@kind("fuzz", "manifest reader: random bytes, random JSON, mutated entries (hypothesis)")
def fuzz_manifest(ctx: Context) -> Case:
    return _fuzz_case("", *_fuzz.timed(lambda: _fuzz.fuzz_manifest_reader(ctx.folder("fuzz-manifest"), ctx.quick)))


@kind("fuzz", "file names: random bytes through report.json, the summary and the contact sheet (hypothesis)")
def fuzz_names(ctx: Context) -> Case:
    return _fuzz_case("", *_fuzz.timed(lambda: _fuzz.fuzz_names(ctx.folder("fuzz-names"), ctx.quick)))


@kind("fuzz", "prep on 40 files with random names and magic + random bodies")
def prep_fuzzed(ctx: Context) -> Case:
    folder = ctx.folder("prep-fuzzed")
    photos = _fuzz.fuzzed_folder(folder / "photos", 12 if ctx.quick else 40, seed=17)
    before = snapshot(photos)
    ran = ctx.run(*prep_args(photos, folder / "out"), timeout=240)
    problem = None
    if ran.code == 0:
        count = len(json.loads((folder / "out" / "report.json").read_bytes())["files"])
        problem = None if count == len(list(photos.iterdir())) else f"report.json lists {count} files"
    return succeeded("", "exit 0, every file in report.json", ran, problem, before, snapshot(photos))


@kind("fuzz", "train on fuzzed manifests (the real command, before any model loads)")
def train_fuzzed(ctx: Context) -> Case:
    from hypothesis import HealthCheck, given, settings

    folder = ctx.folder("train-fuzzed")
    make.photos(folder / "data")
    runs: list[Case] = []

    @settings(max_examples=3 if ctx.quick else 12, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(_fuzz.manifest_texts())
    def check(text: bytes) -> None:
        (folder / "data" / "manifest.jsonl").write_bytes(text)
        ran = ctx.run("train", str(folder / "data"), str(folder / "out"), "--base", str(ctx.model), "--steps", "1",
                      inprocess=True)  # fmt: skip
        if ran.code != 0:  # some texts are valid manifests whose image is missing: still one error line
            runs.append(judged("", "", ran, code=ran.code if ran.code in (1, 2) else 2))

    check()
    bad = [case for case in runs if not case.ok]
    return Case(GROUP, "", "one error line for every manifest", ok=not bad, traceback=any(c.traceback for c in bad),
                detail=f"{len(runs)} runs, {len(bad)} bad" + (f": {bad[0].detail}" if bad else ""))  # fmt: skip
