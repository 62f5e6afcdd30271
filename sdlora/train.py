"""`sdlora train`: DreamBooth LoRA training of SD 1.x/2.x and SDXL on Accelerate: train(config, dataset, out)."""

from __future__ import annotations

import contextlib
import shlex
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora import train_eval
from sdlora.config import Config
from sdlora.errors import Interrupted, SdloraError, UsageError


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    lora_file: Path
    kohya_file: Path
    steps: int


@dataclass(frozen=True)
class Plan:
    """What the pre-flight checks settled, before any model loads."""

    dataset_dir: Path
    out_dir: Path
    examples: list[Any]
    trigger: str
    precision: str  # "no" | "fp16" | "bf16"
    resume_from: Path | None
    name: str


@dataclass
class Run:
    """Everything the loop touches, set up once."""

    config: Config
    plan: Plan
    accelerator: Any
    pipe: Any
    info: Any  # sdlora.models.ModelInfo
    unet: Any  # prepared (DDP/autocast-wrapped) UNet
    text_encoders: dict[str, Any]  # prepared text encoders by pipeline attribute, when they train; else {}
    params: list[Any]
    optimizer: Any
    lr_scheduler: Any
    batches: Any  # sdlora.batches.Batches
    alphas_cumprod: Any  # (T,) fp32 on the device
    start_step: int
    offloaded: list[str] = field(default_factory=list)  # frozen pipeline parts moved to the CPU after caching
    started_at: float = field(default_factory=time.time)


def train(config: Config, dataset_dir: Path, out_dir: Path) -> TrainResult:
    """Pre-flight checks, set-up, the loop, the final save. Ctrl-C/SIGTERM checkpoint and raise Interrupted."""
    plan = preflight(config, Path(dataset_dir), Path(out_dir))
    accelerator = make_accelerator(config, plan.precision)
    evaluation = train_eval.start(config, plan, accelerator)  # identity scoring; None when off
    run = setup(config, plan, accelerator)
    with stop_signals() as stopped:
        step = loop(run, stopped, evaluation)
    if stopped and step < config.train.steps:
        raise Interrupted(interrupted_message(run, step), stopped[0])
    return finish(run, step)


# ----------------------------------------------------------------------------------------------- pre-flight


def preflight(config: Config, dataset_dir: Path, out_dir: Path) -> Plan:
    """Every check that needs no model, each failing with a one-line UsageError."""
    from sdlora import checkpoint, data, prior
    from sdlora.models import check_base
    from sdlora.optim import check_optimizer

    check_base(config.model.base, config.model.allow_pickle, config.model.single_file_config)
    token, class_word = data.trigger_parts(dataset_dir, config.prep.token, config.prep.class_word)
    caption = config.prep.caption_template.format(token=token, class_word=class_word)
    examples = data.load_examples(dataset_dir, default_caption=caption)
    prior.check_class_dir(config.train.class_dir)
    bucketed = any(e.size and e.size[0] != e.size[1] for e in examples)
    if bucketed and (config.train.class_dir or config.train.class_prompt):
        raise UsageError(f"{dataset_dir}: prior preservation needs square images; run `sdlora prep` without --buckets")
    precision = resolve_precision(config.train.mixed_precision, *_cuda_facts())
    check_optimizer(config.train.optimizer)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder; choose another OUT_DIR")
    settings = config.model_dump(mode="json")
    checkpoint.check_out_dir(out_dir, settings, config.train.resume, config.train.overwrite)
    resume_from = checkpoint.resolve_resume(out_dir, config.train.resume)
    return Plan(
        dataset_dir=dataset_dir,
        out_dir=out_dir,
        examples=examples,
        trigger=f"{token} {class_word}",
        precision=precision,
        resume_from=resume_from,
        name=config.train.name or out_dir.resolve().name,
    )


def _cuda_facts() -> tuple[bool, bool]:
    import torch

    cuda = torch.cuda.is_available()
    return cuda, cuda and torch.cuda.is_bf16_supported()


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


# ----------------------------------------------------------------------------------------------- set-up


