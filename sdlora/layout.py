"""Every file and folder name that sdlora writes or reads in an OUT_DIR or dataset folder, defined once.

These names are an interface: UIs, scripts and `--resume` rely on them, so they never change.
"""

from __future__ import annotations

import re

# Any command's output folder: the resolved settings it ran with.
CONFIG_JSON = "config.json"
MARKER = ".sdlora.json"  # which command made the folder: {"command", "run_id", "created", "version"}
LOCK = ".sdlora.lock"  # while a command writes the folder: {"pid", "command", "started"} (UIs read it)

# `sdlora prep` DATASET_DIR (also what `train` and `eval --reference` read).
MANIFEST = "manifest.jsonl"
REPORT = "report.json"
CONTACT_SHEET = "contact_sheet.jpg"
DATASET_IMAGES = "images"
DATASET_MASKS = "masks"  # soft face-and-hair masks, masks/NNNN.png beside images/NNNN.png (train.masked_loss)

# `sdlora train` OUT_DIR.
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"  # also what diffusers' own scripts write
CONFIG_TOML = "config.toml"  # what the resume command passes back
METRICS = "metrics.jsonl"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
CLASS_IMAGES = "class_images"
BEST = "best"
BEST_FILE = "best.json"  # inside best/: the step its files come from, its metrics and why it won
SUMMARY = "summary.json"
IDENTITY_PLOT = "identity.png"
# Inside a checkpoint folder.
TRAINER_STATE = "trainer_state.json"
LORA_STATE = "lora_state.safetensors"
CHECKPOINT_RECORD = "complete.json"  # written last: the checkpoint's files and sizes, and that its LoRA is finite

# `sdlora generate` --out: the sheets beside the images.
GRID = "grid.png"
COMPARE = "compare.png"
SHEETS = (GRID, COMPARE)
COMFYUI_JSON = "comfyui.json"  # the run's ComfyUI workflow (API format): every image it wrote
# --init-image / --keep-face: the photo as generate fitted it, and keep-face's mask (white: repainted), which the
# run's workflows load from ComfyUI's input folder.
COMFYUI_INPUT, COMFYUI_MASK = "comfyui-input.png", "comfyui-mask.png"
COMFYUI_REFERENCE = "comfyui-reference-{}.png"  # --reference: photo N (1-3) as the run's workflows load it
# Its images, numbered through the folder: NNNN-SEED.png, its settings NNNN-SEED.json, a filmstrip NNNN-SEED-steps.png.
GENERATED = re.compile(r"^(\d{4,})-\d+(-steps)?\.(png|json)$")
# A run into a folder that already holds images names its config and sheets after its first image: grid-0004.png.
RUN_FILE = re.compile(r"^(config|grid|compare|comfyui(?:-input|-mask|-reference-\d)?)(-(\d{4,}))?\.(json|png)$")

# The image files read as photos, datasets, references and generated images (prep reports every other file).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"})


def kohya_file(name: str) -> str:
    """The kohya-format LoRA file of a run called `name` (A1111, ComfyUI and civitai know it by this stem)."""
    return f"{name}.safetensors"


def embedding_file(name: str) -> str:
    """Pivotal tuning's embedding file of a run called `name` (A1111/ComfyUI load it as the embedding `NAME_emb`)."""
    return f"{name}_emb.safetensors"


def comfyui_workflow(name: str) -> str:
    """The ComfyUI workflow (API format) that renders a run's sample prompts with its LoRA file."""
    return f"{name}.comfyui.json"


def generated_stem(index: int, seed: int) -> str:
    """Image `index` of a generate folder, made with `seed`: '0004-46' (.png, .json, -steps.png)."""
    return f"{index:04d}-{seed}"


def run_file(name: str, first: int | None) -> str:
    """A generate run's config.json, grid.png, compare.png, comfyui.json or ComfyUI input images; `first` (the
    run's first image) for a run into a folder that held earlier ones: 'grid-0004.png'."""
    if first is None:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}-{first:04d}{dot}{suffix}"


def is_sheet(name: str) -> bool:
    """Whether a file of a generate folder is a sheet of its other images (grid.png, compare-0004.png, a filmstrip
    NNNN-SEED-steps.png) or a ComfyUI input (the fitted photo, the mask, a reference photo), not an image of its
    own."""
    run_file, image = RUN_FILE.match(name), GENERATED.match(name)
    return bool(run_file and run_file.group(1) not in ("config", "comfyui")) or bool(image and image.group(2))


def sample_grid(step: int) -> str:
    return f"step-{step:06d}.png"
