"""Packaging: the Dockerfile installs the pins of pyproject.toml and passes hadolint; atomic writes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def test_dockerfile_pins_match_pyproject():
    dockerfile = (ROOT / "Dockerfile").read_text()
    reqs = _pyproject_requirements()
    pins = re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+-]*)", dockerfile)
    assert pins, "the Dockerfile pins torch"
    for name, version in pins:
        if name.lower() in reqs:
            assert reqs[name.lower()].specifier.contains(version), f"{name}=={version} is outside pyproject's range"
    assert "torch" in {n.lower() for n, _ in pins}
    # The project itself (and so every other pin) comes from pyproject.toml.
    assert "COPY pyproject.toml" in dockerfile and "pip install /src" in dockerfile
    assert 'ENTRYPOINT ["sdlora"]' in dockerfile and "HF_HOME=/models" in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, re.M), "the image runs as a non-root user"


def test_hadolint_passes():
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's, even when it is not activated
    exe = shutil.which("hadolint") or (str(beside_python) if beside_python.is_file() else None)
    if exe is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]')")
    result = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_opens_with_two_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[0].startswith("# run the demo\n") and blocks[1].startswith("# run the tests\n")
    assert "pytest" in blocks[1]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from sdlora.fsutil import atomic_path, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
