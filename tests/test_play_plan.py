"""What a replay sends: grouping by connection, recorded statuses, pipelining, Host, Content-Length."""

from __future__ import annotations

from play_helpers import MS, SAMPLE, T0, get, ok_response, write_capture

from replay.events import F_INCOMPLETE, KIND_REQUEST, Message
from replay.pipeline import open_input
from replay.play.plan import build_plan, set_content_length, set_host
from replay.play.sender import parse_target


def test_sample_grouped_by_connection_in_recorded_order():
    msgs = list(open_input(str(SAMPLE)))
    plan = build_plan(msgs, "target:9")
    assert plan.requests == 37 and len(plan.connections) == 14
    recorded = {}
    for m in msgs:
        if m.kind == KIND_REQUEST:
            recorded.setdefault(m.conn, []).append(m)
    for cp in plan.connections:
        assert [r.index for r in cp.requests] == [m.index for m in sorted(recorded[cp.conn], key=lambda m: m.index)]
        assert all(b"\r\nHost: target:9\r\n" in r.data for r in cp.requests)
    firsts = [cp.t_first for cp in plan.connections]
    assert firsts == sorted(firsts)
    # recorded statuses come from the final responses (100 Continue is not one)
    status = {(r.conn, r.index): r.recorded_status for cp in plan.connections for r in cp.requests}
    assert status[(4, 0)] == 200 and status[(7, 0)] == 206 and status[(5, 0)] == 404
    # conn 10 sent its second request before the first answer: pipelined, and only that one
    piped = [(r.conn, r.index) for cp in plan.connections for r in cp.requests if r.pipelined]
    assert piped == [(10, 1)] and plan.pipelined == 1
    assert sorted(r.seq for cp in plan.connections for r in cp.requests) == list(range(37))


def test_pipelining_follows_the_capture(tmp_path):
    cap = write_capture(tmp_path / "p.pcap", [[
        (T0 + 10 * MS, get("/a"), ok_response()),
        (T0 + 20 * MS, get("/b"), ok_response()),
        (T0 + 21 * MS, get("/c"), ok_response(), True),
        (T0 + 40 * MS, get("/d"), ok_response()),
    ]])
    plan = build_plan(open_input(str(cap)))
    reqs = plan.connections[0].requests
    assert [r.uri for r in reqs] == ["/a", "/b", "/c", "/d"]
    assert [r.pipelined for r in reqs] == [False, False, True, False]
    assert [r.recorded_status for r in reqs] == [200] * 4
    assert plan.span_ns == 30 * MS


def test_set_host_keeps_everything_else():
    req = b"POST /x HTTP/1.1\r\nhOsT:  old.example:8080 \r\nContent-Length: 2\r\nX-Host: keep\r\n\r\nhi"
    out = set_host(req, req.index(b"\r\n\r\n") + 4, "[::1]:8000")
    assert out == b"POST /x HTTP/1.1\r\nhOsT: [::1]:8000\r\nContent-Length: 2\r\nX-Host: keep\r\n\r\nhi"
    bare = b"GET / HTTP/1.0\nHost: a\n\n"
    assert set_host(bare, len(bare), "b") == b"GET / HTTP/1.0\nHost: b\n\n"
    no_host = b"GET / HTTP/1.0\r\n\r\n"
    assert set_host(no_host, len(no_host), "b") == no_host
    # a header value that merely contains "host:" is not the Host header
    tricky = b"GET / HTTP/1.1\r\nReferer: http://host:1/\r\nHost: a\r\n\r\n"
    assert set_host(tricky, len(tricky), "b").endswith(b"Referer: http://host:1/\r\nHost: b\r\n\r\n")


def test_content_length_made_true_for_a_cut_body():
    cut = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789"
    head = cut.index(b"\r\n\r\n") + 4
    assert set_content_length(cut, head) == b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
    no_cl = b"POST /u HTTP/1.1\r\nHost: a\r\n\r\nabc"
    assert set_content_length(no_cl, no_cl.index(b"abc")) == \
        b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    m = Message(KIND_REQUEST, 0, 0, 1, 2, ("1.1.1.1", 1), ("2.2.2.2", 80), F_INCOMPLETE, cut, "POST",
                "/u", 0, 10, head)
    plan = build_plan([m], "t:1")
    assert plan.connections[0].requests[0].data == \
        b"POST /u HTTP/1.1\r\nHost: t:1\r\nContent-Length: 10\r\n\r\n0123456789"


def test_target_urls():
    t = parse_target("http://127.0.0.1:8080")
    assert (t.scheme, t.addr, t.port, t.host_header, t.ssl) == ("http", "127.0.0.1", 8080, "127.0.0.1:8080", None)
    t = parse_target("https://[::1]", insecure=True)
    assert (t.port, t.host_header, t.addr) == (443, "[::1]", "::1") and t.ssl is not None
    assert parse_target("localhost:81").host_header == "localhost:81"
    assert parse_target("http://h:80", resolve=False).host_header == "h"
    import pytest

    from replay.errors import UsageError

    for bad in ("ftp://x", "http://x:99999", "http://x/path", "http://"):
        with pytest.raises(UsageError):
            parse_target(bad, resolve=False)


def test_planned_request_pickles_every_field():
    """The streamed plan crosses a pipe as pickles: every field comes back."""
    import copy
    import dataclasses
    import pickle

    from replay.play.plan import PlannedRequest

    values = {f.name: i + 1 for i, f in enumerate(dataclasses.fields(PlannedRequest))}
    values.update(data=b"GET / HTTP/1.1\r\n\r\n", method="GET", uri="/", pipelined=True)
    r = PlannedRequest(**values)
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        assert dataclasses.asdict(pickle.loads(pickle.dumps(r, proto))) == values
    assert copy.deepcopy(r) == r
