"""`sdlora generate`: images from a base model plus LoRAs, with img2img, keep-face, a refiner, comparisons,
filmstrips, grids and A1111-readable settings in every file (the rendering itself is `render`)."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from rich.console import Console

from sdlora import families, fsutil, models
from sdlora.config import MAX_IMAGES, Config, GenerateConfig
from sdlora.errors import Interrupted, SdloraError, UsageError
from sdlora.generate import comfyui, keepface
from sdlora.generate.output import Job, Writer, check_out_dir
from sdlora.generate.render import (
    Sampling,
    check_negative,
    check_sampler,
    load_for_rendering,
    native_size,
    render_images,
)
from sdlora.lora import files as lora_files
from sdlora.lora.files import Lora, parse_lora

log = logging.getLogger(__name__)

# Refiner pass: img2img over the base's output at this strength (about A1111's "refiner switch at 0.7").
REFINER_STRENGTH = 0.3


def jobs(prompts: list[str], n: int, seed: int, first: int = 0) -> Iterator[Job]:
    """Every prompt n times, made as they are rendered (never all at once: a run may be 100,000 images)."""
    for i in range(len(prompts) * n):
        yield Job(first + i, prompts[i // n], seed + i)


@dataclass
class Source:
    """The photo of --init-image or --keep-face (read and checked before the model loads), with the face's
    landmarks for --keep-face; `fitted` to the output size once that is known, with the face mask."""

    photo: Image.Image
    landmarks: Any = None
    face_mask: Image.Image | None = None

    def fitted(self, width: int, height: int) -> Source:
        if self.landmarks is None:
            return Source(keepface.fit(self.photo, width, height)[0])
        photo, mask = keepface.prepare(self.photo, self.landmarks, width, height)
        return Source(photo, self.landmarks, mask)


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped. A missing, special (pipe,
    device), empty, huge or non-UTF-8 file is a UsageError that says which."""
    import stat

    from sdlora.errors import printable

    path = Path(path)
    where = f"--prompts {printable(path)}"
    try:
        info = path.stat()
    except OSError:
        raise UsageError(f"{where}: no such file") from None
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{where}: is a folder; give a text file with one prompt per line")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{where}: not a regular file (a pipe or device?); give a text file with one prompt per line")
    if info.st_size == 0:
        raise UsageError(f"{where}: the file is empty; write one prompt per line (# starts a comment)")
    if info.st_size > MAX_PROMPTS_BYTES:
        raise UsageError(f"{where}: {info.st_size / 1e6:.0f} MB is too large for a prompts file; is it the right file?")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{where}: could not be read ({exc.strerror or exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"{where}: no prompts in it (one per line; # starts a comment)")
    if any("\x00" in p for p in prompts):
        raise UsageError(f"{where}: holds NUL bytes, so it is not a text file; give a text file")
    return prompts


MAX_PROMPTS_BYTES = 16 * 1024 * 1024


def expand_triggers(prompts: list[str], loras: list[Lora]) -> list[str]:
    """Replace {trigger} with the LoRAs' trigger phrases; warn when a prompt lacks a LoRA's trigger."""
    triggers = list(dict.fromkeys(lora.trigger for lora in loras if lora.trigger))
    expanded = []
    for prompt in prompts:
        if "{trigger}" in prompt:
            if not triggers:
                raise UsageError(
                    f"prompt {prompt!r} uses {{trigger}}, but no --lora has a trigger phrase in its metadata; "
                    "write the words into the prompt instead"
                )
            prompt = prompt.replace("{trigger}", ", ".join(triggers))
        for trigger in triggers:
            if trigger.lower() not in prompt.lower():
                log.warning("prompt %r lacks the LoRA trigger phrase %r: the LoRA may show little", prompt, trigger)
        expanded.append(prompt)
    return expanded


def generate(config: Config, out_dir: Path, *, overwrite: bool = False, engine: str = "local") -> list[Path]:
    """Render every prompt n times with the LoRAs; write DIR/NNNN-SEED.png + .json as each image is decoded, then
    the grids. Into a folder of an earlier generate the images come beside its own, numbered after them (with
    `overwrite`, the earlier runs' files are deleted first). Ctrl-C keeps every image finished so far. `engine`
    "openai" (only ever from an explicit --engine) sends the prompts and reference photos to the hosted API."""
    if engine != "local":
        return _remote(config, out_dir, engine, overwrite)
    g = config.generate
    if not g.prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompts FILE")
    if g.compare and not g.loras:
        raise UsageError("--compare needs at least one --lora (it shows the base model beside the LoRA)")
    if g.init_image and int(g.steps * g.strength) < 1:
        raise UsageError(f"--strength {g.strength} x --steps {g.steps} leaves no denoising step; raise either")
    if g.fuse and config.model.quantize == "fp8":  # peft re-quantizes a merge only for bases torchao loaded itself
        raise UsageError("--fuse with --quantize fp8: a LoRA can't be merged into float8 weights; drop --fuse")
    check_count(len(g.prompts), g.n)
    loras = [parse_lora(spec) for spec in g.loras]
    for lora in loras:
        lora_files.check_finite(lora)
    width, height = g.width_height  # an unset size becomes the base's own once it is loaded
    models.check_sizes(config.model, [("--size", width), ("--size", height)])  # the family's multiple, before loading
    if g.negative:
        check_negative(g.negative, models.peek_family(config.model))
    source = _load_source(g)  # before the base model loads: a bad photo fails fast
    photos, config = _references(config)  # so are references, and a base that takes none
    prompts = expand_triggers(g.prompts, loras)
    out_dir = Path(out_dir)
    inputs = [g.init_image, g.keep_face, *config.generate.reference, *(lora.path for lora in loras)]
    check_out_dir(out_dir, inputs, width * height * 3)
    writer = Writer(out_dir, config, loras, overwrite)
    try:
        with fsutil.lock(out_dir, "generate"):
            writer.start()
            return _generate(config, prompts, loras, source, writer, photos)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: kept the {len(writer.written)} image(s) finished so far in {out_dir}", signal.SIGINT
        ) from None


