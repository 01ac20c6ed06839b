"""The streamed replay's planner (``StreamPlanner``): both cores alike, message for message.

Each scenario pushes the same recorded messages into a planner of each core and compares, after
every push and at the finish, what came out (every field of each planned request, and which
recorded messages came with it), the connections that ended, and the counters. The messages are
drawn to reach every rule: requests and responses out of order, answers before their requests
and after their requests were planned, interim and replayed messages, requests cut by the
capture (chunked or not), heads with and without a Host or a Transfer-Encoding field, heads that
do not read plainly, head lengths that are wrong, a window of a few requests, a header that
knows the last request of some connections. Real captures are compared as well.
"""

from __future__ import annotations

import glob

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import _fastparse_py as pure
from replay.events import (F_CHUNKED, F_GAP, F_INCOMPLETE, F_INTERIM, F_REPLAYED, F_TRUNCATED,
                           KIND_REQUEST, KIND_RESPONSE, Message, PlannedRequest)
from replay.pipeline import open_input
from replay.play.stream import StreamHeader
from tests.conftest import ROOT

try:
    from replay import _fastparse as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

pytestmark = pytest.mark.skipif(compiled is None, reason="replay._fastparse is not built")

MS = 1_000_000
T0 = 1_700_000_000 * 10**9

HEADS = [
    b"GET /a HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n",
    b"GET /b HTTP/1.1\r\nhost:x\r\n\r\n",
    b"GET /c HTTP/1.1\r\nAccept: */*\r\n\r\n",
    b"POST /d HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /f HTTP/1.1\r\nHost: h\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
    b"POST /g HTTP/1.1\r\nHost: h\r\nX-Transfer-Encoding: chunked\r\n\r\n",
    b"GET /h HTTP/1.1\nHost: unix\n\n",
    b"GET /i HTTP/1.1\r\nHost : spaced\r\n\r\n",
    b"GET /j HTTP/1.1\r\nHost: folded\r\n continued\r\n\r\n",
    b"GET /k HTTP/1.1\r\nA: \x0b\r\nHost: h\r\n\r\n",
    b"GET /l HTTP/1.1\r\nHost: one\r\nHost: two\r\n\r\n",
    b"GET /m HTTP/1.1\r\nX: y\rHost: h\r\n\r\n",
    b"GET /n HTTP/1.1\r\nHost: h",
    b"",
]
BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"3\r\nab"]


@st.composite
def request_data(draw):
    head = draw(st.sampled_from(HEADS))
    body = draw(st.sampled_from(BODIES))
    data = head + body
    hl = draw(st.sampled_from([len(head), len(head), 0, len(data) + 3, -1, max(0, len(head) - 4)]))
    return data, hl


