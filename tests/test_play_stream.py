"""The streamed plan (``replay.play.stream``): a ``.rlog`` replayed as it is read.

The planner is checked against ``build_plan`` (the whole-file plan, the reference) on real
captures, as messages in log order; then whole replays of a log, streamed and planned whole,
against one sink: the same requests, in the same order on each connection; ``--loop`` passes;
the output log holding the recorded exchanges beside the replayed ones; and memory that does
not grow with the log."""

from __future__ import annotations

import collections
import glob
import random
import subprocess

import pytest
from play_helpers import (FaultServer, SinkThread, env, get, ok_response, replay_cmd,
                          spread_capture)

from replay.events import F_REPLAYED, KIND_REQUEST
from replay.log import LogReader, LogWriter
from replay.outputs import LOG_MODE, Outputs
from replay.pipeline import open_input
from replay.play import session as ps
from replay.play import stream as S
from replay.play.plan import build_plan
from replay.play.scheduler import Schedule
from replay.play.sender import Options, parse_target
from replay.play.source import RecordedSource
from tests.conftest import ROOT

PCAPS = sorted(glob.glob(str(ROOT / "tests/data/*.pcap"))) + [str(ROOT / "captures/sample.pcap")]
MS = 1_000_000


def to_log(src: str, path) -> str:
    with LogWriter(str(path), meta={"command": "convert"}) as w:
        for m in open_input(src):
            w.write(m)
    return str(path)


def planned(requests):
    return [(r.conn, r.index, r.t, r.data, r.recorded_status, r.pipelined, r.body_length, r.flags)
            for r in requests]


def stream_all(msgs, header=None, host=None):
    p = S.StreamPlanner(host, header=header)
    out, ended = [], []
    for m in msgs:
        out += p.push(m)
        ended += p.ended
        p.ended = []
    out += p.finish()
    ended += p.ended
    return p, out, ended


@pytest.mark.parametrize("pcap", PCAPS, ids=lambda p: p.rsplit("/", 1)[-1])
def test_planner_plans_as_build_plan(pcap, tmp_path):
    log = to_log(pcap, tmp_path / "x.rlog")
    msgs = list(LogReader(log))
    whole = build_plan(msgs, "target:8080")
    header = S.index_header(LogReader(log))
    p, out, ended = stream_all(msgs, header, "target:8080")
    late = [f for r, _, f in out if r is None]
    out = [x for x in out if x[0] is not None]
    want = sorted(planned(r for c in whole.connections for r in c.requests),
                  key=lambda x: (x[2], x[0], x[1]))
    assert planned(r for r, _, _ in out) == want
    assert [r.seq for r, _, _ in out] == list(range(len(out)))
    assert p.pipelined == whole.pipelined and p.skipped == whole.skipped
    assert (header.requests, header.conn_stride) == (whole.requests + sum(whole.skipped.values()),
                                                      whole.conn_stride)
    assert (header.t0, header.t_last) == (whole.t0, whole.t_last) or whole.skipped
    # every recorded connection ends once, after its last planned request
    assert set(ended) >= {r.conn for r, _, _ in out}     # (again if a late request reopened it)
    # the recorded messages come with their request
    finals = {(f.conn, f.index): f for f in late}
    for r, req, final in out:
        assert (req.conn, req.index) == (r.conn, r.index) and req.kind == KIND_REQUEST
        final = final or finals.get((r.conn, r.index))
        assert final is None or (final.conn, final.index, final.status) == (r.conn, r.index, r.recorded_status)


def test_planner_puts_late_written_requests_in_time_order():
    """A log is in completion order: a long upload starts first and is written last."""
    from replay.events import KIND_RESPONSE, Message

    def msg(kind, conn, t0, t1, status=0):
        data = b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % conn if kind == KIND_REQUEST else \
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        return Message(kind, conn, 0, t0, t1, ("10.0.0.1", 1000 + conn), ("10.0.0.2", 80), 0, data,
                       "GET" if kind == KIND_REQUEST else None, f"/{conn}", status, 0,
                       len(data))

    T = 10**18
    log = [msg(KIND_REQUEST, 1, T + 100 * MS, T + 101 * MS), msg(KIND_RESPONSE, 1, T + 102 * MS, T + 103 * MS, 200),
           msg(KIND_REQUEST, 0, T, T + 500 * MS),                # started first, written later
           msg(KIND_RESPONSE, 0, T + 501 * MS, T + 502 * MS, 201)]
    p, out, ended = stream_all(log)
    assert [(r.conn, r.recorded_status) for r, _, _ in out] == [(0, 201), (1, 200)]
    assert p.reordered == 0 and sorted(ended) == [0, 1]


