"""A log block's messages gathered as rows, and its payload put back in row order: both cores
alike, byte for byte and error for error (``gather_rows``, ``restore_payload``)."""

from __future__ import annotations

import dataclasses
import random
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import _fastparse_py as pure
from replay.events import KIND_REQUEST, KIND_RESPONSE, Message
from replay.layout import ROW_STRUCT
from replay.log import LogReader, LogWriter
from replay.log import table as tbl
from tests import rlog_v1
from tests.test_log_v2 import build

try:
    from replay import _fastparse as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

needs_compiled = pytest.mark.skipif(compiled is None, reason="replay._fastparse is not built")


def _outcome(core, fn, *args):
    try:
        return getattr(core, fn)(*args)
    except ValueError as e:
        return f"ValueError: {e}"


def _columns(msgs):
    """What a reader holds for ``restore_payload``: the table's columns and strings."""
    rows, tail, payload = pure.gather_rows(msgs)
    r = np.frombuffer(rows, dtype=rlog_v1.ROW_DTYPE)
    (na,) = struct.unpack_from("<I", tail, 0)
    off = 4
    for _ in range(na):
        off += 1 + tail[off] + 2
    (ns,) = struct.unpack_from("<I", tail, off)
    strings, end = pure.split_strings(tail, off + 4, ns)
    assert end == len(tail)
    data_length = (r["extra"] + r["head_length"].astype(np.uint64) + r["body_length"])
    return payload, [np.ascontiguousarray(c) for c in (
        r["kind"], data_length, r["elided"], r["method"], r["uri"])], strings


def test_the_row_layout_is_one_in_both_cores():
    assert rlog_v1.ROW_DTYPE.itemsize == struct.calcsize(ROW_STRUCT)
    if compiled is not None:
        assert compiled.ROW_SIZE == struct.calcsize(ROW_STRUCT)


@needs_compiled
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(0, 200))
def test_both_cores_gather_the_same_rows_and_put_back_the_same_payload(seed, n):
    msgs = build(seed, n)
    got = compiled.gather_rows(msgs)
    assert got == pure.gather_rows(msgs)
    rows, tail, payload = got
    assert len(rows) == n * struct.calcsize(ROW_STRUCT)
    stored, cols, strings = _columns(msgs)
    assert stored == payload
    whole = b"".join(bytes(m.data) for m in msgs)
    assert compiled.restore_payload(stored, *cols, strings) == whole
    assert pure.restore_payload(stored, *cols, strings) == whole


@needs_compiled
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 200))
def test_both_cores_encode_the_same_table(seed, n):
    msgs = build(seed, n)
    assert compiled.encode_block(msgs) == pure.encode_block(msgs)


def test_tables_at_the_edges_of_their_ranges_encode_alike():
    a = ("::1", 1)
    lo, hi = -2**63, 2**63 - 1
    cases = [
        [Message(0, 2**64 - 1, hi, lo, hi, a, a, 2**32 - 1, b"", None, None, 65535, 2**64 - 1, 0)],
        [Message(1, 0, lo, hi, lo, a, a, 0, b"x", "", "", 0, 0, 2**32 - 1),
         Message(0, 0, hi, lo, lo, a, a, 0, b"y", "", "", 0, 0, 0)],
        [Message(0, c, i, t, t + 3000, a, a, 0, b"GET / ", "GET", "/", 0, 0, 6)
         for c, i, t in [(5, 0, 0), (2**63, 0, 6000), (5, 1, 9000), (5, 2**63 - 1, 12000)]],
    ]
    for msgs in cases:
        table, payload, t_min, t_max, summary = pure.encode_block(msgs)
        assert (t_min, t_max) == (min(min(m.ts_first, m.ts_last) for m in msgs),
                                  max(max(m.ts_first, m.ts_last) for m in msgs))
        if compiled is not None:
            assert compiled.encode_block(msgs) == (table, payload, t_min, t_max, summary)
        t = tbl.Table(table, len(msgs), t_min)
        for name in ("kind", "conn", "index", "ts_first", "ts_last", "flags", "status",
                     "body_length", "head_length"):
            assert t.cols[name].tolist() == [getattr(m, name) for m in msgs], name
        assert t.messages(t.payload(payload)) == msgs
    for core in [pure] + ([compiled] if compiled else []):
        with pytest.raises(ValueError, match="at least one message"):
            core.encode_block([])


