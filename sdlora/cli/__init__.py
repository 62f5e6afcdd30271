"""The command line: parse options, build the config, call one library function, map errors to exit codes.

`core` holds the Typer app, the error boundary, the options commands share and the small commands (env, config,
prep); each other module adds its commands to the app when imported, in the order `sdlora --help` lists them.
This package is the only one that imports typer and the only one that exits.
"""

from sdlora.cli.core import app

# isort: off
from sdlora.cli import generate, train, evaluate, shell  # noqa: F401 - each registers its commands on the app
# isort: on

__all__ = ["app"]
