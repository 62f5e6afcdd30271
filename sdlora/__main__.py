"""`python -m sdlora` runs the CLI (used by subprocess tests and `accelerate launch -m sdlora`)."""

from sdlora.cli import app

app(prog_name="sdlora")