def test_planner_window_is_bounded():
    """Requests whose answers never come leave after ANSWER_WAIT_NS of log time, or when the
    window is full; nothing waits without bound."""
    from replay.events import Message

    p = S.StreamPlanner(None, max_pending=50)
    T = 10**18
    out = []
    most = 0
    for i in range(1000):
        d = b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i
        out += p.push(Message(KIND_REQUEST, i, 0, T + i * MS, T + i * MS, ("a", 1), ("b", 2), 0, d,
                              "GET", f"/{i}", 0, 0, len(d)))
        most = max(most, len(p.heap))
    out += p.finish()
    assert len(out) == 1000 and most <= 51 and p.unknown_status == 1000


def _run(plan, url, tmp_path, name, speed=None, loop=False, limit=0, recorded=None, timeout=10.0):
    outputs = Outputs()
    out = outputs.atomic(tmp_path / name, "-o", mode=LOG_MODE)
    outputs.open()
    tgt = parse_target(url)
    sched = Schedule(plan.t0, plan.span_ns, plan.requests, speed=speed)
    s = ps.PlaySession(plan, sched, tgt, Options(connections=1000 if speed else 64, loop=loop,
                                                 limit=limit, timeout=timeout),
                       ps.About("in", tgt.display), output=ps.ExchangeLog(out, recorded=recorded))
    report = s.run()
    outputs.commit()
    if plan.streaming:
        # the reader's process ended (when it read everything, it is joined after the run,
        # not in the middle of the sends)
        assert s.player.reader.proc.exitcode == 0 and not s.player.reader.proc.is_alive()
    return report, str(tmp_path / name)


@pytest.mark.parametrize("speed", [None, 20.0])
def test_streamed_replay_sends_what_the_whole_plan_sends(tmp_path, speed):
    cap = spread_capture(tmp_path / "in.pcap", n=60, conns=6, span_ns=600 * MS)
    log = to_log(str(cap), tmp_path / "in.rlog")
    got = {}
    for stream in (False, True):
        src = RecordedSource(log, stream=stream)
        with SinkThread() as sink:
            plan = src.plan(parse_target(sink.url).host_header)
            assert plan.streaming is stream
            report, out = _run(plan, sink.url, tmp_path, f"out{stream}.rlog", speed,
                               recorded=None if stream else src.recorded)
            got[stream] = collections.Counter(tuple(r.split(b" ")[1] for r in v)
                                              for v in sink.by_conn().values())
        assert (report.attempted, report.answered, report.error_total) == (60, 60, 0)
        msgs = list(LogReader(out))
        replayed = [m for m in msgs if m.flags & F_REPLAYED]
        recorded = [m for m in msgs if not m.flags & F_REPLAYED]
        assert sum(m.kind == KIND_REQUEST for m in replayed) == 60
        assert sorted((m.conn, m.index, m.kind) for m in recorded) == \
            sorted((m.conn, m.index, m.kind) for m in LogReader(log) if m.index >= 0)
    assert got[True] == got[False]


