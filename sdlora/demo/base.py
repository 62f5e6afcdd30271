"""The toy world's base model, shipped in the package as one small file: what `sdlora demo` trains on.

The identity benchmark (`bench/identity/base.py`) trained it from scratch on renders of every identity of the
toy world except the held-out SUBJECTS (10,000 UNet steps planned; the packaged one was cut at 5,652 on a 2-core
CPU, where it draws a valid person in about half of its samples: docs/identity-benchmark.md). Its weights travel
as `sdlora/demo/identity-base.safetensors` (about 4 MB):

- UNet, VAE and text encoder in fp16 (restored to fp32);
- of the text encoder's 49,408 token embeddings only the rows the base was trained on (the tokens of every
  caption it saw, plus the special tokens). The others never received a gradient: they are random vectors of the
  same scale in the base, and are drawn afresh (seeded) on restore, as any unseen word such as "sks" is;
- the folder's configs and `identity_base.json` as the file's metadata; the tokenizer is rebuilt offline.

The benchmark's base on a flow-matching transformer (a tiny Z-Image: `bench/identity/dit.py`) travels the same way
as `sdlora/demo/identity-dit.safetensors` (transformer, the same kind of VAE, a small Qwen3 text encoder behind the
offline byte-level Qwen tokenizer): the record's `spec.kind` says which LAYOUT a file holds.

`restore` writes either back as a diffusers folder; `bench/identity/fixture.py` exports a new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdlora.faces import toyworld as world

PACKAGED = Path(__file__).with_name("identity-base.safetensors")
PACKAGED_DIT = Path(__file__).with_name("identity-dit.safetensors")  # the flow-matching (Z-Image) base
CLASS_PROMPT = "a photo of a person"
# The held-out subjects: never shown to the base (the packaged one holds out all three; the first published base,
# LEGACY in bench/identity/base.py, the first two: its record says so). None wears glasses, so "with glasses" tests
# fidelity; between them every skin tone but one, every hair colour but one, each hair style, eye colour and three
# of the four backgrounds.
SUBJECTS = (
    world.Identity("tan", "red", "long", "green", False, "mint"),
    world.Identity("dark", "blonde", "tall", "blue", False, "lilac"),
    world.Identity("pale", "black", "short", "brown", False, "sky"),
)
EMBEDDING = "text_encoder.embeddings.token_embedding.weight"
CONFIGS = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "record": "identity_base.json",
}
FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def _clip(folder: Path) -> None:
    from sdlora.families.offline_text import clip_tokenizer

    clip_tokenizer(folder).save_pretrained(folder)


def _qwen(folder: Path) -> None:
    from sdlora.families.offline_text import qwen_tokenizer

    qwen_tokenizer().save_pretrained(folder)


@dataclass(frozen=True)
class Layout:
    """One kind of packaged base: its folder's configs (kept as the file's metadata) and weight files by part, the
    text encoder's token table (only its trained rows travel) and how its offline tokenizer is rebuilt."""

    configs: dict[str, str]
    files: dict[str, str]
    embedding: str
    tokenizer: Callable[[Path], None]  # writes the tokenizer into the given folder
    packaged: Path  # where sdlora ships the benchmark's base of this kind
    chat: bool = False  # the text encoder reads prompts in the chat template (Z-Image): its tokens are trained too


DIT = Layout(
    configs={
        "model_index": "model_index.json",
        "transformer": "transformer/config.json",
        "vae": "vae/config.json",
        "text_encoder": "text_encoder/config.json",
        "scheduler": "scheduler/scheduler_config.json",
        "record": "identity_base.json",
    },
    files={
        "transformer": "transformer/diffusion_pytorch_model.safetensors",
        "vae": "vae/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
    },
    embedding="text_encoder.embed_tokens.weight",  # Qwen3Model's (264 byte-level tokens: ~25 KB saved, not MBs)
    tokenizer=_qwen,
    packaged=PACKAGED_DIT,
    chat=True,
)
# By the record's spec.kind (bench/identity: BaseSpec has none, the DiT builder's DitSpec "zimage").
LAYOUTS = {"unet": Layout(CONFIGS, FILES, EMBEDDING, _clip, PACKAGED), "zimage": DIT}


def layout_of(record: str) -> Layout:
    """The layout of a base from its identity_base.json text."""
    return LAYOUTS[json.loads(record)["spec"].get("kind", "unet")]


def restore(file: Path, folder: Path) -> Path:
    """Write the base stored in `file` (either layout) as a diffusers folder (fp32) at `folder`; returns `folder`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as handle:  # one read: tensors and metadata
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    layout = layout_of(metadata["record"])
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    rows, ids = tensors.pop(layout.embedding + ".rows"), tensors.pop(layout.embedding + ".ids")
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(int(metadata["vocab_size"]), rows.shape[1], generator=generator)
    table *= float(metadata["untrained_row_std"])
    table[ids] = rows
    tensors[layout.embedding] = table
    for key, path in layout.configs.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(metadata[key])
    for part, name in layout.files.items():
        prefix = part + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        save_file(state, str(folder / name), metadata={"format": "pt"})
    layout.tokenizer(folder / "tokenizer")
    return folder


def restore_packaged(folder: Path) -> Path:
    """The packaged base as a diffusers folder at `folder`."""
    return restore(PACKAGED, Path(folder))
