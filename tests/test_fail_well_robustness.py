"""The CI subset of `bench/robustness.py --quick`'s inputs group: every kind of bad input is handled with its
expected outcome, with no traceback, no hang and no file of the user's modified."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quick_inputs_group(tmp_path):
    from bench.robust import inputs

    results = inputs.cases(tmp_path, quick=True)
    classes = {case.extra["class"] for case in results}
    assert len(results) >= 30
    assert classes >= {"disk", "models", "names", "images", "reads", "numbers", "messages", "duplicates", "fuzz"}
    assert classes >= {"outputs", "serve"}  # issue 28: generate/demo output folders, serve's port and downloads
    assert sum(case.traceback for case in results) == 0, [c.name for c in results if c.traceback]
    assert sum(case.hung for case in results) == 0
    assert sum(case.user_files_modified for case in results) == 0
    failed = [f"{case.name}: {case.detail}" for case in results if not case.ok]
    assert not failed, failed


def test_only_picks_the_kinds_of_one_class(tmp_path):
    from bench.robust import inputs

    results = inputs.cases(tmp_path, quick=True, only="serve")
    assert [case.extra["class"] for case in results] == ["serve"] * 3
    assert all(case.ok for case in results), [f"{case.name}: {case.detail}" for case in results if not case.ok]
