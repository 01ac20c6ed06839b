"""``replay play --workers N``: N processes share the recorded connections.
Against a real server on loopback: every request sent once, each recorded connection's requests
in order on the connections of one worker, the report of them all; the shares; what it refuses."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from play_helpers import SinkThread
from test_play_stream import big_log, run_bounded

from replay.play.stream import Shard, StreamHeader, index_header, shard_assignment
from tests.conftest import ROOT
from replay.play.workers import apportion, plan_shares


def _uri_ids(raw: bytes):
    kind, n = re.match(rb"GET /(s2|s|k)/(\d+) ", raw).groups()
    return kind, int(n)


@pytest.mark.parametrize("seed", range(20))
def test_apportion_adds_up_in_proportion(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 9))
    w = rng.choice([0, 0, 1, 5, 1000], k).astype(float)
    total = int(rng.integers(0, 5000))
    minimum = int(rng.integers(0, 2))
    parts = apportion(total, w, minimum)
    assert len(parts) == k and min(parts) >= minimum
    assert sum(parts) == max(total, minimum * k)
    if total > minimum * k and w.sum() > 0:
        exact = minimum + (total - minimum * k) * w / w.sum()
        assert np.all(np.abs(np.array(parts) - exact) < 1)         # largest remainders
    assert apportion(7, [0, 0, 0]) == [3, 2, 2] and apportion(5, []) == []
    assert sum(apportion(10**18 + 1, [1, 1, 1])) == 10**18 + 1          # exact integers


class _Opts:
    def __init__(self, connections, limit=0):
        self.connections = connections
        self.limit = limit


class _Plan:
    def __init__(self, conns, last):
        self.header = StreamHeader(conns=np.asarray(conns, np.uint64),
                                   last_index=np.asarray(last, np.int64))
        self.rules = None


def test_plan_shares_split_connections_and_limit_by_what_each_worker_replays():
    # 2 busy connections (1000 requests) and 40 of one request each
    plan = _Plan(range(42), [999, 999] + [0] * 40)
    shares, assign = plan_shares(2, plan, _Opts(connections=10, limit=1000))
    assert [s.recorded_connections for s in shares] == [21, 21]
    assert sum(s.connections for s in shares) == 10 and all(s.connections >= 1 for s in shares)
    assert sum(s.limit for s in shares) == 1000 and abs(shares[0].limit - shares[1].limit) <= 1
    # a cap above the recorded connections: each worker as many as it replays
    shares, _ = plan_shares(3, plan, _Opts(connections=1000))
    assert sorted(s.connections for s in shares) == [14, 14, 14]
    # one recorded connection with all the requests, 3 with none: the limit follows the requests
    plan = _Plan(range(4), [9999, 0, 0, 0])
    shares, _ = plan_shares(4, plan, _Opts(connections=4, limit=100))
    assert sorted(s.limit for s in shares) == [0, 0, 0, 100]
    # fewer recorded connections than workers: that many workers
    shares, _ = plan_shares(8, _Plan([5, 9], [3, 3]), _Opts(connections=100))
    assert len(shares) == 2
    from replay.errors import UsageError

    with pytest.raises(UsageError, match="needs at least 3 connections"):
        plan_shares(3, _Plan(range(10), [1] * 10), _Opts(connections=2))


def test_every_connection_has_one_worker_listed_or_not():
    conns = np.array([3, 10, 11, 500, 2**64 - 1], np.uint64)
    last = np.array([5, 0, 9, 1, 2], np.int64)
    for n in (1, 2, 3):
        assign = shard_assignment(conns, last, n)
        shards = [Shard(i, n, conns, assign) for i in range(n)]
        for c in [int(x) for x in conns] + [0, 4, 12, 499, 2**63]:     # the last ones: not listed
            owners = [s.i for s in shards if s.owns(c)]
            assert len(owners) == 1
            if c in conns:
                assert owners[0] == assign[int(np.searchsorted(conns, np.uint64(c)))]
            else:
                assert owners[0] == c % n


@pytest.mark.parametrize("listed", [True, False])
def test_a_share_picked_from_the_tables_is_the_share_kept(tmp_path, listed):
    """``Shard.keep`` of a ``LogReader`` (rows picked from each block's table) gives what it
    gives of any other source (every message made, then filtered): the same messages, in the
    same order."""
    from replay.log import LogReader, LogWriter
    from replay.pipeline import open_input

    path = tmp_path / "w.rlog"
    with LogWriter(str(path), meta={"command": "convert"}, block_records=7) as w:
        for m in open_input(str(ROOT / "captures/sample.pcap")):
            w.write(m)
    h = index_header(LogReader(str(path)))
    conns = h.conns if listed else np.zeros(0, np.uint64)
    for n in (1, 2, 3):
        assign = shard_assignment(conns, h.last_index[:len(conns)], n)
        got = []
        for i in range(n):
            s = Shard(i, n, conns, assign)
            kept = list(s.keep(iter(LogReader(str(path)))))
            assert list(s.keep(LogReader(str(path)))) == kept
            got += kept
        assert sorted((m.conn, m.kind, m.index) for m in got) == \
            sorted((m.conn, m.kind, m.index) for m in LogReader(str(path)))


@pytest.mark.parametrize("seed", range(5))
def test_shares_of_connections_are_even_in_count_and_requests(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 3000))
    conns = np.unique(rng.integers(0, 2**64 - 1, m, dtype=np.uint64, endpoint=True))
    last = rng.choice([0, 0, 0, 1, 2, 50, 20_000], len(conns)).astype(np.int64)
    for n in (1, 2, 3, 8):
        w = shard_assignment(conns, last, n)
        assert w.min() >= 0 and w.max() < n
        assert np.array_equal(w, shard_assignment(conns, last, n))          # stable
        counts = np.bincount(w, minlength=n)
        assert counts.max() - counts.min() <= 1
        loads = np.bincount(w, weights=last + 1, minlength=n)
        assert loads.max() - loads.min() <= (last + 1).max()


def test_a_few_connections_are_dealt_evenly():
    conns = np.arange(32, dtype=np.uint64)
    w = shard_assignment(conns, np.full(32, 999), 2)
    assert np.bincount(w).tolist() == [16, 16]
    assert shard_assignment(np.zeros(0, np.uint64), np.zeros(0, np.int64), 3).tolist() == []


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_send_every_request_once_in_order_per_connection(tmp_path, workers):
    log = big_log(tmp_path / "big.rlog", n=6000, long_conns=8, tail=True)
    rep_path = tmp_path / "r.json"
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "max", "--workers",
                         str(workers), "--report", str(rep_path)])
        got = sink.by_conn()
    assert p.returncode == 0, p.stderr
    assert f"with {workers} workers" in p.stderr and "Traceback" not in p.stderr
    rep = json.loads(rep_path.read_text())
    assert rep["workers"] == workers and rep["merged_from"] == [f"worker {i}" for i in range(workers)]
    # 6000 requests, and a second one on each of the 240 short connections
    assert rep["attempted"] == rep["sent"] == rep["answered"] == 6240 and rep["error_total"] == 0
    assert rep["statuses"] == {"200": 6240} and rep["plan"]["requests"] == 6240
    assert rep["connections"]["opened"] == 8 + 240 and rep["input"] == log
    sent = [r for seq in got.values() for r in seq]
    assert len(sent) == 6240 and len({_uri_ids(r) for r in sent}) == 6240
    # each replay connection carries one recorded connection's requests, in recorded order
    for seq in got.values():
        ids = [_uri_ids(r) for r in seq]
        if ids[0][0] == b"k":
            assert all(k == b"k" for k, _ in ids) and [n for _, n in ids] == sorted(n for _, n in ids)
            assert len({n % 8 for _, n in ids}) == 1          # one long connection
        else:
            assert ids in ([(b"s", ids[0][1])], [(b"s", ids[0][1]), (b"s2", ids[0][1])])
    assert "replayed 6240 of 6240 requests" in p.stdout


def test_workers_split_the_limit(tmp_path):
    log = big_log(tmp_path / "big.rlog", n=3000, long_conns=8)
    rep_path = tmp_path / "r.json"
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "max", "--workers", "2",
                         "--limit", "1001", "--report", str(rep_path), "-q"])
        got = sink.by_conn()
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""
    rep = json.loads(rep_path.read_text())
    assert rep["attempted"] == rep["answered"] == 1001
    assert sum(len(v) for v in got.values()) == 1001
    # a limit smaller than the workers: some get none and do not run; the report still says
    # what ran
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "max", "--workers", "5",
                         "--limit", "1", "--report", str(rep_path), "-q"])
    assert p.returncode == 0, p.stderr
    rep = json.loads(rep_path.read_text())
    assert rep["attempted"] == rep["answered"] == 1 and rep["workers"] == 5
    assert rep["tool"].startswith("replay ") and rep["plan"]["streamed"] and "schedule" in rep


@pytest.mark.parametrize("args,says", [
    (["--rate", "100"], "--workers and --rate: give one"),
    (["--speed", "max", "-o", "OUT"], "--workers and -o: give one"),
])
def test_workers_refuse_what_they_cannot_keep(tmp_path, args, says):
    log = big_log(tmp_path / "big.rlog", n=100, long_conns=2)
    args = [a.replace("OUT", str(tmp_path / "o.rlog")) for a in args]
    p = run_bounded(["play", log, "--target", "http://127.0.0.1:9", "--workers", "2", *args])
    assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.rlog").exists()


def test_workers_refuse_a_capture(tmp_path):
    from tests.conftest import ROOT

    p = run_bounded(["play", str(ROOT / "captures" / "sample.pcap"), "--target",
                     "http://127.0.0.1:9", "--speed", "max", "--workers", "2"])
    assert p.returncode == 2 and "--workers: for a .rlog log" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_target_that_refuses_fails_every_worker_and_the_command(tmp_path):
    from play_helpers import free_port

    log = big_log(tmp_path / "big.rlog", n=200, long_conns=4)
    p = run_bounded(["play", log, "--target", f"http://127.0.0.1:{free_port()}", "--speed", "max",
                     "--workers", "2", "--report", str(tmp_path / "r.json")])
    assert p.returncode == 1 and "all 200 requests failed" in p.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["errors"]["refused"] == 200 and rep["answered"] == 0


def test_the_rules_see_each_message_once_in_all(tmp_path):
    """The workers take their share before the rules: the rules line counts what one process
    would, and the requests the filter keeps are each sent once."""
    log = big_log(tmp_path / "big.rlog", n=3000, long_conns=8, tail=True)
    lines = {}
    for workers in ("1", "2"):
        with SinkThread() as sink:
            p = run_bounded(["play", log, "--target", sink.url, "--speed", "max", "--workers",
                             workers, "--path-include", "^/(s|s2)/"])
            got = sink.by_conn()
        assert p.returncode == 0, p.stderr
        lines[workers] = [ln for ln in p.stderr.splitlines() if ln.startswith("rules:")]
        sent = [_uri_ids(r) for seq in got.values() for r in seq]
        assert len(sent) == len(set(sent)) == 240 and {k for k, _ in sent} == {b"s", b"s2"}
    assert lines["1"] == lines["2"] and len(lines["1"]) == 1
    assert lines["1"][0].startswith("rules: kept 480 of 6,240 recorded messages")


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _start_looping(log, url, report, *extra, workers=2, settle=1.0):
    """``play --loop`` with ``workers``, once they exist and (``settle`` s later) send."""
    import subprocess
    import time

    from play_helpers import env, replay_cmd

    p = subprocess.Popen(replay_cmd() + ["play", log, "--target", url, "--speed", "max",
                                         "--workers", str(workers), "--loop", "--duration", "60",
                                         "--report", str(report), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    end = time.monotonic() + 30
    while time.monotonic() < end and len(_children(p.pid)) < (workers if settle else 1):
        time.sleep(0.001)
    time.sleep(settle)
    return p


def _signalled(p, *sigs, gap=0.01):
    """Send ``sigs`` to ``p`` (``gap`` s apart); its (stdout, stderr, seconds to exit)."""
    import signal
    import time

    try:
        t = time.monotonic()
        for k, sig in enumerate(sigs):
            if k:
                time.sleep(gap)
            p.send_signal(getattr(signal, sig))
        out, err = p.communicate(timeout=40)
        return out, err, time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_a_worker_that_dies_stops_the_command_at_once(tmp_path):
    """A worker killed while the others loop: the command notices it at once (not when the
    others end), stops them, and says which worker died and how."""
    import signal
    import time

    log = big_log(tmp_path / "big.rlog", n=2000, long_conns=8)
    with SinkThread() as sink:
        p = _start_looping(log, sink.url, tmp_path / "r.json")
        try:
            workers = _children(p.pid)
            assert len(workers) == 2
            t = time.monotonic()
            os.kill(workers[1], signal.SIGKILL)
            out, err = p.communicate(timeout=30)
            took = time.monotonic() - t
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert p.returncode == 1, err
    assert "replay worker 1 was killed by signal 9 without a report" in err
    assert "Traceback" not in err and took < 30
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_command_keeps_the_merged_report(tmp_path, sig):
    """SIGTERM or SIGINT to the command: the workers stop as a lone replay does on Ctrl-C, and
    the merged report is printed and written; exit 130."""
    log = big_log(tmp_path / "big.rlog", n=2000, long_conns=8)
    with SinkThread() as sink:
        out, err, _ = _signalled(_start_looping(log, sink.url, tmp_path / "r.json"), sig)
    _assert_interrupted(out, err, tmp_path / "r.json", 2)


def _assert_interrupted(out, err, report, workers):
    assert "Traceback" not in err and "(interrupted)" in out, err
    rep = json.loads(report.read_text())
    assert rep["workers"] == workers and rep["interrupted"]
    assert rep["sent"] >= rep["answered"] and rep["in_flight"] >= 0
    assert rep["tool"].startswith("replay ") and rep["plan"]["streamed"]
    return rep


def test_a_signal_as_the_workers_start_is_not_lost(tmp_path):
    """Ctrl-C the moment the workers exist (before their event loops run): they take it as
    soon as they can, and the command ends at once with the report."""
    log = big_log(tmp_path / "big.rlog", n=2000, long_conns=8)
    with SinkThread() as sink:
        p = _start_looping(log, sink.url, tmp_path / "r.json", workers=3, settle=0)
        out, err, took = _signalled(p, "SIGINT")
    assert p.returncode == 130 and took < 30, err
    _assert_interrupted(out, err, tmp_path / "r.json", 3)


def test_a_second_signal_still_gives_the_report(tmp_path):
    """Two SIGTERMs in a row, against a server that stops answering (requests in flight): the
    second makes each worker give up at once, and the merged report still comes out."""
    from play_helpers import FaultServer

    log = big_log(tmp_path / "big.rlog", n=2000, long_conns=8)
    with FaultServer("stall") as srv:
        p = _start_looping(log, srv.url, tmp_path / "r.json", "--timeout", "60")
        out, err, took = _signalled(p, "SIGTERM", "SIGTERM")
    assert p.returncode == 130 and took < 30, err
    rep = _assert_interrupted(out, err, tmp_path / "r.json", 2)
    assert rep["answered"] > 0 and rep["sent"] > rep["answered"] and "schedule" in rep


def test_the_merged_rate_is_answers_over_the_common_window(tmp_path):
    log = big_log(tmp_path / "big.rlog", n=3000, long_conns=8)
    rep_path = tmp_path / "r.json"
    with SinkThread() as sink:
        p = run_bounded(["play", log, "--target", sink.url, "--speed", "max", "--workers", "2",
                         "--report", str(rep_path), "-q"])
    assert p.returncode == 0, p.stderr
    rep = json.loads(rep_path.read_text())
    w = rep["answer_window_unix"]       # from the first send of any to the last answer of any
    assert len(w) == 2 and w[1] > w[0]
    assert rep["requests_per_s"] == round(3000 / (w[1] - w[0]), 1)
    assert rep["started_unix"] <= w[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_data_block_damaged_after_the_summary_is_said_and_skipped(tmp_path, workers):
    """The summary is trusted, a data block's checksum fails when it is read: the replay says
    which block once, and replays the rest."""
    from replay.log import LogReader, LogWriter

    msgs = list(LogReader(big_log(tmp_path / "big.rlog", n=3000, long_conns=8)))
    good = tmp_path / "good.rlog"
    with LogWriter(good, block_records=500) as w:
        w.write_many(msgs)
    with LogReader(good) as r:
        b = r.blocks[2]
        assert r.summary() is not None and b.count == 500
    data = bytearray(good.read_bytes())
    data[b.offset + 200] ^= 0xFF
    bad = tmp_path / "bad.rlog"
    bad.write_bytes(bytes(data))
    with SinkThread() as sink:
        p = run_bounded(["play", str(bad), "--target", sink.url, "--speed", "max", "--workers",
                         workers])
        got = sink.by_conn()
    assert p.returncode == 0, p.stderr
    warned = [ln for ln in p.stderr.splitlines() if ln.startswith("replay: warning:")]
    assert warned == [f"replay: warning: corrupt block at offset {b.offset} (checksum mismatch "
                      "in section A), its 500 messages skipped"]
    assert sum(len(v) for v in got.values()) == 2750 and "Traceback" not in p.stderr


def test_warnings_of_the_log_are_said_once(tmp_path):
    """A torn log: what opening it finds is said once, not again by the reading processes."""
    from replay.log import LogReader, LogWriter

    msgs = list(LogReader(big_log(tmp_path / "big.rlog", n=2000, long_conns=8)))
    with LogWriter(tmp_path / "blocks.rlog", block_records=500) as w:
        w.write_many(msgs)
    data = (tmp_path / "blocks.rlog").read_bytes()
    torn = tmp_path / "torn.rlog"
    torn.write_bytes(data[:len(data) // 2])
    for workers in ("1", "2"):
        with SinkThread() as sink:
            p = run_bounded(["play", str(torn), "--target", sink.url, "--speed", "max",
                             "--workers", workers])
        assert p.returncode == 0, p.stderr
        warned = [ln for ln in p.stderr.splitlines() if ln.startswith("replay: warning:")]
        assert len(warned) == len(set(warned)) >= 1, p.stderr


def _stubborn(tx):
    import time

    time.sleep(60)          # SIGINT blocked (inherited): only SIGKILL ends it


def _failing(tx):
    from replay.errors import ReplayError

    tx.send(("error", ReplayError("the real cause")))
    tx.close()


def test_the_first_failure_is_the_one_said(monkeypatch):
    """A worker fails; another does not stop when told, is killed after the grace time: the
    command's error is the first one, not the death it caused."""
    import multiprocessing
    import signal
    import time
    from multiprocessing.connection import wait

    from replay.play import workers as W

    monkeypatch.setattr(W, "GRACE_S", 0.3)
    ctx = multiprocessing.get_context("fork")
    level = ctx.Value("i", 0, lock=False)
    procs, pipes = [], []
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for target in (_stubborn, _failing):
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=target, args=(tx,))
            p.start()
            tx.close()
            procs.append(p)
            pipes.append(rx)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    t = time.monotonic()
    got, first = W._collect(procs, pipes, wait, level, grace=0.3)
    for p in procs:
        p.join()
    assert first == 1 and str(got[1][1]) == "the real cause"
    assert got[0][0] == "error" and "killed by signal 9" in str(got[0][1])
    assert level.value == 2 and time.monotonic() - t < 10


