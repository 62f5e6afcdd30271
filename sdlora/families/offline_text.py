"""Tokenizers and tiny text-encoder configs built offline, shared by the families' tiny pipelines, the demo and
the tests (family-neutral: it imports no family, so all of them import it without cycles).

The CLIP tokenizer is the real CLIP BPE (49,408 tokens), built from the vocabulary file that the `open-clip-torch`
package ships (install it with `pip install --no-deps open-clip-torch`: its dependencies pull torchvision and a
CUDA torch, and we never import it). The T5 tokenizer is a small Unigram vocabulary with T5's special ids
(<pad> 0, </s> 1, <unk> 2), built without any file. The Qwen tokenizer is byte-level with no merges (one token
per byte) and Qwen's chat template.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdlora.errors import SdloraError

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def clip_bpe_path() -> Path:
    """Path of CLIP's BPE vocabulary shipped inside the open-clip-torch package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SdloraError(
            "the tiny built-in model needs CLIP's vocabulary from open-clip-torch: "
            "run `pip install --no-deps open-clip-torch==3.3.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise SdloraError(f"{path}: CLIP vocabulary missing; reinstall with `pip install --no-deps open-clip-torch`")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt of the real CLIP tokenizer into `folder`."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the 48,894 merges CLIP uses
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (49,408 tokens, max length 77), built offline in `folder`."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_clip_vocab(folder)
    # transformers 5 takes the file paths as `vocab`/`merges`; without model_max_length=77 diffusers'
    # pipelines fail with "int too big to convert".
    return CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), pad_token=pad_token, model_max_length=77)


def clip_text_config(hidden_act: str = "quick_gelu", projection_dim: int = 32):
    """A tiny CLIP text encoder's config (width 32, 5 layers) over the real CLIP vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
    )


# T5's special pieces first (ids 0, 1, 2 as in the real tokenizer), then words of the tests' prompts, then single
# characters so that any lowercase prompt tokenizes without <unk>.
_T5_WORDS = [
    "a",
    "photo",
    "of",
    "sks",
    "person",
    "man",
    "woman",
    "cat",
    "dog",
    "portrait",
    "oil",
    "painting",
    "in",
    "the",
    "an",
    "at",
    "by",
    "with",
]
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-{}"


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 (Unigram) tokenizer with T5's special ids, made in memory: no file, no sentencepiece."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{word}", -2.0) for word in _T5_WORDS] + [(char, -5.0) for char in _T5_CHARS]
    vocab += [(f"▁{char}", -4.0) for char in _T5_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


# Qwen3's chat template, reduced to what text-to-image pipelines use (user turns, the generation prompt, and the
# empty thinking block that enable_thinking=False adds); it renders those exactly as the real template does.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def qwen_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer (Qwen2/2.5/3 text encoders) made in memory: the 256 byte symbols and
    `<|endoftext|>` (pad) with no merges, so every byte is one token, Qwen's chat special tokens and
    `<think>`/`</think>`, and the chat template. Real ids differ; the shapes and the template are the real ones."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=QWEN_CHAT_TEMPLATE, model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": _QWEN_SPECIAL})
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer
