"""``replay play --workers N`` (``--speed max``): N processes share the recorded connections.
Against a real server on loopback: every request sent once, each recorded connection's requests
in order on the connections of one worker, the report of them all; the shares; what it refuses."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from play_helpers import SinkThread
from test_play_stream import big_log, run_bounded

from replay.play.stream import shard_assignment
from replay.play.workers import share


def _uri_ids(raw: bytes):
    kind, n = re.match(rb"GET /(s2|s|k)/(\d+) ", raw).groups()
    return kind, int(n)


def test_shares_add_up():
    for total in (0, 1, 5, 31, 32, 1000):
        for n in (1, 2, 3, 7):
            parts = [share(total, i, n) for i in range(n)]
            assert sum(parts) == total and max(parts) - min(parts) <= 1


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


@pytest.mark.parametrize("args,says", [
    (["--speed", "1"], "--workers: with --speed max"),
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