def make_accelerator(config: Config, precision: str) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps its settings in a process-wide singleton; forget the last run's (tests and notebooks
    # train several times in one process), keeping the distributed set-up.
    AcceleratorState._reset_state()
    # The LR schedule is stepped by hand once per optimisation step, whatever the number of processes.
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,
    )


def setup(config: Config, plan: Plan, accelerator: Any) -> Run:
    """Load the base, make class images, attach LoRA, cache latents/text, build and prepare the optimizer."""
    import torch

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.precision, torch.float32)
    pipe, info = load_base(config, accelerator, weight_dtype)
    return setup_pipeline(config, plan, accelerator, pipe, info)


def setup_pipeline(config: Config, plan: Plan, accelerator: Any, pipe: Any, info: Any) -> Run:
    """setup() after the base is loaded (frozen, on the device): also what bench/train_step.py times."""
    import torch

    from sdlora import checkpoint, lora
    from sdlora.optim import build_optimizer, build_scheduler

    tc = config.train
    # The training noise schedule, kept before sampling swaps the pipeline's scheduler.
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(accelerator.device, torch.float32)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    classes = class_images(config, plan, pipe, accelerator)
    attach_adapters(config, pipe, info, seed=tc.seed)
    batches = build_batches(config, plan, pipe, info, classes, accelerator, num_train_timesteps)
    offloaded = offload_frozen(config, pipe, info)
    encoders = trained_text_encoders(config, pipe, info)
    groups = [{"params": lora.trainable_parameters(pipe.unet), "lr": tc.learning_rate}]
    for name, encoder in encoders.items():
        groups.append({"params": lora.trainable_parameters(encoder), "lr": text_encoder_lr(tc, name)})
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, tc.optimizer, tc.weight_decay, fused=accelerator.device.type == "cuda")
    lr_scheduler = build_scheduler(optimizer, tc.steps, tc.warmup_steps, tc.lr_scheduler)
    models = {"unet": pipe.unet} | encoders
    checkpoint.register_hooks(accelerator, models, accelerator.unwrap_model)
    prepared = accelerator.prepare(*models.values(), optimizer, lr_scheduler)
    unet, optimizer, lr_scheduler = prepared[0], prepared[-2], prepared[-1]
    start_step = 0
    if plan.resume_from is not None:
        accelerator.load_state(str(plan.resume_from))
        start_step = checkpoint.read_step(plan.resume_from)
    write_run_files(config, plan, accelerator)
    return Run(
        config=config,
        plan=plan,
        accelerator=accelerator,
        pipe=pipe,
        info=info,
        unet=unet,
        text_encoders=dict(zip(encoders, prepared[1 : 1 + len(encoders)], strict=True)),
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        batches=batches,
        alphas_cumprod=alphas_cumprod,
        start_step=start_step,
        offloaded=offloaded,
    )


def load_base(config: Config, accelerator: Any, weight_dtype: Any) -> tuple[Any, Any]:
    """The base pipeline with frozen weights in the training's half type (SDXL's VAE: fp32), on the device."""
    from sdlora.models import load_pipeline, model_info

    model = config.model
    pipe = load_pipeline(
        model.base or "",
        allow_pickle=model.allow_pickle,
        torch_dtype=weight_dtype,
        vae=model.vae,
        single_file_config=model.single_file_config,
    )
    info = model_info(pipe)
    place_base(pipe, info, accelerator, own_vae=config.model.vae is not None)
    return pipe, info


def place_base(pipe: Any, info: Any, accelerator: Any, own_vae: bool = False) -> None:
    """Freeze every base weight and move the pipeline to the training device (SDXL's own VAE in fp32)."""
    import torch

    for module in pipe.components.values():
        if hasattr(module, "requires_grad_"):
            module.requires_grad_(False)
    if info.family == "sdxl" and not own_vae and pipe.vae.dtype != torch.float32:
        # SDXL's own VAE overflows in fp16 (NaN latents, black images); fp32 costs once per image with caching.
        pipe.vae.to(dtype=torch.float32)
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)


