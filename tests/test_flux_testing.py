"""The tiny Flux's T5 tokenizer, made offline: T5's special ids, no unknown pieces in lowercase prompts, and a
diffusers-folder round trip that keeps it (and the schnell variant's shorter default length)."""

from __future__ import annotations

from sdlora import testing


def test_t5_tokenizer_has_t5s_special_ids_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = testing.t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a photo of sks person, at 42!").input_ids
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.model_max_length == 512
    padded = tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert padded.shape == (1, 16) and padded[0, -1] == 0
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again("a photo of sks person, at 42!").input_ids == ids
    assert testing.t5_tokenizer(256).model_max_length == 256
