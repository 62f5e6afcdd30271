"""`sdlora generate`: images from a base model plus LoRAs, with img2img, keep-face, a refiner, comparisons,
filmstrips, grids and A1111-readable settings in every file (the rendering itself is `render`)."""

from __future__ import annotations

import functools
import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from rich.console import Console

from sdlora import __version__, families, fsutil, layout, models
from sdlora.config import Config, GenerateConfig
from sdlora.config import save as save_config
from sdlora.errors import Interrupted, SdloraError, UsageError
from sdlora.generate import keepface, pngmeta
from sdlora.generate.render import (
    Sampling,
    a1111_sampler_name,
    check_sampler,
    load_for_rendering,
    make_grid,
    render_images,
)
from sdlora.lora import files as lora_files
from sdlora.lora.files import Lora, parse_lora

log = logging.getLogger(__name__)

# Refiner pass: img2img over the base's output at this strength (about A1111's "refiner switch at 0.7").
REFINER_STRENGTH = 0.3


@dataclass(frozen=True)
class Job:
    """One output image: image i of the run uses seed + i, so it can be remade alone with --seed seed+i --n 1."""

    index: int
    prompt: str
    seed: int


@dataclass
class Source:
    """The photo of --init-image or --keep-face, fitted to the output size, and the face mask for --keep-face."""

    photo: Image.Image
    face_mask: Image.Image | None = None


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


