"""The identity benchmark's base as one small file, so that CI can run the smoke test on a base that draws faces.

The base is built on a GPU (`python -m bench.identity.base`), which CI does not have, and no CPU-sized base was
strong enough for a LoRA to show anything (docs/identity-benchmark.md). So its weights travel in the repo, in
`tests/data/identity-base.safetensors` (about 4 MB):

- UNet, VAE and text encoder in fp16 (restored to fp32);
- of the text encoder's 49,408 token embeddings only the rows the base was trained on (the tokens of every
  caption it saw, plus the special tokens). The others never received a gradient: they are random vectors of the
  same scale in the base, and are drawn afresh (seeded) on restore, as any unseen word such as "sks" is;
- the folder's configs and `identity_base.json` as the file's metadata; the tokenizer is rebuilt offline.

    python -m bench.identity.fixture BASE_DIR tests/data/identity-base.safetensors    (export)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.identity import base, world

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


def trained_token_ids(tokenizer) -> list[int]:
    """Every token of every caption the base trained on (the class prompt and its attribute phrases), the empty
    caption's, and the special tokens."""
    texts = {base.CLASS_PROMPT, ""}
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


def restore(file: Path, folder: Path) -> Path:
    """Write the base stored in `file` as a diffusers folder (fp32) at `folder`; returns `folder`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sdlora.testing import clip_tokenizer

    with safe_open(str(file), "pt") as handle:  # one read: tensors and metadata
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    rows, ids = tensors.pop(EMBEDDING + ".rows"), tensors.pop(EMBEDDING + ".ids")
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(int(metadata["vocab_size"]), rows.shape[1], generator=generator)
    table *= float(metadata["untrained_row_std"])
    table[ids] = rows
    tensors[EMBEDDING] = table
    for key, path in CONFIGS.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(metadata[key])
    for part, name in FILES.items():
        prefix = part + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        save_file(state, str(folder / name), metadata={"format": "pt"})
    clip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the identity benchmark's base as the tests' fixture.")
    parser.add_argument("base_dir", type=Path)
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    export(args.base_dir, args.file)
    print(f"{args.file}: {args.file.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