def class_images(config: Config, plan: Plan, pipe: Any, accelerator: Any) -> list[Any] | None:
    """Prior preservation's class examples: --class-dir, or generated once into OUT_DIR/class_images."""
    from sdlora import prior

    tc = config.train
    if tc.class_dir is None and not tc.class_prompt:
        return None
    prompt = tc.class_prompt or f"a photo of {config.prep.class_word}"
    folder = Path(tc.class_dir) if tc.class_dir else plan.out_dir / prior.CLASS_IMAGES
    if tc.class_dir is None:
        if accelerator.is_main_process:
            gc = config.generate
            prior.generate_class_images(
                pipe,
                folder,
                prompt=prompt,
                count=tc.num_class_images,
                seed=tc.seed,
                resolution=tc.resolution,
                steps=tc.sample_steps,
                cfg=gc.cfg,
                scheduler=gc.scheduler,
                batch_size=gc.batch_size,
            )
        accelerator.wait_for_everyone()
    return prior.class_examples(folder, prompt, tc.num_class_images)


def attach_adapters(config: Config, pipe: Any, info: Any, seed: int) -> None:
    """LoRA on the UNet (and text encoders): trainable parameters in fp32 even when the base is half."""
    import torch
    from diffusers.training_utils import cast_training_params

    from sdlora import lora

    lc, tc = config.lora, config.train
    torch.manual_seed(seed)  # the LoRA init is part of the run: same seed, same adapter
    lora.attach(pipe.unet, lc.rank, lc.alpha, lc.dropout, lora.unet_targets(lc.targets))
    trained = [pipe.unet]
    for encoder in trained_text_encoders(config, pipe, info).values():
        lora.attach(encoder, lc.rank, lc.alpha, lc.dropout, lora.TEXT_ENCODER_ATTENTION)
        trained.append(encoder)
        if tc.gradient_checkpointing:
            encoder.gradient_checkpointing_enable()
    cast_training_params(trained, dtype=torch.float32)
    if tc.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if tc.compile:
        pipe.unet.compile()


def trained_text_encoders(config: Config, pipe: Any, info: Any) -> dict[str, Any]:
    """The text encoders that get LoRA, by pipeline attribute (both of SDXL's), or {}."""
    from sdlora.conditioning import text_encoder_names

    if not config.lora.train_text_encoder:
        return {}
    return {name: getattr(pipe, name) for name in text_encoder_names(info.family)}


def text_encoder_lr(tc: Any, name: str) -> float:
    if name == "text_encoder_2" and tc.text_encoder_2_learning_rate is not None:
        return tc.text_encoder_2_learning_rate
    return tc.text_encoder_learning_rate


def offload_frozen(config: Config, pipe: Any, info: Any) -> list[str]:
    """With train.offload: move the frozen text encoders (their outputs are cached) and, with cached latents, the
    VAE to the CPU; sampling brings them back for a moment. Returns the moved pipeline attributes."""
    from sdlora.conditioning import text_encoder_names

    if not config.train.offload:
        return []
    names = [] if config.lora.train_text_encoder else text_encoder_names(info.family)
    names += ["vae"] if config.train.cache_latents else []
    for name in names:
        getattr(pipe, name).to("cpu")
    return names


