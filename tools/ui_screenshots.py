"""Regenerate the README's screenshots of `sdlora serve` (docs/ui/*.png): `python tools/ui_screenshots.py`.

The browser test clicks through the whole workflow on the tiny model and, told `--screenshots docs/ui`, saves one
screenshot per step there. Plain test runs take none and never touch these files. Needs /usr/bin/chromium
(apt-get install chromium) and the ui extra; extra arguments go to pytest (e.g. -x).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    command = [sys.executable, "-m", "pytest", "tests/test_serve_browser.py", "-k", "test_click_through_the_workflow"]
    command += ["-p", "no:cacheprovider", "-q", "--screenshots", str(ROOT / "docs" / "ui"), *argv]
    return subprocess.call(command, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
