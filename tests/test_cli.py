"""The CLI shell: version, help without heavy imports, env, config precedence and one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import tomllib
from typer.testing import CliRunner

from sdlora import __version__
from sdlora import options as option_tables
from sdlora.cli import app
from sdlora.config import Config

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"sdlora {__version__}"


COMMANDS = ("prep", "train", "generate", "eval", "compare", "demo", "config", "env")


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in result.output, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: sdlora {command}" in " ".join(result.output.split())
    assert "--help" in result.output


def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from sdlora.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_env_reports_versions_and_device():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    for key in (
        "python",
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "device",
        "bitsandbytes 8-bit optimizers",
        "hf cache",
        "hf offline",
    ):
        assert f"- {key}: " in result.output
    assert "- hf offline: yes" in result.output  # conftest sets HF_HUB_OFFLINE=1


def test_config_precedence_through_cli(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nsteps = 10\nseed = 4\n")
    result = runner.invoke(app, ["config", "--config", str(toml), "--set", "train.steps=12"])
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.output)
    assert data["train"]["steps"] == 12 and data["train"]["seed"] == 4 and data["train"]["batch_size"] == 1


def test_unknown_key_is_one_line_usage_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlerning_rate = 1e-4\n")
    result = runner.invoke(app, ["config", "--config", str(toml)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "did you mean 'train.learning_rate'" in lines[0]
    assert "Traceback" not in result.output


def test_missing_config_file_and_debug_traceback(tmp_path):
    missing = tmp_path / "nope.toml"
    result = runner.invoke(app, ["config", "--config", str(missing)])
    assert result.exit_code == 2 and "nope.toml: config file not found" in result.stderr
    result = runner.invoke(app, ["--debug", "config", "--config", str(missing)])
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "sdlora", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"sdlora {__version__}"


# --help, as a user's terminal shows it: every help text whole (square brackets included: rich markup once took
# `[lora]` and `"sdlora[ui]"` for style tags and dropped them), and every option's default.

TABLES = {
    "prep": option_tables.PREP_OPTIONS,
    "generate": option_tables.GENERATE_OPTIONS,
    "train": option_tables.TRAIN_OPTIONS,
    "eval": option_tables.EVAL_OPTIONS,
}
# Options whose setting is unset by default but whose help says what happens then, as [default: ...].
DESCRIBED = {
    ("train", "name"),
    ("train", "eval_every"),
    ("train", "pivotal"),
    ("eval", "threshold"),
    ("generate", "size"),  # the base's own size unless set (generate.render.native_size)
    ("demo", "base"),
    ("demo", "steps"),
}


def _help_output(*command: str) -> str:
    """The real program's --help on a wide terminal (no wrapping)."""
    env = {**os.environ, "COLUMNS": "400", "TERM": "xterm-256color"}
    out = subprocess.run(
        [sys.executable, "-m", "sdlora", *command, "--help"], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout


def _words(text: str) -> str:
    """`text` without whitespace: the help wraps at the terminal's width, after a space or a hyphen."""
    return "".join(text.split())


def _entries(output: str) -> dict[str, str]:
    """{option name: its whole entry} of the Options section, each name of an entry (-c, --config) a key."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in output.split("Options:", 1)[-1].splitlines():
        if re.match(r"^\s{1,4}-", line):
            current = [line]
            names = re.split(r"\s{2,}", line.strip())[0]
            for name in re.findall(r"(?<![\w-])--?[\w-]+", names):
                entries[name] = line
        elif current and line.strip():
            entries.update({k: v + "\n" + line for k, v in entries.items() if v.startswith(current[0])})
    return {name: _words(entry) for name, entry in entries.items()}


def _config_default(key: str):
    section, field = key.split(".")
    return getattr(getattr(Config(), section), field)


def _shown_default(entry: str) -> str | None:
    """The first value of the entry's [default: ...] ('30' of '[default: 30; Flux.1: 28 dev, 4 schnell]')."""
    found = re.search(r"\[default:([^\];]*)", entry)
    return found.group(1).strip() if found else None


def _check_default(command: str, param, entry: str) -> str | None:
    """What is wrong with `param`'s default in `entry`, or None."""
    import click

    key = TABLES.get(command, {}).get(param.name)
    default = _config_default(key) if key else param.default
    shown = _shown_default(entry)
    if (command, param.name) in DESCRIBED:
        return None if shown else "says no [default: ...]"
    if default is None or default in ("", []) or (param.is_flag and not param.secondary_opts and not default):
        return None  # nothing set: nothing to show (a plain flag is off)
    if shown is None:
        return f"hides its default {default!r}"
    if isinstance(default, bool):
        name = (param.opts if default else param.secondary_opts)[0].lstrip("-")
        return None if shown == name else f"shows {shown!r}, the default is {name!r}"
    if isinstance(default, int | float):
        return None if float(shown) == default else f"shows {shown!r}, the default is {default!r}"
    assert not isinstance(default, click.Parameter)
    return None if shown == _words(str(default)) else f"shows {shown!r}, the default is {default!r}"


def _commands():
    import typer.main

    return typer.main.get_command(app).commands


@pytest.mark.parametrize("command", ["env", "config", "prep", "generate", "train", "eval", "compare", "demo", "serve"])
def test_help_shows_every_text_whole_and_every_default(command):
    cmd = _commands()[command]
    output = _help_output(command)
    words = _words(output)
    assert _words(cmd.help) in words, f"{command}'s description is cut:\n{output}"
    entries = _entries(output)
    problems = []
    for param in cmd.params:
        if param.param_type_name == "argument":
            if _words(param.help) not in words:
                problems.append(f"{param.name}: help text cut")
            continue
        entry = entries.get(param.opts[0])
        if param.help and _words(param.help) not in (entry or words):
            problems.append(f"{param.opts[0]}: help text cut to {entry or words!r}")
        if entry is None:
            problems.append(f"{param.opts[0]}: not listed under Options:")
            continue
        problem = _check_default(command, param, entry)
        if problem:
            problems.append(f"{param.opts[0]}: {problem}: {entry!r}")
    assert not problems, f"sdlora {command} --help:\n" + "\n".join(problems)


def test_top_level_help_shows_each_command_whole():
    words = _words(_help_output())
    assert _words('pip install "sdlora[ui]"') in words
    for name, cmd in _commands().items():
        assert _words(cmd.get_short_help_str(limit=1000)) in words, name


def test_help_check_catches_a_lost_default():
    """The checker itself: an entry without its [default: ...] or with a wrong one is reported."""
    train = {p.name: p for p in _commands()["train"].params}
    assert _check_default("train", train["adapter"], "--adapter <str> Adapter type: lora|dora|lokr .")
    assert _check_default("train", train["steps"], "--steps <int> Optimisation steps [default: 80].")
    assert _check_default("train", train["compile"], "--compile / --no-compile x [default: compile]")
    assert _check_default("train", train["lr"], "--lr <float> UNet LoRA learning rate [default: 1e-4].") is None
