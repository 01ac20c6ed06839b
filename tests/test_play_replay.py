"""``replay play`` as a user runs it, against real servers on loopback (the built-in sink)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import pytest
from play_helpers import (MS, SAMPLE, T0, FaultServer, SinkThread, env, free_port, get, ok_response,
                          replay_cmd, server_tls_context, spread_capture, write_capture)

from replay.events import F_CHUNKED, F_REPLAYED, KIND_REQUEST
from replay.pipeline import open_input


def play(*args, timeout=60, check=True):
    p = subprocess.run(replay_cmd() + ["play", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env())
    assert "Traceback" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p


def play_report(tmp_path, *args, **kw):
    rep = tmp_path / "report.json"
    p = play(*args, "--report", rep, "-q", **kw)
    return json.loads(rep.read_text()), p


def recorded_by_conn(path):
    out = {}
    for m in open_input(str(path)):
        if m.kind == KIND_REQUEST:
            out.setdefault(m.conn, []).append(m)
    return {c: [m.data for m in sorted(ms, key=lambda m: m.index)] for c, ms in out.items()}


def with_host(data, host):
    return re.sub(rb"(?im)^(host):[^\r\n]*", lambda m: m.group(1) + b": " + host.encode(), data, count=1)


def test_exact_bytes_order_and_connections(tmp_path):
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, SAMPLE, "--target", sink.url, "--speed", "10")
        got = sink.by_conn()
    expect = recorded_by_conn(SAMPLE)
    host = f"127.0.0.1:{sink.port}"
    # one replay connection per recorded connection, each with exactly the recorded requests,
    # in recorded order, byte for byte but for the Host header
    assert len(got) == len(expect) == 14
    assert sorted(got.values()) == sorted([with_host(d, host) for d in reqs] for reqs in expect.values())
    assert rep["sent"] == rep["answered"] == 37 and rep["error_total"] == 0
    assert rep["connections"]["opened"] == 14


def test_plays_a_log_like_its_capture(tmp_path):
    log = tmp_path / "sample.rlog"
    p = subprocess.run(replay_cmd() + ["convert", str(SAMPLE), "-o", str(log)], capture_output=True,
                       text=True, env=env())
    assert p.returncode == 0, p.stderr
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, log, "--target", sink.url, "--speed", "max")
        got = sink.by_conn()
    host = f"127.0.0.1:{sink.port}"
    assert sorted(got.values()) == sorted([with_host(d, host) for d in reqs]
                                          for reqs in recorded_by_conn(SAMPLE).values())
    assert rep["answered"] == 37 and rep["recorded_statuses"]["304"] == 2


def test_keep_host_sends_the_recorded_bytes(tmp_path):
    with SinkThread() as sink:
        play(SAMPLE, "--target", sink.url, "--speed", "max", "--keep-host", "-q")
        got = sink.by_conn()
    assert sorted(got.values()) == sorted(recorded_by_conn(SAMPLE).values())


def test_no_keepalive_and_connection_cap(tmp_path):
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, SAMPLE, "--target", sink.url, "--speed", "max", "--no-keepalive")
        assert len(sink.by_conn()) == 37 and rep["connections"]["opened"] == 37
    cap = spread_capture(tmp_path / "s.pcap", n=12, conns=4, span_ns=60 * MS)
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, cap, "--target", sink.url, "--connections", "1")
        assert rep["connections"]["max_open"] == 1 and rep["answered"] == 12
        # one connection at a time: each recorded connection still gets its own
        assert len(sink.by_conn()) == 4


def test_speed_factor(tmp_path):
    cap = spread_capture(tmp_path / "s.pcap", n=11, conns=2, span_ns=1_000_000_000)
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, cap, "--target", sink.url, "--speed", "10")
        ts = sorted(r["ts"] for r, _ in sink.records)
    spread = ts[-1] - ts[0]
    assert 0.09 < spread < 0.2, spread                 # ~1 s recorded, at 10x: ~0.1 s
    assert rep["lateness_ms"]["p50"] < 5
    with SinkThread() as sink:
        play(cap, "--target", sink.url, "--speed", "20", "-q")
        ts = sorted(r["ts"] for r, _ in sink.records)
    assert 0.045 < ts[-1] - ts[0] < 0.15


def test_rate_limit_loop_and_duration(tmp_path):
    cap = spread_capture(tmp_path / "s.pcap", n=5, conns=1, span_ns=10_000_000_000)
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, cap, "--target", sink.url, "--rate", "100", "--loop", "--limit", "20")
        ts = sorted(r["ts"] for r, _ in sink.records)
    assert rep["sent"] == 20 and len(ts) == 20
    assert 0.17 < ts[-1] - ts[0] < 0.35                 # 19 gaps of 10 ms, recorded gaps ignored
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, cap, "--target", sink.url, "--speed", "max", "--loop",
                             "--limit", "50")
        assert rep["sent"] == rep["answered"] == 50 == len(sink.records)
    with SinkThread() as sink:
        t = time.monotonic()
        rep, _ = play_report(tmp_path, cap, "--target", sink.url, "--rate", "50", "--loop",
                             "--duration", "0.3")
        assert time.monotonic() - t < 5
        assert 12 <= rep["sent"] <= 17 and rep["answered"] == rep["sent"]


def test_dry_run_sends_nothing(tmp_path):
    with SinkThread() as sink:
        p = play(SAMPLE, "--target", sink.url, "--speed", "2", "--dry-run")
        time.sleep(0.05)
        assert sink.records == []
    assert "37 requests on 14 connections" in p.stdout
    assert "expected duration 0.404 s" in p.stdout and "nothing sent" in p.stdout
    p = play(SAMPLE, "--dry-run", "--speed", "max")
    assert "full speed" in p.stdout


def test_report_fields(tmp_path):
    from replay.log import LogReader

    out = tmp_path / "out.rlog"
    with SinkThread() as sink:
        rep, p = play_report(tmp_path, SAMPLE, "--target", sink.url, "--speed", "10", "-o", out)
    # every byte that came back is counted once: the final responses in the output log, and the
    # sink's "100 Continue" to each request that expects one
    replayed = [m for m in LogReader(str(out)) if m.flags & F_REPLAYED]
    finals = sum(len(m.data) for m in replayed if m.kind != KIND_REQUEST)
    interims = sum(b"\r\nexpect: 100-continue" in m.data[:m.head_length].lower()
                   for m in replayed if m.kind == KIND_REQUEST)
    assert interims == 1
    assert rep["bytes"]["received"] == finals + interims * len(b"HTTP/1.1 100 Continue\r\n\r\n")
    for key in ("sent", "answered", "errors", "statuses", "recorded_statuses", "status_comparison",
                "latency_ms", "latency_from_intended_ms", "lateness_ms", "connections", "schedule"):
        assert key in rep, key
    assert set(rep["errors"]) >= {"refused", "reset", "timeout", "bad_response"}
    assert set(rep["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert {"p50", "p99", "max"} <= set(rep["lateness_ms"])
    assert rep["statuses"] == {"200": 37}
    assert rep["recorded_statuses"] == {"200": 31, "206": 1, "301": 1, "304": 2, "404": 2}
    sc = rep["status_comparison"]
    assert sc["same"] == 31 and sc["different"] == 6 and sc["changes"]["304 -> 200"] == 2
    assert 0 <= rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"] <= rep["latency_ms"]["max"] < 1000
    assert rep["lateness_samples"] == 37 and p.stdout == ""


def test_summary_on_stdout(tmp_path):
    p = play(SAMPLE, "--sink", "--speed", "4")
    assert p.stdout.startswith("replayed 37 of 37 requests")
    assert "lateness ms" in p.stdout and "latency ms" in p.stdout
    assert "sink: received 37 requests on 14 connections" in p.stderr


@pytest.mark.parametrize("mode,kind", [("reset", "reset"), ("garbage", "bad_response"),
                                       ("silent", "timeout"), ("close", "closed")])
def test_faults_are_counted(tmp_path, mode, kind):
    cap = spread_capture(tmp_path / "s.pcap", n=6, conns=2, span_ns=50 * MS)
    with FaultServer(mode) as srv:
        rep, p = play_report(tmp_path, cap, "--target", srv.url, "--timeout", "0.3", check=False)
    assert p.returncode == 1 and p.stderr.strip() == "replay play: all 6 requests failed"
    assert rep["attempted"] == 6 and rep["answered"] == 0
    assert rep["errors"][kind] >= 2 and rep["error_total"] == 6, rep["errors"]
    assert rep["in_flight"] == 0


def test_a_slow_answer_delays_only_its_own_connection(tmp_path):
    cap = write_capture(tmp_path / "slow.pcap", [
        [(T0 + 10 * MS, get("/slow"), ok_response()), (T0 + 30 * MS, get("/after-slow"), ok_response())],
        [(T0 + 20 * MS + i * 40 * MS, get(f"/other/{i}"), ok_response()) for i in range(8)],
    ])
    with FaultServer("slow") as srv:
        rep, _ = play_report(tmp_path, cap, "--target", srv.url)
    assert rep["answered"] == 10 and rep["error_total"] == 0
    # the request behind the slow answer left ~280 ms late, and is counted as held by it ...
    assert rep["held_by_response"] == 1 and rep["lateness_ms"]["max"] > 250
    # ... while the other connection kept its schedule
    assert rep["lateness_not_held_ms"]["max"] < 20
    assert rep["latency_ms"]["max"] > 290


def test_refused(tmp_path):
    port = free_port()
    rep, p = play_report(tmp_path, SAMPLE, "--target", f"http://127.0.0.1:{port}", "--speed", "max",
                         check=False)
    assert p.returncode == 1
    assert rep["errors"]["refused"] == 37 and rep["sent"] == 0 and rep["attempted"] == 37


def test_output_log(tmp_path):
    from replay.log import LogReader

    out = tmp_path / "replayed.rlog"
    with SinkThread() as sink:
        play(SAMPLE, "--target", sink.url, "--speed", "max", "-o", out, "-q")
    msgs = list(LogReader(str(out)))
    replayed = [m for m in msgs if m.flags & F_REPLAYED]
    reqs = {(m.conn, m.index): m for m in replayed if m.kind == KIND_REQUEST}
    resps = {(m.conn, m.index): m for m in replayed if m.kind != KIND_REQUEST}
    recorded = {(m.conn, m.index) for m in open_input(str(SAMPLE)) if m.kind == KIND_REQUEST}
    assert set(reqs) == set(resps) == recorded
    for key, r in resps.items():
        assert r.status == 200 and r.method == reqs[key].method and r.ts_first >= reqs[key].ts_first
    # after them, the recorded exchanges of the same requests, unchanged
    want = [m for m in open_input(str(SAMPLE)) if (m.conn, m.index) in recorded]
    assert [m for m in msgs if not m.flags & F_REPLAYED] == want
    meta = LogReader(str(out)).meta
    assert meta["command"] == "play" and meta["report"]["answered"] == 37


def test_ctrl_c_prints_the_summary(tmp_path):
    cap = spread_capture(tmp_path / "s.pcap", n=5, conns=1, span_ns=100 * MS)
    with SinkThread() as sink:
        p = subprocess.Popen(replay_cmd() + ["play", str(cap), "--target", sink.url, "--loop",
                                             "--duration", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        deadline = time.monotonic() + 10
        while len(sink.records) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(10)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "(interrupted)" in out and re.search(r"replayed \d+ of \d+ requests", out)


def test_https_and_ipv6(tmp_path):
    ctx = server_tls_context(tmp_path)
    with SinkThread(ssl=ctx) as sink:
        rep, _ = play_report(tmp_path, SAMPLE, "--target", sink.url, "--speed", "max", "--insecure")
        assert rep["answered"] == 37 and rep["error_total"] == 0
        rep, _ = play_report(tmp_path, SAMPLE, "--target", sink.url, "--speed", "max", "--limit", "3",
                             check=False)
        assert rep["errors"]["tls"] == 3                  # self-signed: refused without --insecure
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with SinkThread("::1") as sink:
        rep, _ = play_report(tmp_path, SAMPLE, "--target", sink.url, "--speed", "max")
        assert rep["answered"] == 37
        raw = sink.records[0][1]
    assert f"\r\nHost: [::1]:{sink.port}\r\n".encode() in raw


def test_pipelined_requests_go_out_before_the_answer(tmp_path):
    cap = write_capture(tmp_path / "p.pcap", [[
        (T0 + 10 * MS, get("/a"), ok_response()),
        (T0 + 11 * MS, get("/b"), ok_response(), True),
        (T0 + 12 * MS, get("/c"), ok_response(), True),
    ]])
    with SinkThread() as sink:
        rep, _ = play_report(tmp_path, cap, "--target", sink.url, "--speed", "max")
        got = sink.by_conn()
    assert rep["answered"] == 3 and len(got) == 1
    assert [r.split(b" ")[1] for r in list(got.values())[0]] == [b"/a", b"/b", b"/c"]


def test_help_and_bad_flags():
    for args in (["play", "--help"], ["sink", "--help"]):
        p = subprocess.run(replay_cmd() + args, capture_output=True, text=True, env=env())
        assert p.returncode == 0 and "Usage:" in p.stdout
    for args in (["--speed", "fast"], ["--speed", "-2"], ["--bogus"], [], ["--rate", "0"],
                 ["--target", "ftp://x"], ["--target", "http://a:1", "--sink"],
                 ["--speed", "2", "--rate", "5", "--dry-run"], ["--duration", "soon", "--dry-run"]):
        p = subprocess.run(replay_cmd() + ["play", str(SAMPLE), *args], capture_output=True,
                           text=True, env=env())
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("replay"), (args, p.stderr)
    p = subprocess.run(replay_cmd() + ["play", "/nonexistent.pcap", "--dry-run"], capture_output=True,
                       text=True, env=env())
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_a_connection_the_target_closed_while_idle_is_reopened(tmp_path):
    # the target closes a keep-alive connection after 0.2 s without a request, without saying
    # so; the recorded client sent its requests 0.4 s apart on one connection
    cap = write_capture(tmp_path / "idle.pcap",
                        [[(T0 + i * 400 * MS, get(f"/i/{i}"), ok_response()) for i in range(4)]])
    with FaultServer("idle", idle=0.2) as srv:
        rep, _ = play_report(tmp_path, cap, "--target", srv.url)
        assert srv.accepted == 4
    assert rep["sent"] == rep["answered"] == 4 and rep["error_total"] == 0, rep["errors"]
    assert rep["connections"]["reconnects"] == 3


def test_a_request_lost_to_a_closing_connection_is_sent_again(tmp_path):
    # the target closes a reused connection as the next request arrives, before any byte of
    # its answer: an idempotent request goes out again on a new connection; a POST does not
    post = b"POST /p HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nhi"
    cap = write_capture(tmp_path / "race.pcap", [[
        (T0 + 10 * MS, get("/a"), ok_response()),
        (T0 + 30 * MS, get("/b"), ok_response()),
        (T0 + 50 * MS, get("/c"), ok_response()),
        (T0 + 70 * MS, post, ok_response()),
    ]])
    with FaultServer("close-reused") as srv:
        rep, _ = play_report(tmp_path, cap, "--target", srv.url, "--timeout", "2")
    assert rep["sent"] == 4 and rep["answered"] == 3, rep
    assert rep["errors"]["closed"] == 1 and rep["error_total"] == 1
    assert rep["connections"]["reconnects"] == 2 and rep["retried"] == 2


def test_output_log_keeps_the_body_length_of_what_was_sent(tmp_path):
    from replay.log import LogReader

    chunked = (b"POST /c HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    post = b"POST /p HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello"
    cap = write_capture(tmp_path / "bodies.pcap", [[
        (T0 + 10 * MS, post, ok_response()), (T0 + 20 * MS, chunked, ok_response()),
        (T0 + 30 * MS, get("/g"), ok_response())]])
    out = tmp_path / "replayed.rlog"
    with SinkThread() as sink:
        play(cap, "--target", sink.url, "--speed", "max", "-o", out, "-q")
    sent = {m.uri: m for m in LogReader(str(out)) if m.flags & F_REPLAYED and m.kind == KIND_REQUEST}
    assert {u: m.body_length for u, m in sent.items()} == {"/p": 5, "/c": 5, "/g": 0}
    assert sent["/c"].flags & F_CHUNKED and not sent["/p"].flags & F_CHUNKED


@pytest.mark.parametrize("args,flag", [
    (["--speed", "1e-300"], "--speed"), (["--speed", "nan"], "--speed"),
    (["--rate", "nan"], "--rate"), (["--rate", "1e-300"], "--rate"), (["--rate", "-inf"], "--rate"),
    (["--timeout", "1e300"], "--timeout"), (["--timeout", "nan"], "--timeout"),
    (["--duration", "1e300"], "--duration"), (["--duration", "0"], "--duration"),
    (["--port", "70000"], "--port"), (["--port", "0"], "--port"),
])
def test_absurd_flags_are_refused_up_front(args, flag):
    p = play(SAMPLE, "--dry-run", *args, check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("replay play: ") and flag in lines[0]


def test_huge_speed_and_rate_are_the_largest(tmp_path):
    p = play(SAMPLE, "--dry-run", "--speed", "1e308")
    assert "at speed 1e+06" in p.stdout
    p = play(SAMPLE, "--dry-run", "--rate", "1e300")
    assert "at 1e+09 requests/s" in p.stdout
    # an answer that takes longer than the whole schedule at that speed
    cap = write_capture(tmp_path / "slow.pcap", [
        [(T0 + 10 * MS, get("/slow"), ok_response()), (T0 + 30 * MS, get("/after"), ok_response())],
        [(T0 + 20 * MS, get("/other"), ok_response())]])
    with FaultServer("slow") as srv:
        rep, _ = play_report(tmp_path, cap, "--target", srv.url, "--speed", "1e308")
    assert rep["answered"] == 3 and rep["speed"] == 1e6


def test_convert_refuses_an_absurd_idle_timeout(tmp_path):
    for v in ("nan", "inf", "-1", "1e300"):
        p = subprocess.run(replay_cmd() + ["convert", str(SAMPLE), "-o", str(tmp_path / "x.rlog"),
                                           "--idle-timeout", v], capture_output=True, text=True, env=env())
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and "--idle-timeout" in lines[0], (v, p.stderr)
    p = subprocess.run(replay_cmd() + ["convert", str(SAMPLE), "-o", str(tmp_path / "x.rlog"),
                                       "--idle-timeout", "2m", "-q"], capture_output=True, text=True, env=env())
    assert p.returncode == 0, p.stderr


def test_exit_code_follows_max_errors(tmp_path):
    # one request of four times out
    cap = write_capture(tmp_path / "slow.pcap", [
        [(T0 + 10 * MS, get("/slow"), ok_response())],
        *[[(T0 + (20 + i) * MS, get(f"/fast/{i}"), ok_response())] for i in range(3)]])
    with FaultServer("slow") as srv:
        for budget, code in ((None, 0), ("0", 1), ("1", 0), ("25%", 0), ("20%", 1)):
            extra = [] if budget is None else ["--max-errors", budget]
            p = play(cap, "--target", srv.url, "--speed", "max", "--timeout", "0.1", "-q", *extra,
                     check=False)
            assert p.returncode == code, (budget, p.stderr)
            if code:
                assert p.stderr.strip() == (f"replay play: 1 of 4 requests failed, more than "
                                            f"--max-errors {budget} allows")
    for bad in ("-1", "101%", "x", "nan%"):
        p = play(SAMPLE, "--dry-run", "--max-errors", bad, check=False)
        assert p.returncode == 2 and "--max-errors" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_sigterm_stops_like_ctrl_c(tmp_path):
    cap = spread_capture(tmp_path / "s.pcap", n=5, conns=1, span_ns=100 * MS)
    with SinkThread() as sink:
        p = subprocess.Popen(replay_cmd() + ["play", str(cap), "--target", sink.url, "--loop",
                                             "--duration", "20"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        deadline = time.monotonic() + 10
        while len(sink.records) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(10)
    assert time.monotonic() - t < 5     # "within a second" on a quiet machine; CI shares 2 cores
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "(interrupted)" in out and re.search(r"replayed \d+ of \d+ requests", out)
    # a command reading a pipe that does not end
    for cmd in (["ls", "/dev/stdin"], ["convert", "/dev/stdin", "-o", str(tmp_path / "x.rlog")]):
        p = subprocess.Popen(replay_cmd() + cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=5)
        finally:
            p.stdin.close() if p.stdin and not p.stdin.closed else None
        assert p.returncode == 130 and "Traceback" not in err and err.strip() == "replay: interrupted", err
