"""`replay report` end to end: a capture of a JSON API replayed against two releases of it
(``tests/report_app.py``, real HTTP servers on loopback), then compared.

Release 2 carries four injected regressions; both releases carry noise (timestamps, request
ids, a random backend header, shuffled arrays). The report must find exactly the injected
regressions, on the right endpoints and fields, and none of the noise.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.play_helpers import MS, T0, write_capture
from tests.report_app import INJECTED, AppThread, traffic

LAT = ["--latency-min-ms", "10"]     # the injected slowdown is 30 ms; loopback jitter is not


def replay(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _raw(port, data: bytes) -> bytes:
    """One request on its own connection; the response's bytes as they came."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        n = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
        while len(body) < n:
            body += s.recv(65536)
        return head + b"\r\n\r\n" + body


def _request(method, uri, body):
    head = f"{method} {uri} HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\n".encode()
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    v1, v2 = AppThread(1), AppThread(2)
    try:
        conns = []
        for c, reqs in enumerate(traffic()):
            items = []
            for k, (method, uri, body) in enumerate(reqs):
                req = _request(method, uri, body)
                items.append((T0 + (k * 8 + c) * 3 * MS, req, _raw(v1.port, req)))
            conns.append(items)
        cap = write_capture(d / "prod.pcap", conns)
        out = {}
        for name, app in (("primary", v1), ("secondary", v1), ("candidate", v2)):
            p = replay("play", cap, "--target", app.url, "--speed", "max", "-o", d / f"{name}.rlog", "-q")
            assert p.returncode == 0, p.stderr
            out[name] = d / f"{name}.rlog"
        out["dir"] = d
        yield out
    finally:
        v1.close()
        v2.close()


def found(report):
    got = set()
    for e in report["endpoints"]:
        for r in e["regressions"]:
            got.add((e["endpoint"], r["kind"], None if r["kind"] == "latency" else r["field"]))
    return got


def test_candidate_against_baseline_and_noise_finds_exactly_the_injected(runs):
    js = runs["dir"] / "cand.json"
    p = replay("report", runs["candidate"], "--baseline", runs["primary"], "--noise",
               runs["secondary"], "--json", js, "--fail-on", "regression", *LAT)
    assert p.returncode == 3, p.stderr
    assert "gate breached" in p.stderr
    rep = json.loads(js.read_text())
    assert found(rep) == INJECTED, (found(rep), p.stdout)
    assert rep["totals"]["exchanges"] == sum(len(c) for c in traffic())
    assert rep["totals"]["without_baseline"] == 0
    assert not rep["suspected_noise"]
    ep = {e["endpoint"]: e for e in rep["endpoints"]}
    # the noise is seen, and judged as noise
    search = {f["field"]: f["verdict"] for f in ep["GET /api/search"]["fields"]}
    assert search["$.took_ms"] == "noise" and search["$.trace"] == "noise"
    # the price changed on the ids divisible by 7: 8 of 56
    price = next(r for r in ep["GET /api/items/{id}"]["regressions"] if r["field"] == "$.price")
    assert price["count"] == 8
    x = price["examples"][0]
    assert int(x["uri"].rsplit("/", 1)[1]) % 7 == 0 and x["candidate_value"] == x["baseline_value"] + 1
    assert x["curl"].startswith("curl ") and x["uri"] in x["curl"]
    orders = next(r for r in ep["POST /api/orders"]["regressions"] if r["kind"] == "status")
    assert orders["count"] == 14 and orders["examples"][0]["candidate_status"] == "500"
    lat = ep["GET /api/users/{id}"]["latency"]["service"]
    assert lat["candidate"]["p50"] - lat["baseline"]["p50"] > 15
    # the terminal table names them too
    assert "GET /api/users/{id}" in p.stdout and "latency" in p.stdout


