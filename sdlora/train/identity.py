"""Identity evaluation during `sdlora train`: score the fixed validation set, log it, keep the best step's LoRA files.

At each evaluated step the main process renders `sdlora eval`'s standard prompt set (and its edit prompts where
editability can be judged: evaluation/edits.py) with the LoRA being trained, scores it against the dataset's
photos, appends {"step": N, "eval": {...}} to metrics.jsonl and redraws identity.png. When the step becomes the
best one (`pick_best`: within the diversity and bleed floors, the best recognised rate, steps within one standard
error of it tied on identity), its LoRA files are written to OUT_DIR/best/ at once, so pruned checkpoints never
lose it; at the last step summary.json says which step won and why. pick_best only ever moves to the newest step,
so best/ always holds the chosen step's files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdlora import layout
from sdlora.config import Config
from sdlora.errors import SdloraError
from sdlora.fsutil import atomic_dir, atomic_write_text
from sdlora.train import fsdp

BEST, BEST_FILE, SUMMARY, PLOT, METRICS = (
    layout.BEST,
    layout.BEST_FILE,
    layout.SUMMARY,
    layout.IDENTITY_PLOT,
    layout.METRICS,
)


@dataclass
class TrainEval:
    """The evaluation of one run. `reference` etc. are None on processes other than the main one."""

    out_dir: Path
    every: int  # evaluate at multiples of this (0: only at the last step)
    total: int  # the run's last step, always evaluated
    main: bool
    config: Config
    trigger: str
    reference: Any = None  # sdlora.evaluation.metrics.Reference
    backend: Any = None  # sdlora.faces.backends.FaceBackend
    scorer: Any = None  # sdlora.evaluation.clip.ClipScorer where eval.clip judges the edit prompts (real faces)
    rows: list[dict[str, Any]] = field(default_factory=list)  # eval rows so far, flattened: {"step": N, **summary}

    def due(self, step: int) -> bool:
        return step == self.total or (self.every > 0 and step % self.every == 0)


def cadence(config: Config, dataset_dir: Path) -> tuple[int | None, str | None]:
    """(every, note): None when evaluation is off (the note says why). Default: at each checkpoint of a prep
    dataset (its photos are the reference set); a plain folder only when --eval-every is given."""
    from sdlora.prep.manifest import MANIFEST

    tc = config.train
    if tc.eval_every == 0:
        return None, None
    if tc.eval_every is None and not (Path(dataset_dir) / MANIFEST).is_file():
        return None, (
            f"identity evaluation off: {dataset_dir} has no {MANIFEST} (not a `sdlora prep` output); "
            "pass --eval-every N to score against its photos"
        )
    return (tc.checkpoint_every if tc.eval_every is None else tc.eval_every), None


def start(config: Config, plan: Any, accelerator: Any) -> TrainEval | None:
    """Before the models load: the cadence and, on the main process, the reference embeddings and what a resumed
    run already has (its eval rows and best/). None, on every process, when evaluation is off."""
    every, note = cadence(config, plan.dataset_dir)
    if every is not None and fsdp.sharded(accelerator):  # its renders run on the main process alone (fsdp.check)
        every, note = None, "identity evaluation off under FSDP: score checkpoints with `sdlora eval --lora CHECKPOINT`"
    if note:
        accelerator.print(note)
    if every is None:
        return None
    evaluation = TrainEval(plan.out_dir, every, config.train.steps, accelerator.is_main_process, config, plan.trigger)
    outcome: Exception | str | None = None
    if evaluation.main:
        try:
            outcome = _prepare(evaluation, plan, asked=config.train.eval_every is not None)
        except SdloraError as exc:  # raised on every process below, so that none waits for the others
            outcome = exc
    outcome = _share(accelerator, outcome)
    if isinstance(outcome, Exception):
        raise outcome
    if outcome:
        accelerator.print(outcome)
        return None
    return evaluation


def _prepare(evaluation: TrainEval, plan: Any, asked: bool) -> str | None:
    """Main process: the reference set, then the state of a resumed run. A note when evaluation must be off."""
    from sdlora.evaluation.run import face_backend, reference_set
    from sdlora.train import checkpoint

    evaluation.backend = face_backend(evaluation.config.eval.face_model)
    try:
        evaluation.reference = reference_set(plan.dataset_dir, evaluation.backend)
    except SdloraError as exc:
        if asked:
            raise SdloraError(f"--eval-every: {exc}; pass --eval-every 0 to train without it") from None
        return f"identity evaluation off: {exc}"
    evaluation.scorer = _edit_scorer(evaluation)
    resumed = checkpoint.read_step(plan.resume_from) if plan.resume_from is not None else 0
    # Rows of steps after the resumed checkpoint are redone (the monitor drops them from metrics.jsonl too).
    evaluation.rows = [row for row in read_eval_rows(plan.out_dir) if row["step"] <= resumed]
    _restore_best(evaluation)
    return None


def _edit_scorer(evaluation: TrainEval) -> Any:
    """CLIP on the CPU, to judge the edit prompts' images, where eval.clip is set and the face model cannot read
    the change itself (evaluation/edits.py); None otherwise."""
    from sdlora.evaluation import edits

    clip = evaluation.config.eval.clip
    if not clip or edits.judge_of(evaluation.backend, clip=False) is not None:
        return None
    from sdlora.evaluation.clip import ClipScorer

    try:
        return ClipScorer(clip)
    except SdloraError as exc:  # identity is still scored; only editability goes
        print(f"note: editability off during training: {exc}")
        return None


def _share(accelerator: Any, outcome: Any) -> Any:
    """The main process's outcome, on every process."""
    if accelerator.num_processes == 1:
        return outcome
    from accelerate.utils import broadcast_object_list

    box = [outcome]
    broadcast_object_list(box, from_process=0)
    return box[0]


def read_eval_rows(out_dir: Path) -> list[dict[str, Any]]:
    """The eval rows of OUT_DIR/metrics.jsonl, flattened to {"step": N, **metrics} (what pick_best reads)."""
    from sdlora.train.monitor import read_records

    records = read_records(Path(out_dir) / METRICS)
    return [{"step": r["step"], **r["eval"]} for r in records if isinstance(r.get("eval"), dict)]


def best_step(out_dir: Path) -> int | None:
    """The step whose LoRA files OUT_DIR/best/ holds, if any."""
    path = Path(out_dir) / BEST / BEST_FILE
    return int(json.loads(path.read_text(encoding="utf-8"))["step"]) if path.is_file() else None


def _restore_best(evaluation: TrainEval) -> None:
    """On resume, best/ must hold the best of the kept rows. It does unless the run resumed from a checkpoint
    older than best/'s step: then take the files from that step's checkpoint if it is still there."""
    from sdlora.train import checkpoint

    best_dir = evaluation.out_dir / BEST
    if not evaluation.rows:
        shutil.rmtree(best_dir, ignore_errors=True)  # a fresh start (e.g. --overwrite) or nothing kept
        return
    chosen, why = _pick(evaluation)
    if best_step(evaluation.out_dir) == chosen:
        return
    source = checkpoint.step_dir(evaluation.out_dir, chosen)
    if (source / checkpoint.STATE_FILE).is_file():
        _write_best(evaluation, chosen, why, lambda folder: _copy_loras(source, folder))
    else:
        shutil.rmtree(best_dir, ignore_errors=True)
        print(f"note: the LoRA files of the best step so far ({chosen}) are gone; best/ starts again")


def _copy_loras(source: Path, folder: Path) -> None:
    for path in source.glob("*.safetensors"):
        if path.name != layout.LORA_STATE:  # the training state, not a LoRA file
            shutil.copy2(path, folder / path.name)


def catch_up(evaluation: TrainEval | None, run: Any) -> None:
    """At a resume: score the resumed step if it was due and has no score (the run was killed between its
    checkpoint and its evaluation). The model holds exactly that step's weights now, so the score and best/ are
    what the uninterrupted run got."""
    step = run.start_step
    if evaluation is None or step == 0 or not evaluation.due(step):
        return
    missed = evaluation.main and not any(row["step"] == step for row in evaluation.rows)
    if not _share(run.accelerator, missed):  # the main process knows the rows; all must agree (a barrier follows)
        return
    run.accelerator.print(f"note: step {step} was checkpointed but not evaluated; evaluating it now")
    after_step(evaluation, run, step)


def after_step(evaluation: TrainEval | None, run: Any, step: int) -> None:
    """Evaluate at `step` if it is due: the main process scores, the others wait at a barrier."""
    if evaluation is None or not evaluation.due(step):
        return
    if evaluation.main:
        from sdlora.train.outputs import save_loras

        evaluate_step(evaluation, run, step, lambda folder: save_loras(run, folder, unwrap_for_good=False))
    run.accelerator.wait_for_everyone()


