"""`sdlora train`: one LoRA of the person in a dataset, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlora.cli.core import ConfigOpt, QuantizeOpt, SetOpt, app, handles_errors, load_config
from sdlora.options import TRAIN_OPTIONS, settings_of


@app.command()
@handles_errors
def train(
    ctx: typer.Context,
    dataset_dir: Annotated[Path, typer.Argument(help="What `sdlora prep` wrote, or a folder of images (+ .txt).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder: LoRA files, checkpoints, samples, metrics.")],
    base: Annotated[str | None, typer.Option("--base", help="Base model: hub id, diffusers folder or file.")] = None,
    config_file: ConfigOpt = None,
    name: Annotated[str | None, typer.Option(help="Name of the kohya file [default: OUT_DIR's name].")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimisation steps [default: 800].")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training resolution, divisible by 8 [default: 512].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per device per micro-batch [default: 1].")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimisation step [default: 1].")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="UNet LoRA learning rate [default: 1e-4].")] = None,
    text_encoder_lr: Annotated[
        float | None, typer.Option(help="Text-encoder LoRA learning rate [default: 5e-5].")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank [default: 16].")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha [default: 16].")] = None,
    train_text_encoder: Annotated[
        bool | None,
        typer.Option(
            "--train-text-encoder/--no-train-text-encoder",
            help="Also train the text encoder [default: no-train-text-encoder].",
        ),
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter type: lora|dora|lokr [default: lora].")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="auto|no|fp16|bf16 [default: auto].")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw|adamw8bit|prodigy [default: adamw].")] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Save memory [default: no-gradient-checkpointing].",
        ),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the UNet: minutes of compiling in the first step (reported), then faster steps on "
            "a GPU (docs/benchmarks.md) [default: no-compile].",
        ),
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps; 0 disables [default: 200].")
    ] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help="Keep the newest N checkpoints [default: 3].")] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint folder.")] = None,
    class_prompt: Annotated[str | None, typer.Option(help="Prior preservation: generate class images.")] = None,
    num_class_images: Annotated[int | None, typer.Option(help="Class images to use [default: 100].")] = None,
    prior_loss_weight: Annotated[float | None, typer.Option(help="Weight of the prior loss [default: 1.0].")] = None,
    class_dir: Annotated[Path | None, typer.Option(help="Prior preservation: ready class images.")] = None,
    preservation: Annotated[
        str | None,
        typer.Option(
            help="none | class_images (--class-prompt/--class-dir) | output (base's prediction on the caption "
            "without the trigger, no class images) | auto: class_images with pivotal tuning, else output "
            "[default: auto].",
        ),
    ] = None,
    sample_every: Annotated[
        int | None, typer.Option(help="Sample grids every N steps; 0 disables [default: 200].")
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help="Score identity every N steps and keep the best step's LoRA in OUT_DIR/best; 0 disables "
            "[default: at each checkpoint for a prep dataset].",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of data order, noise and LoRA init [default: 0].")] = None,
    allow_pickle: Annotated[bool | None, typer.Option("--allow-pickle", help="Allow .ckpt/.pt/.bin bases.")] = None,
    allow_distilled: Annotated[
        bool | None, typer.Option("--allow-distilled", help="Train on a distilled base (Z-Image-Turbo) as it is.")
    ] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace a run already in OUT_DIR.")] = None,
    pivotal: Annotated[
        bool | None,
        typer.Option(
            "--pivotal/--no-pivotal",
            help="Pivotal tuning: new trigger tokens train too [default: on for SD 1.x/2.x/SDXL, off for Flux.1].",
        ),
    ] = None,
    control_dir: Annotated[Path | None, typer.Option(help="Edit models: control images named as the images.")] = None,
    quantize: QuantizeOpt = None,
    offload_blocks: Annotated[int | None, typer.Option(help="Blocks kept in CPU RAM, 0 = none [default: 0].")] = None,
    sets: SetOpt = None,
) -> None:
    """Train a LoRA of the person in DATASET_DIR on the base model; resumable, loadable in diffusers and UIs."""
    from sdlora.train import train as run_training

    options = settings_of(locals(), TRAIN_OPTIONS)
    result = run_training(load_config(config_file, options, sets), dataset_dir, out_dir)
    typer.echo(f"done: {result.lora_file} and {result.kohya_file} ({result.steps} steps)")
