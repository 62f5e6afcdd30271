"""Robustness figures: hostile and careless inputs, interruptions, and whether anything of the user's was lost.

    PYTHONPATH=$PWD python bench/robustness.py [--quick] [--only CLASS_OR_WORDS] [--json out.json]

Runs every case group in bench/robust/ (each a module with `cases(work, quick)`), then prints: inputs tried,
handled with the expected outcome, tracebacks (must be 0), hangs (must be 0), user files modified (must be 0),
and the interruption trials. `--quick` is the subset CI runs; `--only serve` runs only the inputs group's kinds of
that class (or whose name holds those words, e.g. `--only "generate --out"`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import robust  # noqa: E402


def groups() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(robust.__path__) if not m.name.startswith("_"))


def run(quick: bool, only: str | None = None) -> list[robust.Case]:
    """Every group's cases; with `only`, just the inputs group's kinds of that class or name."""
    results: list[robust.Case] = []
    for name in ["inputs"] if only else groups():
        module = importlib.import_module(f"bench.robust.{name}")
        with tempfile.TemporaryDirectory(prefix=f"sdlora-robust-{name}-") as work:
            results += module.cases(Path(work), quick=quick, **({"only": only} if only else {}))
    return results


def summary(results: list[robust.Case]) -> dict[str, int]:
    return {
        "inputs tried": len(results),
        "handled as expected": sum(case.ok for case in results),
        "tracebacks": sum(case.traceback for case in results),
        "hangs": sum(case.hung for case in results),
        "user files modified": sum(case.user_files_modified for case in results),
        "interruption trials": sum(case.group == "interrupt" for case in results),
        "resumed equal to uninterrupted": sum(case.group == "interrupt" and case.ok for case in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the fast subset (what CI runs)")
    parser.add_argument(
        "--only",
        metavar="CLASS_OR_WORDS",
        help="only the inputs kinds of this class (serve, outputs, models, ...) or whose name holds these words",
    )
    parser.add_argument("--json", type=Path, help="write every case and the summary here")
    opts = parser.parse_args()
    results = run(opts.quick, opts.only)
    for case in results:
        mark = "ok  " if case.ok else "FAIL"
        print(f"{mark} [{case.group}] {case.name}: {case.detail}")
    figures = summary(results)
    print()
    for key, value in figures.items():
        print(f"{key:>22}: {value}")
    if opts.json:
        opts.json.write_text(json.dumps({"summary": figures, "cases": [c.to_dict() for c in results]}, indent=2))
    bad = figures["tracebacks"] or figures["hangs"] or figures["user files modified"]
    return 1 if bad or figures["handled as expected"] < figures["inputs tried"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
