"""The training loop: optimisation steps, NaN checks, logging, checkpoints, samples, evaluation, the final save."""

from __future__ import annotations

import contextlib
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdlora import layout
from sdlora.errors import SdloraError
from sdlora.train import identity
from sdlora.train.state import Run, TrainResult


def loop(run: Run, stopped: list[int], evaluation: identity.TrainEval | None = None) -> int:
    """Optimisation steps from run.start_step; returns the last step done (earlier when a signal stopped it)."""
    import torch

    from sdlora.train import outputs
    from sdlora.train.monitor import Monitor

    tc, accelerator = run.config.train, run.accelerator
    monitor = Monitor(
        run.plan.out_dir, tc.steps, run.start_step, accelerator.is_main_process, accelerator.device.type == "cuda"
    )
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on the device: no sync per step
    first_bad = torch.full((), -1, device=accelerator.device, dtype=torch.long)
    step, since_log = run.start_step, 0
    _catch_up_samples(run)
    try:
        while step < tc.steps:
            started = time.perf_counter()
            loss = optimisation_step(run, step)
            if tc.compile and step == run.start_step:
                float(loss)  # wait for the step: torch.compile compiles the denoiser's forward and backward in it
                took = time.perf_counter() - started
                monitor.print(
                    f"torch.compile: first step (compiling the {run.family.denoiser_label}) took {took:.1f} s"
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
                identity.after_step(evaluation, run, step)
            if stop:
                break
    finally:
        monitor.close()
    check_finite(run, first_bad)
    return step


def _catch_up_samples(run: Run) -> None:
    """At a resume: the resumed step's sample grid, if it was due and a kill came between checkpoint and samples."""
    from sdlora.train import outputs

    step, every = run.start_step, run.config.train.sample_every
    due = step > 0 and every > 0 and (step % every == 0 or step == run.config.train.steps)
    if due and not (run.plan.out_dir / layout.SAMPLES / layout.sample_grid(step)).is_file():
        outputs.render_samples(run, step)


def optimisation_step(run: Run, step: int) -> Any:
    """grad_accum micro-batches, one optimizer and LR-schedule step; returns the mean loss (on the device)."""
    from sdlora import families, objectives
    from sdlora.train import methods

    tc, accelerator, family, objective = run.config.train, run.accelerator, run.family, run.objective
    methods.before_step(run, step)  # e.g. pivotal tuning's pivot: the new rows freeze
    total = None
    for micro in range(tc.grad_accum):
        batch = run.batches.micro_batch(step * tc.grad_accum + micro, accelerator.device)
        encoders = list(run.text_encoders.values())
        with accelerator.accumulate(run.denoiser, *encoders):
            cond = batch.cond
            trained = methods.encoders(run, step) | run.text_encoders  # + those whose new tokens train
            if trained:  # they train: encode with gradients; a frozen one's part may be cached (T5)
                cached = cond or {}
                every = [
                    trained[n] if n in trained else None if cached else getattr(run.pipe, n)
                    for n in family.text_encoders
                ]
                tokens = family.sequence_length(run.pipe, run.config.model.max_sequence_length)
                fresh = family.encode_prompts(families.tokenizers(run.pipe, family), every, batch.prompts, tokens)
                cond = {**cached, **fresh}
            cond = cond if batch.control is None else {**(cond or {}), "control": batch.control}
            # Add noise to the latents according to the noise magnitude at each timestep (forward diffusion).
            noisy = objective.noisy(batch.latents, batch.noise, batch.timesteps)
            pred = family.predict(run.denoiser, noisy, batch.timesteps, cond, batch.time_ids, tc.guidance)
            goal = objective.target(batch.latents, batch.noise, batch.timesteps)
            loss = objectives.denoising_loss(
                pred,
                goal,
                weights=objective.weights(batch.timesteps, tc.min_snr_gamma),
                is_prior=batch.is_prior,
                prior_loss_weight=tc.prior_loss_weight,
                pixel_weights=batch.pixel_weights,  # train.masked_loss; None: every pixel alike
            )
            loss = loss + methods.extra_loss(run, batch, noisy, pred)  # output preservation, masked prior
            accelerator.backward(loss)
            if accelerator.sync_gradients and tc.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.params, tc.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        total = loss.detach() if total is None else total + loss.detach()
    run.lr_scheduler.step()
    return total / tc.grad_accum


def check_finite(run: Run, first_bad: Any) -> None:
    """Stop with a clear error when any process saw a NaN/inf loss, or a LoRA weight is no longer finite (an update
    can break the weights while the loss, computed before it, is still finite). One sync; called at logs,
    before checkpoints (so none holds broken weights) and at the end."""
    import torch

    from sdlora.train.fsdp import local

    worst = (
        int(run.accelerator.gather(first_bad.view(1)).max()) if run.accelerator.num_processes > 1 else int(first_bad)
    )
    mine = bool(torch.stack([torch.isfinite(local(p)).all() for p in run.params]).all()) if run.params else True
    weights_ok = not _agree(run.accelerator, not mine)  # under FSDP each process checks its own shards
    if worst < 0 and weights_ok:
        return
    what = f"loss became NaN/inf at step {worst}" if worst >= 0 else "LoRA weights became NaN/inf"
    raise SdloraError(
        f"{what}: likely fp16 overflow in the VAE or UNet (try --mixed-precision bf16 or no) or a learning rate too "
        f"high; {_way_forward(run)}"
    )


def _way_forward(run: Run) -> str:
    """What to run after a divergence: resume the newest checkpoint that verifies (finite weights) with a lower
    learning rate, which a resume may change."""
    from sdlora.train import checkpoint

    plan, lr = run.plan, run.config.train.learning_rate
    good = checkpoint.good_checkpoints(plan.out_dir)
    config_toml = plan.out_dir / layout.CONFIG_TOML
    command = ["sdlora", "train", str(plan.dataset_dir), str(plan.out_dir), "--config", str(config_toml)]
    if good:
        command += ["--resume", str(good[-1]), "--lr", f"{lr / 10:g}"]
        return f"the last good checkpoint {good[-1]} has finite weights; resume it with a lower --lr: " + shlex.join(
            command
        )
    command += ["--overwrite", "--lr", f"{lr / 10:g}"]
    return "no checkpoint with finite weights was written; start again with a lower --lr: " + shlex.join(command)


def _agree(accelerator: Any, flag: bool) -> bool:
    """True on every process when any process got a stop signal (a collective only with several processes)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), "max").item())


def save_checkpoint(run: Run, step: int) -> None:
    from sdlora.train import checkpoint, fsdp
    from sdlora.train.outputs import save_loras

    def write_files(folder: Path) -> None:
        save_loras(run, folder, unwrap_for_good=False)

    with fsdp.full_lora(run.accelerator, run.denoiser):  # FSDP: the LoRA whole while it is written
        keep, save_state = run.config.train.keep_checkpoints, fsdp.saver(run)
        checkpoint.save(run.accelerator, run.plan.out_dir, step, write_files, keep, save_state)


def finish(run: Run, step: int) -> TrainResult:
    """The final LoRA files in OUT_DIR (main process) and the result."""
    diffusers_file = run.plan.out_dir / layout.DIFFUSERS_LORA
    kohya_file = run.plan.out_dir / layout.kohya_file(run.plan.name)
    from sdlora.train.fsdp import full_lora

    with full_lora(run.accelerator, run.denoiser):  # FSDP: the LoRA whole on every process, written by the main one
        if run.accelerator.is_main_process:
            from sdlora.train.outputs import save_loras

            diffusers_file, kohya_file = save_loras(run, run.plan.out_dir, unwrap_for_good=True)
            run.accelerator.print(f"saved {diffusers_file} and {kohya_file} after {step} steps")
    run.accelerator.wait_for_everyone()
    _release_wrappers(run)
    run.accelerator.end_training()
    return TrainResult(out_dir=run.plan.out_dir, lora_file=diffusers_file, kohya_file=kohya_file, steps=step)


def _release_wrappers(run: Run) -> None:
    """Free the DDP wrappers while their process group still exists. A DDP Reducer freed after end_training's
    destroy_process_group frees the gloo group itself, from Python with the GIL held, and torch's gloo worker
    thread, waiting for the GIL, then deadlocks the exit (seen: a 2-process run hung after writing its files)."""
    if run.accelerator.num_processes == 1:
        return
    run.denoiser = run.accelerator.unwrap_model(run.denoiser)
    run.text_encoders = {name: run.accelerator.unwrap_model(m) for name, m in run.text_encoders.items()}
    run.accelerator.free_memory()  # its own references to the prepared objects, then gc.collect()


def interrupted_message(run: Run, step: int) -> str:
    plan = run.plan
    command = shlex.join(
        [
            "sdlora",
            "train",
            str(plan.dataset_dir),
            str(plan.out_dir),
            "--config",
            str(plan.out_dir / layout.CONFIG_TOML),
        ]
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