def test_streamed_loop_passes_and_limit(tmp_path):
    cap = spread_capture(tmp_path / "in.pcap", n=12, conns=3, span_ns=100 * MS)
    log = to_log(str(cap), tmp_path / "in.rlog")
    with SinkThread() as sink:
        plan = RecordedSource(log).plan(parse_target(sink.url).host_header)
        report, out = _run(plan, sink.url, tmp_path, "loop.rlog", None, loop=True, limit=40)
        conns = sink.by_conn()
    assert report.attempted == 40 and report.answered == 40
    reqs = [m for m in LogReader(out) if m.flags & F_REPLAYED and m.kind == KIND_REQUEST]
    passes = collections.Counter(m.conn // plan.conn_stride for m in reqs)
    # at full speed passes overlap (64 connections at once); each is whole but the last ones
    assert sum(passes.values()) == 40 and len(passes) >= 4 and max(passes.values()) <= 12
    # each recorded connection of each pass kept its order
    for seq in conns.values():
        uris = [r.split(b" ")[1] for r in seq]
        assert uris == sorted(uris, key=lambda u: int(u.rsplit(b"/", 1)[-1]))


def test_full_speed_answers_send_the_next_request_and_faults_still_count(tmp_path):
    """At --speed max a kept-alive connection's answer sends its next request from the answer's
    callback: the order on each connection, a timeout on a request sent that way, and a
    connection the target closes under such a request (sent again on a new one) all hold."""
    cap = spread_capture(tmp_path / "in.pcap", n=20, conns=4, span_ns=100 * MS)
    log = to_log(str(cap), tmp_path / "in.rlog")
    with SinkThread() as sink:
        plan = RecordedSource(log).plan(parse_target(sink.url).host_header)
        report, _ = _run(plan, sink.url, tmp_path, "ok.rlog")
        conns = sink.by_conn()
    assert (report.answered, report.error_total, report.opened) == (20, 0, 4)
    for seq in conns.values():
        uris = [r.split(b" ")[1] for r in seq]
        assert len(uris) == 5 and uris == sorted(uris, key=lambda u: int(u.rsplit(b"/", 1)[-1]))
    # answers two requests per connection, then none: the third of each recorded connection
    # times out, the fourth and fifth go on a new connection and are answered
    with FaultServer("stall") as srv:
        plan = RecordedSource(log).plan(parse_target(srv.url).host_header)
        report, _ = _run(plan, srv.url, tmp_path, "stall.rlog", timeout=1.0)
    assert (report.answered, dict(report.errors), report.opened) == (16, {"timeout": 4}, 8)
    # closes each connection on its second request: sent again (GET), never an error
    with FaultServer("close-reused") as srv:
        plan = RecordedSource(log).plan(parse_target(srv.url).host_header)
        report, _ = _run(plan, srv.url, tmp_path, "reused.rlog")
    assert (report.answered, report.error_total, report.retried) == (20, 0, 16)


def run_bounded(args, timeout=240):
    """The CLI in a process that, if it outlives ``timeout``, is made to print every thread's
    stack (faulthandler on SIGABRT) before the test fails with it."""
    import signal

    p = subprocess.Popen(replay_cmd()[:1] + ["-X", "faulthandler"] + replay_cmd()[1:] + args,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        out, err = p.communicate(timeout=30)
        raise AssertionError(f"replay {' '.join(args)} did not finish:\n{err}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def big_log(path, n=50_000, long_conns=8, seed=3, tail=False) -> str:
    """``n`` requests, answered 0.2 ms later: most on ``long_conns`` kept-alive connections,
    every 25th on a connection of its own."""
    from replay.events import KIND_RESPONSE, Message

    rng = random.Random(seed)
    t = 10**18
    resp = ok_response()
    index = collections.Counter()
    with LogWriter(str(path), meta={"command": "convert"}) as w:
        for i in range(n):
            t += rng.randint(50_000, 150_000)
            conn = long_conns + i if i % 25 == 0 else i % long_conns
            k = index[conn]
            index[conn] += 1
            uri = f"/{'s' if i % 25 == 0 else 'k'}/{i}"
            req = get(uri)
            cl, sv = ("10.0.0.1", 1024 + conn % 60000), ("10.0.0.2", 80)
            w.write(Message(KIND_REQUEST, conn, k, t, t + 10_000, cl, sv, 0, req, "GET", uri, 0, 0,
                            len(req)))
            w.write(Message(KIND_RESPONSE, conn, k, t + 200_000, t + 210_000, cl, sv, 0, resp,
                            "GET", uri, 200, 5, len(resp) - 5))
            if i % 25 == 0 and tail:         # a second request on the short connection
                uri2 = uri.replace("/s/", "/s2/")
                req = get(uri2)
                w.write(Message(KIND_REQUEST, conn, 1, t + 300_000, t + 310_000, cl, sv, 0, req,
                                "GET", uri2, 0, 0, len(req)))
                w.write(Message(KIND_RESPONSE, conn, 1, t + 400_000, t + 410_000, cl, sv, 0,
                                resp, "GET", uri2, 200, 5, len(resp) - 5))
    return str(path)


def test_streamed_play_cli_on_a_log_bigger_than_its_window(tmp_path):
    """50,000 requests on 8 kept-alive connections and 2,000 short ones, at full speed with a
    limit: what the sink got is the first requests, in order on each connection."""
    log = big_log(tmp_path / "big.rlog")
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "max", "--limit", "3000",
                         "--report", str(tmp_path / "r.json")])
        got = sink.by_conn()
    assert p.returncode == 0, p.stderr
    rep = __import__("json").loads((tmp_path / "r.json").read_text())
    assert rep["attempted"] == 3000 and rep["answered"] == 3000 and rep["plan"]["streamed"]
    assert rep["plan"]["requests"] == 50_000 and rep["plan"]["connections"] == 2008
    for seq in got.values():
        ids = [int(r.split(b" ")[1].rsplit(b"/", 1)[-1]) for r in seq]
        assert ids == sorted(ids)
    assert sum(len(v) for v in got.values()) == 3000


def test_streamed_play_with_rules_that_drop_connections_ends(tmp_path):
    """The rules drop the last request of 2,000 short connections, so the index cannot tell
    when they end: at full speed on 64 connections the replay still goes through (an idle
    connection makes room), in order."""
    log = big_log(tmp_path / "big2.rlog", n=20_000, tail=True)
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "max",
                         "--path-exclude", "^/s2/", "--report", str(tmp_path / "r.json")])
        got = sink.by_conn()
    assert p.returncode == 0, p.stderr
    rep = __import__("json").loads((tmp_path / "r.json").read_text())
    assert rep["attempted"] == 20_000 and rep["answered"] == 20_000
    assert not any(b"/s2/" in r for v in got.values() for r in v)
    for seq in got.values():
        ids = [int(r.split(b" ")[1].rsplit(b"/", 1)[-1]) for r in seq]
        assert ids == sorted(ids)