def _staggered_log(path) -> dict:
    """4 connections: conn 0 from the start, conns 1-3 from 200 ms on (so the worker that gets
    two of them keeps no request of the first 200 ms); a request every 10 ms on each, answered.
    Its URIs' recorded times."""
    from play_helpers import get, ok_response

    from replay.events import KIND_REQUEST, KIND_RESPONSE, Message
    from replay.log import LogWriter

    t0 = 10**18
    due = {}
    msgs = []
    for conn, first, n in ((0, 0, 50), (1, 200, 30), (2, 200, 30), (3, 200, 30)):
        cl, sv = ("10.0.0.1", 2000 + conn), ("10.0.0.2", 80)
        for k in range(n):
            t = t0 + (first + 10 * k) * 1_000_000 + conn * 1000
            uri = f"/c{conn}/{k}"
            due[uri] = t
            req, resp = get(uri), ok_response()
            msgs.append(Message(KIND_REQUEST, conn, k, t, t + 10_000, cl, sv, 0, req, "GET", uri,
                                0, 0, len(req)))
            msgs.append(Message(KIND_RESPONSE, conn, k, t + 200_000, t + 210_000, cl, sv, 0, resp,
                                "GET", uri, 200, 5, len(resp) - 5))
    msgs.sort(key=lambda m: m.ts_last)
    with LogWriter(path, meta={"command": "convert"}) as w:
        w.write_many(msgs)
    return due


