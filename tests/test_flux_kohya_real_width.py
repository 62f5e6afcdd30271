"""diffusers' own kohya reader on our kohya Flux file at FLUX.1-dev's real widths (hidden 3072 = 24 heads x 128,
T5 width 4096; 1 double + 2 single blocks, random weights): `FluxPipeline.load_lora_weights` of the kohya file gives
the transformer the diffusers file gives it, within 1e-4, single blocks included (diffusers' converter splits the
single blocks' fused linear1 at the real widths only, so the tiny-model test can't cover them)."""

from __future__ import annotations

import pytest
import torch

RANK, ALPHA = 4, 8.0


def real_width_transformer():
    """The transformer with FLUX.1-dev's widths, 1 double and 2 single blocks, random weights, LoRA on every target
    ('all') with random A and B."""
    from bench.flux_models import flux_transformer
    from sdlora import families
    from sdlora.lora import peft

    model = flux_transformer(double=1, single=2, device="meta")
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    model.requires_grad_(False).eval()
    peft.attach(model, RANK, ALPHA, 0.0, families.get("flux").denoiser_targets("all"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.02, generator=generator)
    return model


def output(model) -> torch.Tensor:
    from sdlora import families

    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 16, 4, 4, generator=generator)  # 2x2 patches of 16 latents: 4 image tokens
    cond = {
        "encoder_hidden_states": torch.randn(1, 8, 4096, generator=generator),
        "pooled_projections": torch.randn(1, 768, generator=generator),
    }
    with torch.no_grad():
        return families.get("flux").predict(model, noisy, torch.tensor([0.6]), cond, None, 1.0)


@pytest.mark.slow
def test_diffusers_reads_our_kohya_flux_file_at_the_real_widths(tmp_path):
    from diffusers import FluxPipeline

    from sdlora import families
    from sdlora.lora import kohya, peft

    model = real_width_transformer()
    trained = output(model)
    diffusers_file, kohya_file = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "person.safetensors"
    peft.save_diffusers(diffusers_file, FluxPipeline, {"transformer": model}, {"sdlora.family": "flux"}, True)
    state = kohya.kohya_state_dict(model, [], families.get("flux"), dtype=torch.float32)
    assert any(k.startswith("lora_unet_single_blocks_1_linear1.") for k in state)
    kohya.save_kohya(kohya_file, state, {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"})
    model.unload_lora()
    plain = output(model)
    pipe = FluxPipeline(None, None, None, None, None, None, model)
    outputs = {}
    for path in (diffusers_file, kohya_file):
        pipe.load_lora_weights(str(path))
        outputs[path.name] = output(model)
        pipe.unload_lora_weights()
    ours, theirs = outputs[diffusers_file.name], outputs[kohya_file.name]
    assert (ours - plain).abs().max() > 1e-2, "the LoRA must change the output for the check to mean anything"
    assert (ours - trained).abs().max() < 1e-5  # the diffusers file is the trained adapter
    assert (ours - theirs).abs().max() < 1e-4  # and diffusers' reading of the kohya file is the same
