"""Each fuzz harness (fuzz/) runs for a few seconds: seeds from the captures, then mutations.

A harness fails on any exception other than ``ReplayError``, on the compiled core and its pure
twin disagreeing, on an input taking more than 5 s or on memory past 2 GiB; the failing input is
in the message. ``python fuzz/run.py`` runs them longer, ``benchmarks/fuzz_long.py`` for hours.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from fuzz import run as fuzz_run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                reason="atheris is not installed (pip install -e '.[test]')")

SECONDS = float(os.environ.get("REPLAY_FUZZ_SECONDS", "10"))


@pytest.mark.parametrize("name", fuzz_run.HARNESSES)
def test_harness_holds_its_invariants(name, tmp_path):
    r = fuzz_run.run(name, tmp_path, seconds=SECONDS)
    assert r["returncode"] == 0 and not r["artifacts"], (
        f"fuzz harness {name} failed; input(s) {r['artifacts']}\n{r['tail']}")
    assert r["seeds"] > 0 and r["executions"] > r["seeds"], fuzz_run.summary_line(r)
