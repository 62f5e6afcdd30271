"""What every likeness method is made of: the verbs (Method, each a no-op until a method overrides it), the set-up
in progress they see (Build) and what they add to the LoRA files (Files). See sdlora.train.methods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdlora.config import Config, TrainConfig
    from sdlora.families import Family
    from sdlora.train.batches import Batches, MicroBatch
    from sdlora.train.data import Example
    from sdlora.train.state import Plan, Run


@dataclass(frozen=True)
class Files:
    """What a method adds to the LoRA files: tensors and metadata of the diffusers file, metadata of the kohya
    file."""

    diffusers_tensors: dict[str, Any] = field(default_factory=dict)
    diffusers_metadata: dict[str, str] = field(default_factory=dict)
    kohya_metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Build:
    """The set-up in progress, as the methods see it (sdlora.train.setup): the base on the device and what has
    been built so far."""

    config: Config
    plan: Plan
    pipe: Any
    family: Family
    accelerator: Any
    trained: dict[str, Any] = field(default_factory=dict)  # text encoders with LoRA, by pipeline attribute
    text_apart: bool = False  # a staged family's frozen encoders cached the text apart (sdlora.train.staging)
    classes: list[Example] | None = None  # prior preservation's class examples (before_adapters)
    batches: Batches | None = None  # set before with_batches
    states: dict[str, Any] = field(default_factory=dict)  # each method's state by name


class Method:
    """The verbs with nothing to do; each method overrides those it acts in."""

    name = ""

    def active(self, tc: TrainConfig) -> bool:
        return False

    def check(self, config: Config, examples: Sequence[Example], dataset_dir: Path, token: str) -> None:
        return None

    def cached_prompts(self, config: Config, plan: Plan) -> list[str]:
        return []

    def rendered_prompts(self, config: Config, plan: Plan) -> list[list[str]]:
        return []

    def shape_objective(self, objective: Any, tc: TrainConfig) -> Any:
        return objective

    def renders_with_base(self, tc: TrainConfig) -> bool:
        """Whether before_adapters renders with the base (set-up brings the staged parts to the device for it)."""
        return False

    def before_adapters(self, build: Build) -> None:
        return None

    def prepare(self, build: Build) -> None:
        return None

    def with_batches(self, build: Build) -> None:
        return None

    def encodes_afresh(self, tc: TrainConfig, family: Family) -> set[str]:
        return set()

    def param_groups(self, state: Any, tc: TrainConfig) -> list[dict[str, Any]]:
        return []

    def before_step(self, run: Run, state: Any, step: int) -> None:
        return None

    def encoders(self, run: Run, state: Any, step: int) -> dict[str, Any]:
        return {}

    def loss_term(self, run: Run, state: Any, batch: MicroBatch, noisy: Any, pred: Any) -> Any:
        return None

    def resume(self, state: Any, folder: Path, name: str) -> None:
        return None

    def write_files(self, state: Any, folder: Path, name: str, header: dict[str, str]) -> Files:
        return Files()