def test_timed_workers_agree_on_start_and_t0(tmp_path):
    """A timed replay with 2 workers, one of which keeps no request of the log's first 200 ms:
    they agree on one start and one t0, so each request arrives when a lone replay would send
    it, whichever worker sends it (without that, the second worker's came 200 ms early)."""
    log = tmp_path / "staggered.rlog"
    due = _staggered_log(log)
    t0 = min(due.values())
    rep_path = tmp_path / "r.json"
    with SinkThread() as sink:
        p = run_bounded(["play", str(log), "--target", sink.url, "--speed", "1", "--workers", "2",
                         "--report", str(rep_path), "-q"])
        with sink.lock:
            arrivals = [(rec["ts"], raw) for rec, raw in sink.records]
    assert p.returncode == 0, p.stderr
    rep = json.loads(rep_path.read_text())
    assert rep["workers"] == 2 and rep["answered"] == 140
    start = rep["schedule"]["start_unix_ns"]
    assert rep["schedule"]["t0_ns"] == t0
    late: dict = {}
    for ts, raw in arrivals:
        uri = raw.split(b" ", 2)[1].decode()
        late.setdefault(uri.split("/")[1], []).append(ts * 1e9 - (start + due[uri] - t0))
    assert sorted(late) == ["c0", "c1", "c2", "c3"]
    for conn, ls in late.items():
        ls.sort()
        assert ls[0] > -2e6, (conn, ls[0])                 # none early
        assert ls[len(ls) // 2] < 50e6, (conn, ls[len(ls) // 2])


def _barrier_run(barrier, firsts, stopping=lambda: False):
    """Each of ``firsts`` arriving at ``barrier`` in turn (one process, one loop); their results."""
    import asyncio

    async def all_of():
        return await asyncio.gather(*(barrier.wait(f, 1000, stopping) for f in firsts))

    return asyncio.run(all_of())


def test_start_barrier_agrees_on_the_least_first_and_one_start(monkeypatch):
    import multiprocessing

    from replay.play import workers as W

    ctx = multiprocessing.get_context("fork")
    got = _barrier_run(W.StartBarrier(ctx, 3), [500, None, 200])
    assert len({g for g in got}) == 1 and got[0][1] == 200          # one start, the least t0
    got = _barrier_run(W.StartBarrier(ctx, 2), [None, None])
    assert got[0] == got[1] and got[0][1] is None                   # none kept: t0 unchanged
    # one never comes: those there agree after the wait, and a late one takes what they agreed
    monkeypatch.setattr(W, "BARRIER_WAIT_S", 0.05)
    b = W.StartBarrier(ctx, 3)
    got = _barrier_run(b, [900, 300])
    assert got[0] == got[1] and got[0][1] == 300
    assert _barrier_run(b, [100]) == [got[0]]
    # stopped while it waits: it leaves at once, alone
    monkeypatch.setattr(W, "BARRIER_WAIT_S", 30)
    (start, t0), = _barrier_run(W.StartBarrier(ctx, 2), [700], stopping=lambda: True)
    assert t0 == 700 and start > 0
