"""The parts of `replay report` one by one: endpoints, JSON fields, ignore patterns, the noise
rule, the latency test, the gate, and the join of run logs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from replay.analysis import diff as D
from replay.analysis.endpoints import Endpoints, looks_like_id, path_of
from replay.analysis.runs import Section, status_of
from replay.analysis.verdict import (Thresholds, gate_breaches, latency_regressed, parse_gate,
                                     rate_regressed)
from replay.errors import UsageError
from replay.events import F_FAILED, F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message


# -- endpoints --------------------------------------------------------------------------------

@pytest.mark.parametrize("seg,want", [
    ("123", True), ("2026-11-30", True), ("550e8400-e29b-41d4-a716-446655440000", True),
    ("5f2c9a1e7b3d4c6a8e9f", True), ("dGhpcyBpcyBhIHRva2VuMTIz", True),
    ("users", False), ("authentication-settings-for-tenants", False), ("v2", False),
    ("app.js", False), ("", False), ("deadbeefdeadbeef", False),   # hex without a digit: a word
])
def test_ids_are_recognised(seg, want):
    assert looks_like_id(seg) is want


def test_endpoints_template_ids_and_drop_the_query():
    e = Endpoints()
    assert e.name("GET", "/api/users/42?x=1") == "GET /api/users/{id}"
    assert e.name("GET", "/api/users/43") == "GET /api/users/{id}"
    assert e.name("GET", "http://h:8080/api/users/7/orders#top") == "GET /api/users/{id}/orders"
    assert e.name("OPTIONS", "*") == "OPTIONS *"
    assert e.name("CONNECT", "h:443") == "CONNECT h:443"
    assert path_of("") == "/" and path_of("/a?b") == "/a"


def test_endpoint_rules_come_first_and_endpoints_are_bounded():
    e = Endpoints(["^/files/=/files/{path}", r"^/u/[a-z]+$=/u/{name}"], max_endpoints=3)
    assert e.name("GET", "/files/a/b/c.txt") == "GET /files/{path}"
    assert e.name("GET", "/u/alice") == "GET /u/{name}"
    assert e.name("GET", "/x") == "GET /x"
    assert e.name("GET", "/y") == "GET (other)" and e.others == 1
    with pytest.raises(UsageError, match="REGEX=NAME"):
        Endpoints(["nothing"])
    with pytest.raises(UsageError, match="bad regular expression"):
        Endpoints(["([=x"])


# -- fields -----------------------------------------------------------------------------------

def test_value_diff_walks_only_what_differs():
    a = {"a": {"b": 1}, "items": [{"price": 2}, {"price": 3}], "e": [], "o": {},
         "odd key": True, "s": '{"inner": 5}', "gone": {"x": 1}}
    b = {"a": {"b": 1}, "items": [{"price": 2}, {"price": 4}], "e": [1], "o": {},
         "odd key": False, "s": '{"inner": 6}', "new": 1}
    assert D.value_diff(a, b) == {"$.items[*].price", "$.e[*]", '$["odd key"]', "$.s.inner",
                                  "$.gone", "$.new"}
    assert D.generic("$.items[12].price") == "$.items[*].price"
    assert D.differing_values(a, b, "$.items[*].price") == (3, 4)


def test_value_diff_types_missing_and_numbers():
    a = {"n": 1, "f": 1.0, "s": "1", "b": True, "gone": 1, "items": [1, 2]}
    b = {"n": 1.0, "f": 1, "s": 1, "b": 1, "new": 1, "items": [2, 1]}
    assert D.value_diff(a, b) == {"$.s", "$.b", "$.gone", "$.new", "$.items[*]"}
    assert D.value_diff({"items": [1, 2]}, {"items": [2, 1]}, unordered=True) == set()
    assert D.value_diff([{"k": [1, {"d": 2}]}], [{"k": [1, {"d": 3}]}]) == {"$[*].k[*].d"}


@pytest.mark.parametrize("pattern,field,want", [
    ("json:$.ts", "$.ts", True), ("json:$.ts", "$.ts.sub", True), ("json:$.ts", "$.tsx", False),
    ("json:$..updated_at", "$.a[*].b.updated_at", True), ("json:$..updated_at", "$.updated_at", True),
    ("json:$.items[*].price", "$.items[*].price", True), ("json:$.items[0].price", "$.items[*].price", True),
    ("json:$.items[*].*", "$.items[*].id", True), ("json:$.items[*].*", "$.other[*].id", False),
    ("header:X-Trace", "header:x-trace", True), ("header:X-Trace", "header:x-other", False),
    ("body", "body", True),
])
def test_ignore_patterns(pattern, field, want):
    assert D.Ignore([pattern]).ignored(field) is want


@pytest.mark.parametrize("bad", ["json:ts", "xml:$.a", "header:", "json:$.a[0"])
def test_bad_ignore_patterns_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--ignore"):
        D.Ignore([bad])


def _resp(body: bytes, headers=b"", status=200, ctype=b"application/json"):
    head = (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nDate: now\r\nContent-Length: %d\r\n%s\r\n"
            % (status, ctype, len(body), headers))
    return Message(KIND_RESPONSE, 0, 0, 0, 0, ("c", 1), ("s", 2), 0, head + body, "GET", "/",
                   status, len(body), len(head))


def test_compare_headers_bodies_and_codings():
    import gzip

    cmp = D.Comparer()
    a = _resp(json.dumps({"id": 1, "price": 10}).encode(), b"Set-Cookie: s=abc; Path=/\r\n")
    z = gzip.compress(json.dumps({"id": 1, "price": 11}).encode())
    b = _resp(z, b"Set-Cookie: s=xyz\r\nContent-Encoding: gzip\r\nX-New: 1\r\n")
    # the cookie's value and the Date are not compared; the decoded body is
    assert cmp.diff(a, b, {}) == {"$.price", "header:content-encoding", "header:x-new"}
    t1 = _resp(b"hello \r\nworld\n", ctype=b"text/plain")
    t2 = _resp(b"hello\nworld", ctype=b"text/plain")
    assert D.Comparer(()).diff(t1, t2, {}) == {"header:content-length"}
    assert cmp.diff(t1, t2, {}) == set()
    # only ignored lines differ: nothing to parse, nothing differs
    d1 = _resp(b"{}", b"X-Request-Id: 1\r\n")
    d2 = _resp(b"{}", b"X-Request-Id: 2\r\n")
    assert cmp.diff(d1, d2, {}) == set()
    # a folded header line is compared whole
    f1 = _resp(b"{}", b"X-A: one\r\n two\r\n")
    f2 = _resp(b"{}", b"X-A: one\r\n three\r\n")
    assert cmp.diff(f1, f2, {}) == {"header:x-a"}


# -- verdicts ---------------------------------------------------------------------------------

def test_diffy_rule():
    th = Thresholds()
    assert rate_regressed(10, 0, 1000, th)            # 1 % of exchanges, no noise
    assert not rate_regressed(10, 9, 1000, th)        # noise differs nearly as often
    assert not rate_regressed(10, 12, 1000, th)       # noise differs more often
    assert not rate_regressed(1, 0, 10_000, th)       # 0.01 %: below the absolute threshold
    assert rate_regressed(3, 0, 3, th)


def _hist(values_us):
    h = HdrHistogram(1, 3_600_000_000, 2)
    for v in values_us:
        h.record_value(v)
    return h


def test_latency_needs_size_and_significance():
    th = Thresholds()
    base = _hist([10_000] * 200)
    slower = _hist([10_000] * 100 + [30_000] * 100)
    assert [p for p, *_ in latency_regressed(base, slower, None, th)] == [90]   # p99 needs 1000
    base, slower = _hist([10_000] * 1200), _hist([10_000] * 1160 + [30_000] * 40)
    assert [p for p, *_ in latency_regressed(base, slower, None, th)] == [99]
    # many tests in one report: each must clear a higher bar
    assert latency_regressed(base, slower, None, th, tests=10**9) == []
    same = _hist([10_000] * 200)
    assert latency_regressed(base, same, None, th) == []
    few = _hist([30_000] * 5)
    assert latency_regressed(base, few, None, th) == []              # too few to judge
    assert latency_regressed(base, _hist([10_500] * 200), None, th) == []   # +5 %: under 20 %
    noisy = _hist([10_000] * 100 + [29_000] * 100)                  # the noise run moved as much
    assert latency_regressed(base, slower, noisy, th) == []


def test_gate_rules():
    assert parse_gate("regression").kind == "regression"
    assert parse_gate("latency").kind == "latency"
    r = parse_gate("p99>+20%")
    assert (r.kind, r.what, r.value, r.unit) == ("limit", "p99", 20.0, "%")
    assert parse_gate("p50>+0.5s").value == 500.0
    assert parse_gate("5xx>0.1%").what == "5xx"
    for bad in ("p99>20%", "sometimes", "5xx>3ms"):
        with pytest.raises(UsageError, match="--fail-on"):
            parse_gate(bad)
    def report(n):
        return {"totals": {"exchanges": 1000, "candidate": {"errors": 0, "5xx": 2, "4xx": 0}},
                "regressions_total": 0,
                "endpoints": [{"endpoint": "GET /a", "regressions": [],
                               "latency": {"service": {"baseline": {"count": n, "p50": 10.0, "p99": 20.0},
                                                       "candidate": {"count": n, "p50": 10.2, "p99": 30.0}}}}]}
    rules = [parse_gate(t) for t in ("regression", "5xx>0.1%", "5xx>1%", "p99>+20%", "p50>+1ms", "errors>0")]
    assert [b.split(":")[0] for b in gate_breaches(rules, report(1000))] == ["5xx>0.1%", "p99>+20%"]
    # a p99 of 50 exchanges is not one: the limit waits for the samples a verdict needs
    assert [b.split(":")[0] for b in gate_breaches(rules, report(50))] == ["5xx>0.1%"]
    with pytest.raises(UsageError, match="share"):
        parse_gate("errors>5")


# -- runs -------------------------------------------------------------------------------------

def _m(kind, conn, index, flags=0, data=b"", status=0, t=0):
    return Message(kind, conn, index, t, t, ("c", 1), ("s", 2), flags, data, "GET", "/a", status, 0, 0)


def _section_log(path, msgs):
    from replay.log import LogWriter

    with LogWriter(str(path), meta={"command": "play", "conn_stride": 10, "target": "t"},
                   block_records=2) as w:
        for m in msgs:
            w.write(m)
    return Section.open(str(path), [(True, None)])[0]


def test_exchanges_complete_in_any_order_and_failures_carry_their_kind(tmp_path):
    msgs = [_m(KIND_REQUEST, 0, 0, F_REPLAYED), _m(KIND_REQUEST, 1, 0, F_REPLAYED),
            _m(KIND_RESPONSE, 1, 0, F_REPLAYED, status=200),
            _m(KIND_RESPONSE, 0, 0, F_REPLAYED | F_FAILED, b"timeout"),
            _m(KIND_REQUEST, 10, 0, F_REPLAYED)]                 # pass 1 of conn 0 (stride 10), unanswered
    sec = _section_log(tmp_path / "r.rlog", msgs)
    keys = sec.keys_in_order()                                  # in the order first written
    assert [(int(k) >> 32, int(k) & 0xFFFFFFFF) for k in keys] == [(0, 0), (1, 0), (10, 0)]
    bt = sec.take(keys)
    assert [status_of(int(s)) for s in bt.status] == ["timeout", 200, None]
    assert bt.has_req.tolist() == [True] * 3 and bt.has_resp.tolist() == [False, True, False]
    assert bt.found.tolist() == [True] * 3 and sec.found == 3


def test_a_late_answer_and_a_key_absent_are_told_apart(tmp_path):
    """No window: an answer written long after its request still pairs with it; a key the
    section does not hold is not found, and is not counted as found."""
    msgs = [_m(KIND_REQUEST, 0, 0, F_REPLAYED)]
    msgs += [m for c in range(1, 50) for m in (_m(KIND_REQUEST, c, 0, F_REPLAYED),
                                              _m(KIND_RESPONSE, c, 0, F_REPLAYED, status=200))]
    msgs.append(_m(KIND_RESPONSE, 0, 0, F_REPLAYED, b"HTTP/1.1 503 x\r\n\r\n", status=503))
    sec = _section_log(tmp_path / "r.rlog", msgs)
    bt = sec.take(np.array([0, (7 << 32), (99 << 32)], dtype=np.uint64))
    assert [status_of(int(s)) for s in bt.status] == [503, 200, None]
    assert bt.found.tolist() == [True, True, False] and sec.found == 2
    assert bt.resp_data[0] == b"HTTP/1.1 503 x\r\n\r\n" and bt.resp_data[2] is None


def test_sections_join_exactly_whatever_the_order(tmp_path):
    """A run whose replayed order is the reverse of the recorded one (--speed max runs whole
    connections one after another): every exchange still finds its counterpart."""
    from replay.analysis.compare import Analysis
    from replay.log import LogWriter

    def run_log(path, reverse):
        keys = [(c, i) for i in range(300) for c in range(40)]        # recorded: by time
        with LogWriter(str(path), meta={"command": "play", "conn_stride": 40, "target": "t"},
                       block_records=256) as w:
            for c, i in (sorted(keys) if reverse else keys):          # replayed: conn by conn
                w.write(_m(KIND_REQUEST, c, i, F_REPLAYED, b"GET /a HTTP/1.1\r\n\r\n"))
                w.write(_m(KIND_RESPONSE, c, i, F_REPLAYED,
                           b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200))
            for c, i in keys:
                w.write(_m(KIND_REQUEST, c, i, 0, b"GET /a HTTP/1.1\r\n\r\n"))
                w.write(_m(KIND_RESPONSE, c, i, 0, b"HTTP/1.1 %d OK\r\nContent-Length: 0\r\n\r\n"
                           % (500 if (c, i) == (3, 7) else 200), 500 if (c, i) == (3, 7) else 200))
        return str(path)

    cand = run_log(tmp_path / "c.rlog", reverse=True)
    base = run_log(tmp_path / "b.rlog", reverse=False)
    for baseline in (None, base):
        rep = Analysis(cand, baseline).run()
        t = rep["totals"]
        assert t["exchanges"] == 12_000 and t["without_baseline"] == 0
        assert t["unmatched"]["recorded"] == 0
        (ep,) = rep["endpoints"]
        assert ep["status"]["changed"] == (1 if baseline is None else 0)


def test_captured_bytes_reach_neither_terminal_nor_shell_raw(tmp_path):
    import io
    import subprocess

    from replay.analysis.compare import curl
    from replay.analysis.text import render_text

    body = bytes(range(256)) + b"'%\\"
    head = (b"POST /up HTTP/1.1\r\nHost: t\r\nX-Evil: \x1b]0;PWNED\x07\x1b[2J\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    req = Message(KIND_REQUEST, 0, 0, 0, 0, ("c", 1), ("s", 2), 0, head + body, "POST", "/up",
                  0, len(body), len(head))
    cmd = curl(req, "http://127.0.0.1:9")
    assert "\x1b" not in cmd and "\x07" not in cmd
    # the command sends exactly the recorded body (checked through bash, without curl)
    printf = cmd.split(" | ")[0]
    assert subprocess.run(["bash", "-c", printf], capture_output=True).stdout == body
    evil = "GET /\x1b[2J\x1b]0;x\x07"
    rep = {"runs": {"candidate": {"target": "t"}, "baseline": {}},
           "totals": {"exchanges": 1, "endpoints": 1, "without_baseline": 0},
           "suspected_noise": [], "regressions_total": 1,
           "endpoints": [{"endpoint": evil, "count": 1, "status": {"changed": 1},
                          "latency": {"service": {"baseline": {"p50": 1, "p99": 1},
                                                  "candidate": {"p50": 1, "p99": 1}}},
                          "regressions": [{"kind": "status", "field": "200 -> 500", "count": 1,
                                           "examples": [{"conn": 0, "index": 0, "method": "GET",
                                                         "uri": evil[4:], "baseline_status": "200",
                                                         "candidate_status": "500", "curl": cmd}]}]}]}
    out = io.StringIO()
    render_text(rep, file=out)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "\\x1b[2J" in out.getvalue()


def test_the_repeat_memory_is_a_ring_that_forgets_what_it_overwrote():
    from replay.analysis.compare import _Recent

    r = _Recent(size=64 * 100, keys=3)
    a = D.Raw(b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * 60, 19)
    r.put(1, a.data, a.head_length)
    got = r.get(1)
    assert got.data == a.data and got.head_length == 19
    r.put(2, b"x" * 101, 0)           # more than a 64th of the ring: not kept
    assert r.get(2) is None
    for k in range(3, 6):                     # keys beyond the last 3 are forgotten
        r.put(k, bytes([k]) * 50, 0)
    assert r.get(1) is None and r.get(5).data == bytes([5]) * 50
    for k in range(200):                      # wraps many times: what is kept reads whole
        r.put(7, bytes([k % 250]) * 97, 3)
        assert r.get(7).data == bytes([k % 250]) * 97
    assert r.get(3) is None                   # overwritten by the ring since


def test_an_exchange_the_candidate_has_no_request_for_is_named_by_the_recording(tmp_path):
    """With a baseline run, the recording is read only where the candidate lacks the request."""
    from replay.analysis.compare import Analysis
    from replay.log import LogWriter

    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def run_log(path, drop):
        with LogWriter(str(path), meta={"command": "play", "conn_stride": 10, "target": "t"}) as w:
            for c in range(3):
                req = Message(KIND_REQUEST, c, 0, 0, 0, ("c", 1), ("s", 2), F_REPLAYED,
                              b"GET /u/%d HTTP/1.1\r\n\r\n" % c, "GET", f"/u/{c}", 0, 0, 0)
                if c != drop:
                    w.write(req)
                w.write(_m(KIND_RESPONSE, c, 0, F_REPLAYED, ok, 200))
            for c in range(3):
                w.write(Message(KIND_REQUEST, c, 0, 0, 0, ("c", 1), ("s", 2), 0,
                                b"GET /rec/%d HTTP/1.1\r\n\r\n" % c, "GET", f"/rec/{c}", 0, 0, 0))
                w.write(_m(KIND_RESPONSE, c, 0, 0, ok, 200))
        return str(path)

    rep = Analysis(run_log(tmp_path / "c.rlog", drop=1), run_log(tmp_path / "b.rlog", drop=None)).run()
    assert sorted((e["endpoint"], e["count"]) for e in rep["endpoints"]) == [
        ("GET /rec/{id}", 1), ("GET /u/{id}", 2)]
    assert rep["totals"]["unmatched"] == {"recorded": 0, "baseline": 0}


def _api_run(path, n, seed, slow=(), changed=(), failing=()):
    """A run log of small JSON answers: a timestamp that differs on every answer, a price
    that changes where ``changed``, latency added where ``slow``, 500s where ``failing``."""
    import random

    from replay.log import LogWriter

    rnd = random.Random(seed)
    with LogWriter(str(path), meta={"command": "play", "conn_stride": 16, "target": "t"},
                   block_records=512) as w:
        for i in range(n):
            conn, index = i % 16, i // 16
            uri = ("/api/items/%d" % (i % 500), "/api/users/%d" % i, "/health")[i % 3]
            req = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % uri.encode()
            t = 1_800_000_000_000_000_000 + i * 1_000_000
            body = json.dumps({"id": i, "price": 10 + (i in changed), "ts": rnd.randrange(10**9)}).encode()
            status = 500 if i in failing else 200
            head = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
                status, len(body))
            lat = 1_000_000 + rnd.randrange(200_000) + (5_000_000 if i in slow else 0)
            w.write(Message(KIND_REQUEST, conn, index, t, t, ("c", 1), ("s", 2), F_REPLAYED, req,
                            "GET", uri, 0, 0, len(req)))
            w.write(Message(KIND_RESPONSE, conn, index, t + lat, t + lat, ("c", 1), ("s", 2),
                            F_REPLAYED, head + body, "GET", uri, status, len(body), len(head)))
        for i in range(n):
            conn, index = i % 16, i // 16
            uri = ("/api/items/%d" % (i % 500), "/api/users/%d" % i, "/health")[i % 3]
            req = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % uri.encode()
            ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            w.write(Message(KIND_REQUEST, conn, index, 0, 0, ("c", 1), ("s", 2), 0, req, "GET", uri,
                            0, 0, len(req)))
            w.write(Message(KIND_RESPONSE, conn, index, 10**6, 10**6, ("c", 1), ("s", 2), 0, ok,
                            "GET", uri, 200, 2, len(ok) - 2))
    return str(path)


def test_workers_give_the_report_of_one_process(tmp_path, monkeypatch):
    """The pass shared by worker processes (forked, their counts merged) reports what one
    process does: counts, histograms, timelines, fields, verdicts and the first examples."""
    import replay.analysis.compare as C

    monkeypatch.setattr(C, "CHUNK", 128)             # many chunks and segments: every worker
    monkeypatch.setattr(C, "SEGMENT", 512)           # has work
    n = 3000
    users = set(range(1, n, 3))
    cand = _api_run(tmp_path / "c.rlog", n, 1, slow=users, changed=set(range(0, n, 7)),
                    failing=set(range(2, n, 30)))
    base = _api_run(tmp_path / "b.rlog", n, 2)
    noise = _api_run(tmp_path / "n.rlog", n, 3)

    def report(workers, **kw):
        rep = C.Analysis(cand, base, **kw).run(workers)
        return json.loads(json.dumps(rep, default=str))

    one, three = report(1, noise=noise), report(3, noise=noise)
    assert one == three
    kinds = {(e["endpoint"], r["kind"], r["field"]) for e in one["endpoints"] for r in e["regressions"]}
    assert ("GET /api/users/{id}", "latency", "p50") in kinds
    assert ("GET /health", "status", "200 -> 500") in kinds
    assert any(k[2] == "$.price" for k in kinds) and not any(k[2] == "$.ts" for k in kinds)
    # without a noise run the repeated requests stand in for it: remembered per segment, so
    # alike too
    one, two = report(1), report(2)
    assert one == two and one["suspected_noise"]


def test_a_failing_worker_is_one_line(tmp_path, monkeypatch):
    import replay.analysis.compare as C
    from replay.errors import InputError

    monkeypatch.setattr(C, "CHUNK", 128)
    monkeypatch.setattr(C, "SEGMENT", 256)
    cand = _api_run(tmp_path / "c.rlog", 1000, 1)
    real = C.Analysis._chunk
    parent = os.getpid()

    def chunk(self, keys, sections):
        if os.getpid() != parent:
            raise RuntimeError("disk on fire")
        return real(self, keys, sections)

    monkeypatch.setattr(C.Analysis, "_chunk", chunk)
    with pytest.raises(InputError, match="a report worker failed: RuntimeError: disk on fire"):
        C.Analysis(cand).run(2)


def test_heads_compare_alike_line_by_line_or_as_sets():
    cmp = D.Comparer()

    def h(*lines):
        data = b"HTTP/1.1 200 OK\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"
        return D.Raw(data, len(data))

    a = h(b"Date: Mon", b"Content-Type: a", b"X-A: 1")
    assert cmp.header_diff(a, h(b"DATE: Tue", b"Content-Type: a", b"X-A: 1")) == set()
    assert cmp.header_diff(a, h(b"Content-Type: a", b"X-A: 1", b"Date: Tue")) == set()  # reordered
    assert cmp.header_diff(a, h(b"Date: Mon", b"Content-Type: b", b"X-A: 1")) == {"header:content-type"}
    assert cmp.header_diff(a, h(b"Date: Mon", b"X-B: 1", b"X-A: 1")) == {"header:content-type", "header:x-b"}
    assert cmp.header_diff(a, h(b"Date", b"Content-Type: a", b"X-A: 1")) == \
        cmp.header_diff(h(b"Date", b"Content-Type: a", b"X-A: 1"), a)


def test_timelines_of_workers_merge_onto_the_earlier_start():
    from replay.analysis.compare import TIMELINE_BUCKETS, _Run
    from replay.analysis.runs import Batch

    def batch(ts):
        bt = Batch()
        n = len(ts)
        bt.n, bt.replayed = n, True
        bt.status = np.full(n, 200)
        bt.req_first = bt.req_last = np.array(ts, dtype=np.int64)
        bt.resp_last = bt.req_first + 1_000_000
        bt.has_req = bt.has_resp = np.ones(n, dtype=bool)
        return bt

    ts = [i * 300_000_000 for i in range(400)]             # 120 s: coarser than 100 ms buckets
    whole = _Run("x")
    whole.add_batch(batch(ts), np.ones(400, dtype=bool))
    for cut in (1, 150, 399):
        for same_start in (True, False):
            for order in (0, 1):
                a, b = _Run("x"), _Run("x")
                a.add_batch(batch(ts[:cut]), np.ones(cut, dtype=bool))
                if same_start:          # as a worker starts: on the parent's start and width
                    b.t0, b.width = a.t0, a.width
                b.add_batch(batch(ts[cut:]), np.ones(400 - cut, dtype=bool))
                m = _Run("x")
                for part in ((a, b), (b, a))[order]:
                    m.merge(part)
                assert m.width == whole.width and max(m.buckets) < 2 * TIMELINE_BUCKETS
                assert m.count == 400 and m.t0 == 0
                if same_start:
                    assert m.timeline() == whole.timeline()
                else:                   # a part of its own start: within a bucket
                    assert sum(x["requests_per_s"] for x in m.timeline()) == \
                        sum(x["requests_per_s"] for x in whole.timeline())


def test_a_worker_that_dies_mid_result_is_one_line():
    from replay.analysis.compare import _result
    from replay.errors import InputError

    r, w = os.pipe()
    pid = os.fork()
    if not pid:
        os.write(w, b"\x80\x05\x95\x10\x00")                # a pickle cut short
        os._exit(0)
    os.close(w)
    with pytest.raises(InputError, match="a report worker ended without its counts"):
        _result((pid, r))


def test_examples_against_the_recording_time_it_from_its_first_byte(tmp_path):
    from replay.analysis.compare import Analysis

    cand = _api_run(tmp_path / "c.rlog", 300, 1, failing={5})
    rep = Analysis(cand).run()
    exs = [x for e in rep["endpoints"] for r in e["regressions"] for x in r.get("examples", [])]
    assert exs and all(x["baseline_ms"] is None or x["baseline_ms"] >= 0 for x in exs)
