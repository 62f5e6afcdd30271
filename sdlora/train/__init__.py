"""`sdlora train`: DreamBooth LoRA training on Accelerate, for every model family: train(config, dataset, out).

It reads like a table of contents: pre-flight checks (here, before any model loads), set-up (`setup`), the loop and
the final save (`run`), with identity scoring (`identity`) beside it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.config import Config
from sdlora.errors import Interrupted, UsageError
from sdlora.train.state import Plan, TrainResult

if TYPE_CHECKING:
    from sdlora.families import Family

__all__ = ["Plan", "TrainResult", "preflight", "resolve_precision", "run_name", "train"]

# Files of a run that a kohya file named NAME.safetensors must not replace.
RUN_FILES = {
    layout.DIFFUSERS_LORA: "the run's diffusers-format LoRA file",
    layout.LORA_STATE: "the training state in each checkpoint",
}


def train(config: Config, dataset_dir: Path, out_dir: Path) -> TrainResult:
    """Pre-flight checks, set-up, the loop, the final save. Ctrl-C/SIGTERM checkpoint and raise Interrupted."""
    from sdlora.train import checkpoint, identity, run, setup

    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    checkpoint.check_owner(out_dir, dataset_dir)  # before anything is written into OUT_DIR
    plan = preflight(config, dataset_dir, out_dir)
    config = plan.config
    accelerator = setup.make_accelerator(config, plan.precision)
    held = _lock(out_dir) if accelerator.is_main_process else None  # one writer: this run's main process
    with held or contextlib.nullcontext():
        if held is not None:
            checkpoint.mark_run(out_dir, fresh=config.train.overwrite and plan.resume_from is None)
        evaluation = identity.start(config, plan, accelerator)  # identity scoring; None when off
        state = setup.setup(config, plan, accelerator)
        identity.catch_up(evaluation, state)  # a resumed step whose evaluation a kill -9 prevented
        with run.stop_signals() as stopped:
            step = run.loop(state, stopped, evaluation)
        if stopped and step < config.train.steps:
            raise Interrupted(run.interrupted_message(state, step), stopped[0])
        return run.finish(state, step)


def _lock(out_dir: Path) -> Any:
    """OUT_DIR's lock; stale temporaries of a killed run are removed once it is held."""
    from sdlora import fsutil

    held = fsutil.lock(out_dir, "train").acquire()
    fsutil.remove_stale_temporaries(out_dir)
    return held


def preflight(config: Config, dataset_dir: Path, out_dir: Path) -> Plan:
    """Every check that needs no model, each failing with a one-line UsageError."""
    from sdlora.lora import training_adapter
    from sdlora.models import check_base, check_sizes
    from sdlora.preflight import check_output_dir
    from sdlora.prep.images import check_images
    from sdlora.train import checkpoint, data, methods, recommended

    # Local checks first (the path, its headers); the hub, a network round trip, once the dataset's are done.
    check_base(config.model.base, config.model.allow_pickle, config.model.single_file_config, hub=False)
    sizes = [("train.resolutions", s) for s in config.train.resolutions] or [("--resolution", config.train.resolution)]
    check_sizes(config.model, sizes)  # the family's multiple (Flux: 16), before any model loads
    token, class_word = data.trigger_parts(dataset_dir, config.prep.token, config.prep.class_word)
    caption = config.prep.caption_template.format(token=token, class_word=class_word)
    examples = data.load_examples(dataset_dir, caption, config.train.control_dir)
    check_images([path for e in examples for path in (e.image, e.control) if path])  # headers: a damaged one fails now
    given = methods.active(config.train)
    for method in given:  # e.g. masked loss: prep's masks; class images: --class-dir holds images
        method.check(config, examples, dataset_dir, token)
    check_base(config.model.base, config.model.allow_pickle, config.model.single_file_config)
    adapter = training_adapter.check(config.model.training_adapter)  # a missing or unreadable file fails now
    precision = _precision_and_device_checks(config)
    name = run_name(config.train.name, out_dir)
    check_output_dir(out_dir, "OUT_DIR")
    family = check_family_takes(config)  # reads the base's family from its config files (and if it is distilled)
    bucketed = any(e.size and e.size[0] != e.size[1] for e in examples)
    # Unset pivotal tuning and preservation: the benchmark's recommendation (an unset pivotal asks the base's family).
    config, settled = recommended.settle(config, examples, token, not bucketed, out_dir, family)
    data.check_controls(examples, family, config.train)  # after the recommendation: it may choose class images
    for method in methods.active(config.train):  # those the recommendation turned on, e.g. pivotal tuning
        if method not in given:
            method.check(config, examples, dataset_dir, token)
    settings = config.model_dump(mode="json")
    checkpoint.check_out_dir(out_dir, settings, config.train.resume, config.train.overwrite)
    resume_from = checkpoint.resolve_resume(out_dir, config.train.resume)
    training_adapter.check_unchanged(resume_from, adapter)
    return Plan(
        dataset_dir=dataset_dir,
        out_dir=out_dir,
        examples=examples,
        trigger=f"{token} {class_word}",
        precision=precision,
        resume_from=resume_from,
        name=name,
        config=config,
        settled=settled,
        training_adapter=adapter,
    )


