"""Load pivotal tuning's NAME_emb.safetensors with Forge's own embedding code (SD 1.x and SDXL) and check that the
vectors it splices into the prompt equal ours.

Forge (lllyasviel/stable-diffusion-webui-forge) is never a dependency of sdlora: export its text-processing code
outside the repo and point --forge at the export (our stack has everything it imports):

    git -C /work/.mirror/lllyasviel+stable-diffusion-webui-forge/repo archive HEAD backend/text_processing \
        | tar -x -C /tmp/forge
    PYTHONPATH=$PWD python bench/forge_embedding_check.py --forge /tmp/forge --family sd1 sdxl

The embeddings are made as in bench/comfyui_embedding_check.py (real CLIP widths, one layer, the real vocabulary,
a few AdamW steps on the trigger rows, `pivotal.save`). Forge then reads the folder as its webui does:
`backend.text_processing.textual_inversion.EmbeddingDatabase` with the tokenizer and the expected width Forge's
engines give it (backend/diffusion_engine/sd15.py: 768; sdxl.py: 2048 = CLIP-L + bigG), which loads the file
(`create_embedding_from_data`) and finds the name in a tokenized prompt (`find_embedding_at_position`); its
`classic_engine.CLIPEmbeddingForTextualInversion` (the token-embedding wrapper Forge installs in each CLIP, with
the family's `embedding_key`) splices the vectors into the prompt's token embeddings. `modules.shared` and
`backend.memory_management`, which classic_engine imports for its prompt weighting and devices, are stand-ins.
Every spliced vector must equal ours bit for bit, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "astro"
EXPECTED_SHAPE = {"sd1": 768, "sdxl": 2048}  # Forge's sd15.py / sdxl.py embedding_expected_shape


def import_forge(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Forge's textual_inversion and classic_engine modules from an export at `root`."""
    sys.path.insert(0, str(root))
    modules = types.ModuleType("modules")
    modules.shared = types.SimpleNamespace(opts=types.SimpleNamespace())
    sys.modules.setdefault("modules", modules)
    sys.modules.setdefault("modules.shared", modules.shared)
    sys.modules.setdefault("backend.memory_management", types.ModuleType("backend.memory_management"))
    from backend.text_processing import classic_engine, textual_inversion

    return textual_inversion, classic_engine


def forge_vectors(forge, family_name: str, folder: Path, key: str, encoder, tokenizer) -> tuple[torch.Tensor, int]:
    """The rows Forge puts at the embedding's place in "a photo of NAME_emb person" for CLIP `key`, and how many
    vectors it says the embedding has."""
    textual_inversion, classic_engine = forge
    database = textual_inversion.EmbeddingDatabase(tokenizer, EXPECTED_SHAPE[family_name])
    database.add_embedding_dir(str(folder))
    database.load_textual_inversion_embeddings()
    if f"{NAME}_emb" not in database.word_embeddings:
        raise SystemExit(f"Forge did not load {NAME}_emb (skipped: {sorted(database.skipped_embeddings)})")
    words = tokenizer(f"a photo of {NAME}_emb person", add_special_tokens=False)["input_ids"]
    offset = next(i for i in range(len(words)) if database.find_embedding_at_position(words, i)[0] is not None)
    embedding, length = database.find_embedding_at_position(words, offset)
    # As classic_engine.tokenize_line: the name's tokens become `vectors` placeholder tokens, fixed at `offset`.
    tokens = words[:offset] + [0] * embedding.vectors + words[offset + length :]
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    ids += [tokenizer.eos_token_id] * (77 - len(ids))
    database.fixes = [[classic_engine.PromptChunkFix(offset, embedding)]]
    wrapper = classic_engine.CLIPEmbeddingForTextualInversion(
        encoder.get_input_embeddings(), database, textual_inversion_key=key
    )
    with torch.no_grad():
        out = wrapper(torch.tensor([ids]))
    return out[0, 1 + offset : 1 + offset + embedding.vectors], embedding.vectors


def check(forge, family_name: str, root: Path) -> dict:
    from comfyui_embedding_check import build, trained_embeddings

    from sdlora import layout
    from sdlora.families.offline_text import clip_tokenizer

    folder = root / family_name
    folder.mkdir()
    pipe, family = build(family_name, folder)
    ours = trained_embeddings(pipe, family, folder)
    tokenizer = clip_tokenizer(root / f"{family_name}-tokenizer")  # the CLIP vocabulary Forge ships, no trigger
    result = {"family": family_name, "file": layout.embedding_file(NAME), "clips": {}}
    for name, key in family.embedding_keys:
        vectors = ours[key]
        spliced, count = forge_vectors(forge, family_name, folder, key, getattr(pipe, name), tokenizer)
        result["clips"][key] = {
            "shape": list(vectors.shape),
            "forge_vectors": count,
            "spliced_equal": spliced.shape == vectors.shape and torch.equal(spliced.float(), vectors),
        }
    result["ok"] = all(c["spliced_equal"] for c in result["clips"].values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forge", type=Path, required=True, help="an export of Forge holding backend/text_processing")
    parser.add_argument("--family", nargs="+", choices=["sd1", "sdxl"], default=["sd1", "sdxl"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args()
    forge = import_forge(options.forge)
    with tempfile.TemporaryDirectory() as tmp:
        results = [check(forge, family, Path(tmp)) for family in options.family]
    print(json.dumps(results, indent=2))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not all(r["ok"] for r in results):
        raise SystemExit("Forge read other vectors than ours")


if __name__ == "__main__":
    main()