@st.composite
def log(draw):
    """Messages as a log holds them (about completion order, with some disorder)."""
    n_conns = draw(st.integers(1, 4))
    base = draw(st.sampled_from([0, 0, 2**63 - 2, 2**64 - 5]))     # ids up to the log's width
    msgs = []
    for conn in range(base, base + n_conns):
        t = T0 + draw(st.integers(0, 3000)) * MS
        for index in range(draw(st.integers(1, 6))):
            t += draw(st.integers(0, 1500)) * MS
            data, hl = draw(request_data())
            flags = draw(st.sampled_from([0, 0, 0, F_INCOMPLETE, F_GAP | F_CHUNKED, F_TRUNCATED,
                                          F_REPLAYED]))
            if b"chunked" in data.lower():
                flags |= F_CHUNKED
            end = t + draw(st.integers(0, 800)) * MS
            method = draw(st.sampled_from(["GET", "POST", "", None]))
            uri = draw(st.sampled_from(["/x", "", None]))
            msgs.append(Message(KIND_REQUEST, conn, index, t, end, ("10.0.0.1", 1000 + conn % 1000),
                                ("10.0.0.2", 80), flags, data, method, uri, 0, 0, hl))
            for interim in range(draw(st.integers(0, 1))):
                msgs.append(Message(KIND_RESPONSE, conn, index, end, end + MS, ("10.0.0.1", 1),
                                    ("10.0.0.2", 80), F_INTERIM, b"HTTP/1.1 100 Continue\r\n\r\n",
                                    method, uri, 100, 0, 25))
            if draw(st.integers(0, 5)):           # most requests are answered
                r_end = end + draw(st.integers(0, 4000)) * MS
                rflags = draw(st.sampled_from([0, 0, F_REPLAYED]))
                msgs.append(Message(KIND_RESPONSE, conn, index, end + MS, r_end, ("10.0.0.1", 1),
                                    ("10.0.0.2", 80), rflags, b"HTTP/1.1 200 OK\r\n\r\n", method,
                                    uri, draw(st.sampled_from([200, 404, 503])), 0, 19))
            t = end
        if draw(st.booleans()):
            msgs.append(Message(KIND_RESPONSE, conn, -1, t, t, ("10.0.0.1", 1), ("10.0.0.2", 80),
                                0, b"HTTP/1.1 200 OK\r\n\r\n", None, None, 200, 0, 19))
    msgs.sort(key=lambda m: m.ts_last)
    # some disorder: a log is written in completion order only roughly
    for _ in range(draw(st.integers(0, 4))):
        if len(msgs) > 1:
            i = draw(st.integers(0, len(msgs) - 2))
            msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
    return msgs


def header_for(msgs, known: int):
    """A ``StreamHeader`` that knows the last request of ``known`` of the connections (of the
    first ones), sometimes wrongly (one before the last)."""
    lasts = {}
    for m in msgs:
        if m.kind == KIND_REQUEST:
            lasts[m.conn] = max(lasts.get(m.conn, -1), m.index)
    conns = sorted(lasts)[:known]
    h = StreamHeader()
    h.conns = np.array(conns, dtype=np.uint64)
    h.last_index = np.array([lasts[c] - (c % 2) for c in conns], dtype=np.int64)
    return h


def _out(items):
    got = []
    for req, m, final in items:
        got.append((None if req is None else tuple(getattr(req, f) for f in
                                                   PlannedRequest.__slots__),
                    id(m) if m is not None else None, id(final) if final is not None else None))
        if req is not None:
            assert type(req) is PlannedRequest and type(req.pipelined) is bool
    return got


def _state(p):
    return (p.planned, p.pipelined, p.reordered, p.unknown_status, p.n, p.seq, dict(p.skipped),
            len(p.heap), len(p.waiting), list(p.early), list(p.conns), list(p.late))


def _step(p, call):
    try:
        got = ("ok", _out(call()), list(p.ended))
    except Exception as e:  # noqa: BLE001  (both must fail alike)
        got = ("error", type(e).__name__)
    p.ended = []
    return got


def run_both(msgs, host, keep_host, header, max_pending):
    a = pure.StreamPlanner(host, keep_host, header, max_pending=max_pending)
    b = compiled.StreamPlanner(host, keep_host, header, max_pending=max_pending)
    for m in msgs:
        got = _step(a, lambda: a.push(m))
        assert got == _step(b, lambda: b.push(m))
        if got[0] == "error":
            return None
        assert _state(a) == _state(b)
        if m.index % 3 == 1:             # a quiet moment of a live source, now and then
            later = m.ts_last + (m.index % 5) * 700 * MS
            assert _step(a, lambda: a.advance(later)) == _step(b, lambda: b.advance(later))
            assert _state(a) == _state(b)
    assert _step(a, a.finish) == _step(b, b.finish)
    assert _state(a) == _state(b)
    return a


@settings(max_examples=300, deadline=None)
@given(log(), st.sampled_from([None, "target:8080", "t", "t\u00e9", "\u20ac"]), st.booleans(),
       st.integers(0, 4), st.sampled_from([1, 2, 3, 100_000]), st.booleans())
def test_planners_agree(msgs, host, keep_host, known, max_pending, with_header):
    header = header_for(msgs, known) if with_header else None
    run_both(msgs, host, keep_host, header, max_pending)


