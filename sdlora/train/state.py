"""What training hands from one stage to the next: the pre-flight's Plan, the set-up's Run, the TrainResult."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

    from sdlora.config import Config
    from sdlora.families import Family
    from sdlora.models import ModelInfo
    from sdlora.train.batches import Batches
    from sdlora.train.data import Example


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
    examples: list[Example]
    trigger: str
    precision: str  # "no" | "fp16" | "bf16"
    resume_from: Path | None
    name: str
    # The settings the run trains with, the recommended ones settled (sdlora.train.recommended).
    config: Config | None = None
    settled: str | None = None  # what the unset recommended settings became, for the log
    # model.training_adapter as the LoRA files name it ({"source": ..., "sha256": ...}), or None.
    training_adapter: dict[str, str] | None = None


@dataclass
class Run:
    """Everything the loop touches, set up once."""

    config: Config
    plan: Plan
    accelerator: Accelerator
    pipe: DiffusionPipeline  # the family's pipeline, frozen, with the adapters attached
    info: ModelInfo
    family: Family
    denoiser: torch.nn.Module  # prepared (DDP/autocast-wrapped) UNet or transformer
    text_encoders: dict[str, torch.nn.Module]  # prepared text encoders by pipeline attribute, when they train; else {}
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler  # (Accelerate-wrapped)
    batches: Batches
    objective: Any  # sdlora.objectives: timesteps, noising, targets and loss weights of the family
    start_step: int
    offloaded: list[str] = field(default_factory=list)  # frozen pipeline parts moved to the CPU after caching
    methods: dict[str, Any] = field(default_factory=dict)  # each active likeness method's state (train.methods)
    started_at: float = field(default_factory=time.time)
