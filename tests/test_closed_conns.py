"""Which connections ended: ``Engine(track_closed=True)`` and ``take_closed()``, on both cores.

One capture holds every way a connection ends: both FINs, an RST, idle expiry, a SYN that reuses
the 4-tuple, and the end of input. Each close is reported once, right after the call that closed
the connection, and that call's output holds what the close flushed (a close-delimited response
ends only there), so a caller that handles a call's messages before its closed ids sees every
connection's last message before its close. With tracking off nothing is reported.
"""

from __future__ import annotations

import pytest

from replay.events import F_CLOSE_DELIMITED
from tests.flow import MS, T0, Flow, check_closes, run, run_closing

S = 1000 * MS
IDLE = 5  # seconds of capture time
GET = b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\n\r\nbody until the connection ends"


def flow(port, t0, **kw):
    return Flow(client=("10.0.0.1", port), t0=t0, **kw)


def every_ending():
    """The packets, and for each connection id the packet (index) whose call closes it."""
    a = flow(40001, T0).handshake()                  # id 0: FIN both ways
    a.c(GET)
    a.s(OK)
    a.fin(0)
    a_close = a.fin(1)
    a.ack(0)
    b = flow(40002, T0 + 100 * MS).handshake()       # id 1: reset by the server
    b.c(GET)
    b.s(UNTIL_CLOSE)
    b_close = b.rst(1)
    c = flow(40003, T0 + 200 * MS).handshake()       # id 2: idle until a later packet sweeps it
    c.c(GET)
    c.s(UNTIL_CLOSE)
    d = flow(40004, T0 + 300 * MS).handshake()       # id 3: open until the end of input
    d.c(GET)
    d.s(OK[:-2])                                     # body cut: comes out at finish()
    d.ack(0)
    d.add(0, "A", ts=T0 + 4 * S)                     # keeps d from going idle
    e1 = flow(40005, T0 + 6 * S).handshake()         # id 4: its 4-tuple reused by a new SYN
    c_close = e1.packets[0]
    e1.c(GET)
    e1.s(UNTIL_CLOSE)
    e2 = flow(40005, T0 + 7 * S, isn_c=900_000, isn_s=700_000).handshake()  # id 5: FIN both ways
    e1_close = e2.packets[0]
    e2.c(GET)
    e2.s(OK)
    e2.fin(1)
    e2_close = e2.fin(0)
    packets = sorted(a.packets + b.packets + c.packets + d.packets + e1.packets + e2.packets,
                     key=lambda p: p[0])
    at = {0: a_close, 1: b_close, 2: c_close, 4: e1_close, 5: e2_close}
    return packets, {cid: packets.index(p) for cid, p in at.items()} | {3: len(packets)}


def test_every_ending_reported_once_after_its_last_message(impl):
    packets, closing_call = every_ending()
    calls = run_closing(impl.Engine(1, idle_timeout=IDLE, track_closed=True), packets)
    closed_at = check_closes(calls, 6)
    assert closed_at == closing_call
    assert [cid for _, ids in calls for cid in ids] == [0, 1, 2, 4, 5, 3]
    last_message_at = {}
    for i, (msgs, _) in enumerate(calls):
        for m in msgs:
            last_message_at[m.conn] = i
    # a clean close comes after the last message; the others flush their last message themselves
    assert last_message_at[0] < closed_at[0] and last_message_at[5] < closed_at[5]
    for cid in (1, 2, 3, 4):
        assert last_message_at[cid] == closed_at[cid], cid
    flushed = {m.conn: m for i, (msgs, _) in enumerate(calls) for m in msgs if m.kind == 1}
    assert all(flushed[cid].flags & F_CLOSE_DELIMITED for cid in (1, 2, 4))
    assert impl.Engine(1, track_closed=True).take_closed() == []


def test_same_closes_through_feed_batch(impl):
    packets, _ = every_ending()
    one_by_one = run_closing(impl.Engine(1, idle_timeout=IDLE, track_closed=True), packets)
    for bounds in ([0, len(packets)], [0, 5, 17, 18, 30, len(packets)]):
        calls = run_closing(impl.Engine(1, idle_timeout=IDLE, track_closed=True), packets, bounds)
        check_closes(calls, 6)
        assert [cid for _, ids in calls for cid in ids] == [0, 1, 2, 4, 5, 3]
        assert [m for msgs, _ in calls for m in msgs] == [m for msgs, _ in one_by_one for m in msgs]


def test_take_closed_empties_the_list(impl):
    packets, _ = every_ending()
    eng = impl.Engine(1, idle_timeout=IDLE, track_closed=True)
    for ts, frame in packets:
        eng.feed(ts, frame)
    assert eng.take_closed() == [0, 1, 2, 4, 5]
    assert eng.take_closed() == []
    eng.finish()
    assert eng.take_closed() == [3]
    assert eng.take_closed() == []


@pytest.mark.parametrize("opts", [{}, {"track_closed": False}], ids=["default", "off"])
def test_tracking_off_reports_nothing(impl, opts):
    packets, _ = every_ending()
    eng = impl.Engine(1, idle_timeout=IDLE, **opts)
    assert eng.take_closed() == []
    msgs = []
    for ts, frame in packets:
        msgs += eng.feed(ts, frame)
        assert eng.take_closed() == []
    msgs += eng.finish()
    assert eng.take_closed() == []
    # tracking changes nothing else
    tracked = run_closing(impl.Engine(1, idle_timeout=IDLE, track_closed=True), packets)
    assert msgs == [m for ms, _ in tracked for m in ms]
    assert run(impl, packets, idle_timeout=IDLE) == run(impl, packets, idle_timeout=IDLE, track_closed=True)


def test_keyword_reaches_the_chosen_core():
    from replay import core

    eng = core.Engine(1, track_closed=True)
    for ts, frame in Flow().handshake().close().packets:
        eng.feed(ts, frame)
    assert eng.take_closed() == [0]
