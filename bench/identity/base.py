"""The toy world's base model, trained from scratch: a small VAE, UNet and CLIP text encoder in diffusers format.

The base learns "a photo of a person" (any identity) and attribute phrases ("with glasses", "with red hair", ...)
from renders of every identity except the benchmark's held-out subjects. `ensure_base` caches it under
~/.cache/sdlora/identity-base-<hash of this file and world.py>, so it is rebuilt only when missing or when the
training code or the world changes.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.identity import world

CLASS_PROMPT = "a photo of a person"
# The benchmark's subjects: never shown to the base. Neither wears glasses, so "with glasses" tests fidelity.
SUBJECTS = (
    world.Identity("tan", "red", "long", "green", False, "mint"),
    world.Identity("dark", "blonde", "tall", "blue", False, "lilac"),
)


@dataclass(frozen=True)
class BaseSpec:
    """Sizes and budgets of one base model (the default is the benchmark's; tests use a tiny one)."""

    vae_seconds: float = 180.0  # wall-clock budgets: step counts are recorded in identity_base.json
    unet_seconds: float = 780.0
    batch: int = 32
    vae_batch: int = 16
    pool: int = 8000  # renders encoded once; the UNet trains on their latents
    vae_channels: tuple[int, ...] = (16, 32, 32)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_width: int = 64
    text_layers: int = 3
    lr: float = 1e-3
    seed: int = 0


TINY = BaseSpec(
    vae_seconds=20.0, unet_seconds=40.0, batch=16, vae_batch=8, pool=600, unet_channels=(32, 32, 64), text_layers=2
)


def cache_dir(spec: BaseSpec) -> Path:
    """~/.cache/sdlora/identity-base-<hash>: the hash covers this file, the world's renderer and the spec."""
    digest = hashlib.sha256()
    # The syntax tree, not the bytes: reformatting or editing comments does not retrain the base. Of world.py
    # only what draws the training images counts (the decoder can change without a retrain).
    digest.update(ast.dump(ast.parse(Path(__file__).read_text(encoding="utf-8"))).encode())
    digest.update(ast.dump(ast.parse(inspect.getsource(world.render))).encode())
    digest.update(repr((world.SIZE, world.SKIN, world.HAIR, world.STYLES, world.EYES, world.BACKGROUND)).encode())
    digest.update(repr((world.FRAME, world.MOUTH)).encode())
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    return Path.home() / ".cache" / "sdlora" / f"identity-base-{digest.hexdigest()[:12]}"


def ensure_base(spec: BaseSpec = BaseSpec(), folder: Path | None = None, log=print) -> Path:
    """The base model folder for `spec`: the cached one, or a freshly trained one (written atomically)."""
    from sdlora.fsutil import atomic_dir

    folder = Path(folder) if folder else cache_dir(spec)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        train_base(spec, tmp, log)
    return folder


def caption(identity: world.Identity, rng: random.Random) -> str:
    """'a photo of a person' (a quarter of the time) or the class prompt with 1-3 of its attribute phrases."""
    if rng.random() < 0.25:
        return CLASS_PROMPT
    words = identity.caption_words()
    if identity.glasses and rng.random() < 0.5:
        chosen = ["with glasses"]  # the phrase the benchmark's fidelity prompt uses, seen often on its own
    else:
        chosen = rng.sample(words, rng.randint(1, min(3, len(words))))
    return f"{CLASS_PROMPT} " + " and ".join(chosen)


def training_identities() -> list[world.Identity]:
    return [i for i in world.all_identities() if i not in SUBJECTS]


def _images(identities: list[world.Identity], rng: random.Random):
    import numpy
    import torch

    arrays = [numpy.asarray(world.render(i, rng), numpy.float32) for i in identities]
    return torch.from_numpy(numpy.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1  # (B, 3, 64, 64) in [-1, 1]


def build_vae(spec: BaseSpec):
    from diffusers import AutoencoderKL

    # Three blocks: 4x downsampling, so 64 px renders become (4, 16, 16) latents.
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=list(spec.vae_channels),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=world.SIZE,
    )


def train_vae(spec: BaseSpec, identities: list[world.Identity], rng: random.Random, log) -> tuple[Any, int]:
    import torch

    vae = build_vae(spec)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.lr)
    started, step = time.time(), 0
    while time.time() - started < spec.vae_seconds:
        _cosine(optimizer, spec.lr, (time.time() - started) / spec.vae_seconds)
        images = _images(rng.choices(identities, k=spec.vae_batch), rng)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Reconstruction plus a weak KL term: latents stay near unit scale without blurring small features.
        loss = torch.nn.functional.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log(f"vae step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)")
        step += 1
    log(f"vae: {step} steps, last loss {loss.item():.4f}")
    return vae.eval().requires_grad_(False), step