def _remote(config: Config, out_dir: Path, engine: str, overwrite: bool) -> list[Path]:
    """--engine openai: the key and server come from the environment, read here once (never from a config)."""
    import os

    from sdlora.generate import api_engine

    if engine not in api_engine.ENGINES:
        raise UsageError(f"--engine {engine!r}: choose one of {', '.join(api_engine.ENGINES)}")
    check_count(len(config.generate.prompts), config.generate.n)
    key, base_url = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_BASE_URL")
    return api_engine.generate(config, out_dir, key, base_url, overwrite)


def check_count(prompts: int, n: int) -> None:
    """More than MAX_IMAGES images in one run is refused before anything loads."""
    if prompts * n > MAX_IMAGES:
        raise UsageError(
            f"{prompts} prompt(s) x --n {n} = {prompts * n:,} images, more than the {MAX_IMAGES:,} one generate "
            "makes; lower --n or split the prompts over several runs"
        )


def with_native_size(config: Config, pipe: Any) -> Config:
    """`config` with the base's own size (render.native_size) as generate.size where nobody set one (an option, a
    TOML file or --set sets it, even to 512x512, and then it wins)."""
    size = native_size(pipe)
    if "size" in config.generate.model_fields_set or size is None:
        return config
    g = config.generate.model_copy(update={"size": f"{size[0]}x{size[1]}"})
    return config.model_copy(update={"generate": g})


