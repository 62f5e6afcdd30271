"""`sdlora generate`'s output folder: which folders it writes into, where a run's numbering starts (after everything
an earlier run left, so no image is ever replaced), each image with the record that remakes it as soon as it
exists, and sheets of bounded size filled as the images arrive."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdlora import __version__, fsutil, layout
from sdlora.errors import SdloraError, UsageError
from sdlora.generate import pngmeta
from sdlora.generate.render import a1111_sampler_name
from sdlora.lora import files as lora_files

if TYPE_CHECKING:
    from sdlora.comfyui.workflow import LoraFile, Photo, Refiner
    from sdlora.config import Config
    from sdlora.families.comfyui import ComfyParts
    from sdlora.lora.files import Lora

log = logging.getLogger(__name__)

# A sheet is a glance, not an archive: at most this many pixels a side (100 prompts x 4 at 512 px once made a
# 2048x51200 px, 58 MB grid.png). The images it leaves out are all in the folder.
MAX_SHEET_SIDE = 4096


@dataclass(frozen=True)
class Job:
    """One output image: image i of the run uses seed + i, so it can be remade alone with --seed seed+i --n 1; its
    file is number `index` of the folder (i, or i after the images an earlier run left there)."""

    index: int
    prompt: str
    seed: int


def first_free(out_dir: Path) -> int:
    """The number of a run's first image: one past every number an earlier run used (images, sheets and configs
    alike, so an interrupted run's images and a run whose images the user deleted both keep their names); 0 for a
    new folder."""
    used = [-1]
    for name in fsutil.contents(out_dir):
        image, run_file = layout.GENERATED.match(name), layout.RUN_FILE.match(name)
        if image:
            used.append(int(image.group(1)))
        elif run_file and run_file.group(3):
            used.append(int(run_file.group(3)))
    return max(used) + 1


def written_by_generate(out_dir: Path) -> list[Path]:
    """The files of earlier runs in a generate folder: images, their settings and filmstrips, configs, sheets."""
    names = fsutil.contents(out_dir)
    found = [out_dir / n for n in names if layout.GENERATED.match(n) or layout.RUN_FILE.match(n)]
    return [path for path in found if path.is_file() and not path.is_symlink()]


def check_out_dir(out_dir: Path, inputs: list[Path | None], first_image_bytes: int) -> None:
    """Before any model loads: --out is new, empty or an earlier generate's; holds none of the inputs; and its disk
    has room for the first image (lock creation then proves it writable)."""
    fsutil.check_own_or_empty(out_dir, "generate")
    root = out_dir.resolve()
    for path in inputs:
        if path is not None and (root == Path(path).resolve() or root in Path(path).resolve().parents):
            raise UsageError(f"--out {out_dir}: holds the input {path}; write the images elsewhere")
    from sdlora.preflight import check_output_dir

    # Room for an uncompressed PNG, its sidecar and config.json, with some to spare; a read-only disk or a
    # folder without write permission is refused here too.
    check_output_dir(out_dir, "--out", need=first_image_bytes + (1 << 20))


class Sheet:
    """A grid filled image by image, row by row: `cols` a row (fewer where they would pass MAX_SHEET_SIDE, never
    under `min_cols`) and as many whole rows as fit (at least one). Only the sheet's own pixels are kept."""

    def __init__(self, cols: int, total: int, cell: tuple[int, int], min_cols: int = 1) -> None:
        width, height = cell
        self.cols = max(min_cols, min(cols, total, MAX_SHEET_SIDE // width))
        rows = max(1, min(-(-total // self.cols), MAX_SHEET_SIDE // height))
        self.capacity, self.total = min(total, self.cols * rows), total
        self.canvas: Image.Image | None = None
        self.cell = cell
        self.count = 0

    def add(self, image: Image.Image) -> None:
        """Paste `image` into the next cell (cells are the first image's size); past the capacity, nothing."""
        if self.count >= self.capacity:
            return
        if self.canvas is None:
            self.cell = image.size
            rows = -(-self.capacity // self.cols)
            self.canvas = Image.new("RGB", (self.cols * image.width, rows * image.height))
        width, height = self.cell
        self.canvas.paste(image.convert("RGB"), ((self.count % self.cols) * width, (self.count // self.cols) * height))
        self.count += 1


class Writer:
    """generate's output folder: its marker, the run's config, each image with its sidecar (and filmstrip) as soon
    as it exists, and the sheets at the end. Images are numbered from `first_free`, and nothing is written over an
    existing file: a run into a folder that holds images adds its own beside them."""

    def __init__(self, out_dir: Path, config: Config, loras: list[Lora], overwrite: bool = False) -> None:
        self.out_dir, self.config, self.loras, self.overwrite = out_dir, config, loras, overwrite
        self.guidance_label: str | None = None  # the family's name of a distilled guidance value (Forge)
        self.hashes = [(lora.name, lora_files.addnet_hash(lora.path)) for lora in loras]
        self.written: list[Path] = []
        self.first = 0
        self.run: int | None = None  # the suffix of this run's config and sheets: None for a new folder
        self.grid: Sheet | None = None
        self.compare: Sheet | None = None
        self.base_images: list[Image.Image] = []
        self.comfyui: ComfyParts | None = None  # the family's ComfyUI loaders for the base (generate sets them)
        self.comfyui_jobs: list[Job] = []  # the images the run's workflow file renders
        self.comfyui_loras: list[LoraFile] | None = None
        self.comfyui_photo: Photo | None = None  # --init-image / --keep-face (comfyui_inputs)
        self.comfyui_refiner: Refiner | None = None  # --refiner (generate sets it)
        self.comfyui_references: list[str] | None = None  # --reference's photos (comfyui_reference_photos)

    def start(self) -> None:
        """Called holding the lock: the marker (a folder of an earlier generate keeps its own), no leftovers, with
        `overwrite` the earlier runs' files gone; then where this run's numbers start."""
        if fsutil.read_marker(self.out_dir) is None:
            fsutil.write_marker(self.out_dir, fsutil.new_marker("generate"))
        fsutil.remove_stale_temporaries(self.out_dir)
        if self.overwrite:
            for path in written_by_generate(self.out_dir):
                path.unlink()
        self.first = first_free(self.out_dir)
        plain_taken = any((self.out_dir / name).exists() for name in (layout.CONFIG_JSON, *layout.SHEETS))
        self.run = self.first if self.first or plain_taken else None

    def path(self, name: str) -> Path:
        """This run's config.json / grid.png / compare.png: 'grid-0004.png' in a folder that held earlier images."""
        return self.out_dir / layout.run_file(name, self.run)

    def write_config(self) -> None:
        text = json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n"  # as sdlora.config.save
        with self._new(self.path(layout.CONFIG_JSON)) as path:
            fsutil.atomic_write_text(path, text, replace=False)

    def comfyui_inputs(
        self, photo: Image.Image, repaint: Image.Image | None, strength: float, inpainting: bool
    ) -> None:
        """The photo as generate fitted it (and keep-face's mask, white where it repaints) beside the images, under
        the names the run's workflows load them by from ComfyUI's input folder."""
        from sdlora.comfyui.workflow import Photo

        names: list[str | None] = []
        for image, name in ((photo, layout.COMFYUI_INPUT), (repaint, layout.COMFYUI_MASK)):
            if image is None:
                names.append(None)
                continue
            with self._new(self.path(name)) as path:
                pngmeta.save_png(path, image, replace=False)
            names.append(path.name)
        self.comfyui_photo = Photo(str(names[0]), strength, names[1], inpainting)

    def comfyui_reference_photos(self, photos: list[Image.Image]) -> None:
        """--reference's photos beside the images (comfyui-reference-N.png), under the names the run's workflows load
        them by from ComfyUI's input folder."""
        names = []
        for number, photo in enumerate(photos, start=1):
            with self._new(self.path(layout.COMFYUI_REFERENCE.format(number))) as path:
                pngmeta.save_png(path, photo, replace=False)
            names.append(path.name)
        self.comfyui_references = names

    def plan_sheets(self, total: int, cell: tuple[int, int], compare: bool) -> int:
        """Size the grid (one row per prompt, n columns) and compare sheet (base | LoRA, one row per image) for
        `total` images of `cell` px; returns how many images the compare sheet shows (their base renders)."""
        self.grid = Sheet(self.config.generate.n, total, cell) if total > 1 else None
        self.compare = Sheet(2, 2 * total, cell, min_cols=2) if compare else None
        return self.compare.capacity // 2 if self.compare else 0

    def image(self, job: Job, image: Image.Image, strip: list[Image.Image] | None) -> None:
        from sdlora.generate.render import make_grid

        stem = layout.generated_stem(job.index, job.seed)
        record = image_record(self.config, job, self.loras, self.hashes, image.size, self.guidance_label)
        prompt = self._workflow([job], stem)
        with self._new(self.out_dir / f"{stem}.png") as path:
            pngmeta.save_png(path, image, record["parameters"], replace=False, prompt=prompt)
        with self._new(self.out_dir / f"{stem}.json") as path:
            pngmeta.save_json(path, record, replace=False)
        self.written.append(self.out_dir / f"{stem}.png")
        if strip:
            with self._new(self.out_dir / f"{stem}-steps.png") as path:
                pngmeta.save_png(path, make_grid(strip, cols=len(strip)), replace=False)
        if self.grid is not None:
            self.grid.add(image)
        if self.compare is not None and self.compare.count < self.compare.capacity:
            self.compare.add(self.base_images[self.compare.count // 2])
            self.compare.add(image)

    def _workflow(self, jobs: list[Job], prefix: str) -> dict[str, Any] | None:
        """The ComfyUI workflow rendering `jobs` (noted for the run's file), or None where none can remake them."""
        from sdlora.generate import comfyui

        if self.comfyui is None:
            return None
        if self.comfyui_loras is None:
            self.comfyui_loras = comfyui.lora_files(self.loras)
        self.comfyui_jobs.extend(job for job in jobs if job not in self.comfyui_jobs)
        images = [(job.prompt, job.seed) for job in jobs]
        extra = {"photo": self.comfyui_photo, "refiner": self.comfyui_refiner, "references": self.comfyui_references}
        return comfyui.workflow(self.comfyui, self.config, self.comfyui_loras, images, prefix, **extra)

    def sheets(self) -> None:
        """The grid and, with --compare, the compare sheet (one row per seed: base model | LoRA); the run's ComfyUI
        workflow (comfyui.json: every image it wrote)."""
        if self.comfyui_jobs:
            workflow = self._workflow(list(self.comfyui_jobs), "sdlora")
            with self._new(self.path(layout.COMFYUI_JSON)) as path:
                fsutil.atomic_write_text(path, json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", replace=False)
        for sheet, name, what in ((self.grid, layout.GRID, "images"), (self.compare, layout.COMPARE, "pairs")):
            if sheet is None or sheet.canvas is None:
                continue
            with self._new(self.path(name)) as path:
                pngmeta.save_png(path, sheet.canvas, replace=False)
            shown, total = sheet.count, sheet.total
            if sheet is self.compare:
                shown, total = shown // 2, total // 2
            if shown < total:
                log.warning(
                    "%s shows the first %d of the %d %s (a sheet is at most %d px a side); all are in %s",
                    path.name, shown, total, what, MAX_SHEET_SIDE, self.out_dir,
                )  # fmt: skip

    @contextmanager
    def _new(self, path: Path) -> Iterator[Path]:
        try:
            yield path
        except FileExistsError:
            raise SdloraError(
                f"{path}: appeared while generate ran (another program wrote it); it was kept and generate stopped"
            ) from None


def _a1111_hash(path: Path) -> str:
    """A1111's hash of a LoRA file (SHA-256 of the bytes after the safetensors header), once per file and run."""
    info = Path(path).stat()
    return _cached_hash(str(path), info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    return lora_files.addnet_hash(Path(path))


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
        "references": [str(path) for path in g.reference],
        "sdlora_version": __version__,
        "parameters": pngmeta.infotext(job.prompt + lora_tags, g.negative, settings),
    }
