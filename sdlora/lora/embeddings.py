"""Pivotal-tuning embeddings: new trigger tokens in a pipeline's CLIP tokenizers and text encoders, the prompt
rewrite that uses them, and their files (`NAME_emb.safetensors`, and the copy inside the diffusers LoRA file).

How a prompt reaches the new tokens: the trigger word (prep.token, e.g. "sks") is rewritten to the new tokens
("<s0><s1>") inside each tokenizer call of an installed tokenizer, so every path that tokenizes (training, its
text cache, sample grids, identity scoring, `generate`, `eval`, diffusers' own pipelines) sees the same ids
without any caller changing its prompts. In A1111/ComfyUI the user writes the embedding's name instead
(`NAME_emb` / `embedding:NAME_emb`). The vectors live in a separate small parameter beside the frozen vocabulary
(`ExtraRows`): no other row of the embedding table is ever a trainable parameter, so every one stays byte-identical.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdlora import layout
from sdlora.errors import SdloraError

if TYPE_CHECKING:
    from sdlora.families import Family

# Keys inside the diffusers LoRA file: they contain "lora" and none of diffusers' model prefixes, so diffusers'
# own load_lora_weights ignores them (kohya's `bundle_emb.` name would make it refuse the whole file).
DIFFUSERS_PREFIX = "pivotal_lora_emb."
WORD_KEY, TOKENS_KEY = "sdlora.pivotal_word", "sdlora.pivotal_tokens"  # safetensors metadata of both files
# In a pivotal-tuned kohya file's metadata: the embedding file it needs beside it (NAME_emb.safetensors), without
# which it would render without its trained tokens.
NEEDS_KEY = "sdlora.embedding_file"
# What token_names writes; a token read from a file must look so (a backslash would break the prompt rewrite).
_TOKEN = re.compile(r"<s\d+>")


@dataclass(frozen=True)
class Embeddings:
    """The trained vectors of one run: {file key ("clip_l", "clip_g"): (n, D) fp32}, the trigger word they replace
    and the new tokens' names."""

    vectors: dict[str, Any]
    word: str
    tokens: tuple[str, ...]

    def metadata(self) -> dict[str, str]:
        return {WORD_KEY: self.word, TOKENS_KEY: ",".join(self.tokens)}


def token_names(count: int) -> tuple[str, ...]:
    """The new tokens' names, as diffusers' advanced DreamBooth script names them: <s0>, <s1>, ..."""
    return tuple(f"<s{i}>" for i in range(count))


class ExtraRows(torch.nn.Module):
    """A text encoder's token embedding with extra rows: ids below the frozen table's size look up `base`, ids
    from it on look up `rows` (n, D), a parameter of their own (fp32, cast to the table's dtype on use)."""

    def __init__(self, base: Any, rows: Any) -> None:
        super().__init__()
        self.base = base
        self.rows = torch.nn.Parameter(rows.detach().clone().float(), requires_grad=False)

    @property
    def weight(self) -> Any:
        """The whole table (base rows, then the new ones), for reading: what a resized nn.Embedding would hold."""
        return torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)])

    def forward(self, ids: Any) -> Any:
        size = self.base.num_embeddings
        found = self.base(ids.clamp(max=size - 1))
        extra = self.rows.to(found.dtype)[(ids - size).clamp(min=0)]
        return torch.where((ids >= size).unsqueeze(-1), extra, found)


class _Rewriting:
    """Put in front of a tokenizer's own class: every call (and `tokenize`) first rewrites the trigger word."""

    sdlora_rewrite: tuple[re.Pattern[str], str] | None = None  # (whole-word pattern, replacement)
    sdlora_enabled: bool = True  # off: the trigger word is an ordinary word again (generate --compare's base)

    def _rewritten(self, text: Any) -> Any:
        rule = self.sdlora_rewrite
        if rule is None or not self.sdlora_enabled or text is None:
            return text
        if isinstance(text, str):
            return rule[0].sub(lambda _: rule[1], text)  # the tokens as they are, never a replacement template
        return [self._rewritten(t) for t in text]

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(self._rewritten(text), *args, **kwargs)  # type: ignore[misc]

    def tokenize(self, text: str, *args: Any, **kwargs: Any) -> Any:
        return super().tokenize(self._rewritten(text), *args, **kwargs)  # type: ignore[misc]


@functools.cache
def _rewriting_class(cls: type) -> type:
    return type(cls.__name__, (_Rewriting, cls), {"__module__": cls.__module__})


