"""`sdlora eval`: score images (given, or generated from a LoRA) against a person's reference photos.

The pieces live in `sdlora.evaluation`: faces (backends), metrics (definitions), prompts, clip, report, and
checkpoints (scoring during training and picking the best step). This module reads the inputs, runs them in
order and writes the outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

from sdlora import layout
from sdlora.config import Config
from sdlora.errors import SdloraError, UsageError
from sdlora.evaluation.checkpoints import pick_best, plot_identity, score_checkpoint
from sdlora.evaluation.metrics import Reference, build_reference, score_images
from sdlora.evaluation.prompts import STANDARD_PROMPTS, clip_text, expand
from sdlora.evaluation.report import EvalResult, print_table, write_json, write_report
from sdlora.faces.backends import FaceBackend, face_backend
from sdlora.models import check_base

__all__ = ["evaluate", "face_backend", "pick_best", "plot_identity", "reference_set", "score_checkpoint"]


def evaluate(
    config: Config,
    *,
    reference: Path | None,
    images: Path | None = None,
    lora: Path | None = None,
    prompts_file: Path | None = None,
    json_path: Path | None = None,
    report_dir: Path | None = None,
    console: Any = None,
) -> EvalResult:
    """Score `images` (a folder) or the standard prompt set rendered with `lora` on `config.model.base`."""
    _check_inputs(reference, images, lora, prompts_file)
    if lora is not None:  # cheap checks first: a typo fails before any model loads
        from sdlora.generate import read_prompts
        from sdlora.lora.files import parse_lora

        check_base(config.model.base, config.model.allow_pickle, config.model.single_file_config)
        adapter = parse_lora(str(lora))
        templates = read_prompts(prompts_file) if prompts_file else list(STANDARD_PROMPTS)
    backend = face_backend(config.eval.face_model)
    threshold = config.eval.threshold or backend.threshold
    ref_images, ref_names = load_reference(reference)
    ref = reference_set(reference, backend, (ref_images, ref_names))
    notes = [f"no face found in reference photo {name}" for name in ref.faceless]
    trigger = None
    if images is not None:
        pictures, names, prompts, seeds = _read_images(images)
        clip_texts = prompts
    else:
        pictures, prompts, seeds, templates, trigger = _generate(config, adapter, templates, notes)
        names = [f"images/{i:03d}.png" for i in range(len(pictures))]
        clip_texts = [clip_text(t) for t in templates]
    fidelity = _fidelity(config.eval.clip, pictures, clip_texts, notes)
    scores, summary = _score(pictures, names, ref, backend, threshold, prompts, seeds, fidelity)
    if summary.images_with_face == 0:
        notes.append("no face was detected in any scored image: identity, bleed and face_spread are undefined")
    result = EvalResult(
        face_model=backend.name,
        threshold=threshold,
        reference=ref.images,
        reference_faces=len(ref.embeddings),
        lora=str(lora) if lora else None,
        trigger=trigger,
        summary=summary,
        images=scores,
        notes=notes,
    )
    print_table(result, console)
    if json_path is not None:
        write_json(result, json_path)
    if report_dir is not None:
        write_report(result, pictures, ref_images, report_dir)
    return result


def _check_inputs(reference: Path | None, images: Path | None, lora: Path | None, prompts: Path | None) -> None:
    if images is not None and lora is not None:
        raise UsageError("can't give both --images and --lora; choose one")
    if images is None and lora is None:
        raise UsageError("give --images DIR (score existing images) or --lora PATH --base MODEL (generate, then score)")
    if prompts is not None and lora is None:
        raise UsageError("--prompts only applies with --lora (images given with --images are scored as they are)")
    if reference is None:
        raise UsageError("--reference is required: the prep output folder (or a folder of photos) of the person")
    if not Path(reference).is_dir():
        raise UsageError(f"--reference {reference}: no such folder")
    if images is not None and not Path(images).is_dir():
        raise UsageError(f"--images {images}: no such folder")


def reference_set(folder: Path, backend: FaceBackend, loaded: tuple[list, list[str]] | None = None) -> Reference:
    """The reference embeddings and hashes of a dataset folder, computed once (e.g. at the start of training)."""
    images, names = loaded or load_reference(folder)
    ref = build_reference(images, names, backend)
    if not ref.embeddings:
        raise SdloraError(f"--reference {folder}: no face found in any of its {len(names)} photos")
    return ref


def load_reference(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """The reference photos: a prep dataset's manifest entries, or every image in a plain folder."""
    from sdlora.prep.manifest import MANIFEST, read_manifest

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        paths = [folder / entry.image for entry in read_manifest(folder)]
    else:
        paths = _image_files(folder)
    if not paths:
        raise UsageError(f"--reference {folder}: no images in it (expected a prep output folder)")
    return [_open(path) for path in paths], [str(path) for path in paths]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in layout.IMAGE_SUFFIXES and p.is_file())


