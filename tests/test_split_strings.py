"""The strings of a log block's table, split and decoded by both cores alike."""

from __future__ import annotations

import random
import struct

import pytest

from replay import _fastparse_py as pure

try:
    from replay import _fastparse as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

CORES = [pytest.param(pure, id="pure"),
         pytest.param(compiled, id="compiled", marks=pytest.mark.skipif(
             compiled is None, reason="replay._fastparse is not built"))]


def _pack(strings) -> bytes:
    out = b""
    for s in strings:
        raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
        out += struct.pack("<I", len(raw)) + raw
    return out


def _outcome(core, buf, off, count):
    try:
        return core.split_strings(buf, off, count)
    except UnicodeDecodeError:
        return "undecodable"
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("core", CORES)
def test_strings_split_and_decode(core):
    strings = ["/api/items/1", "", "GET", "é\u2603", "\udc80lone", "x" * 70_000]
    buf = b"junk" + _pack(strings) + b"rest"
    got, end = core.split_strings(buf, 4, len(strings))
    assert got == [None, *strings] and buf[end:] == b"rest"
    assert core.split_strings(buf, 4, 0) == ([None], 4)


@pytest.mark.parametrize("core", CORES)
def test_bad_tables_fail_as_the_twin(core):
    buf = _pack(["abc", "defg"])
    for cut in range(len(buf)):
        assert _outcome(core, buf[:cut], 0, 2) == _outcome(pure, buf[:cut], 0, 2)
    assert _outcome(core, buf[:5], 0, 2) == "string runs past its end"
    assert _outcome(core, _pack([b"\xff\xfe"]), 0, 1) == "undecodable"
    assert _outcome(core, struct.pack("<I", 0xFFFFFFFF) + b"x", 0, 1) == "string runs past its end"
    assert _outcome(core, buf, -1, 1) == _outcome(pure, buf, -1, 1)


def test_both_cores_split_random_tables_alike():
    if compiled is None:
        pytest.skip("replay._fastparse is not built: nothing to compare")
    rnd = random.Random(7)
    alphabet = "az/?=&%\u00e9\u4e2d\U0001f600"
    for _ in range(300):
        strings = ["".join(rnd.choice(alphabet) for _ in range(rnd.randrange(40)))
                   for _ in range(rnd.randrange(12))]
        buf = _pack(strings)
        if rnd.random() < 0.3:                       # damaged: cut, or a byte changed
            buf = buf[:rnd.randrange(len(buf) + 1)] if rnd.random() < 0.5 or not buf else \
                buf[:(i := rnd.randrange(len(buf)))] + bytes([rnd.randrange(256)]) + buf[i + 1:]
        assert _outcome(compiled, buf, 0, len(strings)) == _outcome(pure, buf, 0, len(strings))
