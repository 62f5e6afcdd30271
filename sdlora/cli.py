"""The command line: parse options, build the config, call one library function, map errors to exit codes.

This is the only module that imports typer and the only one that exits. Heavy libraries (torch, diffusers)
are imported inside commands so that `sdlora --help` stays instant.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sdlora import __version__
from sdlora.errors import BUG, Interrupted, SdloraError, describe, printable
from sdlora.options import EVAL_OPTIONS, GENERATE_OPTIONS, PREP_OPTIONS, TRAIN_OPTIONS, settings_of
from sdlora.quiet import quiet_libraries

app = typer.Typer(
    name="sdlora",
    help="Teach Stable Diffusion one person's face from a handful of photos, and measure whether it learned it.",
    no_args_is_help=True,
    # Plain help: the texts show defaults and choices in square brackets ([default: 800], "sdlora[ui]"), which
    # rich markup (Typer's default where rich is installed) would take for style tags and drop.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    # The terminal's width up to 160 columns (click's own cap is 80, which wraps nearly every option's help).
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 160},
)

F = TypeVar("F", bound=Callable[..., Any])

# Options shared by the commands that read the config.
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (see examples/).", dir_okay=False)
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="none|nf4|int8|fp8: load the frozen UNet/transformer quantized: nf4/int8 with bitsandbytes (QLoRA; "
        "needs a CUDA GPU), fp8 (float8 e4m3 with per-row scales) with torchao (pip install 'sdlora[fp8]') "
        "[default: none].",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any setting: section.key=value (e.g. train.noise_offset=0.05). Repeatable."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdlora {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


def handles_errors(command: F) -> F:
    """The one error boundary: our exceptions, and the failures a user's input or machine causes (full disk,
    read-only folder, damaged model or image files, text that is not UTF-8, out of memory), become one line
    `error: <file>: <what happened>; <what to do>` on stderr with exit 1 (2 for usage). Tracebacks only with --debug;
    an unexpected exception (a bug) says so in one line."""

    @functools.wraps(command)
    def wrapper(ctx: typer.Context, *args: Any, **kwargs: Any) -> Any:
        debug = bool((ctx.obj or {}).get("debug"))
        if not debug:
            quiet_libraries()
        try:
            return command(ctx, *args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Interrupted as exc:  # stopped on request after saving its state: not an error
            if debug:
                traceback.print_exc()
            typer.echo(str(exc), err=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes one line
            if debug:
                traceback.print_exc()
            message, code = _message(exc)
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def _message(exc: Exception) -> tuple[str, int]:
    if isinstance(exc, SdloraError):
        return str(exc), exc.exit_code
    known = describe(exc)
    if known is not None:
        return known
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {printable(first)[:300]}; {BUG}", 1


def load_config(config_file: Path | None, options: dict[str, Any], sets: list[str] | None):
    from sdlora import config

    return config.load(config_file, options, sets or [])


@app.command()
@handles_errors
def env(ctx: typer.Context) -> None:
    """Print versions, device and setup facts, ready to paste into a bug report."""
    from sdlora.env import collect_env

    for key, value in collect_env().items():
        typer.echo(f"- {key}: {value}")


@app.command("config")
@handles_errors
def show_config(ctx: typer.Context, config_file: ConfigOpt = None, sets: SetOpt = None) -> None:
    """Print the resolved config as TOML: defaults < --config FILE < --set. A starting point for your own file."""
    from sdlora.config import to_toml

    typer.echo(to_toml(load_config(config_file, {}, sets)), nl=False)


@app.command()
@handles_errors
def prep(
    ctx: typer.Context,
    photos_dir: Annotated[Path, typer.Argument(help="Folder of photos of one person (read only, never changed).")],
    out_dir: Annotated[Path, typer.Argument(help="Where the training set goes; must be empty unless --overwrite.")],
    token: Annotated[str | None, typer.Option(help="Rare token that names the person [default: sks].")] = None,
    class_word: Annotated[
        str | None, typer.Option(help="Class noun after the token: person, man, woman, ... [default: person].")
    ] = None,
    resolution: Annotated[int | None, typer.Option(help="Side of the square crops in px [default: 512].")] = None,
    crop: Annotated[
        str | None, typer.Option(help="face: centred on the face; center: centre square [default: face].")
    ] = None,
    overwrite: Annotated[bool | None, typer.Option("--overwrite", help="Replace a non-empty OUT_DIR.")] = None,
    buckets: Annotated[
        bool | None, typer.Option("--buckets", help="SDXL aspect-ratio buckets instead of square crops.")
    ] = None,
    min_images: Annotated[
        int | None, typer.Option(help="Fail (exit 1) when fewer photos survive [default: 3].")
    ] = None,
    caption_template: Annotated[
        str | None,
        typer.Option(help="Caption of photos without a .txt sidecar [default: a photo of {token} {class_word}]."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes; 0 = one per CPU core [default: 0].")] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Turn a folder of photos into a clean, face-centred training set, explaining every photo it drops."""
    from sdlora.prep.run import prep as run_prep

    options = settings_of(locals(), PREP_OPTIONS)
    report = run_prep(photos_dir, out_dir, load_config(config_file, options, sets))
    typer.echo(report.summary())
    typer.echo(f"wrote {out_dir}/manifest.jsonl, report.json and contact_sheet.jpg")


