"""What keeps a person LoRA from changing what it should not: differential output preservation
(train.preservation = "output"), and the face-weighted loss (train.masked_loss) with its masked prior.

Both compare the LoRA-on prediction with the base model's on the same noisy latent, computed with every adapter
disabled (the denoiser's and a trained text encoder's): `adapters_off` and `base_prediction`. The training step
calls `extra_loss` once; the masks' per-pixel weights come with the micro-batch (batches.MicroBatch).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlora.errors import UsageError


def check(config: Any, examples: Sequence[Any], dataset_dir: Path) -> None:
    """Pre-flight (no model loaded): train.masked_loss needs prep's masks; images without one train unweighted."""
    if not config.train.masked_loss or any(e.mask is not None for e in examples):
        return
    raise UsageError(
        f"{dataset_dir}: train.masked_loss needs the face masks that `sdlora prep` writes (masks/NNNN.png in "
        "manifest.jsonl), and this dataset has none; re-run `sdlora prep PHOTOS DATASET` or set "
        "train.masked_loss=false"
    )


def class_prompt(caption: str, token: str) -> str:
    """The caption with the trigger token removed: "a photo of sks person" -> "a photo of person"."""
    if not token:
        return caption
    without = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", caption)
    return re.sub(r"\s+", " ", without).strip().replace(" ,", ",")


@dataclass
class Preserver:
    """Differential output preservation's state: each caption's class prompt and their cached conditioning."""

    class_prompts: dict[str, str]  # caption (or "" after caption dropout) -> class prompt
    cache: dict | None  # build_text_cache of the class prompts (frozen encoders' part), None when none is cached
    weight: float


def attach(config: Any, plan: Any, pipe: Any, family: Any, batches: Any, accelerator: Any) -> None:
    """Set-up, after the batches are built: the masks into the instance set, and output preservation's class
    prompts and their text cache into `batches.preserve`."""
    tc = config.train
    if tc.masked_loss:
        batches.instances.load_masks()
        batches.mask_floor = tc.mask_floor
    if tc.preservation != "output":
        return
    prompts = _class_prompts(config, plan)
    cache = text_cache(config, pipe, family, list(dict.fromkeys(prompts.values())), batches)
    batches.preserve = Preserver(prompts, cache, tc.preservation_weight)
    example = prompts[plan.examples[0].caption]
    accelerator.print(f"output preservation: class prompts like {example!r} (weight {tc.preservation_weight:g})")


def _class_prompts(config: Any, plan: Any) -> dict[str, str]:
    """{caption: its class prompt} for every caption of the run (and the empty one of caption dropout)."""
    from sdlora.train import data

    token, _ = data.trigger_parts(plan.dataset_dir, config.prep.token, config.prep.class_word)
    captions = [e.caption for e in plan.examples] + [""]
    return {caption: class_prompt(caption, token) for caption in captions}


def class_prompts(config: Any, plan: Any) -> list[str]:
    """Output preservation's class prompts (none without it): what a staged family's text encoders, loaded apart
    before the denoiser (sdlora.train.staging), also cache."""
    return list(dict.fromkeys(_class_prompts(config, plan).values())) if config.train.preservation == "output" else []


def text_cache(config: Any, pipe: Any, family: Any, prompts: list[str], batches: Any) -> dict | None:
    """The frozen text encoders' conditioning of `prompts`, as setup.build_batches caches the captions': all of
    them when none trains; on staged families (Flux) the captions' own cache, whose encoders, loaded apart before
    the denoiser, cached the class prompts too (T5's part beside a trained CLIP-L); None when nothing is cached."""
    from sdlora import families
    from sdlora.train import staging
    from sdlora.train.batches import build_text_cache
    from sdlora.train.setup import trained_text_encoders

    if staging.frozen_encoders(config, family):
        return batches.text_cache
    trained = trained_text_encoders(config, pipe, family)
    if trained:  # they encode afresh each step
        return None
    encoders, tokenizers = families.encoders(pipe, family), families.tokenizers(pipe, family)
    tokens = family.sequence_length(pipe, config.model.max_sequence_length)
    return build_text_cache(family, tokenizers, encoders, prompts, tokens)


