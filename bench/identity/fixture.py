"""Export the identity benchmark's base as the one small file that `sdlora demo` and the tests restore.

The base is built on a GPU (`python -m bench.identity.base`), which CI does not have, and no CPU-sized base was
strong enough for a LoRA to show anything (docs/identity-benchmark.md). So its weights travel in the package, as
`sdlora/demo/identity-base.safetensors` (about 4 MB; what the file holds and how it is restored:
`sdlora/demo/base.py`):

    python -m bench.identity.fixture BASE_DIR sdlora/demo/identity-base.safetensors    (export)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora.demo.base import CLASS_PROMPT, CONFIGS, EMBEDDING, FILES, restore
from sdlora.faces import toyworld as world

__all__ = ["export", "restore", "trained_token_ids"]


def trained_token_ids(tokenizer) -> list[int]:
    """Every token of every caption the base trained on (the class prompt and its attribute phrases), the empty
    caption's, and the special tokens."""
    texts = {CLASS_PROMPT, ""}
    for identity in world.all_identities():
        texts.update(identity.caption_words())
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for text in texts:
        ids.update(tokenizer(text).input_ids)
    return sorted(ids)


def export(base_dir: Path, file: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    tensors = {}
    for part, name in FILES.items():
        for key, value in load_file(str(base_dir / name)).items():
            tensors[f"{part}.{key}"] = value
    ids = trained_token_ids(CLIPTokenizer.from_pretrained(base_dir / "tokenizer"))
    table = tensors.pop(EMBEDDING)
    untrained = torch.ones(len(table), dtype=torch.bool)
    untrained[ids] = False
    tensors[EMBEDDING + ".rows"] = table[ids]
    tensors[EMBEDDING + ".ids"] = torch.tensor(ids, dtype=torch.int64)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {key: (base_dir / path).read_text() for key, path in CONFIGS.items()}
    metadata["untrained_row_std"] = repr(float(table[untrained].std()))
    metadata["vocab_size"] = str(len(table))
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the identity benchmark's base as the packaged demo base.")
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    export(args.base_dir, args.file)
    print(f"{args.file}: {args.file.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
