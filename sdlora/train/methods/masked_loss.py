"""The face-weighted loss (train.masked_loss): prep's face masks weight each pixel of the denoising loss (the
weights come with the micro-batch: sdlora.train.batches), and the masked prior (train.mask_prior_weight) pulls
the background towards the base model's prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora.errors import UsageError
from sdlora.train.methods.base import Build, Method

if TYPE_CHECKING:
    from sdlora.config import Config, TrainConfig
    from sdlora.train.batches import MicroBatch
    from sdlora.train.state import Run


def check(config: Config, examples: Sequence[Any], dataset_dir: Path) -> None:
    """Pre-flight (no model loaded): train.masked_loss needs prep's masks; images without one train unweighted."""
    if not config.train.masked_loss or any(e.mask is not None for e in examples):
        return
    raise UsageError(
        f"{dataset_dir}: train.masked_loss needs the face masks that `sdlora prep` writes (masks/NNNN.png in "
        "manifest.jsonl), and this dataset has none; re-run `sdlora prep PHOTOS DATASET` or set "
        "train.masked_loss=false"
    )


class MaskedLoss(Method):
    """train.masked_loss, with its masked prior."""

    name = "masked_loss"

    def active(self, tc: TrainConfig) -> bool:
        return bool(tc.masked_loss)

    def check(self, config: Config, examples: Sequence[Any], dataset_dir: Path, token: str) -> None:
        check(config, examples, dataset_dir)

    def with_batches(self, build: Build) -> None:
        """The masks into the instance set: each micro-batch then carries its pixel weights."""
        assert build.batches is not None
        build.batches.instances.load_masks()
        build.batches.mask_floor = build.config.train.mask_floor

    def loss_term(self, run: Run, state: Any, batch: MicroBatch, noisy: Any, pred: Any) -> Any:
        """The masked prior (weight train.mask_prior_weight): outside the face, the base model's prediction."""
        from sdlora import objectives
        from sdlora.train.methods.adapters_off import base_prediction, encode

        tc = run.config.train
        if not (tc.mask_prior_weight and batch.masks is not None):
            return None
        denoiser = run.accelerator.unwrap_model(run.denoiser)  # extra forwards outside DDP's one-forward bookkeeping
        with run.accelerator.autocast():
            cond = batch.cond or {}
            if run.text_encoders:
                cond = encode(run, batch.prompts, cond, adapters=False)
            goal = base_prediction(run.family, denoiser, noisy, batch.timesteps, cond, batch.time_ids, tc.guidance)
            return tc.mask_prior_weight * objectives.masked_prior_loss(pred, goal, 1 - batch.masks)


METHOD = MaskedLoss()