def _a1111_hash(path: Path) -> str:
    """A1111's hash of a LoRA file (SHA-256 of the bytes after the safetensors header), once per file and run."""
    info = Path(path).stat()
    return _cached_hash(str(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    return lora_files.addnet_hash(Path(path))


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


def generate(config: Config, out_dir: Path) -> list[Path]:
    """Render every prompt n times with the LoRAs; write DIR/NNNN-SEED.png + .json as each image is decoded, then
    the grids. Ctrl-C keeps every image finished so far."""
    g = config.generate
    if not g.prompts:
        raise UsageError("no prompt: give --prompt TEXT or --prompts FILE")
    if g.compare and not g.loras:
        raise UsageError("--compare needs at least one --lora (it shows the base model beside the LoRA)")
    if g.init_image and int(g.steps * g.strength) < 1:
        raise UsageError(f"--strength {g.strength} x --steps {g.steps} leaves no denoising step; raise either")
    loras = [parse_lora(spec) for spec in g.loras]
    for lora in loras:
        lora_files.check_finite(lora)
    width, height = g.width_height
    models.check_sizes(config.model, [("--size", width), ("--size", height)])  # the family's multiple, before loading
    source = _load_source(g, width, height)  # before the base model loads: a bad photo fails fast
    prompts = expand_triggers(g.prompts, loras)
    jobs = [Job(i, prompt, g.seed + i) for i, prompt in enumerate(p for p in prompts for _ in range(g.n))]
    out_dir = Path(out_dir)
    check_out_dir(out_dir, [g.init_image, g.keep_face, *(lora.path for lora in loras)], width * height * 3)
    writer = Writer(out_dir, config, loras)
    try:
        with fsutil.lock(out_dir, "generate"):
            writer.start()
            return _generate(config, jobs, loras, source, writer)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: kept the {len(writer.written)} image(s) finished so far in {out_dir}", signal.SIGINT
        ) from None


def _generate(config: Config, jobs: list[Job], loras: list[Lora], source: Source | None, writer: Writer) -> list[Path]:
    """Load the base and LoRAs, render (the base model first with --compare), stream the images, then the sheets."""
    from sdlora.lora import embeddings

    g = config.generate
    pipe, family, adapters = load_for_rendering(config.model, loras)
    config = families.with_defaults(config, family, pipe)  # Flux: 28 steps, guidance 3.5, flow-matching Euler
    g = config.generate
    writer.config, writer.guidance_label = config, family.guidance_label
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
    runner, call = _runner(pipe, g, source, len(jobs))
    writer.write_config()

    base_images = None
    if g.compare:
        runner.disable_lora()  # the same weights with the adapters off: no second copy of the model
        embeddings.set_enabled(pipe, family, False)  # and the trigger word a plain word (pivotal tuning's tokens)
        base_images = _finish(
            _render(runner, jobs, g, call, "base model", config.model.max_sequence_length)[0], refiner, jobs, g, source
        )
        embeddings.set_enabled(pipe, family, True)
        runner.enable_lora()
    if g.fuse and adapters:
        runner.fuse_lora(adapter_names=adapters, lora_scale=1.0)  # keeps the scales set_adapters gave
    images = _stream(runner, jobs, g, call, refiner, source, writer, config.model.max_sequence_length)
    writer.sheets(images, base_images)
    return writer.written


def _stream(
    runner: Any,
    jobs: list[Job],
    g: GenerateConfig,
    call: dict[str, Any],
    refiner: Any,
    source: Source | None,
    writer: Writer,
    max_sequence_length: int | None = None,
) -> list[Image.Image]:
    """Render batch by batch (the same batches, so the same pixels, as one call over every job) and write each
    finished image at once."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    images: list[Image.Image] = []
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("images", total=len(jobs))
        for start in range(0, len(jobs), g.batch_size):
            batch = jobs[start : start + g.batch_size]
            part = {
                key: value[start : start + len(batch)] if isinstance(value, list) else value
                for key, value in call.items()
            }
            rendered, strips = _render(runner, batch, g, part, "images", max_sequence_length, quiet=True)
            rendered = _finish(rendered, refiner, batch, g, source)
            for job, image in zip(batch, rendered, strict=True):
                writer.image(job, image, strips.get(job.index))
            images += rendered
            progress.update(task, completed=len(images))
    return images


class Writer:
    """generate's output folder: its marker, config.json, each image with its sidecar (and filmstrip) as soon as it
    exists, and the sheets at the end."""

    def __init__(self, out_dir: Path, config: Config, loras: list[Lora]) -> None:
        self.out_dir, self.config, self.loras = out_dir, config, loras
        self.guidance_label: str | None = None  # the family's name of a distilled guidance value (Forge)
        self.hashes = [(lora.name, lora_files.addnet_hash(lora.path)) for lora in loras]
        self.written: list[Path] = []

    def start(self) -> None:
        """Called holding the lock: the marker (a folder of an earlier generate keeps its own) and no leftovers."""
        if fsutil.read_marker(self.out_dir) is None:
            fsutil.write_marker(self.out_dir, fsutil.new_marker("generate"))
        fsutil.remove_stale_temporaries(self.out_dir)

    def write_config(self) -> None:
        save_config(self.config, self.out_dir / layout.CONFIG_JSON)

    def image(self, job: Job, image: Image.Image, strip: list[Image.Image] | None) -> None:
        stem = f"{job.index:04d}-{job.seed}"
        record = image_record(self.config, job, self.loras, self.hashes, image.size, self.guidance_label)
        pngmeta.save_png(self.out_dir / f"{stem}.png", image, record["parameters"])
        pngmeta.save_json(self.out_dir / f"{stem}.json", record)
        self.written.append(self.out_dir / f"{stem}.png")
        if strip:
            pngmeta.save_png(self.out_dir / f"{stem}-steps.png", make_grid(strip, cols=len(strip)))

    def sheets(self, images: list[Image.Image], base_images: list[Image.Image] | None) -> None:
        """DIR/grid.png and, with --compare, DIR/compare.png."""
        if len(images) > 1:
            pngmeta.save_png(self.out_dir / layout.GRID, make_grid(images, cols=self.config.generate.n))
        if base_images is not None:
            # One row per seed: the base model on the left, the same seed with the LoRA on the right.
            pairs = [image for pair in zip(base_images, images, strict=True) for image in pair]
            pngmeta.save_png(self.out_dir / layout.COMPARE, make_grid(pairs, cols=2))


def check_out_dir(out_dir: Path, inputs: list[Path | None], first_image_bytes: int) -> None:
    """Before any model loads: --out is new, empty or an earlier generate's; holds none of the inputs; and its disk
    has room for the first image (lock creation then proves it writable)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: is a file; give a folder")
    made_by = fsutil.owner(out_dir)
    if made_by not in (None, "generate") or (made_by is None and fsutil.contents(out_dir)):
        raise UsageError(
            f"--out {out_dir}: holds {fsutil.describe(out_dir)}; generate writes only into a new or empty folder or "
            "one of its own: choose another --out"
        )
    root = out_dir.resolve()
    for path in inputs:
        if path is not None and (root == Path(path).resolve() or root in Path(path).resolve().parents):
            raise UsageError(f"--out {out_dir}: holds the input {path}; write the images elsewhere")
    from sdlora.preflight import check_output_dir

    # Room for an uncompressed PNG, its sidecar and config.json, with some to spare; a read-only disk or a
    # folder without write permission is refused here too.
    check_output_dir(out_dir, "--out", need=first_image_bytes + (1 << 20))


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


def _load_source(g: GenerateConfig, width: int, height: int) -> Source | None:
    if g.init_image is not None:
        photo, _, _ = keepface.fit(keepface.load_photo(g.init_image, "--init-image"), width, height)
        return Source(photo)
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
    fitted, mask = keepface.prepare(photo, faces[0].landmarks, width, height)  # the largest face
    return Source(fitted, mask)


def _runner(pipe: Any, g: GenerateConfig, source: Source | None, count: int) -> tuple[Any, dict[str, Any]]:
    """The pipeline that does the job (text-to-image, img2img, inpainting; sharing the base's weights) and the
    extra arguments of its calls."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipe.set_progress_bar_config(disable=True)
    if source is None:
        return pipe, {}
    if source.face_mask is None:
        runner = AutoPipelineForImage2Image.from_pipe(pipe)
        return runner, {"init_images": [source.photo] * count, "call_kwargs": {"strength": g.strength}}
    # Inpainting repaints the white part of its mask: everything but the face. Strength 1 repaints it fully.
    runner = AutoPipelineForInpainting.from_pipe(pipe)
    repaint = ImageOps.invert(source.face_mask)
    call = {"init_images": [source.photo] * count, "mask_images": [repaint] * count, "call_kwargs": {"strength": 1.0}}
    runner.set_progress_bar_config(disable=True)
    return runner, call


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


def image_record(
    config: Config,
    job: Job,
    loras: list[Lora],
    hashes: list[tuple[str, str]],
    size: tuple[int, int],
    guidance_label: str | None = None,
) -> dict[str, Any]:
    """Everything needed to remake one image, plus A1111's `parameters` text built from it. A LoRA given as a
    train OUT_DIR is named and hashed by its kohya file, which is what A1111, Forge and civitai know."""
    g, base = config.generate, str(config.model.base)
    source = g.init_image or g.keep_face
    hashes = [
        (lora.name, _a1111_hash(lora.a1111_file) if lora.a1111_file else digest)
        for lora, (_, digest) in zip(loras, hashes, strict=True)
    ]
    lora_tags = "".join(f" <lora:{lora.name}:{lora.scale:g}>" for lora in loras)  # how A1111 asks for LoRAs
    settings = {
        "Steps": g.steps,
        "Sampler": a1111_sampler_name(g.scheduler),
        "CFG scale": g.cfg,
        "Seed": job.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": pngmeta.model_hash(Path(base)),
        "Model": Path(base).stem if Path(base).is_file() else Path(base).name,
        "Denoising strength": g.strength if g.init_image else None,
        "Refiner": Path(g.refiner).name if g.refiner else None,
        "Lora hashes": pngmeta.lora_hashes(hashes),
        "Version": f"sdlora {__version__}",
    }
    if guidance_label:  # Forge: real CFG off (1), then the guidance embedding's value under its own name
        pairs = [(k, 1 if k == "CFG scale" else v) for k, v in settings.items()]
        at = [k for k, _ in pairs].index("CFG scale") + 1
        settings = dict(pairs[:at] + [(guidance_label, g.cfg)] + pairs[at:])
    return {
        "prompt": job.prompt,
        "negative_prompt": g.negative,
        "index": job.index,
        "seed": job.seed,
        "steps": g.steps,
        "cfg": g.cfg,
        "scheduler": g.scheduler,
        "width": size[0],
        "height": size[1],
        "base": base,
        "vae": config.model.vae,
        "loras": [
            {"path": str(lora.path), "name": lora.name, "scale": lora.scale, "trigger": lora.trigger, "hash": h}
            for lora, (_, h) in zip(loras, hashes, strict=True)
        ],
        "fuse": g.fuse,
        "init_image": str(g.init_image) if g.init_image else None,
        "keep_face": str(g.keep_face) if g.keep_face else None,
        "strength": g.strength if g.init_image else None,
        "refiner": g.refiner,
        "source": str(source) if source else None,
        "sdlora_version": __version__,
        "parameters": pngmeta.infotext(job.prompt + lora_tags, g.negative, settings),
    }
