"""Filters against a truth computed apart from them.

The truth is plain Python over what ``replay ls --format jsonl`` prints (one dict per message), or
over hand-built messages; the filters run through ``replay filter`` (real processes, real files)
or through ``Rules.apply``. The index path (numpy over a log's table) and the streaming path
(messages one by one) must keep exactly the same messages, on real captures and on random logs.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.cli.main import cli
from replay.errors import UsageError
from replay.events import F_INTERIM, KIND_REQUEST, KIND_RESPONSE, Message
from replay.log import LogReader, LogWriter
from replay.pipeline import open_input
from replay.rules.filters import splitmix64
from replay.rules.ruleset import Rules, settings_from_values
from tests.conftest import DATA, ROOT

SAMPLE = ROOT / "captures" / "sample.pcap"
CAPTURES = [SAMPLE, *sorted(DATA.glob("*.pcap"))]


def replay(*args, check=True):
    """The command in this process (test_filter_cli.py runs it as a real process)."""
    r = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    if check:
        assert r.exit_code == 0, r.stderr
    return r


_LS: dict = {}


def ls(path):
    """``replay ls --format jsonl`` as a separate process, parsed: the truth's input."""
    key = (str(path), Path(path).stat().st_mtime_ns)
    if key not in _LS:
        p = subprocess.run([sys.executable, "-m", "replay.cli.main", "ls", str(path), "--format", "jsonl"],
                           capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
        assert p.returncode == 0, p.stderr
        _LS[key] = [json.loads(line) for line in p.stdout.splitlines()]
    return _LS[key]


def ls_here(path):
    return [json.loads(line) for line in replay("ls", path, "--format", "jsonl").stdout.splitlines()]


def ident(r):
    return (r["kind"], r["conn"], r["index"], r["ts"], r["bytes"])


# -- the truth: exchanges judged in plain Python over ls records ---------------------------------


def exchanges(recs):
    """{(conn, index): dict of what the filters look at}, in order of first appearance."""
    out = collections.OrderedDict()
    for r in recs:
        if r["index"] < 0:
            continue
        key = (r["conn"], r["index"])
        e = out.setdefault(key, {"first": r, "req": None, "final": None})
        if r["kind"] == "request" and e["req"] is None:
            e["req"] = r
        if r["kind"] == "response" and "interim" not in r["flags"] and e["final"] is None:
            e["final"] = r
    for e in out.values():
        rep = e["req"] or e["first"]
        e.update(method=rep["method"], uri=rep["uri"], ts=rep["ts"], conn=rep["conn"],
                 host=e["req"]["host"] if e["req"] else None,
                 status=e["final"]["status"] if e["final"] else 0)
    return out


def expected(recs, keep, request_level=True, limit=None, keep_alone=None):
    kept = set()
    n = 0
    for key, e in exchanges(recs).items():
        if keep(e) and (limit is None or n < limit):
            kept.add(key)
            n += 1
    out = []
    for r in recs:
        if r["index"] < 0:
            if not request_level and keep_alone(r):
                out.append(r)
        elif (r["conn"], r["index"]) in kept:
            out.append(r)
    return [ident(r) for r in out]


def filtered(tmp_path, src, *flags):
    out = tmp_path / "out.rlog"
    p = replay("filter", src, "-o", out, *flags)
    assert "kept" in p.stderr
    return [ident(r) for r in ls_here(out)]


def host_of(value):
    return None if value is None else re.sub(r":\d+$", "", value.lower())


def sample_keep(conn, pct):
    return (splitmix64(conn) >> 11) < round(pct / 100 * (1 << 53))


CASES = {
    "method": (["--method", "post"], lambda e: e["method"] == "POST", True),
    "methods": (["--method", "GET,HEAD", "--method", "PUT"],
                lambda e: e["method"] in ("GET", "HEAD", "PUT"), True),
    "path-include": (["--path-include", r"^/api/(users|cart)", "--path-include", r"\.css$"],
                     lambda e: bool(e["uri"] and (re.search(r"^/api/(users|cart)", e["uri"])
                                                  or re.search(r"\.css$", e["uri"]))), True),
    "path-exclude": (["--path-exclude", "static|blob"],
                     lambda e: not (e["uri"] and re.search("static|blob", e["uri"])), True),
    "host": (["--host", "127.0.0.1", "--host", "*.wikimedia.org"],
             lambda e: host_of(e["host"]) is not None and (host_of(e["host"]) == "127.0.0.1" or
                                                           fnmatch.fnmatch(host_of(e["host"]), "*.wikimedia.org")),
             True),
    "status": (["--status", "2xx", "--status", "301,404"],
               lambda e: 200 <= e["status"] <= 299 or e["status"] in (301, 404), True),
    "status-range": (["--status", "300-399"], lambda e: 300 <= e["status"] <= 399, True),
    "status-exclude": (["--status-exclude", "200"], lambda e: e["status"] != 200, True),
    "sample": (["--sample", "40%"], lambda e: sample_keep(e["conn"], 40), False),
    "limit": (["--limit", "4"], lambda e: True, True),
    "combined": (["--method", "GET", "--path-exclude", "^/static", "--status", "2xx", "--limit", "3"],
                 lambda e: e["method"] == "GET" and not re.search("^/static", e["uri"] or "")
                 and 200 <= e["status"] < 300, True),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("src", CAPTURES, ids=lambda p: p.stem[:30])
def test_filter_against_ls_truth(tmp_path, src, name):
    flags, keep, request_level = CASES[name]
    recs = ls(src)
    limit = int(flags[flags.index("--limit") + 1]) if "--limit" in flags else None
    alone = (lambda r: sample_keep(r["conn"], 40)) if name == "sample" else None
    want = expected(recs, keep, request_level, limit, alone)
    # the capture (streaming path) and its log (index path) both
    assert filtered(tmp_path, src, *flags) == want
    log = tmp_path / "in.rlog"
    replay("convert", src, "-o", log, "-q")
    assert filtered(tmp_path, log, *flags) == want


def test_since_until_absolute_and_relative(tmp_path):
    recs = ls(SAMPLE)
    t0 = recs[0]["ts"]
    reqs = sorted({r["ts"] for r in recs if r["kind"] == "request"})
    lo = (reqs[5] + reqs[6]) / 2
    hi = (reqs[20] + reqs[21]) / 2

    def keep(e):
        return lo <= e["ts"] < hi

    want = expected(recs, keep, request_level=False, keep_alone=lambda r: lo <= r["ts"] < hi)
    assert 10 < len(want) < len(recs) - 10
    rel = filtered(tmp_path, SAMPLE, "--since", f"+{lo - t0:.6f}s", "--until", f"+{(hi - t0) * 1000:.3f}ms")
    assert rel == want
    ab = filtered(tmp_path, SAMPLE, "--since", f"@{lo:.6f}", "--until", f"@{hi:.6f}")
    assert ab == want
    from datetime import datetime, timezone

    iso = datetime.fromtimestamp(lo, timezone.utc).isoformat()
    iso_hi = datetime.fromtimestamp(hi, timezone.utc).isoformat().replace("+00:00", "Z")
    assert filtered(tmp_path, SAMPLE, "--since", iso, "--until", iso_hi) == want


def test_sample_keeps_sessions_whole_and_is_stable(tmp_path):
    msgs = list(synthetic(random.Random(3), conns=400, unpaired=0))
    log = tmp_path / "s.rlog"
    write_log(log, msgs)
    kept = run_rules(LogReader(log), {"sample": "25%"})
    conns = {m.conn for m in kept}
    assert 0.15 < len(conns) / len({m.conn for m in msgs}) < 0.35
    by_conn = collections.Counter(m.conn for m in msgs)
    assert all(collections.Counter(m.conn for m in kept)[c] == by_conn[c] for c in conns)
    again = run_rules(LogReader(log), {"sample": "25"})
    assert again == kept
    # a larger sample contains the smaller one
    assert conns <= {m.conn for m in run_rules(LogReader(log), {"sample": "50%"})}


def test_unpaired_responses_follow_only_connection_level_filters():
    src = DATA / "zeek_zeek_zero-length-bodies-with-drops.pcap"
    msgs = list(open_input(str(src)))
    alone = [m for m in msgs if m.index < 0]
    assert alone
    assert all(m.index >= 0 for m in run_rules(msgs, {"method": "GET"}))
    assert set(map(id, alone)) <= set(map(id, run_rules(msgs, {"sample": "100%"})))
    assert set(map(id, alone)) <= set(map(id, run_rules(msgs, {"since": "+0s"})))


def test_dropping_a_request_drops_its_responses_and_the_other_way():
    # the interim 100 Continue completes before its request: it still follows the request's fate
    msgs = list(open_input(str(SAMPLE)))
    kept = run_rules(msgs, {"path-include": "^/api/events"})
    assert [(m.kind, m.status) for m in kept] == [(KIND_RESPONSE, 100), (KIND_REQUEST, 0), (KIND_RESPONSE, 200)]
    kept = run_rules(msgs, {"status": "404"})
    assert sorted((m.kind, m.uri) for m in kept) == sorted(
        [(k, u) for u in ("/static/img/missing.png", "/no/such/page?ref=home") for k in (0, 1)])


# -- hand-built messages: headers, hosts, missing requests ---------------------------------------

T = 1_700_000_000_000_000_000


def req(conn, index, t, uri="/", method="GET", headers=(), body=b""):
    head = f"{method} {uri} HTTP/1.1\r\n".encode() + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    data = head + body
    return Message(KIND_REQUEST, conn, index, t, t + 10, ("10.0.0.1", 1000 + conn), ("10.0.0.2", 80),
                   0, data, method, uri, 0, len(body), len(head))


def resp(conn, index, t, status=200, method="GET", uri="/", interim=False):
    head = f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n".encode()
    body = b"" if interim else b"ok"
    if interim:
        head = f"HTTP/1.1 {status} Continue\r\n\r\n".encode()
    return Message(KIND_RESPONSE, conn, index, t, t + 10, ("10.0.0.1", 1000 + conn), ("10.0.0.2", 80),
                   F_INTERIM if interim else 0, head + body, method if index >= 0 else None,
                   uri if index >= 0 else None, status, len(body), len(head))


def run_rules(source, values, index=True):
    return list(Rules(settings_from_values(values)).apply(source, index=index))


def test_header_filters():
    msgs = [
        req(0, 0, T, headers=[b"Host: a.example", b"X-Tenant: acme", b"Accept: text/html"]),
        resp(0, 0, T + 100),
        req(1, 0, T + 200, headers=[b"Host: b.example:8080", b"x-tenant: other", b"X-Tenant: acme-2"]),
        resp(1, 0, T + 300, 500),
        req(2, 0, T + 400, headers=[b"Host: A.Example:80"]),
        resp(2, 0, T + 500),
        resp(3, 0, T + 600),          # its request is elsewhere: no headers, no host
    ]
    keys = lambda ms: sorted({(m.conn, m.index) for m in ms})  # noqa: E731
    assert keys(run_rules(msgs, {"header": "X-Tenant: ^acme$"})) == [(0, 0)]
    assert keys(run_rules(msgs, {"header": ["x-tenant: ^acme", "Accept: html"]})) == [(0, 0)]
    assert keys(run_rules(msgs, {"header": "x-tenant: acme-2"})) == [(1, 0)]   # any of its values
    assert keys(run_rules(msgs, {"header": "X-Tenant:"})) == [(0, 0), (1, 0)]   # present
    assert keys(run_rules(msgs, {"header-exclude": "X-Tenant: acme"})) == [(2, 0), (3, 0)]
    assert keys(run_rules(msgs, {"host": "a.example"})) == [(0, 0), (2, 0)]
    assert keys(run_rules(msgs, {"host": "b.example:8080"})) == [(1, 0)]
    assert keys(run_rules(msgs, {"host": "b.example:80"})) == []
    assert keys(run_rules(msgs, {"host": "*.EXAMPLE"})) == [(0, 0), (1, 0), (2, 0)]
    # a response whose request is not in the input is judged by its own fields
    assert keys(run_rules(msgs, {"status": "200", "method": "GET"})) == [(0, 0), (2, 0), (3, 0)]


def test_bad_filters_name_the_rule():
    for values, text in [
        ({"path-include": "(["}, "--path-include '(['"),
        ({"header": "no colon here"}, "--header 'no colon here'"),
        ({"header": "Bad Name: x"}, "expected 'Name: regex'"),
        ({"header-exclude": "X: (?P<"}, "invalid regex"),
        ({"status": "2x"}, "--status 2x: not a status"),
        ({"status": "600-100"}, "not a status"),
        ({"sample": "150%"}, "--sample 150%: not a percentage"),
        ({"sample": "ten"}, "not a percentage"),
        ({"since": "yesterday"}, "--since yesterday: not a time"),
        ({"limit": 0}, "--limit 0: not a count"),
        ({"method": "GE T"}, "not an HTTP method"),
        ({"host": "a/b"}, "not a host"),
    ]:
        with pytest.raises(UsageError) as e:
            Rules(settings_from_values(values))
        assert text in str(e.value) and "\n" not in str(e.value), (values, str(e.value))


# -- index path == streaming path == an oracle, on random logs ------------------------------------

METHODS = ["GET", "POST", "PUT", "HEAD"]
URIS = ["/", "/api/a?x=1", "/api/b", "/static/c.css", "http://h.example/api/abs"]
HOSTS = [b"a.example", b"b.example:8080", None]
STATUSES = [200, 201, 301, 404, 500, 503]


def synthetic(rnd, conns=6, per_conn=6, unpaired=3, shuffle=True):
    """Random messages: exchanges with or without request, interim or final responses, unpaired
    responses; in a random order (the paths must agree whatever the order)."""
    msgs = []
    for c in range(conns):
        for i in range(rnd.randint(0, per_conn)):
            t = T + rnd.randint(0, 5_000_000_000)
            method, uri = rnd.choice(METHODS), rnd.choice(URIS)
            host = rnd.choice(HOSTS)
            headers = ([b"Host: " + host] if host else []) + \
                      ([b"X-T: " + rnd.choice([b"one", b"two"])] if rnd.random() < 0.6 else [])
            if rnd.random() < 0.9:
                msgs.append(req(c, i, t, uri, method, headers))
            if rnd.random() < 0.2:
                msgs.append(resp(c, i, t + rnd.randint(1, 300_000_000), 100, method, uri, interim=True))
            if rnd.random() < 0.85:
                msgs.append(resp(c, i, t + rnd.randint(10, 1_000_000_000), rnd.choice(STATUSES), method, uri))
    for k in range(unpaired):
        msgs.append(resp(rnd.randrange(max(conns, 1)), -1, T + rnd.randint(0, 5_000_000_000),
                         rnd.choice(STATUSES)))
    if shuffle:
        rnd.shuffle(msgs)
    return msgs


def write_log(path, msgs, block_records=7):
    with LogWriter(path, block_records=block_records, threads=False) as w:
        for m in msgs:
            w.write(m)


def oracle(msgs, v):
    """What the rules keep, by the module's rules written out the plainest way."""
    def host(m):
        if m is None:
            return None
        for line in m.data.split(b"\r\n")[1:]:
            if line.lower().startswith(b"host:"):
                return line[5:].strip().decode()
        if m.uri and "://" in m.uri:
            return m.uri.split("://")[1].split("/")[0]
        return None

    def values(m, name):
        if m is None:
            return []
        return [line.split(b":", 1)[1].strip().decode() for line in m.data.split(b"\r\n")[1:]
                if b":" in line and line.split(b":", 1)[0].strip().lower() == name.lower().encode()]

    t0 = msgs[0].ts_first if msgs else 0
    groups = collections.OrderedDict()
    for m in msgs:
        if m.index >= 0:
            groups.setdefault((m.conn, m.index), []).append(m)

    def judge(rep, request, status, alone=False):
        ok = True
        if "method" in v:
            ok &= rep.method in v["method"]
        if "path-include" in v:
            ok &= rep.uri is not None and re.search(v["path-include"], rep.uri) is not None
        if "path-exclude" in v:
            ok &= not (rep.uri is not None and re.search(v["path-exclude"], rep.uri))
        if "host" in v:
            h = host(request)
            ok &= h is not None and h.split(":")[0] == v["host"]
        if "header" in v:
            ok &= any(re.search("one", x) for x in values(request, "X-T"))
        if "header-exclude" in v:
            ok &= not any(re.search("two", x) for x in values(request, "X-T"))
        if "status" in v:
            ok &= status in v["status"]
        if "status-exclude" in v:
            ok &= status not in v["status-exclude"]
        if "since" in v:
            ok &= rep.ts_first >= t0 + v["since"]
        if "until" in v:
            ok &= rep.ts_first < t0 + v["until"]
        if "sample" in v:
            ok &= (splitmix64(rep.conn) >> 11) < round(v["sample"] / 100 * (1 << 53))
        return ok

    kept = set()
    for key, ms in groups.items():
        request = next((m for m in ms if m.kind == KIND_REQUEST), None)
        final = next((m for m in ms if m.kind == KIND_RESPONSE and not m.flags & F_INTERIM), None)
        if judge(request or ms[0], request, final.status if final else 0):
            if "limit" not in v or len(kept) < v["limit"]:
                kept.add(key)
    request_level = bool(set(v) - {"since", "until", "sample"})
    return [m for m in msgs if (m.index >= 0 and (m.conn, m.index) in kept) or
            (m.index < 0 and not request_level and judge(m, None, 0))]


def as_flags(v):
    out = {}
    for k, x in v.items():
        if k in ("status", "status-exclude"):
            out[k] = ",".join(map(str, x))
        elif k == "method":
            out[k] = list(x)
        elif k in ("since", "until"):
            out[k] = f"+{x}ns"
        elif k == "sample":
            out[k] = f"{x}%"
        elif k == "header":
            out[k] = "X-T: one"
        elif k == "header-exclude":
            out[k] = "x-t: two"
        else:
            out[k] = x
    return out


rule_values = st.fixed_dictionaries({}, optional={
    "method": st.sets(st.sampled_from(METHODS), min_size=1),
    "path-include": st.sampled_from(["^/api", r"\.css$", "abs"]),
    "path-exclude": st.sampled_from(["^/$", "static"]),
    "host": st.sampled_from(["a.example", "b.example"]),
    "header": st.just(True),
    "header-exclude": st.just(True),
    "status": st.sets(st.sampled_from(STATUSES), min_size=1),
    "status-exclude": st.sets(st.sampled_from(STATUSES), min_size=1),
    "since": st.integers(0, 4_000_000_000),
    "until": st.integers(500_000_000, 6_000_000_000),
    "sample": st.sampled_from([10, 50, 90]),
    "limit": st.integers(1, 10),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), v=rule_values)
def test_index_and_streaming_paths_agree_with_the_oracle(tmp_path_factory, seed, v):
    rnd = random.Random(seed)
    msgs = synthetic(rnd)
    want = oracle(msgs, v)
    path = tmp_path_factory.mktemp("h") / "x.rlog"
    write_log(path, msgs)
    values = as_flags(v)
    by_index = run_rules(LogReader(path), values)
    streamed_log = run_rules(LogReader(path), values, index=False)
    streamed = run_rules(msgs, values)
    assert by_index == streamed_log == streamed == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), v=rule_values, n=st.integers(2, 3))
