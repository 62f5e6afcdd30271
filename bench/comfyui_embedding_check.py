"""Load pivotal tuning's NAME_emb.safetensors with ComfyUI's own embedding loader (SD 1.x and SDXL) and check that
the vectors it puts into the prompt equal ours.

ComfyUI is never a dependency of sdlora: check it out outside the repo and run this with a Python that has our
stack (ComfyUI's embedding code needs nothing more):

    PYTHONPATH=$PWD:/tmp/comfyui python bench/comfyui_embedding_check.py --family sd1 sdxl

For each family the real CLIP widths (CLIP-L 768; SDXL also OpenCLIP bigG 1280) with one transformer layer (only
the token table matters) and the real CLIP vocabulary are built; `sdlora.lora.embeddings.install` adds the
trigger tokens, their rows train a few AdamW steps through the encoder (so they are no copy of the class word's),
and `sdlora.train.methods.pivotal.save` writes NAME_emb.safetensors as training does. ComfyUI then reads it twice:
`comfy.sd1_clip.load_embed` with the family's embedding key, and its tokenizer (SD1Tokenizer / SDXLTokenizer)
on the prompt "a photo of embedding:NAME_emb person", which splices the vectors into the token list. Every vector
must equal ours bit for bit, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "astro"
WIDTHS = {"clip_l": 768, "clip_g": 1280}


def build(family_name: str, folder: Path):
    """A pipeline-like object with the family's tokenizers and one-layer CLIP encoders at the real widths."""
    from types import SimpleNamespace

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora import families
    from sdlora.families.offline_text import clip_tokenizer

    family = families.get(family_name)
    parts = {}
    torch.manual_seed(0)
    for name, key in family.embedding_keys:
        width = WIDTHS[key]
        config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=1,
            num_attention_heads=width // 64,
            max_position_embeddings=77,
            eos_token_id=2,  # as OpenAI's CLIP-L and SDXL's bigG configs say
            projection_dim=width,
        )
        cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        parts[name] = cls(config).requires_grad_(False)
        pad = "!" if name == "text_encoder_2" else "<|endoftext|>"  # SDXL's second tokenizer pads with "!"
        parts[name.replace("text_encoder", "tokenizer")] = clip_tokenizer(folder / name, pad_token=pad)
    return SimpleNamespace(**parts), family


def trained_embeddings(pipe, family, folder: Path):
    """Install the tokens, train their rows a little, write NAME_emb.safetensors as training does."""
    from sdlora.lora import embeddings
    from sdlora.train.methods.pivotal import Pivotal, save

    tokens = embeddings.token_names(2)
    vectors = embeddings.class_vectors(pipe, family, "person", len(tokens))
    installed = embeddings.install(pipe, family, embeddings.Embeddings(vectors, "sks", tokens))
    params = [rows.rows.requires_grad_(True) for rows in installed.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        loss = 0.0
        for _name, _key, tokenizer, encoder in embeddings.encoder_keys(pipe, family):
            ids = tokenizer(["a photo of sks person"], padding="max_length", max_length=77, return_tensors="pt")
            loss = loss + encoder(ids.input_ids).last_hidden_state.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pivotal = Pivotal(installed=installed, family=family, word="sks", tokens=tokens, until=3)
    save(pivotal, folder, NAME, {"sdlora.family": family.name})
    return {dict(family.embedding_keys)[n]: rows.rows.detach().clone() for n, rows in installed.items()}


def comfy_vectors(family_name: str, folder: Path) -> dict[str, list[torch.Tensor]]:
    """The vectors ComfyUI's tokenizer splices into "a photo of embedding:NAME_emb person", per CLIP."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    tokenizer_cls = comfy.sdxl_clip.SDXLTokenizer if family_name == "sdxl" else comfy.sd1_clip.SD1Tokenizer
    tokenizer = tokenizer_cls(embedding_directory=str(folder))
    tokens = tokenizer.tokenize_with_weights(f"a photo of embedding:{NAME}_emb person")
    found: dict[str, list[torch.Tensor]] = {}
    for clip, batches in tokens.items():  # {"l": [[(token, weight), ...]], "g": ...}
        key = {"l": "clip_l", "g": "clip_g"}[clip]
        found[key] = [t for batch in batches for t, *_ in batch if isinstance(t, torch.Tensor)]
    return found


def check(family_name: str, root: Path) -> dict:
    import comfy.sd1_clip

    from sdlora import layout

    folder = root / family_name
    folder.mkdir()
    pipe, family = build(family_name, folder)
    ours = trained_embeddings(pipe, family, folder)
    result = {"family": family_name, "file": layout.embedding_file(NAME), "clips": {}}
    spliced = comfy_vectors(family_name, folder)
    for key, vectors in ours.items():
        loaded = comfy.sd1_clip.load_embed(f"{NAME}_emb", str(folder), WIDTHS[key], key)
        in_prompt = spliced.get(key, [])
        result["clips"][key] = {
            "shape": list(vectors.shape),
            "load_embed_equal": loaded is not None and torch.equal(loaded.float(), vectors),
            "vectors_in_prompt": len(in_prompt),
            "prompt_vectors_equal": len(in_prompt) == len(vectors)
            and all(torch.equal(a.float(), b) for a, b in zip(in_prompt, vectors, strict=True)),
            "row0_minus_row1_max": float((vectors[0] - vectors[1]).abs().max()),
        }
    result["ok"] = all(c["load_embed_equal"] and c["prompt_vectors_equal"] for c in result["clips"].values())
    return result


def main() -> None:
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # before comfy.model_management is imported: no CUDA here
    from comfyui_check import import_comfy

    import_comfy()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", choices=["sd1", "sdxl"], default=["sd1", "sdxl"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(family, Path(tmp)) for family in options.family]
    print(json.dumps(results, indent=2))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not all(r["ok"] for r in results):
        raise SystemExit("ComfyUI read other vectors than ours")


if __name__ == "__main__":
    main()
