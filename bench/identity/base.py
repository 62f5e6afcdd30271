"""The toy world's base model, trained from scratch: a small VAE, UNet and CLIP text encoder in diffusers format.

The base learns "a photo of a person" (any identity) and attribute phrases ("with glasses", "with red hair", ...)
from renders of every identity except the benchmark's held-out subjects. `ensure_base` caches it under
~/.cache/sdlora/identity-base-<hash of this file and the world's renderer>, so it is rebuilt only when missing or
when the training code or the world changes.

The budgets are step counts, not seconds, so the same spec gives the same base on any device (minutes on a GPU,
hours on a 2-core CPU; the tests' TINY spec builds in about a minute on the CPU). A build saves its state beside
the output every 10 minutes (`progress.py`): one cut short by --max-seconds, a kill or a crash continues where it
stopped when the same command runs again.

Two specs exist. LEGACY (the base behind the published results and the packaged fixture: two held-out subjects,
attention at the UNet's 16x16 and 8x8 levels, batch 128) is what a record without the newer fields describes. The
default holds out three subjects and carries attention at the 8x8 and 4x4 levels instead: about twice as fast a
step on a CPU (0.62 vs 1.29 s at batch 64, 2 threads) for a slightly larger model (1.69 M vs 1.49 M parameters).
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

from bench.identity import progress
from sdlora.demo.base import CLASS_PROMPT, SUBJECTS  # the benchmark's subjects: never shown to the base
from sdlora.faces import toyworld as world


@dataclass(frozen=True)
class BaseSpec:
    """Sizes and budgets of one base model (the default is the benchmark's; tests use a tiny one)."""

    vae_steps: int = 3000
    unet_steps: int = 10000
    batch: int = 64
    vae_batch: int = 32
    pool: int = 20000  # renders drawn once; the VAE trains on them, the UNet on their latents
    vae_channels: tuple[int, ...] = (16, 32, 32)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    text_width: int = 64
    text_layers: int = 3
    lr: float = 1e-3
    ema: float = 0.999  # the saved UNet and text encoder are exponential moving averages of the trained ones
    seed: int = 0
    held_out: int = 3  # the first this many of SUBJECTS are never shown to the base
    attention_at: tuple[int, ...] = (8, 4)  # the latent sizes of the UNet levels with (cross-)attention


# What a record written before `held_out` and `attention_at` existed was built with.
LEGACY = {"held_out": 2, "attention_at": (16, 8)}


def spec_of(record: dict) -> BaseSpec:
    """The spec an identity_base.json record was built with (fields it predates: their LEGACY values)."""
    return BaseSpec(**spec_fields({**LEGACY, **record["spec"]}))


def spec_fields(spec: dict) -> dict:
    """A record's spec as a spec class takes it (JSON gave its tuples back as lists); any builder's spec."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def held_out_subjects(base_dir: Path) -> tuple[world.Identity, ...]:
    """The subjects the base in `base_dir` never saw (a folder without a record: the legacy two)."""
    path = Path(base_dir) / "identity_base.json"
    spec = json.loads(path.read_text())["spec"] if path.is_file() else {}
    return SUBJECTS[: spec.get("held_out", LEGACY["held_out"])]  # any builder's spec (UNet: BaseSpec, DiT: DitSpec)


def is_flow(base_dir: Path) -> bool:
    """Whether `base_dir` holds a flow-matching base (the DiT builder's, dit.py) rather than the UNet one."""
    path = Path(base_dir) / "identity_base.json"
    return path.is_file() and json.loads(path.read_text())["spec"].get("kind", "unet") != "unet"


TINY = BaseSpec(
    vae_steps=60, unet_steps=150, batch=16, vae_batch=8, pool=600, unet_channels=(32, 32, 64), text_layers=2, ema=0.0
)


def cache_dir(spec: BaseSpec) -> Path:
    """~/.cache/sdlora/identity-base-<hash>: the hash covers this file, the world's renderer and the spec."""
    digest = hashlib.sha256()
    # The syntax tree, not the bytes: reformatting or editing comments does not retrain the base. Of toyworld.py
    # only what draws the training images counts (the decoder can change without a retrain).
    digest.update(ast.dump(ast.parse(Path(__file__).read_text(encoding="utf-8"))).encode())
    digest.update(ast.dump(ast.parse(inspect.getsource(world.render))).encode())
    digest.update(repr((world.SIZE, world.SKIN, world.HAIR, world.STYLES, world.EYES, world.BACKGROUND)).encode())
    digest.update(repr((world.FRAME, world.MOUTH)).encode())
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    digest.update(repr(SUBJECTS[: spec.held_out]).encode())
    digest.update(ast.dump(ast.parse(Path(progress.__file__).read_text(encoding="utf-8"))).encode())
    return Path.home() / ".cache" / "sdlora" / f"identity-base-{digest.hexdigest()[:12]}"


def ensure_base(
    spec: BaseSpec = BaseSpec(), folder: Path | None = None, log=print, max_seconds: float = 0, threads: int = 1
) -> Path:
    """The base model folder for `spec`: the cached one, or a freshly trained one (written atomically). A build
    that was cut short (its state saved beside the folder) continues, and its folder is replaced when it ends."""
    folder = Path(folder) if folder else cache_dir(spec)
    return build_resumable(
        folder,
        asdict(spec),
        log,
        lambda tmp, state: train_base(spec, tmp, log, max_seconds=max_seconds, state=state, threads=threads),
    )


def build_resumable(folder: Path, spec: dict[str, Any], log, train) -> Path:
    """`folder` as it is when built, else `train(tmp, state)` into a temporary folder renamed into place, its
    resumable state beside `folder` (cleared when `train` says it finished; a cut-short build continues)."""
    from sdlora.fsutil import atomic_dir

    saved = progress.folder_for(folder)
    if (folder / "model_index.json").is_file() and not saved.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = progress.Progress(saved, spec, log)
    with atomic_dir(folder) as tmp:
        finished = train(tmp, state)
    if finished:
        state.clear()
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


def training_identities(spec: BaseSpec) -> list[world.Identity]:
    return [i for i in world.all_identities() if i not in SUBJECTS[: spec.held_out]]


def _pool(spec: BaseSpec, rng: random.Random, device: str):
    """The renders the base learns from, drawn once from the spec's seed: (identities, uint8 pixels on `device`)."""
    import torch

    pool = rng.choices(training_identities(spec), k=spec.pool)
    pixels = torch.cat([_renders(pool[i : i + 1000], rng) for i in range(0, spec.pool, 1000)]).to(device)
    return pool, pixels


def _latents(vae, pixels):
    """Posterior means of `pixels` (uint8), unscaled."""
    import torch

    with torch.no_grad():
        return torch.cat(
            [vae.encode(_to_float(pixels[i : i + 500])).latent_dist.mean for i in range(0, len(pixels), 500)]
        )


def _renders(identities: list[world.Identity], rng: random.Random):
    import numpy
    import torch

    arrays = [numpy.asarray(world.render(i, rng), numpy.uint8) for i in identities]
    return torch.from_numpy(numpy.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, 64, 64) uint8


def _to_float(pixels):
    return pixels.float() / 127.5 - 1


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


def train_vae(spec: BaseSpec, pixels, log) -> Any:
    """Reconstruction training on the pool's renders (uint8 on the training device)."""
    import torch

    vae = build_vae(spec).to(pixels.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.lr)
    meter = _Meter(log, 0, spec.vae_steps, "vae")
    for step in range(spec.vae_steps):
        _cosine(optimizer, spec.lr, step / spec.vae_steps)
        images = _to_float(pixels[torch.randint(len(pixels), (spec.vae_batch,), device=pixels.device)])
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Reconstruction plus a weak KL term: latents stay near unit scale without blurring small features.
        loss = torch.nn.functional.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(step, loss.item())
    return vae.eval().requires_grad_(False)


def build_unet(spec: BaseSpec):
    from diffusers import UNet2DConditionModel

    attend, plain = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")
    # The down blocks work at 16x16, 8x8 and 4x4 latents, the up blocks back; the 4x4 middle block always attends.
    levels = [attend if size in spec.attention_at else plain for size in (16, 8, 4)]
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        down_block_types=tuple(level[0] for level in levels),
        up_block_types=tuple(level[1] for level in reversed(levels)),
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
    from sdlora.families.sd.tiny import sd_scheduler

    # Stable Diffusion's own noise schedule, so sdlora's training and sampling code sees the usual numbers.
    return sd_scheduler()


def train_base(
    spec: BaseSpec,
    out: Path,
    log=print,
    device: str | None = None,
    max_seconds: float = 0,
    state: progress.Progress | None = None,
    threads: int = 1,
) -> bool:
    """Train VAE, then UNet + text encoder on cached latents; save a StableDiffusionPipeline folder to `out`.
    `max_seconds` (0: none) cuts the UNet's training short; identity_base.json records the steps done. `state`
    saves (and restores) the build's progress. True when every step of the spec is done."""
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline

    from sdlora.families.offline_text import clip_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(spec.seed)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device == "cpu":
        # Default one thread: on a shared 2-core machine two threads oversubscribe (2-30 s vs 2 s/step).
        torch.set_num_threads(threads)
    state = state or progress.Progress(None, asdict(spec), log)
    started = time.time()
    rng = random.Random(spec.seed)
    pool, pixels = _pool(spec, rng, device)
    vae = state.load_vae()
    if vae is None:
        vae = train_vae(spec, pixels, log)
        state.save_vae(vae)
    means = _latents(vae, pixels)
    scale = float(1 / means.std())
    vae.register_to_config(scaling_factor=scale)  # latents reach the UNet at unit variance, as in SD
    latents = means * scale  # (pool, 4, 16, 16)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp) / "tok")
    unet, text_encoder = build_unet(spec).to(device), build_text_encoder(spec).to(device)
    sched = scheduler()
    deadline = started + max_seconds if max_seconds else float("inf")
    unet, text_encoder, steps = train_denoiser(
        spec, unet, text_encoder, tokenizer, sched, latents, pool, rng, log, deadline, state
    )
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
    pipe.to("cpu", torch.float32).save_pretrained(out, safe_serialization=True)
    record = {"spec": asdict(spec), "vae_scale": scale, "unet_steps_done": steps, "device": _device_name(device)}
    record["build_seconds"] = round(time.time() - started, 1)  # this call's (a continued build: since it resumed)
    (out / "identity_base.json").write_text(json.dumps(record, indent=2) + "\n")
    return steps == spec.unet_steps


def continue_base(src: Path, out: Path, steps: int, lr: float, batch: int, log=print, max_seconds: float = 0) -> None:
    """Train a saved base's UNet and text encoder `steps` more (cosine from `lr` to 0) on the same pool of renders
    (re-drawn from the spec's seed) and save the result to `out`; the VAE stays. identity_base.json lists every
    continuation. Used when a build was cut short by its time limit (see docs/identity-benchmark.md)."""
    import dataclasses

    import torch
    from diffusers import StableDiffusionPipeline

    from sdlora import families

    started = time.time()
    record = json.loads((src / "identity_base.json").read_text())
    spec = spec_of(record)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(src).to(device)
    torch.manual_seed(spec.seed + len(record.get("continued", [])) + 1)
    rng = random.Random(spec.seed)
    pool, pixels = _pool(spec, rng, device)
    latents = families.get("sd1").normalize_latents(pipe.vae, _latents(pipe.vae, pixels))
    more = dataclasses.replace(spec, unet_steps=steps, lr=lr, batch=batch)
    deadline = started + max_seconds if max_seconds else float("inf")
    for module in (pipe.unet, pipe.text_encoder):
        module.train().requires_grad_(True)
    unet, text_encoder, done = train_denoiser(
        more, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, latents, pool, rng, log, deadline
    )
    pipe.unet, pipe.text_encoder = unet.eval(), text_encoder.eval()
    pipe.to("cpu", torch.float32).save_pretrained(out, safe_serialization=True)
    step = {"steps": steps, "lr": lr, "batch": batch, "steps_done": done, "device": _device_name(device)}
    step["seconds"] = round(time.time() - started, 1)
    record["continued"] = [*record.get("continued", []), step]
    (out / "identity_base.json").write_text(json.dumps(record, indent=2) + "\n")


def train_denoiser(
    spec, unet, text_encoder, tokenizer, sched, latents, pool, rng, log, deadline=float("inf"), state=None
):
    """Epsilon-prediction DDPM training of UNet and text encoder together (10% empty captions, for CFG).
    Returns the two models holding their moving averages (spec.ema; 0 keeps the last weights) and the steps done.
    `state` (a progress.Progress) restores a saved state first, then saves every few minutes and when cut short."""
    import functools

    import torch

    device = latents.device

    @functools.cache
    def token_ids(prompt: str):  # a few hundred distinct captions: tokenize each once
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return ids[0].to(device)

    alphas = sched.alphas_cumprod.to(device)

    def step_loss():
        index = torch.randint(len(pool), (spec.batch,))
        x0 = latents[index.to(device)]
        prompts = ["" if rng.random() < 0.1 else caption(pool[int(i)], rng) for i in index]
        cond = text_encoder(torch.stack([token_ids(p) for p in prompts])).last_hidden_state
        t = torch.randint(0, len(alphas), (spec.batch,), device=device)
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        # Forward diffusion: x_t = sqrt(a) x0 + sqrt(1 - a) eps; the UNet predicts eps.
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)

    (unet, text_encoder), steps = train_loop(spec, [unet, text_encoder], step_loss, rng, log, deadline, state)
    return unet, text_encoder, steps


def train_loop(spec, models, step_loss, rng, log, deadline=float("inf"), state=None, name="unet"):
    """spec.unet_steps of AdamW on `models` together (cosine learning rate from spec.lr, gradients clipped at 1)
    minimising `step_loss()` (which draws its own batch); the models holding their moving averages (spec.ema; 0
    keeps the last weights) and the steps done. `state` (a progress.Progress) restores a saved state first, then
    saves every few minutes and when cut short by `deadline`."""
    import torch

    modules = torch.nn.ModuleList(models)
    params = list(modules.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.lr)
    averaged = None
    if spec.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(modules, multi_avg_fn=get_ema_multi_avg_fn(spec.ema), use_buffers=True)
    start = state.load_denoiser(modules, averaged, optimizer, rng) if state else 0
    meter = _Meter(log, start, spec.unet_steps, name)
    step = start - 1
    for step in range(start, spec.unet_steps):
        _cosine(optimizer, spec.lr, step / spec.unet_steps)
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if averaged is not None:
            averaged.update_parameters(modules)
        meter.add(step, loss.item())
        cut = time.time() > deadline
        if state and step + 1 < spec.unet_steps:
            state.save_denoiser(step + 1, modules, averaged, optimizer, rng, force=cut)
        if cut:
            log(f"{name}: stopped by the time limit after {step + 1} of {spec.unet_steps} steps")
            break
    if averaged is not None:
        modules = averaged.module
    return list(modules), step + 1


class _Meter:
    """Progress lines for a long run: step, mean loss since the last line, steps/s and time left."""

    def __init__(self, log, start: int, total: int, name: str):
        self.log, self.start, self.total, self.name, self.losses = log, start, total, name, []
        self.every = max(1, min(100, total // 20))
        self.began = time.time()

    def add(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every and step + 1 != self.total and step != self.start:
            return
        rate = (step + 1 - self.start) / max(time.time() - self.began, 1e-9)
        left = (self.total - step - 1) / rate
        mean = sum(self.losses) / len(self.losses)
        self.log(
            f"{self.name} step {step + 1}/{self.total}: loss {mean:.4f}, {rate:.2f} steps/s, "
            f"{time.time() - self.began:.0f} s, about {left / 60:.0f} min left"
        )
        self.losses = []


def _cosine(optimizer, peak: float, done: float) -> None:
    """Linear warm-up over the first 2%, then cosine decay (`done`: the share of steps done, 0 -> 1)."""
    import math

    for group in optimizer.param_groups:
        warm = min(1.0, done / 0.02)
        group["lr"] = peak * warm * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build (or find) the identity benchmark's base model.")
    parser.add_argument("--out", type=Path, help="build into this folder (default: the cache folder)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny spec")
    parser.add_argument("--max-seconds", type=float, default=0, help="cut the UNet's training short (0: never)")
    parser.add_argument("--continue-from", type=Path, help="train this saved base's UNet further (needs --out)")
    parser.add_argument("--steps", type=int, default=1000, help="--continue-from: steps")
    parser.add_argument("--lr", type=float, default=3e-4, help="--continue-from: peak learning rate")
    parser.add_argument("--batch", type=int, default=64, help="--continue-from: batch size")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1 on a shared 2-core machine)")
    args = parser.parse_args(argv)
    if args.continue_from:
        if not args.out:
            parser.error("--continue-from needs --out")
        from sdlora.fsutil import atomic_dir

        with atomic_dir(args.out) as tmp:
            continue_base(args.continue_from, tmp, args.steps, args.lr, args.batch, max_seconds=args.max_seconds)
        print(args.out)
        return
    spec = TINY if args.tiny else BaseSpec()
    print(ensure_base(spec, args.out, max_seconds=args.max_seconds, threads=args.threads))


if __name__ == "__main__":
    main()
