#!/usr/bin/env python3
"""How fast `replay report` reads runs, and whether its memory stays flat.

Makes two synthetic run logs of small JSON API exchanges, as `replay play -o` writes them
(replayed requests and answers in completion order, then the recorded exchanges): a *baseline*
and a *candidate* whose answers differ in a noise field on every exchange (a timestamp: so every
pair of bodies is compared field by field) and in a real field on 1 % of them, with a slower
endpoint. Then, for each size, runs in a child process (so that its peak RSS is its own):

* ``report candidate`` (against the recording inside it),
* ``report candidate --baseline baseline``, and
* the whole command ``replay report candidate --baseline baseline --json FILE`` (start-up,
  terminal table and JSON included),

and prints exchanges/s and peak RSS. The reference figure is the time to just iterate every
message of both logs as Message objects (``LogReader``), in the same run.

Usage::

    python3 benchmarks/bench_report.py [--sizes 100000,1000000,3000000] [--dir /tmp] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from replay.events import F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message  # noqa: E402
from replay.log import LogWriter  # noqa: E402

T0 = 1_800_000_000_000_000_000
PATHS = ["/api/items/%d", "/api/users/%d", "/api/orders/%d", "/api/search?q=%d", "/health"]


def _resp(i, status, obj):
    body = json.dumps(obj).encode()
    head = (b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nDate: x\r\nContent-Length: %d\r\n\r\n"
            % (status, len(body)))
    return head + body, len(head), len(body)


def synth(path: str, n: int, candidate: bool, seed: int = 1) -> None:
    rnd = random.Random(seed)
    clock = random.Random(seed + candidate)      # the noise field: its own in each run
    conns = 64
    meta = {"command": "play", "source": "synthetic", "target": "http://127.0.0.1:1",
            "speed": 1.0, "conn_stride": conns}
    recorded = []
    with LogWriter(path, meta=meta) as w:
        t = T0
        for i in range(n):
            conn, index = i % conns, i // conns
            p = PATHS[i % len(PATHS)]
            uri = p % rnd.randrange(1, 100_000) if "%d" in p else p
            req = b"GET %s HTTP/1.1\r\nHost: api\r\nUser-Agent: bench\r\n\r\n" % uri.encode()
            t += 200_000
            slow = 3_000_000 if candidate and p.startswith("/api/users") else 0
            obj = {"id": i, "name": "item", "price": 10 + (i % 97), "updated_at": t + clock.randrange(10**6)}
            if candidate and i % 100 == 0:
                obj["price"] += 1
            data, hl, bl = _resp(i, 200, obj)
            rq = Message(KIND_REQUEST, conn, index, t, t, ("10.0.0.1", 40000 + conn), ("10.0.0.2", 80),
                         F_REPLAYED, req, "GET", uri, 0, 0, len(req))
            lat = 1_000_000 + rnd.randrange(500_000) + slow
            rs = Message(KIND_RESPONSE, conn, index, t + lat, t + lat, rq.client, rq.server, F_REPLAYED,
                         data, "GET", uri, 200, bl, hl)
            w.write(rq)
            w.write(rs)
            if len(recorded) < n:
                recorded.append((conn, index, uri, req))
        for conn, index, uri, req in recorded:     # the recorded exchanges follow
            data, hl, bl = _resp(0, 200, {"id": index, "name": "item", "price": 0, "updated_at": 0})
            w.write(Message(KIND_REQUEST, conn, index, T0, T0, ("10.0.0.1", 1), ("10.0.0.2", 80), 0, req,
                            "GET", uri, 0, 0, len(req)))
            w.write(Message(KIND_RESPONSE, conn, index, T0 + 10**6, T0 + 10**6, ("10.0.0.1", 1),
                            ("10.0.0.2", 80), 0, data, "GET", uri, 200, bl, hl))


CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
what, cand, base = sys.argv[2], sys.argv[3], sys.argv[4]
t = time.perf_counter()
if what == "read":
    from replay.log import LogReader
    n = sum(1 for _ in LogReader(cand)) + sum(1 for _ in LogReader(base))
else:
    from replay.analysis.compare import Analysis
    from replay.pipeline import allocator_for_scans
    allocator_for_scans()           # as replay report does
    rep = Analysis(cand, base if what == "baseline" else None).run(workers=None)
    n = rep["totals"]["exchanges"]
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec); the workers'
# (forked: their RSS counts the indexes they share with this process) from RUSAGE_CHILDREN
import resource
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"n": n, "s": time.perf_counter() - t, "rss_mib": hwm / 1024,
                  "worker_mib": kids / 1024}))
"""


def child(what, cand, base):
    p = subprocess.run([sys.executable, "-c", CHILD, ROOT, what, cand, base], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout)


def median(runs: list) -> dict:
    """The run of median time (the machine is shared: one run can be off by 20 %)."""
    return sorted(runs, key=lambda r: r["s"])[len(runs) // 2]


def command(cand, base):
    """``replay report`` as a user runs it, timed from launch; its peak RSS from wait4."""
    out = os.path.join(os.path.dirname(cand), "replay-bench-report.json")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", COMMAND, "report", cand, "--baseline", base,
                        "--json", out], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    s = time.perf_counter() - t
    if p.returncode not in (0, 3):
        raise SystemExit(f"replay report failed: {p.stderr}")
    with open(out) as f:
        assert json.load(f)["totals"]["exchanges"]
    os.unlink(out)
    got = json.loads(p.stderr.strip().splitlines()[-1])
    return {"s": s, **got}


# the command, printing its own peak and its workers' on leaving (as CHILD does)
COMMAND = r"""
import atexit, json, resource, sys
def peaks():
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rss_mib": hwm / 1024, "worker_mib": kids / 1024}), file=sys.stderr)
atexit.register(peaks)
from replay.cli.main import main
main()
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the median is printed")
    a = ap.parse_args()
    for n in [int(x) for x in a.sizes.split(",")]:
        cand = os.path.join(a.dir, f"replay-bench-report2-cand-{n}.rlog")
        base = os.path.join(a.dir, f"replay-bench-report2-base-{n}.rlog")
        for path, is_cand in ((cand, True), (base, False)):
            if not os.path.exists(path):
                t = time.perf_counter()
                synth(path, n, is_cand)
                print(f"made {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
        r = median([child("read", cand, base) for _ in range(a.repeat)])
        print(f"{n:>9,} exchanges  reading both logs (baseline): {n / r['s']:>9,.0f} exchanges/s  "
              f"peak {r['rss_mib']:.0f} MiB")
        for what in ("recorded", "baseline"):
            r = median([child(what, cand, base) for _ in range(a.repeat)])
            assert r["n"] == n, r
            print(f"{n:>9,} exchanges  report vs {what:<9}: {n / r['s']:>9,.0f} exchanges/s  "
                  f"peak {r['rss_mib']:.0f} MiB, a worker's {r['worker_mib']:.0f} MiB  ({r['s']:.1f} s)")
        r = median([command(cand, base) for _ in range(a.repeat)])
        print(f"{n:>9,} exchanges  whole command vs baseline: {n / r['s']:>9,.0f} exchanges/s  "
              f"peak {r['rss_mib']:.0f} MiB, a worker's {r['worker_mib']:.0f} MiB  ({r['s']:.1f} s)")


if __name__ == "__main__":
    main()