def test_a_share_of_the_connections_keeps_what_the_whole_keeps_of_them(tmp_path_factory, seed, v,
                                                                       n):
    """``play --workers``: each worker's rules see only its share of the connections; what they
    keep is what the rules keep of the whole log on those connections (relative --since and
    --until still count from the log's first message), on both paths, and the counts add up."""
    import numpy as np

    from replay.play.stream import Shard, shard_assignment

    limit = v.pop("limit", None)          # a limit is shared out: checked per share below
    rnd = random.Random(seed)
    msgs = synthetic(rnd)
    path = tmp_path_factory.mktemp("h") / "x.rlog"
    write_log(path, msgs)
    values = as_flags(v)
    whole = run_rules(LogReader(path), values)
    listed = np.unique(np.array([m.conn for m in msgs][::2], dtype=np.uint64))   # some unlisted
    assign = shard_assignment(listed, np.zeros(len(listed), np.int64), n)
    for index in (True, False):
        got, read = [], 0
        for i in range(n):
            shard = Shard(i, n, listed, assign)
            rules = Rules(settings_from_values(values))
            mine = list(rules.apply(LogReader(path), index=index, shard=shard))
            assert mine == [m for m in whole if shard.owns(m.conn)]
            assert shard.mask(np.array([m.conn for m in mine], np.uint64)).all()
            got += mine
            read += rules.stats["read"]
        assert sorted(got, key=lambda m: (m.conn, m.index, m.kind)) == \
            sorted(whole, key=lambda m: (m.conn, m.index, m.kind))
        assert read == len(msgs)
    if limit is not None:                 # each share's first exchanges, on both paths alike
        values = as_flags(dict(v, limit=limit))
        for i in range(n):
            shard = Shard(i, n, listed, assign)
            by_index = list(Rules(settings_from_values(values)).apply(LogReader(path), shard=shard))
            streamed = list(Rules(settings_from_values(values)).apply(LogReader(path), index=False,
                                                                      shard=shard))
            assert by_index == streamed
            assert len({(m.conn, m.index) for m in by_index if m.index >= 0}) <= limit


