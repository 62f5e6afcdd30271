"""Export the identity benchmark's base as the one small file that `sdlora demo` and the tests restore.

The base is built on a GPU (`python -m bench.identity.base`), which CI does not have, and no CPU-sized base was
strong enough for a LoRA to show anything (docs/identity-benchmark.md). So its weights travel in the package, as
`sdlora/demo/identity-base.safetensors` (about 4 MB; what the file holds and how it is restored:
`sdlora/demo/base.py`). The flow-matching base (`python -m bench.identity.dit`, a tiny Z-Image) travels the same
way, as `sdlora/demo/identity-dit.safetensors`; the folder's record says which it is:

    python -m bench.identity.fixture BASE_DIR [FILE]    (export; FILE defaults to the packaged file of its kind)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora.demo.base import CLASS_PROMPT, Layout, layout_of, restore
from sdlora.faces import toyworld as world
from sdlora.fsutil import atomic_path

__all__ = ["export", "restore", "trained_token_ids"]


def trained_token_ids(tokenizer, chat: bool = False) -> list[int]:
    """Every token of every caption the base trained on (the class prompt and its attribute phrases), the empty
    caption's, and the special tokens; with `chat`, of each caption as the chat template wraps it (Z-Image)."""
    texts = {CLASS_PROMPT, ""}
    for identity in world.all_identities():
        texts.update(identity.caption_words())
    if chat:
        message = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        template = {"tokenize": False, "add_generation_prompt": True, "enable_thinking": True}
        texts = {tokenizer.apply_chat_template(message(text), **template) for text in texts}
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for text in texts:
        ids.update(tokenizer(text).input_ids)
    return sorted(ids)


def export(base_dir: Path, file: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    layout: Layout = layout_of((base_dir / "identity_base.json").read_text())
    tensors = {}
    for part, name in layout.files.items():
        for key, value in load_file(str(base_dir / name)).items():
            tensors[f"{part}.{key}"] = value
    ids = trained_token_ids(AutoTokenizer.from_pretrained(base_dir / "tokenizer"), layout.chat)
    table = tensors.pop(layout.embedding)
    untrained = torch.ones(len(table), dtype=torch.bool)
    untrained[ids] = False
    tensors[layout.embedding + ".rows"] = table[ids]
    tensors[layout.embedding + ".ids"] = torch.tensor(ids, dtype=torch.int64)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {key: (base_dir / path).read_text() for key, path in layout.configs.items()}
    metadata["untrained_row_std"] = repr(float(table[untrained].std()))
    metadata["vocab_size"] = str(len(table))
    with atomic_path(file) as tmp:  # never a half-written fixture; a readable mode, not safetensors' 0600
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the identity benchmark's base as the packaged demo base.")
    parser.add_argument("base_dir", type=Path, help="a base folder (bench.identity.base or bench.identity.dit)")
    parser.add_argument("file", type=Path, nargs="?", help="default: sdlora/demo/identity-{base,dit}.safetensors")
    args = parser.parse_args(argv)
    file = args.file or layout_of((args.base_dir / "identity_base.json").read_text()).packaged
    export(args.base_dir, file)
    print(f"{file}: {file.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
