"""Every file and folder name that sdlora writes or reads in an OUT_DIR or dataset folder, defined once.

These names are an interface: UIs, scripts and `--resume` rely on them, so they never change.
"""

from __future__ import annotations

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

# The image files read as photos, datasets, references and generated images (prep reports every other file).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"})


def kohya_file(name: str) -> str:
    """The kohya-format LoRA file of a run called `name` (A1111, ComfyUI and civitai know it by this stem)."""
    return f"{name}.safetensors"


def embedding_file(name: str) -> str:
    """Pivotal tuning's embedding file of a run called `name` (A1111/ComfyUI load it as the embedding `NAME_emb`)."""
    return f"{name}_emb.safetensors"


def sample_grid(step: int) -> str:
    return f"step-{step:06d}.png"