@app.command()
@handles_errors
def generate(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the images.", file_okay=False)],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model: hub id, diffusers folder or .safetensors.")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora", help="LoRA: a train OUT_DIR, a diffusers or kohya .safetensors, with :SCALE. Repeatable."
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="The prompt; {trigger} becomes the LoRA's trigger.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="File with one prompt per line (# comments).", dir_okay=False)
    ] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="Negative prompt.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Images per prompt [default: 4].")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Images per pipeline call [default: 4].")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Image i uses seed + i [default: 42].")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Denoising steps [default: 30; Flux.1: 28 dev, 4 schnell].")
    ] = None,
    cfg: Annotated[
        float | None, typer.Option("--cfg", help="Guidance scale [default: 7.0; FLUX.1-dev's distilled: 3.5].")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="dpmpp_2m_karras | euler_a | euler | ddim | unipc; flow_euler (Flux.1) "
            "[default: dpmpp_2m_karras; Flux.1: flow_euler].",
        ),
    ] = None,
    size: Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT [default: the base's own size].")] = None,
    fuse: Annotated[
        bool | None, typer.Option("--fuse/--no-fuse", help="Fuse the LoRAs into the weights [default: no-fuse].")
    ] = None,
    compare: Annotated[
        bool | None,
        typer.Option(
            "--compare/--no-compare", help="Also render the base model: DIR/compare.png [default: no-compare]."
        ),
    ] = None,
    keep_face: Annotated[
        Path | None, typer.Option("--keep-face", help="Keep this photo's face, repaint the rest.", dir_okay=False)
    ] = None,
    init_image: Annotated[
        Path | None, typer.Option("--init-image", help="img2img from this photo.", dir_okay=False)
    ] = None,
    strength: Annotated[float | None, typer.Option("--strength", help="img2img strength [default: 0.6].")] = None,
    save_steps: Annotated[
        int | None,
        typer.Option("--save-steps", help="Filmstrip of the x0 prediction every K steps; 0 disables [default: 0]."),
    ] = None,
    refiner: Annotated[str | None, typer.Option("--refiner", help="SDXL refiner model for an img2img pass.")] = None,
    allow_pickle: Annotated[
        bool | None, typer.Option("--allow-pickle", help="Allow pickle (.ckpt/.bin) base models.")
    ] = None,
    quantize: QuantizeOpt = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Render images from a base model plus LoRAs, with A1111-readable settings in every PNG."""
    from sdlora.errors import UsageError
    from sdlora.generate import generate as run_generate
    from sdlora.generate import read_prompts

    if prompt is not None and prompts is not None:
        raise UsageError("can't give both --prompt and --prompts; choose one")
    prompt_list = [prompt] if prompt is not None else read_prompts(prompts) if prompts is not None else None
    options = settings_of(locals(), GENERATE_OPTIONS)
    paths = run_generate(load_config(config_file, options, sets), out)
    typer.echo(f"wrote {len(paths)} image(s) to {out}")


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
    quantize: QuantizeOpt = None,
    sets: SetOpt = None,
) -> None:
    """Train a LoRA of the person in DATASET_DIR on the base model; resumable, loadable in diffusers and UIs."""
    from sdlora.train import train as run_training

    options = settings_of(locals(), TRAIN_OPTIONS)
    result = run_training(load_config(config_file, options, sets), dataset_dir, out_dir)
    typer.echo(f"done: {result.lora_file} and {result.kohya_file} ({result.steps} steps)")


@app.command("eval")
@handles_errors
def eval_command(
    ctx: typer.Context,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="The person's photos: a prep output folder or an image folder.")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Score the images in this folder.")] = None,
    lora: Annotated[
        Path | None, typer.Option("--lora", help="Generate with this LoRA (file or train output folder), then score.")
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Base model for --lora: hub id, folder or file.")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Prompt file ({trigger} per line) instead of the standard set.")
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="Images per prompt [default: 4].")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="First seed; image i uses seed + i [default: 0].")] = None,
    face_model: Annotated[
        str | None,
        typer.Option(
            "--face-model",
            help="dlib (offline) or insightface (ArcFace; only when the package and its buffalo_l weights are "
            "already on disk). insightface's pretrained models are for non-commercial use only [default: dlib].",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", help="Same-person face distance [default: the face model's own, 0.6 for dlib and ArcFace]."
        ),
    ] = None,
    clip: Annotated[
        str | None, typer.Option("--clip", help="CLIP model (hub id or folder) for prompt fidelity; off if unset.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every number to this JSON file.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write an HTML report into this folder.")] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Measure whether the person was learned: face rate, identity, diversity, bleed and prompt fidelity."""
    from sdlora.evaluation.run import evaluate

    options = settings_of(locals(), EVAL_OPTIONS)
    cfg = load_config(config_file, options, sets)
    evaluate(
        cfg, reference=reference, images=images, lora=lora, prompts_file=prompts, json_path=json_out, report_dir=report
    )


@app.command()
@handles_errors
def demo(
    ctx: typer.Context,
    out_dir: Annotated[Path, typer.Argument(help="Empty folder for everything the demo makes.", file_okay=False)],
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="A real base model (hub id, folder, .safetensors) [default: the built-in toy one]."
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps [default: 300 toy, 400 with --base].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo an earlier demo's OUT_DIR.")] = False,
    sets: SetOpt = None,
) -> None:
    """Run prep on built-in photos, then train -> generate -> eval on a toy person it learns (CPU, offline, ~2 min)."""
    from sdlora.demo import demo as run_demo

    result = run_demo(out_dir, base=base, steps=steps, overwrite=overwrite, sets=sets, say=typer.echo)
    typer.echo(f"done: everything is in {result.photos.parent}")


@app.command()
@handles_errors
def serve(
    ctx: typer.Context,
    workspace: Annotated[
        Path, typer.Argument(help="Folder of photos/, datasets/, runs/, images/, models/ (created if missing).")
    ],
    host: Annotated[
        str, typer.Option(help="Interface to bind; anything but the loopback needs --auth or --auth-file.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the web app.")] = 7860,
    auth: Annotated[str | None, typer.Option(help="USER:PASSWORD to log in (visible in the process list).")] = None,
    auth_file: Annotated[
        Path | None, typer.Option(help="File of USER:PASSWORD lines to log in.", dir_okay=False)
    ] = None,
    models: Annotated[
        Path | None, typer.Option(help="A read-only folder of base models outside the workspace.", file_okay=False)
    ] = None,
) -> None:
    """Serve the whole workflow as a local web app (optional extra: pip install "sdlora[ui]")."""
    from sdlora.serve import serve as run_serve

    run_serve(workspace, host=host, port=port, auth=auth, auth_file=auth_file, models=models)