def test_the_same_release_twice_has_no_regression(runs):
    js = runs["dir"] / "same.json"
    p = replay("report", runs["secondary"], "--baseline", runs["primary"], "--json", js,
               "--fail-on", "regression", *LAT)
    rep = json.loads(js.read_text())
    assert found(rep) == set(), found(rep)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no regressions" in p.stdout
    # without a noise run, what changes on every answer is suspected, and shown apart
    suspects = {(s["endpoint"], s["field"]) for s in rep["suspected_noise"]}
    assert ("GET /api/items/{id}", "$.updated_at") in suspects
    assert ("GET /api/search", "$.took_ms") in suspects
    assert ("GET /api/items/{id}", "header:x-backend-node") in suspects


def test_candidate_against_the_recording(runs):
    js = runs["dir"] / "rec.json"
    p = replay("report", runs["candidate"], "--json", js, *LAT)
    assert p.returncode == 0, p.stderr
    rep = json.loads(js.read_text())
    assert rep["runs"]["baseline"]["what"].startswith("the recording")
    got = found(rep)
    assert {g for g in got if g[1] != "latency"} == {g for g in INJECTED if g[1] != "latency"}


def test_ignore_and_endpoint_rules(runs):
    js = runs["dir"] / "ign.json"
    p = replay("report", runs["candidate"], "--baseline", runs["primary"], "--noise", runs["secondary"],
               "--ignore", "json:$.price", "--ignore", "header:Cache-Control",
               "--endpoint", "^/api/items/=items", "--json", js, *LAT)
    assert p.returncode == 0, p.stderr
    rep = json.loads(js.read_text())
    assert ("GET items", "body", "$.price") not in found(rep)
    assert {e["endpoint"] for e in rep["endpoints"]} >= {"GET items", "POST /api/orders"}
    assert not [r for e in rep["endpoints"] if e["endpoint"] == "GET items" for r in e["regressions"]]


@pytest.mark.parametrize("args,msg", [
    (["nosuch.rlog"], "no such file"),
    (["{capture}"], "a capture, not a replay's output log"),
    (["{primary}", "--fail-on", "sometimes"], "--fail-on"),
    (["{primary}", "--ignore", "xml:$"], "--ignore"),
    (["{primary}", "--json", "{primary}"], "would overwrite the candidate"),
    (["{primary}", "--json", "/nonexistent/dir/r.json"], "does not exist"),
])
def test_bad_input_is_one_line(runs, args, msg):
    subst = {"capture": runs["dir"] / "prod.pcap", "primary": runs["primary"]}
    p = replay("report", *[a.format(**subst) for a in args])
    assert p.returncode == (1 if msg == "does not exist" else 2), p.stderr   # 1: an output error
    assert msg in p.stderr and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_replay_errors_and_the_intended_send_time(tmp_path):
    """A target that resets every connection: each request of the run log has a failed record
    naming the error, and the report calls it an error regression against the recording.
    A timed run's requests carry when they were due and when they left."""
    from replay.events import F_FAILED, F_REPLAYED, KIND_REQUEST
    from replay.log import LogReader
    from tests.play_helpers import FaultServer, spread_capture

    cap = spread_capture(tmp_path / "s.pcap", n=12, conns=2, span_ns=300 * MS)
    out = tmp_path / "reset.rlog"
    with FaultServer("reset") as srv:
        p = replay("play", cap, "--target", srv.url, "-o", out, "-q", "--timeout", "2")
        assert p.returncode == 1, p.stderr          # every request failed
    msgs = list(LogReader(str(out)))
    failed = [m for m in msgs if m.flags & F_FAILED]
    reqs = [m for m in msgs if m.flags & F_REPLAYED and m.kind == KIND_REQUEST]
    assert len(failed) == len(reqs) == 12
    assert {m.data for m in failed} <= {b"reset", b"closed"} and failed[0].status == 0
    # a timed replay: due (ts_first) no later than sent (ts_last), and close to it
    assert all(0 <= m.ts_last - m.ts_first < 1000 * MS for m in reqs)
    js = tmp_path / "r.json"
    p = replay("report", out, "--json", js, "--fail-on", "errors>0")
    assert p.returncode == 3, p.stderr
    rep = json.loads(js.read_text())
    (ep,) = rep["endpoints"]
    kinds = {(r["kind"], r["field"]) for r in ep["regressions"]}
    assert kinds and all(k == "error" for k, _ in kinds), kinds
    assert rep["totals"]["candidate"]["errors"] == 12


