"""Pure tensor math of the denoising objectives: timesteps, forward noising, targets, SNR weights, loss.

The functions take tensors and return tensors; `DDPM` bundles them with one noise schedule as the objective object
that UNet families hand the training loop, `FlowMatching` the rectified-flow objective of DiT families (Flux.1).
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


# Flow matching (rectified flow, Flux.1): x_t = (1 - sigma) x_0 + sigma eps with sigma in (0, 1], and the model
# predicts the velocity eps - x_0. "timesteps" of these objectives are the sigmas themselves, (B,) fp32.
TIMESTEP_SAMPLING = ("uniform", "sigmoid", "logit_normal", "shift")
FLOW_TRAIN_STEPS = 1000  # the discrete grid of diffusers' FlowMatchEulerDiscreteScheduler (logit_normal)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The discrete flow shift s * t / (1 + (s - 1) * t): s > 1 moves samples towards the noisy end."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch: int, generator: torch.Generator, scheme: str, shift: float = 1.0) -> torch.Tensor:
    """Training sigmas (B,) fp32 in (0, 1), drawn as the anchors draw them:
    - uniform: U(0, 1) (kohya `uniform`);
    - sigmoid: sigmoid(N(0, 1)) (kohya `sigmoid`, ai-toolkit), continuous;
    - logit_normal: the same density on diffusers' grid of 1000 training sigmas (1/1000 ... 1), as
      train_dreambooth_lora_flux.py's `--weighting_scheme logit_normal` draws it;
    - shift: sigmoid(N(0, 1)) then the discrete flow shift (kohya's `shift` with `discrete_flow_shift`)."""
    if scheme == "uniform":
        return torch.rand(batch, generator=generator)
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep sampling {scheme!r}; expected one of {TIMESTEP_SAMPLING}")
    sigmas = torch.sigmoid(torch.randn(batch, generator=generator))
    if scheme == "logit_normal":
        index = (sigmas * FLOW_TRAIN_STEPS).long().clamp(max=FLOW_TRAIN_STEPS - 1)
        return (FLOW_TRAIN_STEPS - index).float() / FLOW_TRAIN_STEPS
    return shift_sigmas(sigmas, shift) if scheme == "shift" else sigmas


def _per_sample_sigma(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The straight path between data and noise: x_t = (1 - sigma) x_0 + sigma eps."""
    s = _per_sample_sigma(sigmas, latents)
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity along that path, d x_t / d sigma = eps - x_0."""
    return noise - latents


def flow_x0(noisy: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The clean-image estimate of a velocity prediction: x_0 = x_t - sigma v."""
    return noisy - _per_sample_sigma(sigmas, noisy) * velocity


def flow_min_snr_weights(sigmas: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma for velocity targets: the velocity error is the x_0 error / sigma, so weighting the velocity
    loss by min(SNR, gamma) * sigma^2, with SNR = ((1 - sigma) / sigma)^2, weights the x_0 loss by
    min(SNR, gamma), as min-SNR does for DDPM. (B,)"""
    s = sigmas.float()
    return torch.minimum((1 - s) ** 2, gamma * s**2)


@dataclass(frozen=True)
class FlowMatching:
    """Rectified-flow training (Flux.1): sigmas from `sampling`, x_t = (1 - sigma) x_0 + sigma eps, the velocity
    target eps - x_0, optional min-SNR-equivalent weights."""

    sampling: str = "shift"  # one of TIMESTEP_SAMPLING
    shift: float = 3.1582  # discrete flow shift of the "shift" scheme (kohya's recommended value for Flux.1)

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return sample_sigmas(batch, generator, self.sampling, self.shift)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_noisy(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_target(latents, noise)

    def weights(self, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
        return flow_min_snr_weights(timesteps, min_snr_gamma) if min_snr_gamma else None
