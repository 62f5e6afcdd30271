"""Training set-up: the accelerator, the base on the device, class images, adapters, cached batches, optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.config import Config, class_prompt_of
from sdlora.train import fsdp, staging
from sdlora.train.methods.base import Build, Method
from sdlora.train.state import Plan, Run

if TYPE_CHECKING:
    from sdlora.config import TrainConfig
    from sdlora.families import Family
    from sdlora.models import ModelInfo

__all__ = ["Run", "load_base", "make_accelerator", "setup", "setup_pipeline"]


def make_accelerator(config: Config, precision: str) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps its settings in a process-wide singleton; forget the last run's (tests and notebooks
    # train several times in one process), keeping the distributed set-up.
    AcceleratorState._reset_state()
    # The LR schedule is stepped by hand once per optimisation step, whatever the number of processes.
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,
    )
    fsdp.enable_on_cpu(accelerator)
    fsdp.check(config, accelerator)  # an FSDP config's refusals, before any model loads
    return accelerator


def setup(config: Config, plan: Plan, accelerator: Any) -> Run:
    """Load the base, make class images, attach LoRA, cache latents/text, build and prepare the optimizer."""
    import torch

    from sdlora.train import checkpoint
    from sdlora.train.offload import check_accelerator

    tc = config.train
    check_accelerator(tc.offload_blocks, str(accelerator.distributed_type))
    note = checkpoint.check_resumed_batch(plan.out_dir, plan.resume_from, tc.batch_size, accelerator.num_processes)
    if note:
        accelerator.print(note)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.precision, torch.float32)
    cached = staging.encode_first(config, plan, accelerator, weight_dtype)  # Flux: T5, CLIP before the transformer
    pipe, info = load_base(config, accelerator, weight_dtype)
    return setup_pipeline(config, plan, accelerator, pipe, info, cached)


def setup_pipeline(
    config: Config, plan: Plan, accelerator: Any, pipe: Any, info: ModelInfo, cached: staging.Cached | None = None
) -> Run:
    """setup() after the base is loaded (frozen, on the device): also what bench/train_step.py times. `cached`:
    what staging.encode_first cached (a staged family's text encoders are then not in `pipe`). Each active
    likeness method (sdlora.train.methods) caches what it needs at its point."""
    from sdlora import families
    from sdlora.lora import peft
    from sdlora.train import methods, offload

    family = info.spec
    if plan.settled:
        accelerator.print(plan.settled)  # what the unset recommended settings became, once the base has loaded
    given = config  # what the run files store, so that a resume compares like with like
    config = families.with_defaults(config, family, pipe)  # e.g. Flux's sampler for the sample grids
    active = methods.active(config.train)
    objective = build_objective(config.train, family, pipe, accelerator.device, active)
    staged = staging.staged_parts(config, family)  # in CPU RAM, on the device only to be cached
    # The denoiser joins the device once they have left it; under FSDP, as its shards (accelerator.prepare).
    late = [family.denoiser] if staged or fsdp.sharded(accelerator) else []
    peft.check_exportable(config.lora, getattr(pipe, family.denoiser), family)  # before class images
    cached = cached or staging.encode_apart(config, plan, pipe, family, accelerator, pipe.vae.dtype)
    text_cache = staging.use(pipe, family, cached)  # renders read the cache; None unless a staged family
    build = methods.Build(
        config, plan, pipe, family, accelerator, text_apart=bool(staging.frozen_encoders(config, family))
    )
    away = staged + late  # in CPU RAM: on the device for a method that renders with the base
    for method in active:  # class images: rendered by the base, before any adapter
        with staging.visiting(pipe, away if method.renders_with_base(config.train) else [], accelerator.device):
            method.before_adapters(build)
    attach_adapters(config, pipe, family, seed=config.train.seed)
    check_sizes(config, family)
    build.trained = trained_text_encoders(config, pipe, family)
    for method in active:  # pivotal tuning's new tokens: before the text caching
        method.prepare(build)
    build.batches = build_batches(config, plan, pipe, family, build.classes, accelerator, objective, staged, text_cache)
    for method in active:  # the masks, output preservation's class prompts
        method.with_batches(build)
    for name in late if not fsdp.sharded(accelerator) else []:
        getattr(pipe, name).to(accelerator.device)
    blocks = offload.state_of(getattr(pipe, family.denoiser))
    if blocks is not None:  # the offloaded blocks' LoRA, made on the CPU, to the device; a frozen adapter's, home
        offload.adopt(blocks)
        getattr(pipe, family.denoiser).to(accelerator.device)
    offloaded = staged if staged else offload_frozen(config, pipe, family, active)
    return prepare_training(given, build, info, objective, offloaded, active)


def build_objective(tc: TrainConfig, family: Family, pipe: Any, device: Any, active: Sequence[Method]) -> Any:
    """The training objective (noise schedule), kept before sampling swaps the pipeline's scheduler; a method may
    change it (timestep bias)."""
    objective = family.objective(pipe.scheduler, device, tc.timestep_sampling, tc.timestep_shift)
    for method in active:
        objective = method.shape_objective(objective, tc)
    return objective


def prepare_training(
    given: Config, build: Build, info: ModelInfo, objective: Any, offloaded: list[str], active: Sequence[Method]
) -> Run:
    """The optimizer over the LoRA (and the methods' groups), Accelerate's wrappers, a resumed checkpoint's state,
    the run files (`given`: the settings as given): the Run the loop takes."""
    from sdlora.train import checkpoint, offload

    config, plan, pipe, accelerator = build.config, build.plan, build.pipe, build.accelerator
    tc, family = config.train, info.spec
    encoders = build.trained
    denoiser = getattr(pipe, family.denoiser)
    groups = param_groups(tc, denoiser, encoders)
    for method in active:  # pivotal tuning's rows: after the LoRA groups, which then leave them out
        groups += method.param_groups(build.states.get(method.name), tc)
    optimizer, lr_scheduler = build_optimization(groups, tc, cuda=accelerator.device.type == "cuda")
    models = {family.denoiser: denoiser} | encoders
    checkpoint.register_hooks(accelerator, models, accelerator.unwrap_model)
    offload.ignore_in_ddp(offload.state_of(denoiser), denoiser)  # frozen weights in CPU RAM: not DDP's
    prepared = accelerator.prepare(*models.values(), optimizer, lr_scheduler)
    denoiser, optimizer, lr_scheduler = prepared[0], prepared[-2], prepared[-1]
    params = [p for g in optimizer.param_groups for p in g["params"]]  # FSDP: its sharded ones, in the same order
    fsdp.report(accelerator, denoiser, family.denoiser_label)
    start_step = 0
    if plan.resume_from is not None:
        load = fsdp.loader(accelerator, family.denoiser, denoiser, optimizer, lr_scheduler)  # None: load_state
        rates = [g["lr"] for g in groups]
        start_step = resume_state(accelerator, plan.resume_from, optimizer, lr_scheduler, rates, load)
        for method in active:  # e.g. pivotal tuning's rows and pivot step
            method.resume(build.states.get(method.name), plan.resume_from, plan.name)
    # The family's own defaults (a training shift) stay unset in the run files, to apply again at a resume.
    write_run_files(given, plan, accelerator, family_defaults=list(family.generate_defaults(pipe)))
    return Run(
        config=config,
        plan=plan,
        accelerator=accelerator,
        pipe=pipe,
        info=info,
        family=family,
        denoiser=denoiser,
        text_encoders=dict(zip(encoders, prepared[1 : 1 + len(encoders)], strict=True)),
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        batches=build.batches,
        objective=objective,
        start_step=start_step,
        offloaded=offloaded,
        methods=build.states,
    )


def build_optimization(groups: list[dict[str, Any]], tc: TrainConfig, cuda: bool) -> tuple[Any, Any]:
    """The optimizer over `groups` and its learning-rate schedule."""
    from sdlora.train.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(groups, tc.optimizer, tc.weight_decay, fused=cuda)
    return optimizer, build_scheduler(optimizer, tc.steps, tc.warmup_steps, tc.lr_scheduler)


def param_groups(tc: TrainConfig, denoiser: Any, encoders: dict[str, Any]) -> list[dict[str, Any]]:
    """The LoRA's optimizer groups: the denoiser's, then each trained text encoder's at its learning rate."""
    from sdlora.lora import peft

    groups = [{"params": peft.trainable_parameters(denoiser), "lr": tc.learning_rate}]
    for name, encoder in encoders.items():
        groups.append({"params": peft.trainable_parameters(encoder), "lr": text_encoder_lr(tc, name)})
    return groups


def resume_state(
    accelerator: Any, folder: Path, optimizer: Any, lr_scheduler: Any, rates: list[float], load: Any = None
) -> int:
    """Load a checkpoint's state (with `load`, else accelerator.load_state); the learning rates of this run's
    settings replace the saved ones (a resume may lower them). Returns the checkpoint's step."""
    from sdlora.errors import SdloraError
    from sdlora.train import checkpoint

    try:
        (load or accelerator.load_state)(str(folder))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SdloraError(
            f"{folder}: checkpoint could not be loaded ({first}); resume an older one with --resume PATH"
        ) from None
    if checkpoint.apply_learning_rates(optimizer, lr_scheduler, rates):
        accelerator.print(f"learning rates from this run's settings: {', '.join(f'{r:g}' for r in rates)}")
    return checkpoint.read_step(folder)


def load_base(config: Config, accelerator: Any, weight_dtype: Any) -> tuple[Any, Any]:
    """The base pipeline with frozen weights in the training's half type (SDXL's VAE: fp32), on the device."""
    from sdlora import models

    pipe = staging.load_base(config, weight_dtype)  # a staged family's frozen text encoders load later, alone
    info = models.model_info(pipe)
    staged = staging.staged_parts(config, info.spec)
    # setup_pipeline moves them when their turn comes (FSDP's prepare moves the denoiser's shards).
    cpu = [*staged, info.spec.denoiser] if staged or fsdp.sharded(accelerator) else []
    own_vae = config.model.vae is not None
    place_base(pipe, info, accelerator, own_vae, keep_on_cpu=cpu, offload_blocks=config.train.offload_blocks)
    return pipe, info


def place_base(
    pipe: Any,
    info: Any,
    accelerator: Any,
    own_vae: bool = False,
    keep_on_cpu: Sequence[str] = (),
    offload_blocks: int = 0,
) -> None:
    """Freeze every base weight and move the pipeline to the training device (a VAE that overflows in half
    precision, SDXL's own, in fp32), but for the parts in `keep_on_cpu` and the frozen weights of the
    `offload_blocks` last transformer blocks (sdlora.train.offload), which stay in CPU RAM."""
    import torch

    from sdlora.train import offload

    for module in pipe.components.values():
        if hasattr(module, "requires_grad_"):
            module.requires_grad_(False)
    said = offload.describe(offload.offload(getattr(pipe, info.spec.denoiser), offload_blocks, accelerator.device))
    if said:
        accelerator.print(said)
    if info.spec.vae_fp32 and not own_vae and pipe.vae.dtype != torch.float32:
        # SDXL's own VAE overflows in fp16 (NaN latents, black images); fp32 costs once per image with caching.
        pipe.vae.to(dtype=torch.float32)
    if keep_on_cpu:
        for name, module in pipe.components.items():
            if name not in keep_on_cpu and hasattr(module, "to"):
                module.to(accelerator.device)
    else:
        pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)


def attach_adapters(config: Config, pipe: Any, family: Family, seed: int) -> None:
    """LoRA on the denoiser (and text encoders): trainable parameters in fp32 even when the base is half."""
    import torch
    from diffusers.training_utils import cast_training_params

    from sdlora.lora import peft, training_adapter

    lc, tc = config.lora, config.train
    denoiser = getattr(pipe, family.denoiser)
    if config.model.training_adapter:  # before the seed: the LoRA's init is the same with or without it
        training_adapter.load(pipe, family, config.model.training_adapter)
    torch.manual_seed(seed)  # the LoRA init is part of the run: same seed, same adapter
    peft.attach(denoiser, lc.rank, lc.alpha, lc.dropout, family.denoiser_targets(lc.targets), lc.kind, lc.lokr_factor)
    if config.model.training_adapter:
        training_adapter.activate(denoiser)  # peft's add_adapter left only the new LoRA active
    trained = [denoiser]
    for encoder in trained_text_encoders(config, pipe, family).values():
        peft.attach(encoder, lc.rank, lc.alpha, lc.dropout, family.text_encoder_targets(), lc.kind, lc.lokr_factor)
        trained.append(encoder)
        if tc.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
    cast_training_params(trained, dtype=torch.float32)
    if tc.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if tc.compile:
        denoiser.compile()


def trained_text_encoders(config: Config, pipe: Any, family: Family) -> dict[str, Any]:
    """The text encoders that get LoRA, by pipeline attribute (all of the family's), or {}."""
    if not config.lora.train_text_encoder:
        return {}
    return {name: getattr(pipe, name) for name in family.trainable_text_encoders}


def text_encoder_lr(tc: TrainConfig, name: str) -> float:
    if name == "text_encoder_2" and tc.text_encoder_2_learning_rate is not None:
        return tc.text_encoder_2_learning_rate
    return tc.text_encoder_learning_rate


def offload_frozen(config: Config, pipe: Any, family: Family, active: Sequence[Method] = ()) -> list[str]:
    """With train.offload: move the frozen text encoders (their outputs are cached) and, with cached latents, the
    VAE to the CPU; sampling brings them back for a moment. Returns the moved pipeline attributes."""
    if not config.train.offload:
        return []
    live = set(trained_text_encoders(config, pipe, family))
    for method in active:  # e.g. pivotal tuning's encoders encode afresh while the rows train
        live |= method.encodes_afresh(config.train, family)
    names = [name for name in family.text_encoders if name not in live and getattr(pipe, name) is not None]
    names += ["vae"] if config.train.cache_latents else []
    for name in names:
        getattr(pipe, name).to("cpu")
    return names


def check_sizes(config: Config, family: Family) -> None:
    """Training sizes the family can take (Flux packs 2x2 latent patches: multiples of 16)."""
    from sdlora.errors import UsageError

    tc, multiple = config.train, family.size_multiple
    for size in tc.resolutions or [tc.resolution]:
        if size % multiple:
            raise UsageError(
                f"--resolution {size}: {family.label} trains on sizes that are multiples of {multiple}; "
                f"try {max(multiple, size // multiple * multiple)}"
            )


def build_batches(
    config: Config,
    plan: Plan,
    pipe: Any,
    family: Family,
    classes: list[Any] | None,
    accelerator: Any,
    objective: Any,
    staged: Sequence[str] = (),
    text_cache: dict[str, Any] | None = None,
) -> Any:
    """Cache the latents (VAE once per image and flip) and, with a frozen text encoder, the text conditioning
    (`text_cache`: already cached, by staging.encode_apart); `staged` parts come from CPU RAM to the device for it,
    one at a time."""
    from sdlora import families
    from sdlora.train.batches import Batches, build_text_cache, image_sets

    tc, device = config.train, accelerator.device
    with staging.visiting(pipe, [n for n in staged if n == "vae"], device):
        instances, class_set, controls = image_sets(plan.examples, classes, tc, pipe.vae, family)
    trained = trained_text_encoders(config, pipe, family)
    frozen = [name for name in family.text_encoders if name not in trained]
    # Frozen encoders' outputs are cached: all of them, or (staged families) those beside a trained one (T5).
    if text_cache is None and frozen and not trained:  # (staged families' were cached apart: encode_apart)
        prompts = [e.caption for e in [*plan.examples, *(classes or [])]] + [""]
        tokens = family.sequence_length(pipe, config.model.max_sequence_length)
        encoders, tokenizers = families.encoders(pipe, family), families.tokenizers(pipe, family)
        text_cache = build_text_cache(family, tokenizers, encoders, prompts, tokens)
    accelerator.print(
        f"{len(plan.examples)} images{_class_count(config, classes)}; effective batch "
        f"{tc.batch_size} x {tc.grad_accum} accumulation x {accelerator.num_processes} processes = "
        f"{tc.batch_size * tc.grad_accum * accelerator.num_processes}; "
        f"{'fp32 (no mixed precision)' if plan.precision == 'no' else plan.precision + ' mixed precision'}"
    )
    return Batches(
        instances,
        class_set,
        text_cache=text_cache,
        controls=controls,
        seed=tc.seed,
        batch_size=tc.batch_size,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        objective=objective,
        noise_offset=tc.noise_offset,
        caption_dropout=tc.caption_dropout,
    )


def write_run_files(config: Config, plan: Plan, accelerator: Any, family_defaults: Sequence[str] = ()) -> None:
    """config.json (what train resolved) and config.toml (what the resume command passes back); the settings in
    `family_defaults` ('section.key') only where given, so that the family's own values apply again when the file
    is read back."""
    from sdlora.config import save, to_toml
    from sdlora.fsutil import atomic_write_text
    from sdlora.train import checkpoint

    if not accelerator.is_main_process:
        return
    if config.train.overwrite and plan.resume_from is None:
        checkpoint.clear_run(plan.out_dir)
    # Never store --resume/--overwrite: passing config.toml back must not wipe the run it resumes.
    stored = config.model_copy(update={"train": config.train.model_copy(update={"resume": None, "overwrite": False})})
    # The sampling settings as given: a family's own defaults (Flux: 28 steps, guidance 3.5) apply again at a resume.
    given_only = ["generate", *family_defaults]
    save(stored, plan.out_dir / layout.CONFIG_JSON, given_only=given_only)
    atomic_write_text(plan.out_dir / layout.CONFIG_TOML, to_toml(stored, given_only=given_only))


def _class_count(config: Config, classes: list[Any] | None) -> str:
    """' + 100 class images' for the set-up line, and how many carried their own caption (class_dir's IMG.txt)."""
    if not classes:
        return ""
    own = sum(e.caption != class_prompt_of(config) for e in classes)
    return f" + {len(classes)} class images{f' ({own} with their own caption)' if own else ''}"