def test_options_from_the_report_table_of_a_rules_file(runs):
    rules = runs["dir"] / "rules.toml"
    rules.write_text('method = ["GET", "POST"]\n\n[report]\nignore = ["json:$.price", "header:cache-control"]\n'
                     'endpoint = ["^/api/items/=items"]\nfail-on = ["regression"]\nlatency-min-ms = 10\n')
    js = runs["dir"] / "toml.json"
    p = replay("report", runs["candidate"], "--baseline", runs["primary"], "--noise", runs["secondary"],
               "--rules", rules, "--json", js)
    rep = json.loads(js.read_text())
    assert p.returncode == 3                     # the gate from the file: orders and users regressed
    assert not [r for e in rep["endpoints"] if e["endpoint"] == "GET items" for r in e["regressions"]]
    # the same file serves filter and play: they skip the [report] table
    p = replay("filter", runs["primary"], "--rules", rules, "--dry-run")
    assert p.returncode == 0, p.stderr
    rules.write_text("[report]\nthreshold = 3\n")
    p = replay("report", runs["candidate"], "--rules", rules)
    assert p.returncode == 2 and "unknown key 'threshold'" in p.stderr


def test_play_report_files_merge(tmp_path):
    """The --report files of replayers that ran side by side merge: counts added, latency
    histograms added exactly (the merged percentiles are those of both runs' samples together);
    mixed with a log, or with comparison options, they are refused in one line."""
    from hdrh.histogram import HdrHistogram

    from tests.play_helpers import SAMPLE

    paths = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.json"
        r = replay("play", SAMPLE, "--sink", "--speed", "max", "--report", p, "-q")
        assert r.returncode == 0, r.stderr
        paths.append(p)
    one = [json.loads(p.read_text()) for p in paths]
    out = tmp_path / "merged.json"
    r = replay("report", *paths, "--json", out)
    assert r.returncode == 0, r.stderr
    assert "2 reports merged" in r.stdout and "replayed 74 of 74 requests" in r.stdout
    m = json.loads(out.read_text())
    assert m["attempted"] == m["answered"] == 74 and m["merged_from"] == [str(p) for p in paths]
    assert m["statuses"] == {k: 2 * v for k, v in one[0]["statuses"].items()}
    both = HdrHistogram.decode(one[0]["histograms"]["latency"])
    both.add(HdrHistogram.decode(one[1]["histograms"]["latency"]))
    assert both.get_total_count() == 74
    assert m["latency_ms"]["p99"] == round(both.get_value_at_percentile(99) / 1000, 4)
    assert HdrHistogram.decode(m["histograms"]["latency"]).get_total_count() == 74
    # requests/s: all answers over the window of both runs (here one after the other)
    w = [one[0]["answer_window_unix"], one[1]["answer_window_unix"]]
    assert m["answer_window_unix"] == [min(w[0][0], w[1][0]), max(w[0][1], w[1][1])]
    assert m["requests_per_s"] == round(74 / (m["answer_window_unix"][1] -
                                              m["answer_window_unix"][0]), 1)
    r = replay("report", paths[0], SAMPLE)
    assert r.returncode == 2 and "not both" in r.stderr.strip().splitlines()[-1], r.stderr
    r = replay("report", *paths, "--fail-on", "regression")
    assert r.returncode == 2 and "are merged, not compared" in r.stderr, r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"attempted": 1}')
    r = replay("report", paths[0], bad)
    assert r.returncode == 2 and "not a --report file" in r.stderr and "Traceback" not in r.stderr
