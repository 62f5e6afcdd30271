"""Refactors change no behaviour: fixed-seed train/generate runs give the LoRA tensors and pixels recorded in
tests/data/golden.json (recorded with `python tests/golden.py --record` on the code before the family refactor).

If this fails after a change that is *meant* to change outputs, say so in the commit and re-record; a refactor
must never need that.
"""

from __future__ import annotations

import json

import pytest
from golden import GOLDEN_FILE, SCENARIOS, machine, run_pinned

RECORDED = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_outputs_match_the_recorded_hashes(name):
    hashes = run_pinned(name)  # in a fresh process with CPU-independent kernels (golden.PINNED_ENV)
    expected = RECORDED[name]
    assert sorted(hashes) == sorted(expected), "a different set of outputs was written"
    changed = [key for key in expected if hashes[key] != expected[key]]
    where = f"recorded on {RECORDED.get('_recorded_on')}, run on {machine()}"
    assert not changed, f"{name}: outputs differ from the recorded golden run ({where}): {changed}"