@contextlib.contextmanager
def adapters_off(modules: Sequence[Any]) -> Iterator[None]:
    """Every peft adapter layer in `modules` disabled (the base layers alone compute), then restored as it was,
    trainable flags included (peft's enable_adapters changes them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    was_off = [layer.disable_adapters for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, off in zip(layers, was_off, strict=True):
            layer.enable_adapters(not off)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def encode(run: Any, prompts: list[str], cached: dict, adapters: bool) -> dict:
    """Conditioning of `prompts` with the run's trained text encoders (adapters on, with gradients; or off,
    without), the frozen encoders' part taken from `cached` when it is there."""
    import torch

    from sdlora import families

    family, trained = run.family, {n: run.accelerator.unwrap_model(e) for n, e in run.text_encoders.items()}
    every = [trained[n] if n in trained else None if cached else getattr(run.pipe, n) for n in family.text_encoders]
    tokens = family.sequence_length(run.pipe, run.config.model.max_sequence_length)
    tokenizers = families.tokenizers(run.pipe, family)
    with contextlib.ExitStack() as stack:
        if not adapters:
            stack.enter_context(torch.no_grad())
            stack.enter_context(adapters_off(list(trained.values())))
        fresh = family.encode_prompts(tokenizers, every, prompts, tokens)
    return {**cached, **fresh}


def base_prediction(
    family: Any,
    denoiser: Any,
    noisy: Any,
    timesteps: Any,
    cond: dict,
    micro_conditioning: Any,
    guidance: float | None,
) -> Any:
    """The base model's prediction (every adapter of `denoiser` disabled), without gradients: the target of
    output preservation and of the masked prior."""
    import torch

    with torch.no_grad(), adapters_off([denoiser]):
        return family.predict(denoiser, noisy, timesteps, cond, micro_conditioning, guidance)


def extra_loss(run: Any, batch: Any, noisy: Any, pred: Any) -> Any:
    """The step's preservation terms, added to its denoising loss: output preservation (weight
    train.preservation_weight) and the masked prior (train.mask_prior_weight); 0.0 when both are off.
    `noisy`/`pred`: the step's noisy latents and LoRA-on prediction of the captions."""
    from sdlora import objectives

    tc, family, preserve = run.config.train, run.family, getattr(run.batches, "preserve", None)
    if preserve is None and not tc.mask_prior_weight:
        return 0.0
    denoiser = run.accelerator.unwrap_model(run.denoiser)  # extra forwards outside DDP's one-forward bookkeeping
    total: Any = 0.0
    with run.accelerator.autocast():
        if preserve is not None:
            prompts = [preserve.class_prompts.get(p, p) for p in batch.prompts]
            cached = _cached(preserve.cache, prompts, noisy.device)
            lora_cond = encode(run, prompts, cached, adapters=True) if run.text_encoders else cached
            base_cond = encode(run, prompts, cached, adapters=False) if run.text_encoders else cached
            goal = base_prediction(family, denoiser, noisy, batch.timesteps, base_cond, batch.time_ids, tc.guidance)
            on = family.predict(denoiser, noisy, batch.timesteps, lora_cond, batch.time_ids, tc.guidance)
            total = total + preserve.weight * objectives.per_sample_loss(on, goal).mean()
        if tc.mask_prior_weight and batch.masks is not None:
            cond = batch.cond or {}
            if run.text_encoders:
                cond = encode(run, batch.prompts, cond, adapters=False)
            goal = base_prediction(family, denoiser, noisy, batch.timesteps, cond, batch.time_ids, tc.guidance)
            total = total + tc.mask_prior_weight * objectives.masked_prior_loss(pred, goal, 1 - batch.masks)
    return total


def _cached(cache: dict | None, prompts: list[str], device: Any) -> dict:
    import torch

    from sdlora.train.batches import select

    if cache is None:
        return {}
    rows = torch.tensor([cache["prompts"][p] for p in prompts], device=device)
    return select(cache["cond"], rows)
