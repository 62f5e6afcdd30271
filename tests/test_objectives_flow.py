"""objectives.py's flow matching on small tensors: noising, target, x0, weights, each timestep scheme's range and
mean (against the mean computed by quadrature of its density)."""

from __future__ import annotations

import math

import pytest
import torch

from sdlora import objectives


def test_noising_target_and_x0():
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = objectives.flow_noisy(x0, eps, sigmas)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], eps[2])
    assert torch.allclose(noisy[1], 0.75 * x0[1] + 0.25 * eps[1])
    velocity = objectives.flow_target(x0, eps)
    assert torch.allclose(velocity, eps - x0)
    # The exact velocity takes x_t back to x_0 (what the filmstrips decode).
    assert torch.allclose(objectives.flow_x0(noisy, velocity, sigmas), x0, atol=1e-6)


def test_noising_matches_diffusers_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[torch.tensor([10, 600])]
    theirs = scheduler.scale_noise(x0, t, eps)
    assert torch.allclose(objectives.flow_noisy(x0, eps, t / 1000), theirs, atol=1e-6)


def _quadrature_mean(scheme: str, shift: float) -> float:
    """E[sigma] under the scheme, by integrating over the standard normal (midpoint rule)."""
    z = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    density = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    s = torch.sigmoid(z)
    if scheme == "shift":
        s = shift * s / (1 + (shift - 1) * s)
    if scheme == "logit_normal":
        s = (1000 - (s * 1000).floor().clamp(max=999)) / 1000
    return float((s * density).sum() * (z[1] - z[0]))


@pytest.mark.parametrize(
    "scheme, shift, low, high",
    [
        ("uniform", 1.0, 0.0, 1.0),
        ("sigmoid", 1.0, 0.0, 1.0),
        ("logit_normal", 1.0, 0.001, 1.0),
        ("shift", 3.1582, 0, 1),
    ],
)
def test_timestep_sampling_range_and_mean(scheme, shift, low, high):
    n = 200_000
    sigmas = objectives.sample_sigmas(n, torch.Generator().manual_seed(0), scheme, shift)
    assert sigmas.shape == (n,) and sigmas.dtype == torch.float32
    assert float(sigmas.min()) >= low and float(sigmas.max()) <= high
    expected = 0.5 if scheme == "uniform" else _quadrature_mean(scheme, shift)
    assert float(sigmas.mean()) == pytest.approx(expected, abs=3e-3)
    if scheme == "shift":
        assert expected > 0.7  # the shift moves training towards the noisy end
    if scheme == "logit_normal":  # on diffusers' grid of 1000 sigmas
        assert torch.allclose(sigmas * 1000, (sigmas * 1000).round(), atol=1e-3)


def test_sampling_is_seeded_and_rejects_unknown_schemes():
    a = objectives.FlowMatching("shift", 3.0).sample_timesteps(4, torch.Generator().manual_seed(1))
    b = objectives.FlowMatching("shift", 3.0).sample_timesteps(4, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="timestep sampling"):
        objectives.sample_sigmas(2, torch.Generator(), "karras")


def test_shift_formula_and_min_snr_weights():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(objectives.shift_sigmas(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    w = objectives.flow_min_snr_weights(torch.tensor([0.1, 0.5, 0.9]), 5.0)
    snr = ((1 - torch.tensor([0.1, 0.5, 0.9])) / torch.tensor([0.1, 0.5, 0.9])) ** 2
    assert torch.allclose(w, torch.clamp(snr, max=5.0) * torch.tensor([0.1, 0.5, 0.9]) ** 2)
    objective = objectives.FlowMatching()
    assert objective.weights(t, None) is None
    assert torch.equal(objective.target(torch.ones(1, 2), torch.zeros(1, 2), t[:1]), -torch.ones(1, 2))
