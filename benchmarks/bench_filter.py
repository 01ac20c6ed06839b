#!/usr/bin/env python3
"""How fast the filters select from a log: records/s on the index path and on the streaming path.

Logs measured (each when present or made):

* a synthetic log of small API messages (``--messages``, default 1,000,000: requests and
  responses of a few hundred bytes, many connections, ~280k distinct request-targets), written
  with ``LogWriter`` to ``/tmp/replay-bench-api.rlog`` and kept for later runs;
* the benchmark capture's log (``/tmp/b3.rlog`` or ``--log``; make one with
  ``python benchmarks/make_capture.py -o /tmp/bench.pcap --size 450`` then
  ``replay convert /tmp/bench.pcap -o /tmp/b3.rlog``): few, large messages.

For each log it prints, as records (messages) per second of the whole log:

* the baseline: ``table()`` alone (the index's columns, no payload), and decoding every message
  (what any filter that is not index-aware must do);
* index-level filters (status, method, time window, connection sample, a combination), timed
  from a fresh ``LogReader`` to the selected row numbers, so the table read is included;
  ``over index`` gives the same without the table read;
* regex filters: --path-include (evaluated once per distinct request-target in the table) and
  --host / --header (they decompress the blocks holding the requests still in);
* the streaming path on the same log (every message decoded and pushed), for comparison;
* ``replay filter`` end to end for one case (select, decode the kept rows, write a new log).

Each figure is the best of ``--repeat`` runs. The filters do not use the compiled core, so there
is no pure/compiled pair to compare here. Nothing is pass/fail; targets from issue 5: index-level
filters >= 1M records/s, regex path filters >= 100k records/s.

Usage::

    python3 benchmarks/bench_filter.py [--messages 1000000] [--log /tmp/b3.rlog] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replay.events import KIND_REQUEST, KIND_RESPONSE, Message  # noqa: E402
from replay.log import LogReader, LogWriter  # noqa: E402
from replay.rules.ruleset import Rules, settings_from_values  # noqa: E402

API_LOG = "/tmp/replay-bench-api.rlog"
T0 = 1_700_000_000_000_000_000


def synth(path: str, n_msgs: int, seed: int = 1) -> None:
    """Small API traffic: keep-alive connections, 1-20 exchanges each, 64 connections open at a
    time, messages written in completion order (responses interleaved with other requests)."""
    rnd = random.Random(seed)
    methods = ["GET"] * 6 + ["POST"] * 2 + ["PUT", "DELETE"]
    paths = ["/api/users/%d", "/api/orders/%d", "/api/products?page=%d", "/api/cart/%d/items",
             "/health", "/api/checkout/%d", "/static/app.%d.js"]
    hosts = [b"api.example.com", b"shop.example.com", b"admin.example.com"]
    statuses = [200] * 20 + [201, 204, 301, 304, 400, 401, 403, 404, 404, 500, 502, 503]
    server = ("10.255.0.1", 80)
    t = T0
    live = []          # [conn, remaining exchanges, next index, client]
    next_conn = 0
    written = 0
    heap = []          # (completion time, seq, message): responses not yet written
    seq = 0
    import heapq

    with LogWriter(path, meta={"command": "bench_filter synth"}) as w:
        while written < n_msgs:
            while len(live) < 64:
                c = next_conn
                next_conn += 1
                live.append([c, rnd.randint(1, 20), 0,
                             (f"10.{c >> 16 & 255}.{c >> 8 & 255}.{c & 255}", 30000 + c % 30000)])
            slot = rnd.randrange(len(live))
            conn, left, i, client = live[slot]
            t += rnd.randint(1_000, 20_000)
            while heap and heap[0][0] <= t and written < n_msgs:
                w.write(heapq.heappop(heap)[2])
                written += 1
            if written >= n_msgs:
                break
            m = rnd.choice(methods)
            p = rnd.choice(paths)
            uri = p % rnd.randint(1, 100_000) if "%d" in p else p
            body = b'{"user":"u%d","password":"secret%d"}' % (i, conn) if m in ("POST", "PUT") else b""
            head = (b"%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bench\r\nAuthorization: Bearer t%d\r\n"
                    % (m.encode(), uri.encode(), rnd.choice(hosts), conn))
            if body:
                head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            head += b"\r\n"
            w.write(Message(KIND_REQUEST, conn, i, t, t + 2_000, client, server, 0, head + body,
                            m, uri, 0, len(body), len(head)))
            written += 1
            st = rnd.choice(statuses)
            rb = b'{"ok":true,"id":%d}' % i
            rh = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (st, len(rb))
            t2 = t + rnd.randint(100_000, 3_000_000)
            seq += 1
            heapq.heappush(heap, (t2, seq, Message(KIND_RESPONSE, conn, i, t2, t2 + 1_000, client, server,
                                                   0, rh + rb, m, uri, st, len(rb), len(rh))))
            live[slot][1] -= 1
            live[slot][2] += 1
            if live[slot][1] == 0:
                live.pop(slot)
        while heap and written < n_msgs:
            w.write(heapq.heappop(heap)[2])
            written += 1


def best(fn, repeat):
    out = None
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def rate(n, dt):
    return f"{n / dt / 1e6:6.2f} M/s" if n / dt >= 1e6 else f"{n / dt / 1e3:6.0f} k/s"


def bench_log(path: str, repeat: int) -> None:
    r = LogReader(path)
    n = len(r)
    size = os.path.getsize(path)
    t = r.table()
    print(f"\n== {path}: {n:,} messages, {size / 1e6:.0f} MB, {len(r.blocks)} blocks, "
          f"{len(r.strings) - 1:,} distinct strings")

    dt, _ = best(lambda: LogReader(path).table(), repeat)
    print(f"  {'baseline: table() alone':<44} {dt * 1000:8.1f} ms  {rate(n, dt)}")
    dt_all, _ = best(lambda: sum(1 for _ in LogReader(path)), 1)
    print(f"  {'baseline: decode every message':<44} {dt_all * 1000:8.1f} ms  {rate(n, dt_all)}")

    t0 = t["ts_first"][0]
    span = int(t["ts_first"].max() - t0)
    lo, hi = span // 4, span // 2
    cases = [
        ("index", "--status 5xx", {"status": "5xx"}),
        ("index", "--method POST", {"method": "POST"}),
        ("index", "--since/--until (a quarter of the span)", {"since": f"+{lo}ns", "until": f"+{hi}ns"}),
        ("index", "--sample 10%", {"sample": "10%"}),
        ("index", "--method GET --status 2xx --sample 50% --limit", {"method": "GET", "status": "2xx",
                                                                     "sample": "50%", "limit": n // 10}),
        ("regex", "--path-include '^/api/(checkout|orders)'", {"path-include": "^/api/(checkout|orders)"}),
        ("regex", "--path-exclude '\\.(js|css|png)$' --method GET",
         {"path-exclude": r"\.(js|css|png)$", "method": "GET"}),
        ("payload", "--host shop.example.com", {"host": "shop.example.com"}),
        ("payload", "--header 'User-Agent: bench|curl'", {"header": "User-Agent: bench|curl"}),
    ]
    for kind, label, values in cases:
        rules = Rules(settings_from_values(values))
        dt, rows = best(lambda: rules.filters.select_rows(LogReader(path)), repeat)
        cached = LogReader(path)
        tab = cached.table()
        cached.table = lambda tab=tab: tab
        dt_idx, _ = best(lambda: rules.filters.select_rows(cached), repeat)
        print(f"  {kind + ': ' + label:<44} {dt * 1000:8.1f} ms  {rate(n, dt)}   "
              f"(over index {rate(n, dt_idx)}; kept {len(rows):,})")

    for label, values in [("--status 5xx", {"status": "5xx"}),
                          ("--path-include '^/api/(checkout|orders)'", {"path-include": "^/api/(checkout|orders)"})]:
        def streamed():
            return sum(1 for _ in Rules(settings_from_values(values)).apply(LogReader(path), index=False))
        dt, kept = best(streamed, 1)
        print(f"  {'streaming: ' + label:<44} {dt * 1000:8.1f} ms  {rate(n, dt)}   (kept {kept:,})")

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.rlog")
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "replay.cli.main", "filter", path, "-o", out, "-q",
                        "--method", "POST", "--status", "2xx"], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        dt = time.perf_counter() - t1
        kept = len(LogReader(out))
    print(f"  {'replay filter -o (POST, 2xx), end to end':<44} {dt * 1000:8.1f} ms  {rate(n, dt)}   "
          f"(wrote {kept:,}; process start included)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--log", default="/tmp/b3.rlog", help="the benchmark capture's log")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    have = None
    if os.path.exists(API_LOG):
        try:
            have = len(LogReader(API_LOG))
        except Exception:  # noqa: BLE001
            have = None
    if have != args.messages:
        t0 = time.perf_counter()
        synth(API_LOG, args.messages)
        print(f"wrote {API_LOG} ({args.messages:,} messages) in {time.perf_counter() - t0:.1f} s")
    bench_log(API_LOG, args.repeat)
    if os.path.exists(args.log):
        bench_log(args.log, args.repeat)
    else:
        print(f"\n({args.log} not found: make it with benchmarks/make_capture.py and replay convert)")


if __name__ == "__main__":
    main()
