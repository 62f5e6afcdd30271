"""The command line's core: the Typer app, the one error boundary, the options every command shares, and the
small commands (env, config, prep). The other commands live beside it, one module per concern.

The cli package is the only one that imports typer and the only one that exits. Heavy libraries (torch,
diffusers) are imported inside commands so that `sdlora --help` stays instant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sdlora import __version__
from sdlora.errors import last_words
from sdlora.options import PREP_OPTIONS, settings_of
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
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the boundary: every failure becomes one line
            message, code = last_words(exc, debug)
            typer.echo(message, err=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


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
    captions: Annotated[
        str | None,
        typer.Option(
            help="template|vlm|keep: the template, a vision-language model's captions, or each photo's IMG.txt "
            "[default: template]."
        ),
    ] = None,
    captioner: Annotated[
        str | None,
        typer.Option(
            help="With --captions vlm: hub id or folder of a vision-language model "
            "[default: HuggingFaceTB/SmolVLM-Instruct]."
        ),
    ] = None,
    config_file: ConfigOpt = None,
    sets: SetOpt = None,
) -> None:
    """Turn a folder of photos into a clean, face-centred training set, explaining every photo it drops."""
    from sdlora.prep.run import prep as run_prep

    options = settings_of(locals(), PREP_OPTIONS)
    report = run_prep(photos_dir, out_dir, load_config(config_file, options, sets))
    typer.echo(report.summary())
    typer.echo(f"wrote {out_dir}/manifest.jsonl, report.json and contact_sheet.jpg")