def timed_log(path, n, gap_ns, slow_every=0, slow_ns=0) -> str:
    """``n`` requests ``gap_ns`` apart, one per connection; every ``slow_every``-th answered
    ``slow_ns`` later (written to the log when it ends, as the core would)."""
    from replay.events import KIND_RESPONSE, Message

    t0 = 10**18
    msgs = []
    for i in range(n):
        t = t0 + i * gap_ns
        uri = f"/t/{i}"
        req, resp = get(uri), ok_response()
        cl, sv = ("10.0.0.1", 2000 + i), ("10.0.0.2", 80)
        late = slow_ns if slow_every and i % slow_every == 0 else 200_000
        msgs.append(Message(KIND_REQUEST, i, 0, t, t + 10_000, cl, sv, 0, req, "GET", uri, 0, 0,
                            len(req)))
        msgs.append(Message(KIND_RESPONSE, i, 0, t + late, t + late + 10_000, cl, sv, 0, resp,
                            "GET", uri, 200 + (i % slow_every == 0 if slow_every else 0), 5,
                            len(resp) - 5))
    msgs.sort(key=lambda m: m.ts_last)
    with LogWriter(str(path), meta={"command": "convert"}) as w:
        for m in msgs:
            w.write(m)
    return str(path)


def test_streamed_statuses_of_answers_that_ended_late(tmp_path):
    """Every 5th recorded answer took 5 s: the replay at 4x has answered them before the log
    says what production answered; they are compared all the same."""
    log = timed_log(tmp_path / "slow.rlog", 100, 25 * MS, slow_every=5, slow_ns=5 * 10**9)
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "4",
                         "--report", str(tmp_path / "r.json")])
    assert p.returncode == 0, p.stderr
    rep = __import__("json").loads((tmp_path / "r.json").read_text())
    sc = rep["status_comparison"]
    assert rep["answered"] == 100 and sc["not_recorded"] == 0, sc
    assert sc["same"] == 80 and sc["different"] == 20        # the sink answers 200; 20 were 201
    assert rep["recorded_statuses"] == {"200": 80, "201": 20}


