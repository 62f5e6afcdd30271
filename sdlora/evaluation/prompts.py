"""The evaluation prompt set, prompt files, and the trigger phrase stored in a LoRA file."""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import UsageError

LORA_FILE = "pytorch_lora_weights.safetensors"
TRIGGER_KEYS = ("sdlora.trigger_phrase", "modelspec.trigger_phrase")

# Portraits, full-body shots, scenes and styles test whether the face survives away from the training
# framing; the group prompts are where bleed shows (other people taking the subject's face).
STANDARD_PROMPTS = (
    "a close-up portrait photo of {trigger}, natural light",
    "a photo of {trigger} laughing, looking away from the camera",
    "a full-body photo of {trigger} standing in a park",
    "a full-body photo of {trigger} walking on a beach at sunset",
    "{trigger} in a cafe, reading a book, candid photo",
    "{trigger} as an astronaut on the moon, cinematic lighting",
    "an oil painting of {trigger}, impressionist style",
    "a pencil sketch of {trigger}",
    "{trigger} with two friends at a party",
    "a group photo of {trigger} and three colleagues in an office",
)
# What CLIP reads in place of the trigger: the rare token means nothing to it.
CLIP_SUBJECT = "a person"


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts in it (one per line, {{trigger}} for the person)")
    return prompts


def lora_file(path: Path) -> Path:
    """The LoRA weights file: `path` itself, or the diffusers-format file inside a train OUT_DIR."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise UsageError(f"--lora {path}: no such file (give a .safetensors LoRA or a train output folder)")
    return path


def trigger_phrase(path: Path) -> str | None:
    """The trigger phrase in a LoRA file's safetensors metadata (ours or kohya's modelspec), if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return next((metadata[key] for key in TRIGGER_KEYS if metadata.get(key)), None)


def expand(templates: list[str], n: int, seed: int, trigger: str) -> tuple[list[str], list[str], list[int]]:
    """(templates, prompts, seeds) with each template repeated n times; image i uses seed + i."""
    repeated = [t for t in templates for _ in range(n)]
    prompts = [t.replace("{trigger}", trigger) for t in repeated]
    return repeated, prompts, [seed + i for i in range(len(repeated))]


def clip_text(template: str) -> str:
    return template.replace("{trigger}", CLIP_SUBJECT)