PCAPS = sorted(glob.glob(str(ROOT / "tests/data/*.pcap"))) + [str(ROOT / "captures/sample.pcap")]


@pytest.mark.parametrize("pcap", PCAPS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_real_captures_planned_alike(pcap):
    msgs = list(open_input(pcap))
    p = run_both(msgs, "127.0.0.1:9", False, None, 100_000)
    assert p is not None and (p.planned > 0 or not any(m.kind == KIND_REQUEST for m in msgs))


def test_host_edit_is_byte_exact():
    """The Host value the compiled planner writes itself, against the twin's helper."""
    m = Message(KIND_REQUEST, 0, 0, T0, T0, ("a", 1), ("b", 2), 0,
                b"GET / HTTP/1.1\r\nHOST:\t old \r\nX: y\r\n\r\nbody", "GET", "/", 0, 0, 0)
    m.head_length = m.data.index(b"\r\n\r\n") + 4
    for mod in (pure, compiled):
        p = mod.StreamPlanner("new:1")
        out = p.push(m) + p.finish()
        assert out[0][0].data == b"GET / HTTP/1.1\r\nHOST: new:1\r\nX: y\r\n\r\nbody"
        r = out[0][0]
        assert r.head_length == r.data.index(b"\r\n\r\n") + 4 and r.body_length == 4


# -- planned requests across the reader's pipe ----------------------------------------------------

_ints = st.one_of(st.integers(-3, 3), st.integers(-(1 << 63), (1 << 63) - 1),
                  st.integers(-(1 << 70), 1 << 70))
_texts = st.one_of(st.sampled_from(["GET", "POST", "", "/api/x?y=1"]), st.text(max_size=6),
                   st.just("\udcff"))


@st.composite
def planned_request(draw):
    return PlannedRequest(
        draw(st.one_of(st.integers(0, (1 << 64) - 1), _ints)), draw(_ints), draw(_ints),
        draw(st.binary(max_size=40)), draw(_texts), draw(_texts), draw(_ints),
        draw(st.one_of(st.none(), st.integers(0, 999), _ints)),
        draw(st.one_of(st.booleans(), st.just(1))), draw(_ints), draw(_ints), draw(_ints))


_entries = st.one_of(
    st.tuples(st.integers(0, 3), st.tuples(planned_request(), st.none(), st.none())),
    st.tuples(st.integers(0, 3), st.tuples(planned_request(), st.just("recorded"), st.none())),
    st.tuples(st.integers(0, 3), st.tuples(st.just("end_conn"), st.integers(0, 9))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_entries, max_size=12), st.sampled_from([(pure, compiled), (compiled, pure),
                                                          (compiled, compiled)]))
def test_packed_batches_come_back_whole(batch, ends):
    packer, unpacker = ends
    blob, others = packer.pack_planned(batch)
    assert (blob, others) == (pure if packer is compiled else compiled).pack_planned(batch)
    got = unpacker.unpack_planned(blob, others)
    assert got == batch
    for a, b in zip(got, batch):
        if isinstance(a[1][0], PlannedRequest):
            assert [type(getattr(a[1][0], f)) for f in PlannedRequest.__slots__] == \
                [type(getattr(b[1][0], f)) for f in PlannedRequest.__slots__]


@pytest.mark.parametrize("mod", [pure, compiled], ids=["pure", "compiled"])
def test_cut_batch_is_refused(mod):
    r = PlannedRequest(1, 2, 3, b"GET / HTTP/1.1\r\n\r\n", "GET", "/", 18, 200, False, 0, 0, 0)
    blob, others = mod.pack_planned([(0, (r, None, None))] * 2)
    assert others == [] and mod.unpack_planned(blob, []) == [(0, (r, None, None))] * 2
    for cut in (1, len(blob) // 2 - 1, len(blob) // 2 + 5, len(blob) - 1):
        with pytest.raises(ValueError):
            mod.unpack_planned(blob[:cut], [])