def rewrite_rule(word: str, tokens: tuple[str, ...]) -> tuple[re.Pattern[str], str]:
    """The trigger word as a whole word (not inside "asks"), case-insensitive as CLIP's lower-casing tokenizer."""
    return re.compile(rf"(?<![\w<]){re.escape(word)}(?![\w>])", re.IGNORECASE), "".join(tokens)


def encoder_keys(pipe: Any, family: Family) -> list[tuple[str, str, Any, Any]]:
    """(pipeline attribute, file key, tokenizer, encoder) of each text encoder that gets the new tokens."""
    return [
        (name, key, getattr(pipe, name.replace("text_encoder", "tokenizer")), getattr(pipe, name))
        for name, key in family.embedding_keys
    ]


def class_vectors(pipe: Any, family: Family, class_word: str, count: int) -> dict[str, Any]:
    """Each new token's starting vector: the class word's embedding (the mean of its tokens' rows), per encoder."""
    vectors = {}
    for _, key, tokenizer, encoder in encoder_keys(pipe, family):
        ids = tokenizer(class_word, add_special_tokens=False).input_ids or [tokenizer.unk_token_id]
        table = encoder.get_input_embeddings().weight
        vectors[key] = table[torch.tensor(ids, device=table.device)].float().mean(0).expand(count, -1).clone()
    return vectors


def install(pipe: Any, family: Family, embeddings: Embeddings) -> dict[str, ExtraRows]:
    """Add the new tokens to the family's CLIP tokenizers and their vectors to the text encoders, and switch the
    prompt rewrite on; returns the ExtraRows module of each encoder by pipeline attribute."""
    installed = {}
    rule = rewrite_rule(embeddings.word, embeddings.tokens)
    for name, key, tokenizer, encoder in encoder_keys(pipe, family):
        if key not in embeddings.vectors:
            raise SdloraError(f"pivotal embeddings: no {key!r} vectors for {name} ({family.label} needs them)")
        table = encoder.get_input_embeddings()
        if isinstance(table, ExtraRows):
            raise SdloraError(f"{name}: already holds pivotal embeddings; load one run's embeddings at a time")
        vectors = embeddings.vectors[key].to(table.weight.device)
        if vectors.shape != (len(embeddings.tokens), table.weight.shape[1]):
            raise SdloraError(
                f"pivotal embeddings: {key} is {tuple(vectors.shape)}, but {name} takes "
                f"({len(embeddings.tokens)}, {table.weight.shape[1]}); use the embeddings made for this base"
            )
        known = set(tokenizer.get_vocab())
        if known & set(embeddings.tokens) or len(tokenizer) != table.num_embeddings:
            raise SdloraError(
                f"{name}: its tokenizer already has added tokens ({len(tokenizer)} tokens, {table.num_embeddings} "
                "embedding rows); pivotal tuning needs a base with the plain CLIP vocabulary"
            )
        tokenizer.add_tokens(list(embeddings.tokens))
        ids = tokenizer.convert_tokens_to_ids(list(embeddings.tokens))
        assert ids == list(range(table.num_embeddings, table.num_embeddings + len(ids))), ids
        rows = ExtraRows(table, vectors)
        encoder.set_input_embeddings(rows)
        _pool_at_first_eos(encoder, tokenizer)
        tokenizer.__class__ = _rewriting_class(type(tokenizer))
        tokenizer.sdlora_rewrite = rule
        installed[name] = rows
    return installed


def _pool_at_first_eos(encoder: Any, tokenizer: Any) -> None:
    """CLIP configs with the legacy eos_token_id 2 (OpenAI's CLIP-L, SDXL's bigG) pool at the highest token id,
    which is a new token once there are any; pool at the first real end-of-text token instead (the same position
    for every prompt without new tokens)."""
    transformer = getattr(encoder, "text_model", encoder)  # transformers 4 nests it; 5 does not
    if getattr(transformer, "eos_token_id", None) == 2 and tokenizer.eos_token_id not in (None, 2):
        transformer.eos_token_id = tokenizer.eos_token_id


def set_enabled(pipe: Any, family: Family, on: bool) -> None:
    """Switch the prompt rewrite of installed tokenizers on or off (off: the trigger word is an ordinary word, as
    for the plain base); nothing happens for tokenizers without new tokens."""
    for _, _, tokenizer, _ in encoder_keys(pipe, family):
        if isinstance(tokenizer, _Rewriting):
            tokenizer.sdlora_enabled = on