def build_batches(
    config: Config, plan: Plan, pipe: Any, info: Any, classes: list[Any] | None, accelerator: Any, timesteps: int
) -> Any:
    """Cache the latents (VAE once per image and flip) and, with a frozen text encoder, the text conditioning."""
    from sdlora.batches import Batches, ImageSet, build_text_cache
    from sdlora.conditioning import text_encoder_names, tokenizers_of

    tc = config.train
    instances = ImageSet(plan.examples, tc.resolution, tc.flip, pipe.vae, tc.cache_latents)
    class_set = ImageSet(classes, tc.resolution, tc.flip, pipe.vae, tc.cache_latents) if classes else None
    class_prompt = classes[0].caption if classes else ""
    text_cache = None
    if not config.lora.train_text_encoder:
        prompts = [e.caption for e in plan.examples] + [class_prompt, ""]
        encoders = [getattr(pipe, name) for name in text_encoder_names(info.family)]
        text_cache = build_text_cache(info.family, tokenizers_of(pipe, info.family), encoders, prompts)
    accelerator.print(
        f"{len(plan.examples)} images{f' + {len(classes)} class images' if classes else ''}; effective batch "
        f"{tc.batch_size} x {tc.grad_accum} accumulation x {accelerator.num_processes} processes = "
        f"{tc.batch_size * tc.grad_accum * accelerator.num_processes}; precision {plan.precision}"
    )
    return Batches(
        instances,
        class_set,
        class_prompt=class_prompt,
        text_cache=text_cache,
        seed=tc.seed,
        batch_size=tc.batch_size,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        num_train_timesteps=timesteps,
        noise_offset=tc.noise_offset,
        caption_dropout=tc.caption_dropout,
    )


def write_run_files(config: Config, plan: Plan, accelerator: Any) -> None:
    """config.json (what train resolved) and config.toml (what the resume command passes back)."""
    from sdlora import checkpoint
    from sdlora.config import save, to_toml
    from sdlora.fsutil import atomic_write_text

    if not accelerator.is_main_process:
        return
    if config.train.overwrite and plan.resume_from is None:
        checkpoint.clear_run(plan.out_dir)
    # Never store --resume/--overwrite: passing config.toml back must not wipe the run it resumes.
    stored = config.model_copy(update={"train": config.train.model_copy(update={"resume": None, "overwrite": False})})
    save(stored, plan.out_dir / "config.json")
    atomic_write_text(plan.out_dir / "config.toml", to_toml(stored))


# ----------------------------------------------------------------------------------------------- the loop


def loop(run: Run, stopped: list[int], evaluation: train_eval.TrainEval | None = None) -> int:
    """Optimisation steps from run.start_step; returns the last step done (earlier when a signal stopped it)."""
    import torch

    from sdlora import outputs
    from sdlora.monitor import Monitor

    tc, accelerator = run.config.train, run.accelerator
    monitor = Monitor(
        run.plan.out_dir, tc.steps, run.start_step, accelerator.is_main_process, accelerator.device.type == "cuda"
    )
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on the device: no sync per step
    first_bad = torch.full((), -1, device=accelerator.device, dtype=torch.long)
    step, since_log = run.start_step, 0
    try:
        while step < tc.steps:
            started = time.perf_counter()
            loss = optimisation_step(run, step)
            if tc.compile and step == run.start_step:
                float(loss)  # wait for the step: torch.compile compiles the UNet's forward and backward in it
                monitor.print(
                    f"torch.compile: first step (compiling the UNet) took {time.perf_counter() - started:.1f} s"
                )
            step, since_log = step + 1, since_log + 1
            loss_sum += loss
            bad = ~torch.isfinite(loss) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)
            monitor.advance()
            if since_log and (step % tc.log_every == 0 or step == tc.steps):
                check_finite(run, first_bad)
                monitor.log(step, float(loss_sum) / since_log, run.lr_scheduler.get_last_lr()[0])
                loss_sum.zero_()
                since_log = 0
            stop = _agree(accelerator, bool(stopped))
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 or (stop and step < tc.steps):
                check_finite(run, first_bad)
                save_checkpoint(run, step)
            if tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps) and not stop:
                outputs.render_samples(run, step)
            if not (stop and step < tc.steps):
                train_eval.after_step(evaluation, run, step)
            if stop:
                break
    finally:
        monitor.close()
    check_finite(run, first_bad)
    return step


