"""Pivotal tuning during training (train.pivotal): new trigger tokens whose embedding rows train beside the LoRA for
the first train.pivotal_fraction of the steps, then freeze; their files; their part of checkpoints and resumes.

While the rows train, the text conditioning of their encoders is encoded afresh each step (gradients reach the
rows through the frozen encoder); at the pivot the rows freeze and, when the run caches text conditioning, the
cache is rebuilt once from the final rows. The pivot step is stored with the rows in every checkpoint's
NAME_emb.safetensors, so a resume (even with another --steps) pivots where the straight run did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdlora import layout
from sdlora.errors import SdloraError, UsageError
from sdlora.lora import embeddings
from sdlora.train.methods.base import Build, Files, Method

if TYPE_CHECKING:
    from sdlora.config import Config, TrainConfig
    from sdlora.families import Family
    from sdlora.train.state import Run

UNTIL_KEY = "sdlora.pivotal_until"  # emb file metadata in checkpoints: the first step with frozen rows


@dataclass
class Pivotal:
    installed: dict[str, Any]  # sdlora.lora.embeddings.ExtraRows by text-encoder attribute
    family: Family
    word: str
    tokens: tuple[str, ...]
    until: int  # steps [0, until) train the rows
    frozen: bool = False

    @property
    def params(self) -> list[Any]:
        return [rows.rows for rows in self.installed.values()]

    def embeddings(self) -> embeddings.Embeddings:
        return embeddings.current(self.installed, self.family, self.word, self.tokens)


def check(config: Config, examples: list[Any], word: str) -> None:
    """Before any model loads: the captions must name the trigger word, or the new tokens would never train."""
    if config.train.pivotal and not names_trigger(examples, word):
        raise UsageError(
            f"--pivotal: no caption names the trigger word {word!r}, so its new tokens would never train; put "
            f"{word!r} in the captions (prep.token) or pass --no-pivotal"
        )


def names_trigger(examples: list[Any], word: str) -> bool:
    """Whether a caption names the trigger word (which its new tokens then stand for)."""
    rule = embeddings.rewrite_rule(word, embeddings.token_names(1))[0]
    return any(rule.search(e.caption) for e in examples)


def start(config: Config, plan: Any, pipe: Any, family: Family, accelerator: Any = None) -> Pivotal | None:
    """Install the new tokens (each row starting as the class word's embedding) and make their rows trainable;
    with several processes their gradients are averaged over the processes (the text encoders are not wrapped
    for distributed training as the denoiser is)."""
    from sdlora.train import data

    tc = config.train
    if not tc.pivotal:
        return None
    if not family.embedding_keys:
        raise UsageError(
            f"--pivotal: not available for {family.label} bases (only its CLIP-L could take new tokens, and that "
            "gives the model one pooled vector; the prompt's words reach it through T5, which never trains); "
            "pass --no-pivotal"
        )
    word, class_word = data.trigger_parts(plan.dataset_dir, config.prep.token, config.prep.class_word)
    tokens = embeddings.token_names(tc.pivotal_tokens)
    vectors = embeddings.class_vectors(pipe, family, class_word, len(tokens))
    installed = embeddings.install(pipe, family, embeddings.Embeddings(vectors, word, tokens))
    for rows in installed.values():
        if accelerator is not None and accelerator.num_processes > 1:
            rows.rows.register_post_accumulate_grad_hook(_averaged_over_processes(accelerator))
    until = max(1, int(tc.pivotal_fraction * tc.steps))
    return Pivotal(installed=installed, family=family, word=word, tokens=tokens, until=until)


def _averaged_over_processes(accelerator: Any) -> Any:
    def hook(param: Any) -> None:
        # The mean of a sum of micro-batch gradients: averaging after each micro-batch gives the same result.
        param.grad.copy_(accelerator.reduce(param.grad, reduction="mean"))

    return hook


def param_group(pivotal: Pivotal | None, tc: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer group of the new rows, which become trainable now: after the text-encoder LoRA groups are
    made, so that those (all trainable parameters of an encoder) leave them out; [] without pivotal tuning."""
    if pivotal is None:
        return []
    for param in pivotal.params:
        param.requires_grad_(True)
    return [{"params": pivotal.params, "lr": tc.pivotal_learning_rate}]


def training_encoders(run: Run, pivotal: Pivotal | None, step: int) -> dict[str, Any]:
    """The text encoders whose conditioning must be encoded afresh at `step` for the rows to learn ({} after the
    pivot); the training step encodes them beside the LoRA-trained ones."""
    if pivotal is None or step >= pivotal.until:
        return {}
    return {name: getattr(run.pipe, name) for name in pivotal.installed}


def before_step(run: Run, pivotal: Pivotal | None, step: int) -> None:
    """At the pivot (or the first step of a run resumed after it): freeze the rows and rebuild the text cache."""
    if pivotal is None or pivotal.frozen or step < pivotal.until:
        return
    pivotal.frozen = True
    for param in pivotal.params:
        param.requires_grad_(False)
        param.grad = None  # no update at all from here on (AdamW would still apply momentum and weight decay)
    if run.batches.text_cache is not None:
        _recache(run, pivotal)


def _recache(run: Run, pivotal: Pivotal) -> None:
    """The cached conditioning of the installed encoders, encoded again with the final rows (same prompts, same
    rows of the cache); the other encoders' parts stay."""
    from sdlora import families
    from sdlora.train.batches import build_text_cache

    family, cache = run.family, run.batches.text_cache
    encoders = [getattr(run.pipe, n) for n in family.text_encoders]
    tokens = family.sequence_length(run.pipe, run.config.model.max_sequence_length)
    fresh = build_text_cache(family, families.tokenizers(run.pipe, family), encoders, list(cache["prompts"]), tokens)
    cache["cond"] = {**cache["cond"], **fresh["cond"]}


def save(pivotal: Pivotal | None, folder: Path, name: str, header: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """NAME_emb.safetensors in `folder` (with the pivot step, for resumes); returns the tensors and metadata that
    go inside the diffusers LoRA file (({}, {}) without pivotal tuning)."""
    if pivotal is None:
        return {}, {}
    found = pivotal.embeddings()
    embeddings.save(Path(folder) / layout.embedding_file(name), found, {**header, UNTIL_KEY: str(pivotal.until)})
    return embeddings.diffusers_tensors(found), found.metadata()


def resume(pivotal: Pivotal | None, folder: Path, name: str) -> None:
    """Put a checkpoint's rows and pivot step back."""
    import torch
    from safetensors import safe_open

    if pivotal is None:
        return
    path = Path(folder) / layout.embedding_file(name)
    found = embeddings.read(path) if path.is_file() else None
    if found is None:
        raise SdloraError(f"{folder}: holds no pivotal embeddings ({path.name}); resume a checkpoint of this run")
    with safe_open(str(path), framework="pt") as handle:
        pivotal.until = int((handle.metadata() or {}).get(UNTIL_KEY, pivotal.until))
    keys = dict(pivotal.family.embedding_keys)
    with torch.no_grad():
        for encoder, rows in pivotal.installed.items():
            rows.rows.copy_(found.vectors[keys[encoder]])


class PivotalTuning(Method):
    """train.pivotal: new trigger tokens whose rows train beside the LoRA until the pivot."""

    name = "pivotal"

    def active(self, tc: TrainConfig) -> bool:
        return bool(tc.pivotal)

    def check(self, config: Config, examples: Any, dataset_dir: Path, token: str) -> None:
        check(config, list(examples), token)  # the captions name the trigger word its new tokens stand for

    def prepare(self, build: Build) -> None:
        """New trigger tokens, after the adapters and before the text caching."""
        build.states[self.name] = start(build.config, build.plan, build.pipe, build.family, build.accelerator)

    def encodes_afresh(self, tc: TrainConfig, family: Family) -> set[str]:
        return set(dict(family.embedding_keys))  # while the rows train, never offloaded

    def param_groups(self, state: Pivotal | None, tc: TrainConfig) -> list[dict[str, Any]]:
        return param_group(state, tc)

    def before_step(self, run: Run, state: Pivotal | None, step: int) -> None:
        before_step(run, state, step)

    def encoders(self, run: Run, state: Pivotal | None, step: int) -> dict[str, Any]:
        return training_encoders(run, state, step)

    def resume(self, state: Pivotal | None, folder: Path, name: str) -> None:
        resume(state, folder, name)

    def write_files(self, state: Pivotal | None, folder: Path, name: str, header: dict[str, str]) -> Files:
        """NAME_emb.safetensors; its vectors inside the diffusers file; the kohya file names the emb file it needs
        (generate refuses it without: sdlora.lora.embeddings.find)."""
        tensors, metadata = save(state, folder, name, header)
        needs = {embeddings.NEEDS_KEY: layout.embedding_file(name)} if state is not None else {}
        return Files(tensors, metadata, needs)


METHOD = PivotalTuning()