def _generate(
    config: Config,
    prompts: list[str],
    loras: list[Lora],
    source: Source | None,
    writer: Writer,
    photos: list[Image.Image] | None = None,
) -> list[Path]:
    """Load the base and LoRAs, render (with --compare first the base model's images the compare sheet shows),
    stream the images, then the sheets."""
    from sdlora.lora import embeddings

    pipe, family, adapters = load_for_rendering(config.model, loras)
    config = families.with_defaults(config, family, pipe)  # Flux: 28 steps, guidance 3.5, flow-matching Euler
    config = with_native_size(config, pipe)
    g = config.generate
    writer.config, writer.guidance_label = config, family.guidance_label
    writer.comfyui = family.comfyui_parts(pipe, str(config.model.base), *g.width_height, g.cfg)
    check_sampler(g.scheduler, family)
    inpainting = family.inpainting_kind(pipe)
    if inpainting and g.keep_face is None:
        raise UsageError(f"{config.model.base} is an inpainting model ({inpainting}): use it with --keep-face PHOTO")
    if g.refiner and not family.supports_refiner:
        with_refiner = ", ".join(f.label for f in families.REGISTRY.values() if f.supports_refiner)
        raise UsageError(
            f"--refiner: a refiner pass is for {with_refiner} bases, and {config.model.base} is {family.name}"
        )
    refiner = _refiner(g.refiner, config.model.allow_pickle, family) if g.refiner else None
    if refiner is not None:
        writer.comfyui_refiner = comfyui.refiner(config, family, REFINER_STRENGTH)
    source = source.fitted(*g.width_height) if source is not None else None
    runner, call = _runner(pipe, family, g, source)
    if photos:  # --reference: every image of the run sees the same photos
        call = {"call_kwargs": {"image": photos}}
    writer.write_config()
    if source is not None:  # the photo (and mask) the run's ComfyUI workflows load
        repaint = ImageOps.invert(source.face_mask) if source.face_mask is not None else None  # as _runner's
        writer.comfyui_inputs(source.photo, repaint, g.strength if g.init_image else 1.0, bool(inpainting))
    if photos:  # the reference photos the run's ComfyUI workflows load
        writer.comfyui_reference_photos(photos)
    total = len(prompts) * g.n
    compared = writer.plan_sheets(total, g.width_height, g.compare)
    tokens = config.model.max_sequence_length
    if compared:
        runner.disable_lora()  # the same weights with the adapters off: no second copy of the model
        embeddings.set_enabled(pipe, family, False)  # and the trigger word a plain word (pivotal tuning's tokens)
        shown = list(islice(jobs(prompts, g.n, g.seed, writer.first), compared))
        base_images = _render(runner, shown, g, _per_image(call, len(shown)), "base model", tokens)[0]
        writer.base_images = _finish(base_images, refiner, shown, g, source)
        embeddings.set_enabled(pipe, family, True)
        runner.enable_lora()
    if g.fuse and adapters:
        runner.fuse_lora(adapter_names=adapters, lora_scale=1.0)  # keeps the scales set_adapters gave
    _stream(runner, jobs(prompts, g.n, g.seed, writer.first), total, g, call, refiner, source, writer, tokens)
    writer.sheets()
    return writer.written