def optimisation_step(run: Run, step: int) -> Any:
    """grad_accum micro-batches, one optimizer and LR-schedule step; returns the mean loss (on the device)."""
    from sdlora import conditioning, diffusion

    tc, accelerator, family = run.config.train, run.accelerator, run.info.family
    prediction = run.info.prediction_type
    total = None
    for micro in range(tc.grad_accum):
        batch = run.batches.micro_batch(step * tc.grad_accum + micro, accelerator.device)
        encoders = list(run.text_encoders.values())
        with accelerator.accumulate(run.unet, *encoders):
            cond = batch.cond
            if cond is None:  # the text encoders train: encode with gradients
                tokenizers = conditioning.tokenizers_of(run.pipe, family)
                cond = conditioning.encode_prompts(family, tokenizers, encoders, batch.prompts)
            # Add noise to the latents according to the noise magnitude at each timestep (forward diffusion).
            noisy = diffusion.add_noise(batch.latents, batch.noise, batch.timesteps, run.alphas_cumprod)
            pred = run.unet(noisy, batch.timesteps, **conditioning.unet_kwargs(family, cond, batch.time_ids)).sample
            goal = diffusion.target(batch.latents, batch.noise, batch.timesteps, run.alphas_cumprod, prediction)
            weights = None
            if tc.min_snr_gamma:
                weights = diffusion.min_snr_weights(batch.timesteps, run.alphas_cumprod, tc.min_snr_gamma, prediction)
            loss = diffusion.denoising_loss(
                pred, goal, weights=weights, is_prior=batch.is_prior, prior_loss_weight=tc.prior_loss_weight
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and tc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.params, tc.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        total = loss.detach() if total is None else total + loss.detach()
    run.lr_scheduler.step()
    return total / tc.grad_accum


def check_finite(run: Run, first_bad: Any) -> None:
    """Stop with a clear error when any process saw a NaN/inf loss (one sync; called at logs and checkpoints)."""
    from sdlora import checkpoint

    worst = (
        int(run.accelerator.gather(first_bad.view(1)).max()) if run.accelerator.num_processes > 1 else int(first_bad)
    )
    if worst < 0:
        return
    kept = checkpoint.list_checkpoints(run.plan.out_dir)
    where = f"; the last good checkpoint {kept[-1]} is intact (resume it with a lower --lr)" if kept else ""
    raise SdloraError(
        f"loss became NaN/inf at step {worst}: likely fp16 overflow in the VAE or UNet (try --mixed-precision bf16 "
        f"or no) or a learning rate too high (try a lower --lr){where}"
    )


def _agree(accelerator: Any, flag: bool) -> bool:
    """True on every process when any process got a stop signal (a collective only with several processes)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "max").item())


# ----------------------------------------------------------------------------------------------- outputs


def save_checkpoint(run: Run, step: int) -> None:
    from sdlora import checkpoint
    from sdlora.outputs import save_loras

    def write_files(folder: Path) -> None:
        save_loras(run, folder, unwrap_for_good=False)

    checkpoint.save(run.accelerator, run.plan.out_dir, step, write_files, run.config.train.keep_checkpoints)


def finish(run: Run, step: int) -> TrainResult:
    """The final LoRA files in OUT_DIR (main process) and the result."""
    diffusers_file = run.plan.out_dir / "pytorch_lora_weights.safetensors"
    kohya_file = run.plan.out_dir / f"{run.plan.name}.safetensors"
    if run.accelerator.is_main_process:
        from sdlora.outputs import save_loras

        diffusers_file, kohya_file = save_loras(run, run.plan.out_dir, unwrap_for_good=True)
        run.accelerator.print(f"saved {diffusers_file} and {kohya_file} after {step} steps")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return TrainResult(out_dir=run.plan.out_dir, lora_file=diffusers_file, kohya_file=kohya_file, steps=step)


def interrupted_message(run: Run, step: int) -> str:
    plan = run.plan
    command = shlex.join(
        ["sdlora", "train", str(plan.dataset_dir), str(plan.out_dir), "--config", str(plan.out_dir / "config.toml")]
        + ["--resume", "latest"]
    )
    return f"stopped after step {step}; checkpoint saved. Resume with: {command}"


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While training, SIGINT/SIGTERM only record themselves (the loop finishes the step and checkpoints)."""
    stopped: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        stopped.append(signum)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: keep the default handlers
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield stopped
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