def test_rows_hold_the_fields_the_ids_and_the_elided_targets():
    a, b = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    msgs = [
        Message(KIND_REQUEST, 5, 0, 10, 20, a, b, 0, b"GET /x HTTP/1.1\r\n\r\n", "GET", "/x",
                0, 0, 19),
        Message(KIND_RESPONSE, 5, 0, 30, 40, a, b, 0, b"HTTP/1.1 200 OK\r\n\r\nab", "GET", "/x",
                200, 2, 19),
        Message(KIND_REQUEST, 6, 0, 50, 50, b, a, 0, b"POST POST /y", "POST", "POST", 0, 0, 12),
    ]
    for core in [pure] + ([compiled] if compiled else []):
        rows, tail, payload = core.gather_rows(msgs)
        r = np.frombuffer(rows, dtype=rlog_v1.ROW_DTYPE)
        assert r["client"].tolist() == [0, 0, 1] and r["server"].tolist() == [1, 1, 0]
        # the uris first ("/x", "POST"), then the methods that are no uri ("GET")
        assert r["uri"].tolist() == [1, 1, 2] and r["method"].tolist() == [3, 3, 2]
        assert r["elided"].tolist() == [1, 0, 1]
        assert r["extra"].tolist() == [0, 0, 0]
        # the requests first, each without its target, then the response
        assert payload == b"GET  HTTP/1.1\r\n\r\nPOST  /yHTTP/1.1 200 OK\r\n\r\nab"
        assert tail.endswith(struct.pack("<I", 3) + b"\x02\0\0\0/x\x04\0\0\0POST\x03\0\0\0GET")


