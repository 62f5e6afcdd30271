"""The tiny offline models: real tokenizer ids, every family saves, reloads and runs."""

from __future__ import annotations

import pytest
import torch

from sdlora import testing


def test_clip_tokenizer_matches_real_clip(tmp_path):
    tok = testing.clip_tokenizer(tmp_path)
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77
    assert len(tok) == 49408


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_tiny_pipeline_reloads_offline_and_runs(tiny_models, family):
    from diffusers import DiffusionPipeline

    folder = tiny_models[family]
    assert (folder / "model_index.json").is_file()
    assert list(folder.rglob("*.safetensors")), "weights must be saved as safetensors"
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    expected = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}.get(family, "StableDiffusionPipeline")
    assert type(pipe).__name__ == expected
    assert pipe.tokenizer.model_max_length == 77
    if family == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe(
        "a photo of sks person",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert out.std() > 0, "a real forward pass produces a non-constant image"
