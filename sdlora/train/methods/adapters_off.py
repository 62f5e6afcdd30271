"""The base model beside the LoRA in training: every adapter disabled (`adapters_off`), the base's prediction and
the trained text encoders' conditioning either way; what output preservation and the masked prior compare with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdlora.families import Family
    from sdlora.train.state import Run


@contextlib.contextmanager
def adapters_off(modules: Sequence[Any]) -> Iterator[None]:
    """Every peft adapter layer in `modules` disabled (the base layers alone compute), then restored as it was,
    trainable flags included (peft's enable_adapters changes them). A training adapter (model.training_adapter)
    stays on: the base the LoRA trains on is then the de-distilled model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdlora.lora import training_adapter

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if any(training_adapter.NAME in layer.active_adapters for layer in layers):
        with training_adapter.alone(modules):
            yield
        return
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


def encode(run: Run, prompts: list[str], cached: dict, adapters: bool) -> dict:
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
    family: Family,
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
