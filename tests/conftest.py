"""Shared fixtures: every core test runs against both implementations of the core."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
DATA = Path(__file__).resolve().parent / "data"

NO_EXTENSIONS = os.environ.get("REPLAY_NO_EXTENSIONS", "") not in ("", "0")
REQUIRE_EXTENSION = os.environ.get("REPLAY_REQUIRE_EXTENSION", "") not in ("", "0")


def load_compiled():
    """The compiled core, or None when it was not built."""
    try:
        return importlib.import_module("replay._fastparse")
    except ImportError:
        return None


def _impl_params():
    params = [pytest.param("pure", id="pure")]
    if not NO_EXTENSIONS:
        params.append(pytest.param("compiled", id="compiled"))
    return params


@pytest.fixture(params=_impl_params())
def impl(request):
    """The core module under test: ``replay._fastparse_py`` or ``replay._fastparse``."""
    if request.param == "pure":
        return importlib.import_module("replay._fastparse_py")
    mod = load_compiled()
    if mod is None:
        if REQUIRE_EXTENSION:
            pytest.fail("replay._fastparse was expected (REPLAY_REQUIRE_EXTENSION=1) but is not built")
        pytest.skip("replay._fastparse is not built (pip install -e . compiles it)")
    return mod


@pytest.fixture
def corpus():
    if not (CORPUS / "pcaps").is_dir():
        pytest.skip(f"public capture corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def kafka_broker():
    """A real Kafka-protocol broker (Tansu, memory storage) on a free loopback port for the
    session (``tests/kafka_broker.py``); skipped, with the reason, when it cannot run here."""
    import kafka_broker as kb

    why = kb.missing()
    if why:
        pytest.skip(why)
    b = kb.Broker().start()
    try:
        yield b
    finally:
        b.stop()
