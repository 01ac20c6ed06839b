"""The compiled core must load where it was built: a silent fallback to the pure twin is a failure."""

from __future__ import annotations

import pytest

from replay import core
from replay import _fastparse_py
from tests.conftest import NO_EXTENSIONS, REQUIRE_EXTENSION, load_compiled


def test_compiled_core_loaded():
    if NO_EXTENSIONS:
        assert core.IMPLEMENTATION == "pure"
        assert core.impl is _fastparse_py
        return
    mod = load_compiled()
    if mod is None:
        if REQUIRE_EXTENSION:
            pytest.fail("replay._fastparse was expected (REPLAY_REQUIRE_EXTENSION=1) but did not load")
        pytest.skip("replay._fastparse is not built (pip install -e . compiles it)")
    assert core.IMPLEMENTATION == "compiled"
    assert core.impl is mod
    assert mod.__file__.endswith((".so", ".pyd"))


def test_same_api():
    mod = load_compiled()
    if mod is None:
        pytest.skip("replay._fastparse is not built")
    assert mod.STAT_NAMES == _fastparse_py.STAT_NAMES
    assert mod.SUPPORTED_LINKTYPES == _fastparse_py.SUPPORTED_LINKTYPES
    for name in ("Engine", "decode"):
        assert hasattr(mod, name), name
    for name in ("feed_batch", "feed", "finish", "take_closed", "stats", "relieve"):
        assert hasattr(mod.Engine, name), name
