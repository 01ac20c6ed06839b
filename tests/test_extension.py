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


def test_send_loop_follows_the_core():
    """The replay's send loop is compiled where the core is, and has its twin's API."""
    from replay import _sendloop_py

    if NO_EXTENSIONS or load_compiled() is None:
        assert core.sendloop is _sendloop_py
        return
    from replay import _sendloop

    assert core.sendloop is _sendloop and _sendloop.__file__.endswith((".so", ".pyd"))
    for name in ("READ_SIZE", "READS", "EVENTS"):
        assert getattr(_sendloop, name) == getattr(_sendloop_py, name), name
    for cls in ("SendLoop", "LoopTransport"):
        want = {n for n in vars(getattr(_sendloop_py, cls)) if not n.startswith("_")}
        assert want <= set(dir(getattr(_sendloop, cls))), (cls, want - set(dir(getattr(_sendloop, cls))))


def test_an_engine_is_not_pickled_and_filters_only_once_made():
    """An Engine holds C state (its port flags on the heap): it cannot be pickled or copied (a
    clear error, where a copy of its pointer would crash), and one made without ``__init__``
    passes every port instead of reading flags it does not have."""
    import copy
    import pickle

    mod = load_compiled()
    if mod is None:
        pytest.skip("replay._fastparse is not built")
    for eng in (mod.Engine(1), mod.Engine(1, ports=(80,))):
        with pytest.raises(TypeError):
            pickle.dumps(eng)
        with pytest.raises(TypeError):
            copy.deepcopy(eng)
    bare = mod.Engine.__new__(mod.Engine)
    del bare                                  # (freed without flags: nothing to free)
    eng = mod.Engine(1, ports=(80,))
    eng.__init__(1)                           # made again without ports: every port passes
    eng.__init__(1, ports=(8080,))            # and again with some: their flags alone
