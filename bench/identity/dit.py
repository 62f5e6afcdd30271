"""The toy world's base on a flow-matching transformer: a small Z-Image (`ZImagePipeline`) trained from scratch.

Same world, captions, held-out subjects, pool of renders and resumable step-budgeted loop as the UNet base
(`base.py`: `train_loop`, `progress.py`); what differs is the model and the objective:
- the VAE is the UNet base's kind (4x downsampling, 4 channels: 64 px renders -> (4, 16, 16) latents), trained the
  same way or taken from an existing base folder (`vae_from`: the UNet base's, so both bases read the same latents),
  with a shift and a scale so that the latents reach the transformer centred at unit variance;
- the denoiser is a `ZImageTransformer2DModel` (2x2 patches: 64 tokens per image), the text encoder a small Qwen3
  behind the offline byte-level Qwen tokenizer, encoded as sdlora's Z-Image family encodes prompts (chat template,
  second-to-last layer);
- rectified flow, the family's own objective (sdlora.objectives.FlowMatching: shift scheme at the scheduler's
  shift): x_t = (1 - s) x0 + s eps, velocity target eps - x0, through the family's `predict`.

    python -m bench.identity.dit --out DIT --threads 2 --max-seconds 9000 [--vae-from BASE3]   # again: continues
    python -m bench.identity --base DIT --base-only --seeds 64 --out OUT                      # VAE and validity
    python -m bench.identity.dit --continue-from DIT --out DIT2 --steps 1500 --lr 3e-4        # a cut build's cooldown

A cut build continues (`--continue-from`) as the UNet base's does: its saved weights (the moving average) trained
`--steps` more with a cosine from `--lr` to zero on the same pool, the VAE kept; resumable like a build (the state
beside the new folder), and listed under "continued" in identity_base.json.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.identity import base, progress

SEQUENCE = 128  # Qwen tokens per caption in training (the longest caption is ~115; causal: padding changes nothing)


@dataclass(frozen=True)
class DitSpec:
    """Sizes and budgets of one DiT base (field names as BaseSpec's where they mean the same)."""

    vae_steps: int = 3000
    unet_steps: int = 10000  # the transformer's steps (the name the shared loop and progress files use)
    batch: int = 64
    vae_batch: int = 32
    pool: int = 20000
    vae_channels: tuple[int, ...] = (16, 32, 32)
    dim: int = 128
    layers: int = 4
    refiner_layers: int = 1
    heads: int = 4
    text_width: int = 64
    text_layers: int = 3  # Z-Image reads the second-to-last: the last layer is never used
    lr: float = 5e-4
    vae_lr: float = 1e-3  # the UNet base's VAE rate
    ema: float = 0.999
    seed: int = 0
    held_out: int = 3
    shift: float = 3.0  # the scheduler's static shift (training and sampling)
    kind: str = "zimage"


TINY = DitSpec(vae_steps=4, unet_steps=4, batch=4, vae_batch=2, pool=16, dim=32, layers=1, heads=2, ema=0.9)


def build_transformer(spec: DitSpec):
    from diffusers import ZImageTransformer2DModel

    head = spec.dim // spec.heads
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=spec.dim,
        n_layers=spec.layers,
        n_refiner_layers=spec.refiner_layers,
        n_heads=spec.heads,
        n_kv_heads=spec.heads,
        cap_feat_dim=spec.text_width,
        axes_dims=[head // 2, head // 4, head // 4],
        axes_lens=[1024, 64, 64],
    )


def build_text_encoder(spec: DitSpec, tokenizer):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_width,
            intermediate_size=2 * spec.text_width,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=spec.text_width // 4,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _vae(spec: DitSpec, pixels, state: progress.Progress, vae_from: Path | None, log):
    """The VAE: a cut build's, else `vae_from`'s (a base folder), else trained here (and saved for a resume)."""
    vae = state.load_vae()
    if vae is not None:
        return vae.to(pixels.device)
    if vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").to(pixels.device).eval().requires_grad_(False)
        log(f"vae: from {vae_from}")
    else:
        vae = base.train_vae(replace(spec, lr=spec.vae_lr), pixels, log)
    state.save_vae(vae)
    return vae


def train_dit(
    spec: DitSpec, out: Path, log=print, max_seconds: float = 0, state=None, threads: int = 1, vae_from=None, init=None
):
    """Train (or take) the VAE, then the transformer and Qwen3 on cached latents; save a ZImagePipeline folder to
    `out` with identity_base.json. True when every step of the spec is done. `init`: a saved DiT base folder whose
    transformer, Qwen3 and VAE train on (`spec.unet_steps` more at `spec.lr`) instead of new ones."""
    import torch
    from diffusers import ZImagePipeline

    from sdlora.families.offline_text import qwen_tokenizer
    from sdlora.families.zimage.family import ZIMAGE
    from sdlora.families.zimage.tiny import zimage_scheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    earlier = json.loads((Path(init) / "identity_base.json").read_text()) if init else None
    torch.manual_seed(spec.seed + (len(earlier.get("continued", [])) + 1 if earlier else 0))
    if device == "cpu":
        torch.set_num_threads(threads)
    state = state or progress.Progress(None, asdict(spec), log)
    started = time.time()
    rng = random.Random(spec.seed)
    pool, pixels = base._pool(spec, rng, device)
    vae = _vae(spec, pixels, state, init or vae_from, log)
    means = base._latents(vae, pixels)
    shift, scale = float(means.mean()), float(1 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = ZIMAGE.normalize_latents(vae, means)
    tokenizer = qwen_tokenizer()
    if init:
        saved = ZImagePipeline.from_pretrained(init)
        transformer, text_encoder = (
            m.to(device).train().requires_grad_(True) for m in (saved.transformer, saved.text_encoder)
        )
    else:
        transformer = build_transformer(spec).to(device)
        text_encoder = build_text_encoder(spec, tokenizer).to(device)
    sched = zimage_scheduler()
    sched.register_to_config(shift=spec.shift)
    objective = ZIMAGE.objective(sched, device)

    def step_loss():
        index = torch.randint(len(pool), (spec.batch,))
        x0 = latents[index.to(device)]
        prompts = ["" if rng.random() < 0.1 else base.caption(pool[int(i)], rng) for i in index]
        cond = ZIMAGE.encode_prompts([tokenizer], [text_encoder], prompts, SEQUENCE)
        sigmas = objective.sample_timesteps(spec.batch, torch.default_generator).to(device)
        noise = torch.randn_like(x0)
        velocity = ZIMAGE.predict(transformer, objective.noisy(x0, noise, sigmas), sigmas, cond, None)
        return torch.nn.functional.mse_loss(velocity.float(), objective.target(x0, noise, sigmas).float())

    deadline = started + max_seconds if max_seconds else float("inf")
    models, steps = base.train_loop(spec, [transformer, text_encoder], step_loss, rng, log, deadline, state, "dit")
    pipe = ZImagePipeline(
        scheduler=sched, vae=vae, text_encoder=models[1].eval(), tokenizer=tokenizer, transformer=models[0].eval()
    )
    pipe.to("cpu", torch.float32).save_pretrained(out, safe_serialization=True)
    if earlier:  # a continuation: the build's record, its steps counted on and this run listed
        record = earlier | {"unet_steps_done": earlier["unet_steps_done"] + steps}
        run = {"from": str(init), "steps": spec.unet_steps, "lr": spec.lr, "steps_done": steps}
        run |= {"device": base._device_name(device), "seconds": round(time.time() - started, 1)}
        record["continued"] = [*earlier.get("continued", []), run]
    else:
        record = {"spec": asdict(spec), "vae_scale": scale, "vae_shift": shift, "unet_steps_done": steps}
        record |= {"device": base._device_name(device), "vae_from": str(vae_from) if vae_from else None}
        record["build_seconds"] = round(time.time() - started, 1)
    (out / "identity_base.json").write_text(json.dumps(record, indent=2) + "\n")
    return steps == spec.unet_steps


def ensure_dit(spec: DitSpec, folder: Path, log=print, max_seconds: float = 0, threads: int = 1, vae_from=None):
    """Build the DiT base into `folder`, or continue a build of it that was cut short (its state beside it)."""
    train = lambda tmp, state: train_dit(spec, tmp, log, max_seconds, state, threads, vae_from)  # noqa: E731
    return base.build_resumable(Path(folder), asdict(spec), log, train)


def continue_dit(src: Path, folder: Path, steps: int, lr: float, log=print, max_seconds: float = 0, threads: int = 1):
    """Train the saved DiT base `src` `steps` more (cosine from `lr` to 0) into `folder`; cut short, the same call
    continues it (its state beside `folder`, saved for this source and these budgets only)."""
    record = json.loads((Path(src) / "identity_base.json").read_text())
    spec = replace(DitSpec(**base.spec_fields(record["spec"])), unet_steps=steps, lr=lr)
    train = lambda tmp, state: train_dit(spec, tmp, log, max_seconds, state, threads, init=src)  # noqa: E731
    return base.build_resumable(Path(folder), asdict(spec) | {"continue_from": str(Path(src).resolve())}, log, train)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the identity benchmark's DiT (Z-Image) base model.")
    parser.add_argument("--out", type=Path, required=True, help="build into this folder (again: continue it)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny spec")
    parser.add_argument("--steps", type=int, help="the transformer's steps (default: the spec's 10,000)")
    parser.add_argument("--max-seconds", type=float, default=0, help="cut the training short (0: never)")
    parser.add_argument("--vae-from", type=Path, help="take the VAE of this base folder instead of training one")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--continue-from", type=Path, help="train this saved DiT base further (--steps, --lr)")
    parser.add_argument("--lr", type=float, default=3e-4, help="--continue-from: peak learning rate")
    args = parser.parse_args(argv)
    if args.continue_from:
        steps = args.steps or 1000
        print(
            continue_dit(
                args.continue_from, args.out, steps, args.lr, max_seconds=args.max_seconds, threads=args.threads
            )
        )
        return
    spec = TINY if args.tiny else DitSpec()
    if args.steps:
        spec = replace(spec, unet_steps=args.steps)
    print(ensure_dit(spec, args.out, max_seconds=args.max_seconds, threads=args.threads, vae_from=args.vae_from))


if __name__ == "__main__":
    main()