def test_streamed_schedule_starts_at_the_first_request_the_rules_keep(tmp_path):
    """The rules drop the log's first 15 s: a 3 s replay still sends (the schedule starts at the
    first request kept, not at the log's first)."""
    log = timed_log(tmp_path / "late.rlog", 200, 100 * MS)       # 20 s
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "1", "--duration", "3",
                         "--path-include", r"^/t/(1[5-9]\d)$", "--report", str(tmp_path / "r.json")])
    assert p.returncode == 0, p.stderr
    rep = __import__("json").loads((tmp_path / "r.json").read_text())
    assert 20 <= rep["answered"] <= 31, rep["answered"]


def test_a_killed_plan_reader_stops_the_replay_with_one_line(tmp_path):
    import os
    import signal
    import time

    log = timed_log(tmp_path / "long.rlog", 2000, 10 * MS)       # 20 s
    with SinkThread() as sink:
        p = subprocess.Popen(replay_cmd() + ["play", log, "--target", sink.url, "-q"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        kids = []
        end = time.monotonic() + 20
        while not kids and time.monotonic() < end:
            time.sleep(0.2)
            try:
                kids = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
            except OSError:
                break
        time.sleep(1)
        for k in kids:
            os.kill(int(k), signal.SIGKILL)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert kids, "no reader process seen"
    lines = [x for x in err.splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "ended unexpectedly" in lines[0], err


def test_a_recorded_status_that_comes_while_its_request_is_on_its_way_is_counted():
    """Tried before its recorded answer ended, answered after the status came: the status is
    among the recorded statuses as well as compared (the race once lost one in CI)."""
    from replay.events import KIND_RESPONSE, Message
    from replay.play.clock import LoopClock
    from replay.play.plan import PlannedRequest
    from replay.play.report import Report
    from replay.play.sender import Attempt, Player

    report = Report()
    player = Player(None, None, parse_target("http://127.0.0.1:9"), Options(), report, LoopClock())
    for outcome in ("answered", "failed"):
        req = PlannedRequest(1, 0, 0, b"GET / HTTP/1.1\r\n\r\n", "GET", "/", 18)
        player._tried(req)
        att = Attempt(req, 0, None, 1)
        req.recorded_status = 201                  # the reader's late mark, before the answer
        if outcome == "answered":
            player.answered(att, Message(KIND_RESPONSE, 1, 0, 1, 1, None, None, 0, b"",
                                         status=200), 1, None)
        else:
            player.failed(att, "reset", True)
    assert report.recorded_statuses == {201: 2}
    assert report.different == 1 and report.unrecorded == 0


def test_the_readers_pipe_hands_over_every_batch_whole_and_in_order():
    """``PipeWriter`` and ``PipeReader`` (the reader's process to the sender): batches of every
    size, from empty to several times the pipe's capacity, with and without extra items, come
    out whole and in order, however the reads cut them, then the end mark; a pipe closed
    without the end mark is an EOFError once what it held is taken."""
    import pickle
    import threading

    rng = random.Random(7)
    sent = [(rng.randbytes(rng.choice([0, 1, 11, 700, 70_000, 3 << 20])),
             [(k, ("late", (k, 2, 200, None)))] * rng.randint(0, 2)) for k in range(120)]
    rx, tx = S._pipe()

    def write():
        for b in sent:
            tx.send(b)
        tx.send(None)
        tx.close()

    t = threading.Thread(target=write)
    t.start()
    got = []
    while not got or got[-1] is not None:
        b = rx.next()
        if b is S.NOTHING:
            assert rx.wait(5)
            continue
        got.append(b if b is None else (b[0], pickle.loads(b[1]) if b[1] else []))
    t.join(10)
    assert got[:-1] == sent and got[-1] is None
    rx.close()

    rx, tx = S._pipe()
    tx.send((b"abc", []))
    tx.close()
    assert rx.next() == (b"abc", b"")
    with pytest.raises(EOFError):
        rx.next()
    rx.close()


def test_a_batch_that_cannot_be_read_back_stops_the_replay_with_its_reason():
    """The batches before it are taken; then one line naming the log."""
    import os

    from replay.core import pack_planned

    r = S.StreamReader(S.StreamingPlan("x.rlog", S.StreamHeader(), None, None, False), 1)
    r.rx.close()
    r._tx.close()
    r.rx, tx = S._pipe()
    req = (0, (S.PlannedRequest(1, 0, 5, b"GET / HTTP/1.1\r\n\r\n", "GET", "/", 18, 200, False,
                                0, 0, 0), None, None))
    tx.send(pack_planned([req]))
    os.write(tx.fd, S._FRAME.pack(3, 5) + b"abc" + b"nope!")
    assert r.receive(1.0) and not r.done
    assert r.items.popleft()[1][0].data == b"GET / HTTP/1.1\r\n\r\n"
    assert r.receive(1.0)
    assert r.done and r.items[0][1][0] == S.FAILED
    assert "x.rlog: the plan's reader sent what cannot be read back" in str(r.items[0][1][1])
    tx.close()
    r.rx.close()


def test_the_reader_lets_go_what_the_hold_lets_go_and_nothing_sooner():
    """The reading process hands over a timed run's request once it is due within
    ``READ_AHEAD_NS`` of the clock: before the schedule starts, the first ``READ_AHEAD_NS`` of
    it; after, what the hold let go stays let go (a request due before then goes without the
    hold's calls), and a request due later waits (here: until the reader is stopped)."""
    import time
    import types

    from replay.play import sender
    from replay.events import PlannedRequest

    sched = Schedule(0, 10 * sender.NS, 1000, speed=1.0)
    r = S.StreamReader(types.SimpleNamespace(t0=0), 1, sender._Hold(sched))
    r._released, r._until = r.hold.released_until, None     # (as the child sets them)

    def req(t):
        return PlannedRequest(conn=1, index=t, t=t, data=b"", method="GET", uri="/",
                              head_length=0, seq=0)

    ahead = sender.READ_AHEAD_NS
    r.parent = -1      # (a request the hold would not let go then ends the wait at once)
    assert r._wait_for(req(0), 0) and r._wait_for(req(ahead), 0)    # prefill: the first second
    assert not r._wait_for(req(ahead + 1), 0)                       # ... and no more
    start = time.monotonic_ns()
    r.start_ns.value = start
    rng = random.Random(5)
    for _ in range(300):
        off = rng.choice([0, ahead // 2, ahead, ahead + 2_000_000, 3 * ahead]) + rng.randint(0, 999)
        now = time.monotonic_ns()
        went = r._wait_for(req(off), 0)
        if off <= now - start + ahead:
            assert went, off
        elif off > time.monotonic_ns() - start + ahead:
            assert not went, off
    assert r._until is not None                                      # the fast way was taken
    r.rx.close()
    r._tx.close()


def test_a_reader_that_read_everything_lingers_until_stopped(tmp_path):
    """Its end mark comes at once, but its process exits only at ``stop()`` (after the run: its
    exit is 4 ms of a CPU the sender may share), and then at once, with exit code 0."""
    import time

    cap = spread_capture(tmp_path / "in.pcap", n=12, conns=3, span_ns=100 * MS)
    plan = RecordedSource(to_log(str(cap), tmp_path / "in.rlog")).plan("h")
    r = plan.start(1)
    deadline_s = time.monotonic() + 10
    got = []
    while not r.done and time.monotonic() < deadline_s:
        item = r.get()
        if item is None:
            r.receive(0.05)
        else:
            got.append(item)
    assert r.done and r.finished
    assert sum(isinstance(i[1][0], S.PlannedRequest) for i in got) == 12
    time.sleep(0.3)
    assert r.proc.is_alive()                 # done reading, still there
    # a process forked since holds the pipe's end too (here a second reader): still let go
    other = plan.start(1)
    t = time.monotonic()
    r.stop()
    assert not r.proc.is_alive() and r.proc.exitcode == 0
    assert time.monotonic() - t < 0.5        # let go, not the 1 s check nor a kill
    other.stop()
    assert not other.proc.is_alive()
