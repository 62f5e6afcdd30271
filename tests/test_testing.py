"""The tiny offline models: real CLIP tokenizer ids; the small T5 tokenizer made offline (T5's special ids, no
unknown pieces in lowercase prompts, a diffusers-folder round trip that keeps it, and the schnell variant's shorter
default length); the byte-level Qwen tokenizer with Qwen's chat template; every family saves, reloads and runs."""

from __future__ import annotations

import pytest
import torch

from sdlora import testing


def test_clip_tokenizer_matches_real_clip(tmp_path):
    tok = testing.clip_tokenizer(tmp_path)
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77
    assert len(tok) == 49408


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


def test_qwen_tokenizer_is_byte_level_with_qwens_chat_template_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from sdlora.families.offline_text import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    messages = [{"role": "user", "content": "a photo of sks person"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na photo of sks person<|im_end|>\n<|im_start|>assistant\n"
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == text + "<think>\n\n</think>\n\n"  # as Qwen3's own template adds it
    ids = tokenizer(text).input_ids
    assert len(ids) == len("user\na photo of sks person\nassistant\n") + 3  # one token per byte, 3 specials
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>" and tokenizer.pad_token == "<|endoftext|>"
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again(text).input_ids == ids and again.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("family", [name for name in testing.FAMILIES if name != "qwenedit"])  # test_edit.py
def test_tiny_pipeline_reloads_offline_and_runs(tiny_models, family):
    from diffusers import DiffusionPipeline

    folder = tiny_models[family]
    assert (folder / "model_index.json").is_file()
    assert list(folder.rglob("*.safetensors")), "weights must be saved as safetensors"
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    expected = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline", "zimage": "ZImagePipeline"}
    expected |= {"klein": "Flux2KleinPipeline", "qwenimage": "QwenImagePipeline"}
    assert type(pipe).__name__ == expected.get(family, "StableDiffusionPipeline")
    if family not in ("zimage", "klein", "qwenimage"):  # their tokenizers are Qwen's (test_qwen_tokenizer_...)
        assert pipe.tokenizer.model_max_length == 77
    if family == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe(
        prompt="a photo of sks person",  # klein's first argument is its reference image
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert out.std() > 0, "a real forward pass produces a non-constant image"