def evaluate_step(evaluation: TrainEval, run: Any, step: int, write_loras: Callable[[Path], Any]) -> dict[str, Any]:
    """Score step `step`, log and plot it, update best/ (and summary.json at the last step)."""
    from sdlora.evaluation.run import plot_identity

    metrics = _score(evaluation, run)
    with (evaluation.out_dir / METRICS).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "eval": metrics}) + "\n")
    evaluation.rows.append({"step": step, **metrics})
    rows = evaluation.rows
    plot_identity(rows, evaluation.out_dir / PLOT)
    chosen, why = _pick(evaluation)
    if chosen == step:
        _write_best(evaluation, step, why, write_loras)
    elif best_step(evaluation.out_dir) == chosen:
        _write_best_record(evaluation.out_dir / BEST, chosen, why, _row(rows, chosen))
    else:  # pick_best keeps the previous best or takes the new step; best/ went missing in between
        print(f"note: step {chosen} is the best so far but {evaluation.out_dir / BEST} does not hold its files")
    run.accelerator.print(f"step {step} eval: {_facts(metrics)}; best so far: step {chosen}")
    if step == evaluation.total:
        write_summary(evaluation, chosen, why)
    return metrics


def _score(evaluation: TrainEval, run: Any) -> dict[str, Any]:
    """Render the validation set with the LoRA in training and score it; no effect on the training's RNG."""
    import torch

    from sdlora.evaluation.prompts import clip_text, default_templates, expand
    from sdlora.evaluation.run import score_checkpoint
    from sdlora.generate.render import Sampling
    from sdlora.train import outputs

    config = evaluation.config
    templates = default_templates(config.eval.face_model, config.eval.clip)
    repeated, prompts, seeds = expand(templates, config.eval.n, config.eval.seed, evaluation.trigger)
    cuda = run.accelerator.device.type == "cuda"
    devices = [run.accelerator.device] if cuda else []
    with torch.random.fork_rng(devices=devices), outputs.rendering(run):
        return score_checkpoint(
            run.pipe,
            evaluation.reference,
            evaluation.backend,
            prompts,
            seeds,
            Sampling.for_training(config),
            threshold=config.eval.threshold,
            scorer=evaluation.scorer,
            clip_texts=[clip_text(t) for t in repeated],
        )


def _pick(evaluation: TrainEval) -> tuple[int, str]:
    from sdlora.evaluation.run import pick_best

    ec = evaluation.config.eval
    return pick_best(evaluation.rows, ec.min_diversity, ec.max_bleed)


def _write_best(evaluation: TrainEval, step: int, why: str, write_loras: Callable[[Path], Any]) -> None:
    """Replace best/ whole: the LoRA files of `step` and best.json."""
    with atomic_dir(evaluation.out_dir / BEST) as tmp:
        write_loras(tmp)
        _write_best_record(tmp, step, why, _row(evaluation.rows, step))


def _write_best_record(folder: Path, step: int, why: str, row: dict[str, Any]) -> None:
    record = {"step": step, "why": why, "eval": {k: v for k, v in row.items() if k != "step"}}
    atomic_write_text(folder / BEST_FILE, json.dumps(record, indent=2) + "\n")


def _row(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    return next(row for row in rows if row["step"] == step)


def write_summary(evaluation: TrainEval, chosen: int, why: str) -> None:
    """OUT_DIR/summary.json and the printed verdict: which step's LoRA files best/ holds, and why."""
    rows = evaluation.rows
    summary = {
        "best_step": chosen,
        "why": why,
        "best_dir": str(evaluation.out_dir / BEST),
        "best_eval": {k: v for k, v in _row(rows, chosen).items() if k != "step"},
        "floors": {
            "min_diversity": evaluation.config.eval.min_diversity,
            "max_bleed": evaluation.config.eval.max_bleed,
        },
        "evaluated_steps": [row["step"] for row in rows],
    }
    atomic_write_text(evaluation.out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    print(f"best checkpoint: step {chosen} -> {evaluation.out_dir / BEST} ({why})")


def _facts(metrics: dict[str, Any]) -> str:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{value:.3f}"

    edited = f", editability {fmt('editability')}" if "editability" in metrics else ""
    return (
        f"face_rate {fmt('face_rate')}, identity {fmt('identity')}, recognised {fmt('recognised_rate')}, "
        f"diversity {fmt('diversity')}, bleed {fmt('bleed')}{edited}"
    )
