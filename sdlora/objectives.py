"""Pure tensor math of the denoising objectives: timesteps, forward noising, targets, SNR weights, loss.

The functions take tensors and return tensors; `DDPM` bundles them with one noise schedule as the objective object
that UNet families hand the training loop, `FlowMatching` the rectified-flow objective of DiT families (Flux.1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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


TIMESTEP_BIAS = ("none", "high", "low")


def biased_unit(values: torch.Tensor, bias: str, strength: float) -> torch.Tensor:
    """Values in [0, 1) warped towards 1 ("high": the noisy end) or 0 ("low"): u -> u^(1 / (1 + strength)), or
    its mirror 1 - (1 - u)^(1 / (1 + strength)). On uniform u that is Beta(1 + strength, 1) (density
    (1 + s) u^s, mean (1 + s) / (2 + s)) or Beta(1, 1 + strength); strength 0 changes nothing; "none" returns
    `values` itself."""
    if bias == "none":
        return values
    exponent = 1.0 / (1.0 + strength)
    if bias == "high":
        return values.pow(exponent)
    if bias == "low":
        return 1 - (1 - values).pow(exponent)
    raise ValueError(f"unknown timestep bias {bias!r}; expected one of {TIMESTEP_BIAS}")


def sample_biased_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, bias: str, strength: float
) -> torch.Tensor:
    """Integer timesteps in [0, T) skewed by `biased_unit`: (B,) int64; "none": exactly `sample_timesteps`."""
    if bias == "none":
        return sample_timesteps(batch, num_train_timesteps, generator)
    unit = biased_unit(torch.rand(batch, generator=generator, dtype=torch.float64), bias, strength)
    return (unit * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def with_bias(objective: Any, bias: str, strength: float) -> Any:
    """`objective` (DDPM or FlowMatching) drawing its timesteps with train.timestep_bias; the same object for
    "none"."""
    if bias == "none":
        return objective
    if not hasattr(objective, "timestep_bias"):
        raise ValueError(f"{type(objective).__name__} objectives take no timestep bias")
    return replace(objective, timestep_bias=bias, timestep_bias_strength=strength)


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


def per_sample_loss(
    prediction: torch.Tensor, goal: torch.Tensor, pixel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample, in fp32: (B,); `pixel_weights` (B, 1, H, W) weight each latent pixel."""
    errors = F.mse_loss(prediction.float(), goal.float(), reduction="none")
    if pixel_weights is not None:
        errors = errors * pixel_weights.to(errors.device, errors.dtype)
    return errors.mean(dim=tuple(range(1, prediction.ndim)))


def mask_weights(masks: torch.Tensor, size: tuple[int, int], floor: float) -> torch.Tensor:
    """Per-pixel loss weights of the face-weighted loss: soft masks (B, 1, H, W) in [0, 1] (1 = face and hair)
    averaged down to the latents' (h, w), raised to at least `floor` (the background still trains a little), then
    divided by each map's mean, so that every sample's weights average 1 and the loss keeps its scale. (B, 1, h, w)
    fp32; an all-ones mask gives all-ones weights (exactly the plain loss)."""
    small = F.interpolate(masks.float(), size=size, mode="area") if masks.shape[-2:] != size else masks.float()
    weights = small.clamp(min=floor, max=1.0)
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def masked_prior_loss(prediction: torch.Tensor, base: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar loss of the masked prior: the squared distance of the LoRA-on prediction from the adapter-disabled
    one, weighted by `weights` (B, 1, h, w: 1 - the mask, so the region outside the face), averaged over the
    weights (pooled over the batch): outside the face the LoRA is held to what the base predicts."""
    errors = F.mse_loss(prediction.float(), base.float(), reduction="none").mean(dim=1, keepdim=True)
    weights = weights.to(errors.device, errors.dtype)
    return (errors * weights).sum() / weights.sum().clamp(min=1e-6)


def denoising_loss(
    prediction: torch.Tensor,
    goal: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    is_prior: torch.Tensor | None = None,
    prior_loss_weight: float = 1.0,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss: per-sample MSE times `weights` (min-SNR); with DreamBooth prior preservation the class
    samples (`is_prior`, bool (B,)) are averaged apart and added with `prior_loss_weight`; `pixel_weights`
    (B, 1, H, W, from `mask_weights`) weight each latent pixel of the face-weighted loss."""
    losses = per_sample_loss(prediction, goal, pixel_weights)
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
    timestep_bias: str = "none"  # one of TIMESTEP_BIAS (train.timestep_bias)
    timestep_bias_strength: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return sample_biased_timesteps(
            batch, self.num_train_timesteps, generator, self.timestep_bias, self.timestep_bias_strength
        )

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
    # train.timestep_bias: applied to the scheme's sigmas after they are drawn (biased_unit), so "high" pulls
    # any scheme's draws towards the noisy end (on "uniform": Beta(1 + strength, 1)).
    timestep_bias: str = "none"
    timestep_bias_strength: float = 1.0

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        sigmas = sample_sigmas(batch, generator, self.sampling, self.shift)
        return biased_unit(sigmas, self.timestep_bias, self.timestep_bias_strength)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_noisy(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return flow_target(latents, noise)

    def weights(self, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
        return flow_min_snr_weights(timesteps, min_snr_gamma) if min_snr_gamma else None