def test_paths_agree_on_the_sample_log(tmp_path):
    log = tmp_path / "s.rlog"
    replay("convert", SAMPLE, "-o", log, "-q")
    for values in [{"status": "2xx"}, {"header": "Cookie: sid="}, {"host": "127.0.0.1"},
                   {"header-exclude": "Accept-Encoding: gzip", "since": "+0.3s"}]:
        a = run_rules(LogReader(log), values)
        b = run_rules(LogReader(log), values, index=False)
        assert a == b and a, values


def test_streaming_bounds_decide_early_and_say_so():
    # a request whose response comes after more than max_pending messages: decided without it
    from replay.rules.filters import FilterSet, StatusFilter

    fs = FilterSet(StatusFilter.from_settings({"status": settings_from_values({"status": "200"})}))
    s = fs.stream(max_pending=5)
    out = []
    msgs = [req(0, 0, T)]
    for c in range(1, 7):
        msgs += [req(c, 0, T + c * 10), resp(c, 0, T + c * 10 + 5)]
    msgs.append(resp(0, 0, T + 100))
    for m in msgs:
        out += s.push(m)
    out += s.finish()
    assert s.forced >= 1
    assert (0, 0) not in {(m.conn, m.index) for m in out}     # its 200 came too late
    assert {(m.conn, m.index) for m in out} == {(c, 0) for c in range(1, 7)}
    # by capture time: a quiet stream releases what waited longer than the wait
    s = fs.stream(wait=1.0)
    assert s.push(req(0, 0, T)) == []
    assert s.advance(T + 2_000_000_000) == [] and s.forced == 1


def test_limit_counts_in_order_of_first_appearance():
    msgs = [req(0, 0, T + 50), req(1, 0, T + 10), resp(1, 0, T + 60), resp(0, 0, T + 70),
            req(2, 0, T + 80), resp(2, 0, T + 90)]
    kept = run_rules(msgs, {"limit": 2, "status": "200"})
    assert [(m.conn, m.kind) for m in kept] == [(0, 0), (1, 0), (1, 1), (0, 1)]


def test_pcap_and_its_log_filter_the_same(tmp_path):
    log = tmp_path / "s.rlog"
    replay("convert", SAMPLE, "-o", log, "-q")
    for flags in (["--status", "2xx", "--method", "GET"], ["--host", "127.0.0.1:8080", "--limit", "7"]):
        a = filtered(tmp_path, SAMPLE, *flags)
        b = filtered(tmp_path, log, *flags)
        assert a == b and a
