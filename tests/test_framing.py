"""HTTP/1.x framing and pairing through the whole core, on scapy-crafted TCP conversations."""

from __future__ import annotations

import itertools

from replay.events import (
    F_CHUNKED,
    F_CLOSE_DELIMITED,
    F_GAP,
    F_INCOMPLETE,
    F_INTERIM,
    F_MIDSTREAM,
    F_RESYNC,
    F_UNPAIRED,
    F_UPGRADE,
)
from tests.flow import Flow, requests, responses, run

GET = b"GET /a HTTP/1.1\r\nHost: example.test\r\n\r\n"


def ok(body=b"hello", extra=b""):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_simple_exchange(impl):
    f = Flow().handshake()
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, st = run(impl, f.packets)
    assert [m.kind for m in msgs] == [0, 1]
    req, resp = msgs
    assert req.data == GET and req.method == "GET" and req.uri == "/a" and req.index == 0
    assert resp.data == ok() and resp.status == 200 and resp.body_length == 5
    assert (resp.method, resp.uri, resp.index) == ("GET", "/a", 0)
    assert req.client == ("10.0.0.1", 40000) and req.server == ("10.0.0.2", 80)
    assert resp.client == req.client and resp.flags == 0 and req.flags == 0
    assert req.ts_first == f.packets[3][0]
    assert resp.ts_first == resp.ts_last == f.packets[4][0]
    assert st["requests"] == 1 and st["responses"] == 1 and st["connections"] == 1
    assert st["gaps"] == 0 and st["open_connections"] == 0


