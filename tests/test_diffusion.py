"""objectives.py: noising, targets, min-SNR weights and the prior-preservation loss on small tensors."""

from __future__ import annotations

import pytest
import torch

from sdlora import objectives


@pytest.fixture
def schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's scaled_linear schedule
    return torch.cumprod(1 - betas, dim=0)


def test_add_noise_matches_diffusers(schedule):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.allclose(objectives.add_noise(x0, eps, t, schedule), scheduler.add_noise(x0, eps, t), atol=1e-6)
    v = scheduler.get_velocity(x0, eps, t)
    assert torch.allclose(objectives.target(x0, eps, t, schedule, "v_prediction"), v, atol=1e-6)
    assert objectives.target(x0, eps, t, schedule, "epsilon") is eps
    with pytest.raises(ValueError, match="prediction_type"):
        objectives.target(x0, eps, t, schedule, "sample")


def test_min_snr_weights(schedule):
    t = torch.tensor([0, 500, 999])
    snr = schedule[t] / (1 - schedule[t])
    eps_w = objectives.min_snr_weights(t, schedule, 5.0, "epsilon")
    assert torch.allclose(eps_w, torch.clamp(snr, max=5.0) / snr)
    assert eps_w[0] < 1 and eps_w[2] == pytest.approx(1.0)  # low noise is down-weighted, high noise kept
    v_w = objectives.min_snr_weights(t, schedule, 5.0, "v_prediction")
    assert torch.allclose(v_w, torch.clamp(snr, max=5.0) / (snr + 1))


def test_offset_noise_shifts_channel_means():
    g = torch.Generator().manual_seed(0)
    plain = objectives.sample_noise((64, 4, 8, 8), g)
    g = torch.Generator().manual_seed(0)
    offset = objectives.sample_noise((64, 4, 8, 8), g, offset=1.0)
    per_channel = (offset - plain).std(dim=(2, 3))
    assert per_channel.max() < 1e-5 and (offset - plain).abs().mean() > 0.3  # constant per (sample, channel)


def test_prior_loss_is_weighted_apart():
    pred = torch.zeros(4, 1, 2, 2)
    goal = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    is_prior = torch.tensor([False, False, True, True])
    loss = objectives.denoising_loss(pred, goal, is_prior=is_prior, prior_loss_weight=0.5)
    assert loss.item() == pytest.approx(1.0 + 0.5 * 4.0)
    weighted = objectives.denoising_loss(pred, goal, weights=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert weighted.item() == pytest.approx((1 + 0 + 4 + 4) / 4)
