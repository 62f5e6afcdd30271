"""`sdlora eval` and `sdlora compare`: is the person recognisable, and which route keeps them best."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlora.cli.core import ConfigOpt, SetOpt, app, handles_errors, load_config
from sdlora.options import COMPARE_OPTIONS, EVAL_OPTIONS, settings_of


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
        str | None,
        typer.Option(
            "--clip",
            help="CLIP model (hub id or folder) for prompt fidelity, and to judge the edit prompts with real faces "
            "(editability); off if unset.",
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every number to this JSON file.")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write an HTML report into this folder.")] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Measure whether the person was learned: face rate, identity, diversity, bleed, editability, prompt fidelity."""
    from sdlora.evaluation.run import evaluate

    options = settings_of(locals(), EVAL_OPTIONS)
    cfg = load_config(config_file, options, sets)
    evaluate(
        cfg, reference=reference, images=images, lora=lora, prompts_file=prompts, json_path=json_out, report_dir=report
    )


@app.command("compare")
@handles_errors
def compare_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.html, report.json, routes/.")],
    reference: Annotated[Path | None, typer.Option(help="The person's photos every route is scored against.")] = None,
    route: Annotated[list[str] | None, typer.Option(help="[LABEL:]KIND=VALUE, repeatable (docs/compare.md).")] = None,
    base: Annotated[str | None, typer.Option(help="Base of the rendered routes without ,base=.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file [default: eval's standard set].")] = None,
    n: Annotated[int | None, typer.Option("--seeds", "--n", help="Seeds per prompt [default: 4].")] = None,
    face_model: Annotated[str | None, typer.Option(help="dlib, insightface or toy [default: dlib].")] = None,
    clip: Annotated[str | None, typer.Option(help="CLIP model for prompt fidelity; off if unset.")] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """The same prompts and seeds through several routes to one person, scored and ranked in one HTML report."""
    from sdlora.compare import compare

    cfg = load_config(config_file, settings_of(locals(), COMPARE_OPTIONS), sets)
    compare(cfg, reference, route or [], out, prompts_file=prompts)