def _batches(items: Iterable[Job], size: int) -> Iterator[list[Job]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _per_image(call: dict[str, Any], count: int) -> dict[str, Any]:
    """render_images' arguments for `count` images: the one source photo (and mask) repeated."""
    return {key: [value] * count if isinstance(value, Image.Image) else value for key, value in call.items()}


def _stream(
    runner: Any,
    todo: Iterable[Job],
    total: int,
    g: GenerateConfig,
    call: dict[str, Any],
    refiner: Any,
    source: Source | None,
    writer: Writer,
    max_sequence_length: int | None = None,
) -> None:
    """Render batch by batch (the same batches, so the same pixels, as one call over every job) and write each
    finished image at once; nothing stays in memory but the sheets."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    done = 0
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("images", total=total)
        for batch in _batches(todo, g.batch_size):
            rendered, strips = _render(
                runner, batch, g, _per_image(call, len(batch)), "images", max_sequence_length, quiet=True
            )
            for job, image in zip(batch, _finish(rendered, refiner, batch, g, source), strict=True):
                writer.image(job, image, strips.get(job.index))
            done += len(batch)
            progress.update(task, completed=done)


def _finish(
    images: list[Image.Image], refiner: Any, jobs: list[Job], g: GenerateConfig, source: Source | None
) -> list[Image.Image]:
    """The refiner pass, then the photo's own face composited back (--keep-face)."""
    if refiner is not None:
        # At least one denoising step however few --steps (img2img runs steps x strength of them).
        steps = max(g.steps, math.ceil(1 / REFINER_STRENGTH))
        call = {"init_images": images, "call_kwargs": {"strength": REFINER_STRENGTH}}
        images = _render(refiner, jobs, g.model_copy(update={"save_steps": 0, "steps": steps}), call, "refiner")[0]
    if source is not None and source.face_mask is not None:
        images = [keepface.composite(source.photo, image, source.face_mask) for image in images]
    return images


def _references(config: Config) -> tuple[list[Image.Image], Config]:
    """--reference's photos, read before any weights load (a base that takes none is refused), and the config with
    the photos used in generate.reference (a dataset's picks) and one image per call (the Edit pipelines take one
    prompt at a time)."""
    from sdlora.generate import references

    g = config.generate
    if not g.reference:
        return [], config
    paths = references.choose(g.reference, references.reference_count(config.model))
    update = {"reference": paths, "batch_size": 1}
    return references.load(paths), config.model_copy(update={"generate": g.model_copy(update=update)})


def _load_source(g: GenerateConfig) -> Source | None:
    """The --init-image or --keep-face photo, read (and its face found) before any model loads."""
    if g.init_image is not None:
        return Source(keepface.load_photo(g.init_image, "--init-image"))
    if g.keep_face is None:
        return None
    from sdlora.faces.dlib import DlibFaces

    photo = keepface.load_photo(g.keep_face, "--keep-face")
    faces = DlibFaces().detect(photo)
    if not faces:
        raise SdloraError(
            f"--keep-face {g.keep_face}: no face found; use a photo with a clear, roughly frontal face "
            "at least ~80 px wide"
        )
    return Source(photo, faces[0].landmarks)  # the largest face


def _runner(pipe: Any, family: Any, g: GenerateConfig, source: Source | None) -> tuple[Any, dict[str, Any]]:
    """The pipeline that does the job (text-to-image, img2img, inpainting; sharing the base's weights) and the
    extra arguments of its calls (one photo and mask: `_per_image` repeats them for a batch). A family's own
    `photo_pipeline` (an inpainting pipeline) does img2img with the whole image masked."""
    import diffusers
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipe.set_progress_bar_config(disable=True)
    if source is None:
        return pipe, {}
    own = getattr(diffusers, family.photo_pipeline).from_pipe(pipe) if family.photo_pipeline else None
    if own is not None:
        own.set_progress_bar_config(disable=True)
    if source.face_mask is None:
        runner = own or _from_pipe(AutoPipelineForImage2Image, pipe, family, "--init-image", "img2img")
        call = {"init_images": source.photo, "call_kwargs": {"strength": g.strength}}
        if own is not None:
            call["mask_images"] = Image.new("L", source.photo.size, 255)  # repaint it all, at --strength
        return runner, call
    # Inpainting repaints the white part of its mask: everything but the face. Strength 1 repaints it fully.
    runner = own or _from_pipe(AutoPipelineForInpainting, pipe, family, "--keep-face", "inpainting")
    repaint = ImageOps.invert(source.face_mask)
    call = {"init_images": source.photo, "mask_images": repaint, "call_kwargs": {"strength": 1.0}}
    return runner, call


def _from_pipe(auto: Any, pipe: Any, family: Any, option: str, kind: str) -> Any:
    """diffusers' img2img or inpainting pipeline of the base (sharing its weights), its progress bar off; one line
    where diffusers has none for the base's family (AutoPipeline's ValueError), or gives one that takes no strength
    (a text-to-image pipeline that reads reference images: not an img2img)."""
    import inspect

    try:
        runner = auto.from_pipe(pipe)
    except ValueError:  # AutoPipeline can't find a pipeline linked to ...
        runner = None
    if runner is None or "strength" not in inspect.signature(runner.__call__).parameters:
        raise UsageError(
            f"{option}: diffusers has no {kind} pipeline for {family.label} bases ({type(pipe).__name__}); "
            f"render without {option}"
        )
    runner.set_progress_bar_config(disable=True)
    return runner


def _refiner(name: str, allow_pickle: bool, family: Any) -> Any:
    from diffusers import AutoPipelineForImage2Image

    refiner = models.load_pipeline(name, allow_pickle=allow_pickle, torch_dtype=models.inference_dtype())
    if families.detect(refiner) is not family:
        raise UsageError(f"--refiner {name}: not an {family.label} model")
    refiner = AutoPipelineForImage2Image.from_pipe(refiner).to(models.device())
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _render(
    pipe: Any,
    jobs: list[Job],
    g: GenerateConfig,
    call: dict[str, Any],
    label: str,
    max_sequence_length: int | None = None,
    quiet: bool = False,
) -> tuple[list[Image.Image], dict[int, list[Image.Image]]]:
    """render_images over the jobs with a progress bar per batch (none when `quiet`); returns the images and the
    filmstrips by job index."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    strips: dict[int, list[Image.Image]] = {}

    def keep_strips(first: int, frames: list[list[Image.Image]]) -> None:
        for offset, image_frames in enumerate(frames):
            strips[jobs[first + offset].index] = image_frames

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=quiet) as progress:
        task = progress.add_task(label, total=len(jobs))
        images = render_images(
            pipe,
            [job.prompt for job in jobs],
            [job.seed for job in jobs],
            Sampling.of(g).but(max_sequence_length=max_sequence_length),
            on_batch=lambda done, _total: progress.update(task, completed=done),
            preview_every=g.save_steps,
            on_previews=keep_strips,
            **call,
        )
    return images, strips
