"""The likeness methods, one fixed list (METHODS): small objects with the same verbs, which set-up, the loop and
the final save run over without naming any of them. A new method is one file here and one entry in METHODS.

The verbs, in the order a run meets them (every one a no-op in `Method`, which a method overrides where it acts):
- `active(tc)`: whether the settings turn it on; only active methods are asked anything else.
- `check(config, examples, dataset_dir, token)`: pre-flight, before any model loads; one-line UsageErrors.
- `cached_prompts(config, plan)` / `rendered_prompts(config, plan)`: prompts whose frozen text conditioning a
  staged family (sdlora.train.staging) caches before the denoiser loads, beside the captions' and the renders'.
- `shape_objective(objective, tc)`: the training objective it changes (timestep bias).
- `before_adapters(build)`, `prepare(build)`, `with_batches(build)`: what it caches before step 1, at the three
  points of set-up (the base alone, which `renders_with_base(tc)` brings to the device; adapters attached;
  latents and text cached); its state goes in `build.states`, and the loop hands it back as `state`.
- `encodes_afresh(tc, family)`, `param_groups(state, tc)`: encoders whose outputs it needs live, its optimizer group.
- `before_step(run, state, step)`, `encoders(run, state, step)`, `loss_term(run, state, batch, noisy, pred)`: in
  the loop.
- `resume(state, folder, name)`, `write_files(state, folder, name, header)`: what a checkpoint holds of it and
  what it adds to the LoRA files (sdlora.train.outputs).
A base class of no-ops (not a hook registry): the list is fixed, and each method file shows only the verbs it
acts in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdlora.train.methods import class_images, masked_loss, output_preservation, pivotal, timestep_bias
from sdlora.train.methods.base import Build, Files, Method

if TYPE_CHECKING:
    from sdlora.config import TrainConfig
    from sdlora.train.batches import MicroBatch
    from sdlora.train.state import Run

__all__ = ["METHODS", "Build", "Files", "Method", "active", "before_step", "encoders", "extra_loss"]

# The order is the order of their loss terms and optimizer groups: changing it changes the bits of a run.
METHODS: tuple[Method, ...] = (
    pivotal.METHOD,
    class_images.METHOD,
    output_preservation.METHOD,
    masked_loss.METHOD,
    timestep_bias.METHOD,
)


def active(tc: TrainConfig) -> list[Method]:
    """The methods the settings turn on, in METHODS' order."""
    return [method for method in METHODS if method.active(tc)]


def extra_loss(run: Run, batch: MicroBatch, noisy: Any, pred: Any) -> Any:
    """The active methods' loss terms, summed (from 0.0) before they join the step's denoising loss."""
    total: Any = 0.0
    for method in active(run.config.train):
        term = method.loss_term(run, run.methods.get(method.name), batch, noisy, pred)
        if term is not None:
            total = total + term
    return total


def encoders(run: Run, step: int) -> dict[str, Any]:
    """Text encoders the active methods need encoded afresh, with gradients, at `step`."""
    found: dict[str, Any] = {}
    for method in active(run.config.train):
        found |= method.encoders(run, run.methods.get(method.name), step)
    return found


def before_step(run: Run, step: int) -> None:
    for method in active(run.config.train):
        method.before_step(run, run.methods.get(method.name), step)