def _precision_and_device_checks(config: Config) -> str:
    """The precision the run trains in; the optimizer and --quantize checked on this machine (before a staged
    family's text encoders load, train.setup)."""
    from sdlora.models import device_facts
    from sdlora.quantization import check_quantize
    from sdlora.train.offload import check_settings
    from sdlora.train.optim import check_optimizer

    cuda, bf16 = device_facts()
    check_optimizer(config.train.optimizer)
    check_quantize(config.model.quantize, cuda)
    check_settings(config.train.offload_blocks, config.train.gradient_checkpointing, config.train.compile)
    return resolve_precision(config.train.mixed_precision, cuda, bf16)


def check_family_takes(config: Config) -> Family:
    """Settings the base's family can't honour are refused before any model loads (its family is read from the
    base's config files): a text-encoder LoRA where the family trains none, pivotal tuning where no CLIP encoder
    takes new tokens, an adapter kind its files can't hold, a distilled checkpoint (check_distilled).
    Returns the family, so that the pre-flight reads the base's config once."""
    from sdlora.models import peek_base

    lc = config.lora
    family, stand_in = peek_base(config.model)
    check_distilled(config, family, stand_in)
    if config.train.offload_blocks and hasattr(stand_in, family.denoiser):  # a single file without configs: at load
        from sdlora.train.offload import check_count

        check_count(config.train.offload_blocks, getattr(stand_in, family.denoiser), family.label)
    if lc.train_text_encoder and not family.trainable_text_encoders:
        raise UsageError(
            f"--train-text-encoder: {family.label} trains no text-encoder LoRA (its LoRA files hold the "
            f"{family.denoiser_label}'s alone); leave it off"
        )
    if config.train.pivotal and not family.embedding_keys:
        raise UsageError(
            f"--pivotal: not available for {family.label} bases (pivotal tuning's new tokens need a CLIP text "
            f"encoder that carries the prompt's words to the {family.denoiser_label}, and it has none); pass "
            "--no-pivotal"
        )
    from sdlora.generate.render import check_negative  # the sample grids' and identity renders' negative prompt

    check_negative(config.generate.negative, family)
    if family.adapter_kinds is not None and lc.kind not in family.adapter_kinds:
        raise UsageError(
            f"--adapter {lc.kind}: {family.label}'s LoRA files can't hold it; use --adapter "
            f"{' or '.join(family.adapter_kinds)}"
        )
    return family


def check_distilled(config: Config, family: Family, stand_in: Any) -> None:
    """A distilled checkpoint (an inference target, Family.is_distilled, read from its configs) is refused in one
    line naming the three routes, unless model.allow_distilled or model.training_adapter."""
    from sdlora.errors import printable

    model = config.model
    if model.allow_distilled or model.training_adapter or not family.is_distilled(stand_in):
        return
    base = family.undistilled_base(stand_in) or f"{family.label}'s undistilled base"
    raise UsageError(
        f"--base {printable(model.base or '')}: a distilled {family.label} checkpoint, made for rendering (trained "
        f"directly it gives grain or no effect); train on {base} and render your LoRA on this one, or set "
        "model.training_adapter = PATH_OR_HUB_ID (a de-distillation LoRA, left out of samples and your LoRA files), "
        "or train on a de-distilled checkpoint; --allow-distilled trains on it as it is"
    )


def run_name(name: str | None, out_dir: Path) -> str:
    """The run's name (--name, else OUT_DIR's): a plain file name, so that NAME.safetensors lands in OUT_DIR and
    replaces none of the run's own files."""
    given = name is not None
    name = name if given else Path(out_dir).resolve().name
    what = f"--name {name!r}" if given else f"OUT_DIR's name {name!r} (the default --name)"
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip() or name[0] == ".":
        raise UsageError(f"{what}: must be a plain file name (no '/', '\\', leading '.' or '..'), e.g. --name alice")
    if len(name.encode()) > 200:
        raise UsageError(f"{what}: too long for a file name ({len(name.encode())} bytes); choose a shorter --name")
    taken = [what_it_is for f, what_it_is in RUN_FILES.items() if layout.kohya_file(name).casefold() == f.casefold()]
    if taken:
        raise UsageError(f"{what}: {layout.kohya_file(name)} would replace {taken[0]}; choose another --name")
    return name


def resolve_precision(requested: str, cuda: bool, bf16_supported: bool) -> str:
    """auto: fp32 ("no") on CPU, bf16 on GPUs that have it, else fp16. bf16 on a GPU without it, and fp16 on the
    CPU, are errors."""
    if requested == "auto":
        return ("bf16" if bf16_supported else "fp16") if cuda else "no"
    if requested == "bf16" and cuda and not bf16_supported:
        raise UsageError("--mixed-precision bf16: this GPU has no bf16 support; use fp16 (or no)")
    if requested == "fp16" and not cuda:
        # Accelerate has no fp16 autocast or gradient scaler on the CPU: the half base and fp32 LoRA can't mix.
        raise UsageError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    return requested
