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

from sdlora import fsutil, layout
from sdlora.config import Config
from sdlora.errors import SdloraError, UsageError
from sdlora.evaluation import edits
from sdlora.evaluation.checkpoints import pick_best, plot_identity, score_checkpoint
from sdlora.evaluation.metrics import Reference, build_reference, score_images
from sdlora.evaluation.prompts import clip_text, default_templates, expand
from sdlora.evaluation.report import SCHEMA, EvalResult, print_table, write_json, write_report
from sdlora.faces.backends import FaceBackend, face_backend
from sdlora.models import check_base

__all__ = [
    "evaluate",
    "face_backend",
    "pick_best",
    "plot_identity",
    "reference_set",
    "score_checkpoint",
    "score_folder",
]


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
    adapter, templates = _lora_inputs(config, lora, prompts_file) if lora is not None else (None, [])
    _check_json_path(json_path)
    claim = _claim_report(report_dir) if report_dir is not None else None  # locked until the report is written
    try:
        stream = report_dir / "images" if report_dir is not None else None
        result, pictures, ref_images = _evaluate(config, reference, images, lora, adapter, templates, stream)
        print_table(result, console)
        if json_path is not None:
            write_json(result, json_path)
        if report_dir is not None:
            write_report(result, pictures, ref_images, report_dir)
    finally:
        if claim is not None:
            claim.drop()
    return result


def _lora_inputs(config: Config, lora: Path, prompts_file: Path | None) -> tuple[Any, list[str]]:
    """Cheap checks first, so a typo fails before any model loads: the base, the LoRA (finite), the prompts."""
    from sdlora.generate import read_prompts
    from sdlora.lora.files import check_finite, parse_lora

    check_base(config.model.base, config.model.allow_pickle, config.model.single_file_config, hub=False)
    adapter = parse_lora(str(lora))
    check_finite(adapter)
    check_base(config.model.base, config.model.allow_pickle, config.model.single_file_config)  # asks the hub last
    if prompts_file is not None:
        return adapter, read_prompts(prompts_file)
    return adapter, default_templates(config.eval.face_model, config.eval.clip)


def _evaluate(
    config: Config,
    reference: Path,
    images: Path | None,
    lora: Path | None,
    adapter: Any,
    templates: list[str],
    stream: Path | None,
) -> tuple[EvalResult, list[Image.Image], list[Image.Image]]:
    """Read or render (streaming into `stream`) the images and score them: (result, images, reference photos)."""
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
        pictures, prompts, seeds, templates, trigger = _generate(config, adapter, templates, notes, stream)
        names = [f"images/{i:03d}.png" for i in range(len(pictures))]
        clip_texts = [clip_text(t) for t in templates]
    fidelity, preferences = _fidelity(config.eval.clip, pictures, clip_texts, notes, prompts)
    scores, summary = _score(pictures, names, ref, backend, threshold, prompts, seeds, fidelity, preferences)
    edit_summary = edits.summarise(scores, edits.judge_of(backend, bool(config.eval.clip)))
    notes += [line for line in [edits.note(scores, edit_summary, backend.name)] if line]
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
        edits=edit_summary,
        images=scores,
        notes=notes,
    )
    return result, pictures, ref_images


def _inside_dataset(path: Path) -> Path | None:
    """The `sdlora prep` dataset folder `path` is (or is in: a dataset's images/), if any."""
    for folder in (path, path.parent):
        if folder.is_dir() and fsutil.owner(folder) == "prep":
            return folder
    return None


def _check_json_path(path: Path | None) -> None:
    """--json writes a new file or replaces an earlier eval result; never a dataset's file or anything else."""
    if path is None:
        return
    path = Path(path).absolute()
    dataset = _inside_dataset(path.parent)
    if dataset is not None:
        raise UsageError(f"--json {path}: inside the dataset {dataset}; write the result elsewhere")
    if path.is_dir():
        raise UsageError(f"--json {path}: is a folder; give a file name, e.g. {path / 'eval.json'}")
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("schema") == SCHEMA
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UsageError(f"--json {path}: exists and is not an `sdlora eval` result; choose a new file name")


