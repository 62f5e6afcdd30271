"""Differential output preservation (train.preservation = "output"): on the subject's own noisy latent, the LoRA's
prediction for the caption without the trigger token is pulled to the base model's (every adapter disabled:
sdlora.train.methods.adapters_off), with no class images."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdlora.train.methods.base import Build, Method

if TYPE_CHECKING:
    from sdlora.config import Config, TrainConfig
    from sdlora.train.batches import MicroBatch
    from sdlora.train.state import Plan, Run


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


def start(build: Build) -> Preserver:
    """Each caption's class prompt and their text cache, after the batches are built."""
    config, plan, tc = build.config, build.plan, build.config.train
    prompts = _class_prompts(config, plan)
    cache = text_cache(build, list(dict.fromkeys(prompts.values())))
    example = prompts[plan.examples[0].caption]
    build.accelerator.print(f"output preservation: class prompts like {example!r} (weight {tc.preservation_weight:g})")
    return Preserver(prompts, cache, tc.preservation_weight)


def _class_prompts(config: Config, plan: Plan) -> dict[str, str]:
    """{caption: its class prompt} for every caption of the run (and the empty one of caption dropout)."""
    from sdlora.train import data

    token, _ = data.trigger_parts(plan.dataset_dir, config.prep.token, config.prep.class_word)
    captions = [e.caption for e in plan.examples] + [""]
    return {caption: class_prompt(caption, token) for caption in captions}


def text_cache(build: Build, prompts: list[str]) -> dict | None:
    """The frozen text encoders' conditioning of `prompts`, as set-up caches the captions': all of them when none
    trains; on staged families (Flux) the captions' own cache, whose encoders, loaded apart before the denoiser,
    cached the class prompts too (T5's part beside a trained CLIP-L); None when nothing is cached."""
    from sdlora import families
    from sdlora.train.batches import build_text_cache

    assert build.batches is not None
    if build.text_apart:
        return build.batches.text_cache
    if build.trained:  # they encode afresh each step
        return None
    pipe, family = build.pipe, build.family
    encoders, tokenizers = families.encoders(pipe, family), families.tokenizers(pipe, family)
    tokens = family.sequence_length(pipe, build.config.model.max_sequence_length)
    return build_text_cache(family, tokenizers, encoders, prompts, tokens)


def loss_term(run: Run, preserve: Preserver, batch: MicroBatch, noisy: Any) -> Any:
    """preservation_weight x the distance of the LoRA's prediction for the class prompts from the base's."""
    from sdlora import objectives
    from sdlora.train.methods.adapters_off import base_prediction, encode

    tc, family = run.config.train, run.family
    denoiser = run.accelerator.unwrap_model(run.denoiser)  # extra forwards outside DDP's one-forward bookkeeping
    with run.accelerator.autocast():
        prompts = [preserve.class_prompts.get(p, p) for p in batch.prompts]
        cached = _cached(preserve.cache, prompts, noisy.device)
        lora_cond = encode(run, prompts, cached, adapters=True) if run.text_encoders else cached
        base_cond = encode(run, prompts, cached, adapters=False) if run.text_encoders else cached
        goal = base_prediction(family, denoiser, noisy, batch.timesteps, base_cond, batch.time_ids, tc.guidance)
        on = family.predict(denoiser, noisy, batch.timesteps, lora_cond, batch.time_ids, tc.guidance)
        return preserve.weight * objectives.per_sample_loss(on, goal).mean()


def _cached(cache: dict | None, prompts: list[str], device: Any) -> dict:
    import torch

    from sdlora.train.batches import select

    if cache is None:
        return {}
    rows = torch.tensor([cache["prompts"][p] for p in prompts], device=device)
    return select(cache["cond"], rows)


class OutputPreservation(Method):
    """train.preservation = "output"."""

    name = "output_preservation"

    def active(self, tc: TrainConfig) -> bool:
        return tc.preservation == "output"

    def cached_prompts(self, config: Config, plan: Plan) -> list[str]:
        """Its class prompts: what a staged family's text encoders, loaded apart before the denoiser, also cache."""
        return list(dict.fromkeys(_class_prompts(config, plan).values()))

    def with_batches(self, build: Build) -> None:
        build.states[self.name] = start(build)

    def loss_term(self, run: Run, state: Preserver, batch: MicroBatch, noisy: Any, pred: Any) -> Any:
        return loss_term(run, state, batch, noisy)


METHOD = OutputPreservation()
