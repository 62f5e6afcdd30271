"""`sdlora demo` and `sdlora serve`: the whole workflow on a toy world, and as a local web app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlora.cli.core import SetOpt, app, handles_errors


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