def build_unet(spec: BaseSpec):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=spec.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_text_encoder(spec: BaseSpec):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=spec.text_width,
            intermediate_size=2 * spec.text_width,
            num_attention_heads=4,
            num_hidden_layers=spec.text_layers,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )


def scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion's own noise schedule, so sdlora's training and sampling code sees the usual numbers.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def train_base(spec: BaseSpec, out: Path, log=print) -> None:
    """Train VAE, then UNet + text encoder on cached latents; save a StableDiffusionPipeline folder to `out`."""
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline

    from sdlora.testing import clip_tokenizer

    torch.manual_seed(spec.seed)
    # One thread: on a shared 2-core machine two threads oversubscribe and run slower (measured 2-30 s vs 2 s/step).
    torch.set_num_threads(1)
    rng = random.Random(spec.seed)
    identities = training_identities()
    vae, vae_steps = train_vae(spec, identities, rng, log)
    pool = rng.choices(identities, k=spec.pool)
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(_images(pool[i : i + 256], rng)).latent_dist.mean for i in range(0, spec.pool, 256)]
        )
    scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=scale)  # latents reach the UNet at unit variance, as in SD
    latents = means * scale  # (pool, 4, 16, 16)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
    unet, text_encoder, sched = build_unet(spec), build_text_encoder(spec), scheduler()
    unet_steps = train_denoiser(spec, unet, text_encoder, tokenizer, sched, latents, pool, rng, log)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "identity_base.json").write_text(
        json.dumps(
            {"spec": asdict(spec), "vae_scale": scale, "vae_steps": vae_steps, "unet_steps": unet_steps}, indent=2
        )
        + "\n"
    )


def train_denoiser(spec, unet, text_encoder, tokenizer, sched, latents, pool, rng: random.Random, log) -> int:
    """Epsilon-prediction DDPM training of UNet and text encoder together (10% empty captions, for CFG)."""
    import torch

    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr)
    alphas = sched.alphas_cumprod
    started, step = time.time(), 0
    while time.time() - started < spec.unet_seconds:
        _cosine(optimizer, spec.lr, (time.time() - started) / spec.unet_seconds)
        index = torch.randint(len(pool), (spec.batch,))
        x0 = latents[index]
        prompts = ["" if rng.random() < 0.1 else caption(pool[int(i)], rng) for i in index]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids).last_hidden_state
        t = torch.randint(0, len(alphas), (spec.batch,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        # Forward diffusion: x_t = sqrt(a) x0 + sqrt(1 - a) eps; the UNet predicts eps.
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 250 == 0:
            log(f"unet step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)")
        step += 1
    log(f"unet: {step} steps, last loss {loss.item():.4f}")
    return step


def _cosine(optimizer, peak: float, progress: float) -> None:
    """Cosine decay of the learning rate over the time budget (progress 0 -> 1)."""
    import math

    for group in optimizer.param_groups:
        group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


if __name__ == "__main__":
    print(ensure_base())
