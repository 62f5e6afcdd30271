"""The CLI shell: version, help without heavy imports, env, config precedence and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib
from typer.testing import CliRunner

from sdlora import __version__
from sdlora.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"sdlora {__version__}"


COMMANDS = ("prep", "train", "generate", "eval", "demo", "config", "env")


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
