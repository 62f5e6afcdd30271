"""Micro-batches for the training step: cached latents and text embeddings, SDXL time ids, noise, timesteps, prior
pairing, one aspect-ratio bucket per micro-batch.

Every random choice of micro-batch k (which images, flips, noise, timesteps, caption dropout) comes from
generators seeded by (seed, k) and drawn for the whole global batch, of which each process takes its slice.
So a resumed run, or a run on N processes, trains on exactly the samples of one uninterrupted 1-process run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sdlora import objectives
from sdlora.families import Conditioning
from sdlora.train.data import DataOrder, Example, load_example, stream_seed

if TYPE_CHECKING:
    from sdlora.families import Family


@dataclass
class MicroBatch:
    latents: torch.Tensor  # (B, C, H/8, W/8), fp32 on the device; one (H, W) per micro-batch
    time_ids: torch.Tensor  # (B, 6) fp32: SDXL's original size, crop top-left, target size, each (height, width)
    noise: torch.Tensor  # same shape
    timesteps: torch.Tensor  # (B,): int64 DDPM timesteps, or fp32 sigmas of a flow-matching objective
    prompts: list[str]
    cond: Conditioning | None  # cached text conditioning (of the frozen encoders), None when none is cached
    is_prior: torch.Tensor | None  # (B,) bool: class images of prior preservation
    masks: torch.Tensor | None = None  # (B, 1, h, w) soft face masks at latent size (train.masked_loss), else None
    pixel_weights: torch.Tensor | None = None  # (B, 1, h, w) loss weights from the masks (objectives.mask_weights)
    control: torch.Tensor | None = None  # (B, C, h, w) edit training's control latents (flipped with their images)


class ImageSet:
    """The images of one set (instance or class) as latents, each at its bucket's size: encoded once and cached
    (both flips when flipping), or encoded each step when caching is off. With several `resolutions`, each image
    is in the set once per resolution (micro-batches hold one size: DataOrder groups by bucket)."""

    def __init__(
        self,
        examples: list[Example],
        resolutions: int | list[int],
        flip: bool,
        vae: Any,
        cache: bool,
        family: Any = None,
    ) -> None:
        sizes = [resolutions] if isinstance(resolutions, int) else list(resolutions)
        self.examples = [e for _ in sizes for e in examples]
        self.flip, self.vae, self.family = flip, vae, family  # the family normalises the VAE's latents
        self.sizes = [size for size in sizes for _ in examples]  # the resolution of each entry of self.examples
        self.masks: list[torch.Tensor] | None = None  # (1, H, W) each in [0, 1], after load_masks()
        loaded = [load_example(e, size) for size in sizes for e in examples]
        self.pixels = [pixels for pixels, _ in loaded]  # (3, H, W) each, in [-1, 1]
        self.geometry = [geometry for _, geometry in loaded]
        self.cached = self._encode() if cache else None  # (F, 4, H/8, W/8) each

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(width, height) of each image."""
        return [g.size for g in self.geometry]

    @torch.no_grad()
    def _encode(self, chunk: int = 8) -> list[torch.Tensor]:
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(self.buckets):
            by_size.setdefault(size, []).append(index)
        cached: list[torch.Tensor] = [torch.empty(0)] * len(self.pixels)
        for indices in by_size.values():
            for start in range(0, len(indices), chunk):
                part = indices[start : start + chunk]
                pixels = torch.stack([self.pixels[i] for i in part])
                views = [pixels, torch.flip(pixels, dims=[-1])] if self.flip else [pixels]
                encoded = torch.stack([encode_latents(self.vae, v, self.family) for v in views], 1)  # (n, F, 4, h, w)
                for index, latents in zip(part, encoded, strict=True):
                    cached[index] = latents
        return cached

    def latents(self, slots: list[tuple[int, int]]) -> torch.Tensor:
        if self.cached is not None:
            return torch.stack([self.cached[i][f] for i, f in slots])
        pixels = torch.stack([torch.flip(self.pixels[i], dims=[-1]) if f else self.pixels[i] for i, f in slots])
        with torch.no_grad():
            return encode_latents(self.vae, pixels.to(self.vae.device), self.family)

    def load_masks(self) -> None:
        """Each image's face mask, cut like the image (ones for an image without one): train.masked_loss."""
        from sdlora.train.data import load_mask

        self.masks = [load_mask(e, size) for e, size in zip(self.examples, self.sizes, strict=True)]

    def mask_batch(self, slots: list[tuple[int, int]]) -> torch.Tensor:
        """(B, 1, H, W) masks of `slots`, flipped with their images."""
        assert self.masks is not None
        return torch.stack([torch.flip(self.masks[i], dims=[-1]) if f else self.masks[i] for i, f in slots])

    def time_ids(self, slots: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([self.geometry[i].time_ids(bool(f)) for i, f in slots], dtype=torch.float32)


def image_sets(examples: list[Example], classes: list[Example] | None, train: Any, vae: Any, family: Any) -> tuple:
    """(instances, class images or None, the instances' control images or None) as ImageSets at every
    train.resolutions; each control image is cut as its image and sits at its image's entry (edit training)."""
    from dataclasses import replace

    sizes = train.resolutions or [train.resolution]

    def image_set(items: list[Example] | None) -> ImageSet | None:
        return ImageSet(items, sizes, train.flip, vae, train.cache_latents, family) if items else None

    controls = [replace(e, image=e.control) for e in examples if e.control]
    return image_set(examples), image_set(classes), image_set(controls)


def encode_latents(vae: Any, pixels: torch.Tensor, family: Any) -> torch.Tensor:
    """VAE latents (mean of the posterior, normalised as the family's denoiser expects), fp32 on the VAE's device."""
    video = "temperal_downsample" in vae.config  # a video VAE (Qwen-Image's) takes (B, 3, F, H, W): one frame
    pixels = pixels.to(vae.device, vae.dtype)
    posterior = vae.encode(pixels.unsqueeze(2) if video else pixels).latent_dist
    latents = posterior.mean.float()
    return family.normalize_latents(vae, latents.squeeze(2) if video else latents)


class Batches:
    """Builds micro-batch k of this process."""

    def __init__(
        self,
        instances: ImageSet,
        classes: ImageSet | None,
        *,
        text_cache: dict[str, Any] | None,
        seed: int,
        batch_size: int,
        num_processes: int,
        rank: int,
        objective: Any,
        noise_offset: float,
        caption_dropout: float,
        controls: ImageSet | None = None,
    ) -> None:
        self.instances, self.classes = instances, classes  # each image with its caption (class images too)
        self.controls = controls  # the instances' control images, entry for entry (edit training)
        self.text_cache = text_cache  # {"prompts": {prompt: row}, "cond": Conditioning} or None
        self.seed, self.b, self.nproc, self.rank = seed, batch_size, num_processes, rank
        self.objective, self.noise_offset, self.caption_dropout = objective, noise_offset, caption_dropout
        self.mask_floor = 0.1  # train.mask_floor, set with the masks (sdlora.train.methods.masked_loss)
        group = batch_size * num_processes  # the global micro-batch, of which this process takes a slice
        self.order = DataOrder(instances.buckets, seed, instances.flip, group)
        self.class_order = DataOrder(classes.buckets, seed + 1, classes.flip, group) if classes else None

    def micro_batch(self, k: int, device: torch.device) -> MicroBatch:
        mine = slice(self.rank * self.b, (self.rank + 1) * self.b)
        generator = torch.Generator().manual_seed(stream_seed("noise", self.seed, k))
        slots = self.order.batch(k)[mine]
        latents, noise, timesteps, prompts = self._draw(self.instances, slots, generator, mine)
        time_ids = self.instances.time_ids(slots)
        dropped = (torch.rand(self.b * self.nproc, generator=generator) < self.caption_dropout)[mine]
        prompts = ["" if drop else prompt for prompt, drop in zip(prompts, dropped.tolist(), strict=True)]
        masks = self.instances.mask_batch(slots) if self.instances.masks is not None else None
        is_prior = None
        if self.classes is not None and self.class_order is not None:
            class_slots = self.class_order.batch(k)[mine]
            extra = self._draw(self.classes, class_slots, generator, mine)
            time_ids = torch.cat([time_ids, self.classes.time_ids(class_slots)])
            latents, noise = torch.cat([latents, extra[0]]), torch.cat([noise, extra[1]])
            timesteps, prompts = torch.cat([timesteps, extra[2]]), prompts + extra[3]
            is_prior = torch.arange(len(prompts)) >= self.b
            if masks is not None:  # class images train unweighted
                masks = torch.cat([masks, torch.ones(len(class_slots), *masks.shape[1:])])
        cond = None
        if self.text_cache is not None:
            rows = torch.tensor([self.text_cache["prompts"][key] for key in self._text_keys(prompts, slots)])
            cond = select(self.text_cache["cond"], rows.to(device))
        weights = None
        if masks is not None:
            masks = torch.nn.functional.interpolate(masks, size=latents.shape[-2:], mode="area")
            weights = objectives.mask_weights(masks, latents.shape[-2:], self.mask_floor).to(device)
            masks = masks.to(device)
        return MicroBatch(
            latents=latents.to(device),
            time_ids=time_ids.to(device),
            noise=noise.to(device, non_blocking=True),
            timesteps=timesteps.to(device, non_blocking=True),
            prompts=prompts,
            cond=cond,
            is_prior=None if is_prior is None else is_prior.to(device),
            masks=masks,
            pixel_weights=weights,
            control=None if self.controls is None else self.controls.latents(slots).float().to(device),
        )

    def _text_keys(self, prompts: list[str], slots: list[tuple[int, int]]) -> list[Any]:
        """The text cache's key of each prompt: the prompt, or with control images (edit training) the prompt with
        its example's control image as cut and flipped (sdlora.train.controls)."""
        if self.controls is None:
            return prompts
        from sdlora.train import controls

        images = self.instances
        keyed = [
            controls.key(prompt, images.examples[i], images.sizes[i], bool(f))
            for prompt, (i, f) in zip(prompts, slots, strict=False)
        ]
        return keyed + prompts[len(slots) :]  # (class images have no control images: check_controls)

    def _draw(self, images: ImageSet, slots: list[tuple[int, int]], generator: torch.Generator, mine: slice):
        """Latents, noise, timesteps and prompts of this rank's slots; the noise is drawn for the global batch."""
        latents = images.latents(slots).float()
        global_shape = (self.b * self.nproc, *latents.shape[1:])
        noise = objectives.sample_noise(global_shape, generator, self.noise_offset)[mine]
        timesteps = self.objective.sample_timesteps(self.b * self.nproc, generator)[mine]
        prompts = [images.examples[i].caption for i, _ in slots]
        return latents, noise, timesteps, prompts


@torch.no_grad()
def build_text_cache(
    family: Family,
    tokenizers: list[Any],
    text_encoders: list[Any],
    prompts: list[str],
    max_sequence_length: int | None = None,
) -> dict:
    """Encode each distinct prompt once (frozen text encoders): rows of one conditioning table on the device."""
    unique = list(dict.fromkeys(prompts))
    parts = [
        family.encode_prompts(tokenizers, text_encoders, unique[i : i + 16], max_sequence_length)
        for i in range(0, len(unique), 16)
    ]
    return {"prompts": {p: i for i, p in enumerate(unique)}, "cond": concat(parts)}


def merge_text_caches(parts: list[dict]) -> dict:
    """One cache from caches of the same prompts, each holding some of the conditioning (one encoder each)."""
    return {"prompts": parts[0]["prompts"], "cond": {k: v for part in parts for k, v in part["cond"].items()}}


def select(cond: Conditioning, index: Any) -> Conditioning:
    """Rows `index` of every tensor in `cond`."""
    return {key: value[index] for key, value in cond.items()}


def concat(parts: list[Conditioning]) -> Conditioning:
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