def _claim_report(folder: Path) -> fsutil.Claim:
    """--report: a new or empty folder, or an earlier report; never a dataset or another command's folder. Locked
    and marked now (renders stream into it)."""
    folder = Path(folder)
    dataset = _inside_dataset(folder.absolute())
    made_by = fsutil.owner(folder)
    if dataset is not None or made_by not in (None, "eval") or (made_by is None and fsutil.contents(folder)):
        raise UsageError(
            f"--report {folder}: holds {fsutil.describe(dataset or folder)}; choose a new folder for the report"
        )
    claim = fsutil.claim(folder, "eval", lock_now=True)
    fsutil.remove_stale_temporaries(folder)
    fsutil.write_marker(folder, claim.marker)
    return claim


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
    from sdlora.prep.manifest import MANIFEST, confined, read_manifest

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        paths = [confined(folder, entry.image) for entry in read_manifest(folder)]
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
    (grid.png, compare-0004.png, *-steps.png) are sheets of other images, not samples: skipped."""
    paths = [p for p in _image_files(folder) if not layout.is_sheet(p.name) and not p.stem.endswith("-steps")]
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


def _generate(config: Config, adapter: Any, templates: list[str], notes: list[str], stream: Path | None):
    """Render the prompt templates with the LoRA (an adapters.Lora): (images, prompts, seeds, templates, trigger).
    With `stream` (the report's images/), each batch is written there as soon as it is decoded and a rerun with
    the same settings reuses it: Ctrl-C keeps what is done."""
    trigger = adapter.trigger
    if trigger is None:
        trigger = f"{config.prep.token} {config.prep.class_word}"
        notes.append(f"{adapter.path.name} has no trigger phrase in its metadata; used {trigger!r} from [prep]")
    repeated, prompts, seeds = expand(templates, config.eval.n, config.eval.seed, trigger)
    from sdlora.generate.render import Sampling, load_for_rendering, render_images

    sampling = Sampling.of(config.generate)
    key = _render_key(config, adapter, sampling)
    pipe = None
    images: list[Image.Image] = []
    for start in range(0, len(prompts), sampling.batch_size):
        chunk = range(start, min(start + sampling.batch_size, len(prompts)))
        done = [_streamed(stream, i, prompts[i], seeds[i], key) for i in chunk]
        if any(image is None for image in done):
            pipe = pipe or load_for_rendering(config.model, [adapter])[0]
            done = render_images(pipe, [prompts[i] for i in chunk], [seeds[i] for i in chunk], sampling)
            for i, image in zip(chunk, done, strict=True):
                _stream_image(stream, i, image, prompts[i], seeds[i], key)
        images += done
    return images, prompts, seeds, repeated, trigger


def _render_key(config: Config, adapter: Any, sampling: Any) -> str:
    """What a streamed render depends on besides its prompt and seed: base, LoRA bytes and scale, sampling."""
    import hashlib
    from dataclasses import asdict

    from sdlora.lora.files import addnet_hash

    facts = [str(config.model.base), str(config.model.vae), addnet_hash(adapter.path), adapter.scale, asdict(sampling)]
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _streamed(stream: Path | None, index: int, prompt: str, seed: int, key: str) -> Image.Image | None:
    """Image `index` rendered earlier with the same prompt, seed and settings (kept by an interrupted run)."""
    if stream is None:
        return None
    try:
        record = json.loads((stream / f"{index:03d}.json").read_text(encoding="utf-8"))
        if record != {"prompt": prompt, "seed": seed, "key": key}:
            return None
        with Image.open(stream / f"{index:03d}.png") as image:
            return image.convert("RGB")
    except (OSError, ValueError):
        return None


def _stream_image(stream: Path | None, index: int, image: Image.Image, prompt: str, seed: int, key: str) -> None:
    if stream is None:
        return
    from sdlora.generate import pngmeta

    pngmeta.save_png(stream / f"{index:03d}.png", image)
    pngmeta.save_json(stream / f"{index:03d}.json", {"prompt": prompt, "seed": seed, "key": key})


def _fidelity(
    clip: str | None, pictures: list, texts: list[str | None], notes: list[str], prompts: list[str | None]
) -> tuple[list[float | None], list[bool | None]]:
    """CLIP's (similarity of image and text, whether it prefers an edit prompt's text to it without the edit)."""
    if not clip:
        notes.append("prompt_fidelity skipped: no CLIP model given (--clip HUB_ID_OR_FOLDER)")
        return [None] * len(pictures), [None] * len(pictures)
    from sdlora.evaluation.clip import ClipScorer, edit_preferences

    scorer = ClipScorer(clip)
    known = [i for i, text in enumerate(texts) if text]
    scores: list[float | None] = [None] * len(pictures)
    for i, value in zip(known, scorer.score([pictures[i] for i in known], [texts[i] for i in known]), strict=True):
        scores[i] = value
    if len(known) < len(pictures):
        notes.append(f"prompt_fidelity covers {len(known)} of {len(pictures)} images (the rest have no prompt)")
    return scores, edit_preferences(scorer, pictures, texts, prompts, scores)


def _score(pictures, names, ref, backend: FaceBackend, threshold: float, prompts, seeds, fidelity, preferences=None):
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
            preferences=preferences,
            progress=lambda _: progress.advance(task),
        )


def score_folder(
    config: Config, folder: Path, ref: Reference, backend: FaceBackend, clip_texts: list[str | None] | None = None
) -> tuple[Any, list[Any], list[Image.Image], list[str]]:
    """Score a folder's images as `eval --images` does, against a reference set built once (`sdlora compare` scores
    several folders against one): (summary, per-image scores, the images, notes). `clip_texts` (one per image)
    replace the recorded prompts for CLIP, e.g. the prompts without a trigger word."""
    pictures, names, prompts, seeds = _read_images(folder)
    notes: list[str] = []
    texts = clip_texts if clip_texts is not None and len(clip_texts) == len(pictures) else prompts
    fidelity, preferences = _fidelity(config.eval.clip, pictures, texts, notes, prompts)
    threshold = config.eval.threshold or backend.threshold
    scores, summary = _score(pictures, names, ref, backend, threshold, prompts, seeds, fidelity, preferences)
    return summary, scores, pictures, notes