def test_head_response_has_no_body(impl):
    f = Flow().handshake()
    f.c(b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n")
    f.s(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    f.c(GET)
    f.s(ok(b"x" * 3000))
    f.close()
    msgs, _ = run(impl, f.packets)
    resp = responses(msgs)
    assert [(r.method, r.status, r.body_length, r.index) for r in resp] == [
        ("HEAD", 200, 0, 0), ("GET", 200, 3000, 1)]
    assert resp[1].data == ok(b"x" * 3000)
    assert not any(m.flags & F_INCOMPLETE for m in msgs)


def test_no_body_statuses(impl):
    f = Flow().handshake()
    for status in (b"204 No Content", b"304 Not Modified"):
        f.c(GET)
        f.s(b"HTTP/1.1 " + status + b"\r\nContent-Length: 99\r\n\r\n")
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, _ = run(impl, f.packets)
    assert [(r.status, r.body_length) for r in responses(msgs)] == [(204, 0), (304, 0), (200, 5)]


def test_zero_content_length(impl):
    f = Flow().handshake()
    f.c(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    f.s(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, _ = run(impl, f.packets)
    assert [(m.kind, m.method, m.status, m.body_length) for m in msgs] == [
        (0, "POST", 0, 0), (1, "POST", 201, 0), (0, "GET", 0, 0), (1, "GET", 200, 5)]
    assert all(m.flags == 0 for m in msgs)


EXPECT_HEAD = (b"POST /upload HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
               b"Content-Length: 10\r\n\r\n")


def _continue_case(impl, interim_parts, reorder=False):
    f = Flow().handshake()
    f.c(EXPECT_HEAD)
    server_pkts = [f.s(p, send=False)[0] for p in interim_parts]
    body_pkt = f.c(b"0123456789", send=False)[0]
    if reorder:
        # the client's body is captured before the interim response(s) that released it
        f.packets.append(body_pkt)
        f.packets.extend(server_pkts)
    else:
        f.packets.extend(server_pkts)
        f.packets.append(body_pkt)
    f.s(ok(b"done"))
    f.close()
    msgs, st = run(impl, f.packets)
    req = requests(msgs)
    resp = responses(msgs)
    assert len(req) == 1 and req[0].data == EXPECT_HEAD + b"0123456789"
    assert req[0].body_length == 10 and not req[0].flags & F_INCOMPLETE
    assert resp[-1].status == 200 and resp[-1].data == ok(b"done") and resp[-1].index == 0
    assert resp[-1].method == "POST" and not resp[-1].flags & F_INTERIM
    interim = resp[:-1]
    assert all(r.flags & F_INTERIM and r.index == 0 and r.method == "POST" for r in interim)
    return interim, st


def test_expect_100_continue_one_ack(impl):
    interim, st = _continue_case(impl, [b"HTTP/1.1 100 Continue\r\n\r\n"])
    assert [r.status for r in interim] == [100]
    assert st["interim_responses"] == 1


def test_expect_100_continue_split_over_two_segments(impl):
    interim, _ = _continue_case(impl, [b"HTTP/1.1 100 Con", b"tinue\r\n\r\n"])
    assert [r.data for r in interim] == [b"HTTP/1.1 100 Continue\r\n\r\n"]


def test_two_interim_responses(impl):
    interim, _ = _continue_case(impl, [b"HTTP/1.1 100 Continue\r\n\r\n",
                                       b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"])
    assert [r.status for r in interim] == [100, 103]


def test_interim_with_short_reason_phrase(impl):
    interim, _ = _continue_case(impl, [b"HTTP/1.1 100\r\n\r\n"])
    assert [r.status for r in interim] == [100]
    interim, _ = _continue_case(impl, [b"HTTP/1.1 100 \r\n\r\n"])
    assert [r.status for r in interim] == [100]


def test_expect_100_continue_out_of_order(impl):
    interim, _ = _continue_case(impl, [b"HTTP/1.1 100 Continue\r\n\r\n"], reorder=True)
    assert [r.status for r in interim] == [100]


def test_response_ended_by_fin(impl):
    f = Flow().handshake()
    f.c(b"GET /stream HTTP/1.0\r\nHost: h\r\n\r\n")
    body = b"line\n" * 1000
    f.s(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
    f.fin(1)
    f.fin(0)
    f.ack(1)
    msgs, _ = run(impl, f.packets)
    resp = responses(msgs)
    assert len(resp) == 1
    assert resp[0].flags & F_CLOSE_DELIMITED and not resp[0].flags & F_INCOMPLETE
    assert resp[0].body_length == len(body) and resp[0].data.endswith(body)


def test_close_delimited_cut_by_reset_is_incomplete(impl):
    f = Flow().handshake()
    f.c(GET)
    f.s(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
    f.rst(1)
    msgs, _ = run(impl, f.packets)
    resp = responses(msgs)
    assert len(resp) == 1 and resp[0].flags & F_CLOSE_DELIMITED and resp[0].flags & F_INCOMPLETE


def test_response_captured_before_its_request(impl):
    f = Flow().handshake()
    req_pkt = f.c(GET, send=False)[0]
    resp_pkt = f.s(ok(), send=False)[0]
    # capture order: response first (e.g. two capture interfaces merged); its ack covers the request
    f.packets.append((req_pkt[0], resp_pkt[1]))
    f.packets.append((resp_pkt[0], req_pkt[1]))
    f.close()
    msgs, _ = run(impl, f.packets)
    resp = responses(msgs)
    assert len(requests(msgs)) == 1 and len(resp) == 1
    assert resp[0].index == 0 and resp[0].method == "GET" and not resp[0].flags & F_UNPAIRED


def test_pipelined_requests_in_one_segment(impl):
    f = Flow().handshake()
    reqs = [b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(3)]
    f.c(b"".join(reqs))
    f.s(b"".join(ok(b"r%d" % i) for i in range(3)))
    f.close()
    msgs, _ = run(impl, f.packets)
    assert [r.data for r in requests(msgs)] == reqs
    assert [(r.uri, r.index, r.body_length) for r in responses(msgs)] == [
        ("/0", 0, 2), ("/1", 1, 2), ("/2", 2, 2)]


CHUNKED_BODY = (b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
                b"0\r\nX-Trailer: yes\r\n\r\n")
CHUNKED_RESP = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY


def test_chunked_with_extensions_and_trailers(impl):
    f = Flow().handshake()
    f.c(GET)
    f.s(CHUNKED_RESP, size=7)
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, _ = run(impl, f.packets)
    resp = responses(msgs)
    assert resp[0].data == CHUNKED_RESP and resp[0].flags == F_CHUNKED
    assert resp[0].body_length == 4 + 5 + 14
    assert resp[1].data == ok() and resp[1].index == 1


def test_chunked_body_in_every_order_of_six_segments(impl):
    f = Flow().handshake()
    f.c(GET)
    size = -(-len(CHUNKED_RESP) // 6)
    segs = f.s(CHUNKED_RESP, size=size, send=False)
    assert len(segs) == 6
    prefix = list(f.packets)
    f.packets = []
    f.close()
    suffix = f.packets
    for order in itertools.permutations(range(6)):
        pkts = list(prefix)
        for k, i in enumerate(order):
            pkts.append((segs[0][0] + k, segs[i][1]))
        msgs, st = run(impl, pkts + suffix)
        resp = responses(msgs)
        assert len(resp) == 1, order
        assert resp[0].data == CHUNKED_RESP, order
        assert resp[0].flags & ~F_CHUNKED == 0, order
        assert st["gaps"] == 0


def test_three_way_feed(impl):
    """Whole, one byte per segment, and with trailing bytes that must stay unconsumed."""
    msg = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabcde"
    for size in (None, 1):
        f = Flow().handshake()
        f.c(msg, size=size)
        f.s(ok())
        f.close()
        msgs, _ = run(impl, f.packets)
        assert [m.data for m in requests(msgs)] == [msg]
        assert responses(msgs)[0].index == 0
    # trailing bytes: the start of a next request that never completes
    f = Flow().handshake()
    f.c(msg + b"GET /next HT")
    f.s(ok())
    eng = impl.Engine(1)
    out = []
    for ts, frame in f.packets:
        out.extend(eng.feed(ts, frame))
    assert [m.data for m in requests(out)] == [msg]
    assert len(responses(out)) == 1
    rest = eng.finish()
    assert requests(rest) == []  # a head that never completed is not a message
    assert eng.stats()["dropped_head_bytes"] == len(b"GET /next HT")


def test_sequence_wraparound(impl):
    f = Flow(isn_c=2**32 - 20, isn_s=2**32 - 3).handshake()
    body = bytes(range(256)) * 40
    f.c(b"POST /w HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    f.s(ok(body))
    f.close()
    msgs, st = run(impl, f.packets)
    assert requests(msgs)[0].data.endswith(body)
    assert responses(msgs)[0].data == ok(body)
    assert st["gaps"] == 0 and not any(m.flags for m in msgs)


def test_midstream_resynchronises_on_next_request(impl):
    f = Flow()
    # no handshake: the capture starts in the middle of a response body
    f.s(b"tail of an earlier body")
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, st = run(impl, f.packets)
    assert [m.kind for m in msgs] == [0, 1]
    assert all(m.flags & F_MIDSTREAM for m in msgs)
    assert responses(msgs)[0].index == 0 and responses(msgs)[0].data == ok()
    assert st["midstream_connections"] == 1


def test_retransmission_first_copy_wins(impl):
    f = Flow().handshake()
    f.c(GET)
    pkt = f.s(ok(b"first"))[0]
    # a retransmission of the same range with different bytes: the first delivered is kept
    f.packets.append((pkt[0] + 1, f.frame(1, "PA", ok(b"other"), seq=f.nxt[1] - len(ok(b"first")))))
    f.close()
    msgs, st = run(impl, f.packets)
    assert responses(msgs)[0].data == ok(b"first")
    assert st["retransmitted_segments"] == 1


def test_loss_inside_body_marks_gap_and_resyncs(impl):
    f = Flow().handshake()
    body = b"y" * 4000
    f.c(GET)
    segs = f.s(ok(body), size=1000, send=False)
    f.packets.extend([segs[0], segs[2], segs[3], segs[4]])  # segment 1 never captured
    f.ack(0)  # the client acknowledges everything: the hole is real loss
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, st = run(impl, f.packets)
    resp = responses(msgs)
    assert resp[0].flags & F_GAP and resp[0].flags & F_INCOMPLETE
    assert resp[0].status == 200 and resp[0].index == 0
    assert resp[1].data == ok() and resp[1].index == 1 and not resp[1].flags & F_INCOMPLETE
    assert st["gaps"] == 1 and st["gap_bytes"] == 1000


def test_lost_request_response_is_unpaired(impl):
    f = Flow().handshake()
    f.lose(0, len(GET))  # the request was never captured
    f.s(ok(b"orphan"))
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, st = run(impl, f.packets)
    resp = responses(msgs)
    assert resp[0].flags & F_UNPAIRED and resp[0].index == -1 and resp[0].method is None
    assert resp[1].index == 0 and resp[1].method == "GET"
    assert st["unpaired_responses"] == 1


def test_upgrade_stops_framing(impl):
    f = Flow().handshake()
    f.c(b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    f.s(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    f.c(b"\x81\x85GET / HTTP/1.1\r\n\r\n")  # websocket frames, not HTTP
    f.s(b"\x81\x05hello")
    f.close()
    msgs, st = run(impl, f.packets)
    assert len(requests(msgs)) == 1 and len(responses(msgs)) == 1
    assert responses(msgs)[0].flags & F_UPGRADE and responses(msgs)[0].status == 101
    assert st["upgraded_connections"] == 1


def test_connect_tunnel(impl):
    f = Flow().handshake()
    f.c(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n")
    f.s(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    f.c(b"\x16\x03\x01\x00\x05hello")
    f.s(b"\x16\x03\x03\x00\x05world")
    f.close()
    msgs, st = run(impl, f.packets)
    assert [(m.kind, m.method) for m in msgs] == [(0, "CONNECT"), (1, "CONNECT")]
    assert msgs[1].flags & F_UPGRADE and st["upgraded_connections"] == 1


def test_non_http_is_counted_and_skipped(impl):
    f = Flow(server=("10.0.0.2", 22)).handshake()
    f.s(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    f.c(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(range(256)) * 300)
    f.close()
    msgs, st = run(impl, f.packets)
    assert msgs == []
    assert st["non_http_streams"] >= 1


def test_resync_flag_after_loss_of_a_head(impl):
    f = Flow().handshake()
    f.c(GET)
    f.s(ok())
    f.lose(0, 10)
    f.c(b"ost: h\r\n\r\n")  # the rest of a request whose start was lost
    f.s(ok())
    f.c(GET)
    f.s(ok())
    f.close()
    msgs, _ = run(impl, f.packets)
    req = requests(msgs)
    assert [r.data for r in req] == [GET, GET]
    assert req[1].flags & F_RESYNC
    # the middle response answers the lost request: not paired with the wrong one
    assert [r.index for r in responses(msgs)][-1] == req[1].index