BAD = [
    ("kind", 256), ("kind", -1), ("kind", 1.0), ("flags", 2**32), ("conn", 2**64),
    ("conn", -1), ("index", 2**63), ("ts_first", "1"), ("ts_last", -2**63 - 1),
    ("status", 65536), ("body_length", None), ("head_length", 2**32),
    ("data", "text"), ("data", 7), ("client", ["10.0.0.1", 1]), ("client", ("10.0.0.1",)),
    ("client", ("10.0.0.1", 70000)), ("client", ("x" * 256, 1)), ("server", (b"10.0.0.1", 1)),
    ("server", ("10.0.0.1", "80")), ("uri", b"/x"), ("method", 1), ("client", None),
    ("server", None),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_a_field_that_does_not_fit_is_one_value_error_alike(field, value):
    msgs = build(3, 5)
    msgs[2] = dataclasses.replace(msgs[2], **{field: value})
    got = _outcome(pure, "gather_rows", msgs)
    assert got.startswith("ValueError: ") and (field in got or "address" in got), got
    if compiled is not None:
        assert _outcome(compiled, "gather_rows", msgs) == got


def test_bytes_like_data_and_numpy_integers_are_taken():
    base = build(11, 20)
    msgs = [dataclasses.replace(m, data=bytearray(m.data), conn=np.uint64(m.conn),
                                status=np.int64(m.status)) for m in base]
    msgs[0] = dataclasses.replace(msgs[0], data=memoryview(base[0].data))
    want = pure.gather_rows(base)
    assert pure.gather_rows(msgs) == want
    if compiled is not None:
        assert compiled.gather_rows(msgs) == want
        assert compiled.gather_rows(base) == want


class Text(str):
    def encode(self, *args):        # str's own encoding is what a log stores
        return b"zz"


class Raw(bytes):
    pass


def test_subclasses_of_str_and_bytes_are_stored_as_their_values():
    a = (Text("10.0.0.1"), 80)
    msgs = [Message(KIND_REQUEST, 1, 0, 5, 6, a, a, 0, Raw(b"GET /u HTTP/1.1"), Text("GET"),
                    Text("/u"), 0, 0, 15)]
    plain = [Message(KIND_REQUEST, 1, 0, 5, 6, ("10.0.0.1", 80), ("10.0.0.1", 80), 0,
                     b"GET /u HTTP/1.1", "GET", "/u", 0, 0, 15)]
    want = pure.gather_rows(plain)
    assert pure.gather_rows(msgs) == want
    if compiled is not None:
        assert compiled.gather_rows(msgs) == want


def test_an_address_missing_from_the_first_row_is_refused_alike():
    a = ("10.0.0.1", 80)
    msgs = [Message(KIND_REQUEST, 1, 0, 5, 6, None, a, 0, b"x", None, None, 0, 0, 1),
            Message(KIND_REQUEST, 1, 1, 7, 8, a, a, 0, b"y", None, None, 0, 0, 1)]
    got = _outcome(pure, "gather_rows", msgs)
    assert got == "ValueError: a message field does not fit the .rlog column 'client': a NoneType"
    if compiled is not None:
        assert _outcome(compiled, "gather_rows", msgs) == got


class Sub(Message):         # another class than Message: read through getattr
    __slots__ = ()


@needs_compiled
def test_a_subclass_of_message_is_read_through_its_attributes():
    msgs = build(5, 40)
    subs = [Sub(*dataclasses.astuple(m)) for m in msgs]
    assert compiled.gather_rows(subs) == compiled.gather_rows(msgs) == pure.gather_rows(msgs)


class Fresh:
    """A message whose texts are new objects at each read (a property), gone once read: the
    core must keep what it points into until the block is made."""

    def __init__(self, m):
        self._m = m

    def __getattr__(self, name):
        v = getattr(self._m, name)
        return "".join(list(v)) if name in ("uri", "method") and v is not None else v


@pytest.mark.parametrize("seed", range(20))
def test_texts_read_as_new_objects_each_time_are_kept_until_the_block_is_made(seed):
    msgs = build(seed, 60)
    want = pure.gather_rows(msgs)
    assert pure.gather_rows([Fresh(m) for m in msgs]) == want
    if compiled is not None:
        assert compiled.gather_rows([Fresh(m) for m in msgs]) == want
        assert compiled.encode_block([Fresh(m) for m in msgs]) == pure.encode_block(msgs)


class Folded(str):          # a subclass whose own equality ignores case
    def __eq__(self, other):
        return str(self).lower() == str(other).lower()

    def __hash__(self):
        return hash(str(self).lower())


def test_strings_are_the_same_when_their_bytes_are_whatever_a_subclass_says():
    a = ("10.0.0.1", 80)
    msgs = [Message(KIND_REQUEST, 1, i, 5 + i, 6 + i, a, a, 0, f"{m} /u HTTP/1.1".encode(),
                    Folded(m), Folded(u), 0, 0, 15)
            for i, (m, u) in enumerate([("GET", "/u"), ("get", "/U"), ("GET", "/u")])]
    rows, tail, _ = pure.gather_rows(msgs)
    r = np.frombuffer(rows, dtype=rlog_v1.ROW_DTYPE)
    assert r["uri"].tolist() == [1, 2, 1]         # "/u" and "/U" are two strings
    assert b"get" in tail and b"GET" in tail
    if compiled is not None:
        assert compiled.gather_rows(msgs) == (rows, tail, _)


def test_damaged_columns_fail_alike():
    msgs = build(21, 120)
    stored, cols, strings = _columns(msgs)
    rnd = random.Random(4)
    cases = 0
    for _ in range(400):
        c = [x.copy() for x in cols]
        s = list(strings)
        st_ = stored
        what = rnd.randrange(6)
        i = rnd.randrange(len(msgs))
        if what == 0:
            c[1][i] = (int(c[1][i]) + rnd.choice([1, 2**63, 2**64 - 1])) % 2**64  # data_length
        elif what == 1:
            c[2][i] = 1                                                   # elided
        elif what == 2:
            c[rnd.choice([3, 4])][i] = rnd.choice([0, len(s), 2**32 - 1])  # string ids
        elif what == 3:
            s[rnd.randrange(len(s))] = rnd.choice([None, 5, "é" * 3])
        elif what == 4:
            st_ = stored[:-1] if rnd.random() < 0.5 else stored + b"x"
        else:
            c[0][i] = rnd.choice([0, 1, 7])                              # kind
        got = _outcome(pure, "restore_payload", st_, *c, s)
        if compiled is not None:
            assert _outcome(compiled, "restore_payload", st_, *c, s) == got
        cases += isinstance(got, str)
    assert cases > 100          # most damage is found


@pytest.mark.parametrize("block_bytes", [1 << 30, 3000, 1])
def test_write_many_cuts_the_blocks_write_cuts(tmp_path, block_bytes):
    msgs = build(8, 500)
    for m in msgs:
        if m.kind not in (0, 1):
            m.kind = 1
    a, b = tmp_path / "a.rlog", tmp_path / "b.rlog"
    with LogWriter(a, block_records=64, block_bytes=block_bytes, meta={"created": "x"}) as w:
        for m in msgs:
            w.write(m)
    with LogWriter(b, block_records=64, block_bytes=block_bytes, meta={"created": "x"}) as w:
        for k in range(0, len(msgs), 37):
            w.write_many(msgs[k:k + 37])
        assert w.records_written == len(msgs)
    with LogReader(a) as ra, LogReader(b) as rb:
        assert [(x.count, x.t_min) for x in ra.blocks] == [(x.count, x.t_min) for x in rb.blocks]
        assert list(ra) == list(rb) == msgs


def _decoded(msgs):
    """A block of ``msgs`` as a reader decodes it: its Table and its payload in row order."""
    table, payload, t_min, _, _ = pure.encode_block(msgs)
    t = tbl.Table(table, len(msgs), t_min)
    return t, t.payload(payload)


def _make_args(t, payload, rows=slice(None)):
    c = t.cols
    offs, lens = t.data_offsets(), c["data_length"]
    return (*(np.ascontiguousarray(c[k][rows]) for k in (
        "kind", "conn", "index", "ts_first", "ts_last", "client", "server", "flags")),
        np.ascontiguousarray(offs[rows]), np.ascontiguousarray(lens[rows]),
        *(np.ascontiguousarray(c[k][rows]) for k in (
            "method", "uri", "status", "body_length", "head_length")),
        payload, t.addrs, t.strings)


@needs_compiled
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 150), pick=st.integers(0, 2**32))
def test_both_cores_make_the_same_messages_of_a_block(seed, n, pick):
    msgs = build(seed, n)
    t, payload = _decoded(msgs)
    assert compiled.make_messages(*_make_args(t, payload)) == msgs
    rows = np.array(sorted(random.Random(pick).sample(range(n), k=n // 2)), dtype=np.int64)
    want = [msgs[i] for i in rows]
    assert pure.make_messages(*_make_args(t, payload, rows)) == want
    assert compiled.make_messages(*_make_args(t, payload, rows)) == want


def test_ids_and_bytes_out_of_range_fail_alike():
    msgs = build(9, 30)
    t, payload = _decoded(msgs)
    for k, value in ((5, len(t.addrs)), (6, 2**32 - 1), (10, len(t.strings)), (11, 2**31),
                     (8, len(payload) + 1), (9, 2**64 - 1)):
        args = list(_make_args(t, payload))
        args[k] = args[k].copy()
        args[k][len(msgs) // 2] = value
        for core in [pure] + ([compiled] if compiled else []):
            with pytest.raises(IndexError):
                core.make_messages(*args)


@needs_compiled
def test_messages_the_compiled_core_makes_are_left_to_reference_counting():
    import gc

    msgs = build(2, 20)
    made = compiled.make_messages(*_make_args(*_decoded(msgs)))
    assert made == msgs and not any(gc.is_tracked(m) for m in made)
    assert all(gc.is_tracked(m) for m in pure.make_messages(*_make_args(*_decoded(msgs))))


def test_writing_a_log_leaves_numpy_unloaded(tmp_path):
    """convert and capture only write: their start does without numpy's import."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from replay.events import Message\n"
            "from replay.log import LogWriter\n"
            f"with LogWriter({str(tmp_path / 'x.rlog')!r}) as w:\n"
            "    w.write(Message(0, 1, 0, 5, 6, ('::1', 1), ('::1', 2), 0, b'GET / x', 'GET', '/',"
            " 0, 0, 7))\n"
            "print('numpy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    with LogReader(tmp_path / "x.rlog") as r:
        assert [m.uri for m in r] == ["/"]