def _open(path: Path) -> Image.Image:
    from sdlora.prep.images import read_image

    return read_image(path)


def _read_images(folder: Path) -> tuple[list[Image.Image], list[str], list[str | None], list[int | None]]:
    """Images of a folder with their prompt and seed, if recorded. `sdlora generate`'s grids and filmstrips
    (grid.png, compare.png, *-steps.png) are sheets of other images, not samples: skipped."""
    paths = [p for p in _image_files(folder) if p.name not in layout.SHEETS and not p.stem.endswith("-steps")]
    if not paths:
        raise UsageError(f"--images {folder}: no images in it ({', '.join(sorted(layout.IMAGE_SUFFIXES))})")
    prompts, seeds = zip(*(_recorded_prompt(path) for path in paths), strict=True)
    return [_open(path) for path in paths], [str(p) for p in paths], list(prompts), list(seeds)


def _recorded_prompt(path: Path) -> tuple[str | None, int | None]:
    """(prompt, seed) from `sdlora generate`'s NAME.json, a NAME.txt caption, or the PNG's A1111 `parameters`."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
            seed = record.get("seed")
            return record.get("prompt"), seed if isinstance(seed, int) else None
        except (json.JSONDecodeError, AttributeError):
            pass  # not ours: fall through to the other sources
    caption = path.with_suffix(".txt")
    if caption.is_file():
        return caption.read_text(encoding="utf-8").strip() or None, None
    with Image.open(path) as raw:
        parameters = (getattr(raw, "text", None) or {}).get("parameters")
    if not parameters:
        return None, None
    seed = re.search(r"(?:^|, )Seed: (\d+)", parameters.splitlines()[-1])
    return parameters.splitlines()[0], int(seed.group(1)) if seed else None  # A1111: prompt on the first line


def _generate(config: Config, adapter: Any, templates: list[str], notes: list[str]):
    """Render the prompt templates with the LoRA (an adapters.Lora): (images, prompts, seeds, templates, trigger)."""
    trigger = adapter.trigger
    if trigger is None:
        trigger = f"{config.prep.token} {config.prep.class_word}"
        notes.append(f"{adapter.path.name} has no trigger phrase in its metadata; used {trigger!r} from [prep]")
    repeated, prompts, seeds = expand(templates, config.eval.n, config.eval.seed, trigger)
    from sdlora.generate.render import Sampling, load_for_rendering, render_images

    pipe = load_for_rendering(config.model, [adapter])[0]
    images = render_images(pipe, prompts, seeds, Sampling.of(config.generate))
    return images, prompts, seeds, repeated, trigger


def _fidelity(clip: str | None, pictures: list, texts: list[str | None], notes: list[str]) -> list[float | None]:
    if not clip:
        notes.append("prompt_fidelity skipped: no CLIP model given (--clip HUB_ID_OR_FOLDER)")
        return [None] * len(pictures)
    from sdlora.evaluation.clip import ClipScorer

    scorer = ClipScorer(clip)
    known = [i for i, text in enumerate(texts) if text]
    scores: list[float | None] = [None] * len(pictures)
    for i, value in zip(known, scorer.score([pictures[i] for i in known], [texts[i] for i in known]), strict=True):
        scores[i] = value
    if len(known) < len(pictures):
        notes.append(f"prompt_fidelity covers {len(known)} of {len(pictures)} images (the rest have no prompt)")
    return scores


def _score(pictures, names, ref, backend: FaceBackend, threshold: float, prompts, seeds, fidelity):
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("scoring faces", total=len(pictures))
        return score_images(
            pictures,
            names,
            ref,
            backend,
            threshold,
            prompts=prompts,
            seeds=seeds,
            fidelity=fidelity,
            progress=lambda _: progress.advance(task),
        )