def current(installed: dict[str, ExtraRows], family: Family, word: str, tokens: tuple[str, ...]) -> Embeddings:
    """The vectors now in the installed modules, detached fp32 copies on the CPU."""
    keys = dict(family.embedding_keys)
    vectors = {keys[name]: rows.rows.detach().float().cpu().clone() for name, rows in installed.items()}
    return Embeddings(vectors=vectors, word=word, tokens=tokens)


def save(path: Path, embeddings: Embeddings, header: dict[str, str]) -> None:
    """NAME_emb.safetensors: {"clip_l": (n, 768), "clip_g": (n, 1280)}, the layout A1111 and ComfyUI load as an
    embedding (and diffusers' load_textual_inversion with state_dict["clip_l"]); atomic."""
    from safetensors.torch import save_file

    from sdlora.fsutil import atomic_path

    tensors = {key: value.contiguous() for key, value in embeddings.vectors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={**header, **embeddings.metadata()})


def diffusers_tensors(embeddings: Embeddings) -> dict[str, Any]:
    """The vectors under their keys inside the diffusers LoRA file."""
    return {DIFFUSERS_PREFIX + key: value.contiguous() for key, value in embeddings.vectors.items()}


def read(path: Path) -> Embeddings | None:
    """The embeddings in an emb file or a diffusers LoRA file of ours; None when it holds none. Metadata that
    could not have come from sdlora (a token other than <sN>, e.g. one with a backslash; an empty trigger word) is a
    one-line SdloraError naming the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if WORD_KEY not in metadata:
            return None
        vectors = {}
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            name = key.removeprefix(DIFFUSERS_PREFIX)
            if key.startswith(DIFFUSERS_PREFIX) or "." not in key:
                vectors[name] = handle.get_tensor(key).float()
    tokens = tuple(t for t in metadata.get(TOKENS_KEY, "").split(",") if t)
    if not vectors or not tokens:
        return None
    word = metadata[WORD_KEY]
    bad = [t for t in tokens if not _TOKEN.fullmatch(t)]
    if bad or not word.strip():
        field, value = (TOKENS_KEY, bad[0]) if bad else (WORD_KEY, word)
        raise SdloraError(
            f"{path}: its pivotal-tuning metadata is damaged ({field} = {value!r}; sdlora writes tokens <s0>, "
            "<s1>, ... and a trigger word); use the file as sdlora wrote it, or train again"
        )
    return Embeddings(vectors=vectors, word=word, tokens=tokens)


def find(lora_path: Path, name: str) -> Embeddings | None:
    """The embeddings of a LoRA: inside its file (our diffusers file), else the file its metadata names (a
    pivotal-tuned kohya file: NEEDS_KEY) or `STEM_emb.safetensors` beside it, else `NAME_emb.safetensors` in its
    folder (a train OUT_DIR, where NAME is the run's name). A kohya file that needs its embedding file and has
    none beside it is a one-line SdloraError: it would render without its trained tokens."""
    from safetensors import safe_open

    lora_path = Path(lora_path)
    found = read(lora_path)
    if found is not None:
        return found
    with safe_open(str(lora_path), framework="pt") as handle:
        needed = Path((handle.metadata() or {}).get(NEEDS_KEY, "")).name  # a file name, never a path
    for candidate in dict.fromkeys(
        [needed] * bool(needed) + [layout.embedding_file(lora_path.stem), layout.embedding_file(name)]
    ):
        path = lora_path.parent / candidate
        if path.is_file():
            found = read(path)
            if found is not None:
                return found
    if needed:
        raise SdloraError(
            f"{lora_path}: pivotal-tuned, and its embedding file {needed} is not beside it (without it the trigger "
            f"word renders without its trained tokens); put {needed} from the run's OUT_DIR into {lora_path.parent}"
        )
    return None


def load_for_loras(pipe: Any, family: Family, loras: list[Any]) -> Embeddings | None:
    """Install the embeddings of the LoRAs that have any (`generate` and `eval`); one run's at most."""
    found = [(lora, e) for lora in loras if (e := find(lora.path, lora.name)) is not None]
    if len(found) > 1:
        raise SdloraError(
            f"--lora {found[1][0].path}: two LoRAs with pivotal embeddings ({found[0][0].path} too); their new "
            "tokens would clash: give one of them"
        )
    if not found:
        return None
    install(pipe, family, found[0][1])
    return found[0][1]
