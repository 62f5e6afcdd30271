"""`sdlora generate`: images with a LoRA, reference photos or a hosted engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlora.cli.core import ConfigOpt, QuantizeOpt, SetOpt, app, handles_errors, load_config
from sdlora.options import GENERATE_OPTIONS, settings_of


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
    reference: Annotated[list[Path] | None, typer.Option(help="Photos of the person (repeat) or a dataset.")] = None,
    allow_pickle: Annotated[
        bool | None, typer.Option("--allow-pickle", help="Allow pickle (.ckpt/.bin) base models.")
    ] = None,
    quantize: QuantizeOpt = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
    engine: Annotated[str, typer.Option(help="local | openai (uploads --reference photos to an image API)")] = "local",
    api_model: Annotated[str | None, typer.Option(help="--engine openai's model [default: gpt-image-1].")] = None,
) -> None:
    """Render images from a base model plus LoRAs, with A1111-readable settings in every PNG."""
    from sdlora.errors import UsageError
    from sdlora.generate import generate as run_generate
    from sdlora.generate import read_prompts

    if prompt is not None and prompts is not None:
        raise UsageError("can't give both --prompt and --prompts; choose one")
    prompt_list = [prompt] if prompt is not None else read_prompts(prompts) if prompts is not None else None
    options = settings_of(locals(), GENERATE_OPTIONS)
    paths = run_generate(load_config(config_file, options, sets), out, engine=engine)
    typer.echo(f"wrote {len(paths)} image(s) to {out}")
