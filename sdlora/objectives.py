"""Pure tensor math of the denoising objectives: timesteps, forward noising, targets, SNR weights, loss.

The functions take tensors and return tensors; `DDPM` bundles them with one noise schedule as the objective object
that UNet families hand the training loop (flow matching joins with the DiT families).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_noise(shape: torch.Size | tuple[int, ...], generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise of `shape` (B, C, H, W); `offset` adds a per-channel constant (offset noise), which lets the
    model learn to change an image's mean brightness."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, T), one per sample: (B,) int64."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather `values[t]` and shape it (B, 1, 1, 1) to broadcast over latents."""
    out = values.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    a = _per_sample(alphas_cumprod, timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """What the UNet should predict: eps (epsilon) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, timesteps, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) per sample: (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction. (B,)"""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def per_sample_loss(prediction: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in fp32: (B,)."""
    return F.mse_loss(prediction.float(), goal.float(), reduction="none").mean(dim=tuple(range(1, prediction.ndim)))


def denoising_loss(
    prediction: torch.Tensor,
    goal: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    is_prior: torch.Tensor | None = None,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Scalar loss: per-sample MSE times `weights` (min-SNR); with DreamBooth prior preservation the class
    samples (`is_prior`, bool (B,)) are averaged apart and added with `prior_loss_weight`."""
    losses = per_sample_loss(prediction, goal)
    if weights is not None:
        losses = losses * weights.to(losses.device)
    if is_prior is None:
        return losses.mean()
    # Masked means instead of boolean indexing: no host synchronisation on CUDA.
    prior = is_prior.to(losses.device, losses.dtype)
    instance = (losses * (1 - prior)).sum() / (1 - prior).sum().clamp(min=1)
    prior_part = (losses * prior).sum() / prior.sum().clamp(min=1)
    return instance + prior_loss_weight * prior_part


@dataclass(frozen=True)
class DDPM:
    """Denoising diffusion training with a discrete noise schedule: integer timesteps drawn uniformly, x_t from
    `add_noise`, the epsilon or v target, optional min-SNR weights."""

    alphas_cumprod: torch.Tensor  # (T,) fp32, on the training device
    prediction_type: str  # "epsilon" | "v_prediction"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(batch, self.num_train_timesteps, generator)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return add_noise(latents, noise, timesteps, self.alphas_cumprod)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)

    def weights(self, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
        """Per-sample loss weights (B,), or None for a plain mean."""
        if not min_snr_gamma:
            return None
        return min_snr_weights(timesteps, self.alphas_cumprod, min_snr_gamma, self.prediction_type)
