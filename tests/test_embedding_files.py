"""Pivotal tuning's embedding files as generate and eval find them: a kohya file that needs its NAME_emb file says
so in its metadata, and generate refuses in one line when the file is missing; damaged embedding metadata (a
backslash in a token) is a one-line error naming the file, not the catch-all."""

from __future__ import annotations

import pytest
import torch
from generate_helpers import make_lora
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.errors import SdloraError
from sdlora.lora import embeddings


def _generate(base, lora, out):
    args = ["generate", "--base", str(base), "--lora", str(lora), "--prompt", "a photo of sks person"]
    return CliRunner().invoke(app, [*args, "--n", "1", "--steps", "2", "--size", "64x64", "--out", str(out)])


def _error_line(result) -> str:
    """The one `error:` line of a failed command (progress bars of the base's loading come before it)."""
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bug in sdlora" not in result.output and "Traceback" not in result.output, result.output
    return lines[0]


def _emb_file(path, tokens="<s0>,<s1>", word="sks"):
    metadata = {embeddings.WORD_KEY: word, embeddings.TOKENS_KEY: tokens}
    save_file({"clip_l": torch.zeros(2, 32)}, str(path), metadata=metadata)
    return path


def test_a_kohya_file_that_needs_its_embedding_file_refuses_without_it(tiny_sd1, tmp_path):
    folder = make_lora(tiny_sd1, tmp_path / "lora", seed=0, metadata={embeddings.NEEDS_KEY: "alice_emb.safetensors"})
    lora = folder / "pytorch_lora_weights.safetensors"
    result = _generate(tiny_sd1, lora, tmp_path / "gen")
    assert result.exit_code == 1, result.output
    line = _error_line(result)
    assert line.startswith(f"error: {lora}: pivotal-tuned, and its embedding file alice_emb.safetensors")
    assert f"put alice_emb.safetensors from the run's OUT_DIR into {folder}" in line
    assert not (tmp_path / "gen").exists() or not list((tmp_path / "gen").glob("*.png"))


def test_the_embedding_file_named_in_the_metadata_is_found_under_its_own_name(tmp_path):
    lora = tmp_path / "renamed.safetensors"
    save_file(
        {"lora_unet_x.alpha": torch.ones(())}, str(lora), metadata={embeddings.NEEDS_KEY: "alice_emb.safetensors"}
    )
    _emb_file(tmp_path / "alice_emb.safetensors")
    found = embeddings.find(lora, "renamed")
    assert found is not None and found.tokens == ("<s0>", "<s1>") and found.word == "sks"
    # A LoRA that needs none: nothing found, nothing refused.
    plain = tmp_path / "plain.safetensors"
    save_file({"lora_unet_x.alpha": torch.ones(())}, str(plain))
    assert embeddings.find(plain, "plain") is None


def test_a_backslash_in_embedding_metadata_is_a_one_line_error_naming_the_file(tiny_sd1, tmp_path):
    folder = make_lora(tiny_sd1, tmp_path / "alice", seed=0)
    lora = (folder / "pytorch_lora_weights.safetensors").rename(folder / "alice.safetensors")
    emb = _emb_file(folder / "alice_emb.safetensors", tokens="<s0>\\x,<s1>")
    with pytest.raises(SdloraError, match=r"alice_emb.safetensors: its pivotal-tuning metadata is damaged"):
        embeddings.read(emb)
    result = _generate(tiny_sd1, lora, tmp_path / "gen")  # (today's code: the catch-all, from re's template)
    assert result.exit_code == 1, result.output
    line = _error_line(result)
    assert line.startswith(f"error: {emb}: its pivotal-tuning metadata is damaged")


def test_the_prompt_rewrite_takes_tokens_literally():
    rule = embeddings.rewrite_rule("sks", ("<s0>", "<s1>"))
    assert rule[0].sub(lambda _: rule[1], "a photo of sks person") == "a photo of <s0><s1> person"
