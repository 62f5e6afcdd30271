"""Refactors change no behaviour: fixed-seed train/generate runs give the LoRA tensors and pixels recorded in
tests/data/golden.json (recorded with `python tests/golden.py --record` on the code before the family refactor).

If this fails after a change that is *meant* to change outputs, say so in the commit and re-record; a refactor
must never need that.
"""

from __future__ import annotations

import pytest
from golden import SCENARIOS, cpu_make, machine, recorded, run_pinned


def test_recordings_are_chosen_by_the_cpus_make():
    assert cpu_make("AMD EPYC 9B14") == "AMD" and cpu_make("Intel(R) Xeon(R) Processor") == "Intel"
    assert cpu_make("Apple M3") == "Apple M3"  # an unknown make has no recording: the golden test says so


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_outputs_match_the_recorded_hashes(name):
    recording = recorded()
    assert recording, f"no golden recording for this CPU's make ({machine()}): record one from known-good code"
    hashes = run_pinned(name)  # in a fresh process with CPU-independent kernels (golden.PINNED_ENV)
    expected = recording[name]
    assert sorted(hashes) == sorted(expected), "a different set of outputs was written"
    changed = [key for key in expected if hashes[key] != expected[key]]
    where = f"recorded on {recording.get('_recorded_on')}, run on {machine()}"
    assert not changed, f"{name}: outputs differ from the recorded golden run ({where}): {changed}"
