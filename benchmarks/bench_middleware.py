#!/usr/bin/env python3
"""Messages per second through a middleware process and through Python hooks.

Messages are a realistic small pair (a 90-byte GET and a 100-byte JSON response) unless
``--body`` gives a body size. For each middleware the whole list goes through ``Middleware.map``;
the baseline is the same list through ``apply_plugins`` with one hook that keeps every message,
timed in the same run.

Usage::

    python3 benchmarks/bench_middleware.py                 # 100k messages
    python3 benchmarks/bench_middleware.py -n 20000 --body 65536

Figures are for people to read; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replay.events import KIND_REQUEST, KIND_RESPONSE, Message  # noqa: E402
from replay.httpmsg import with_data  # noqa: E402
from replay.rules.middleware import Middleware  # noqa: E402
from replay.rules.plugins import apply_plugins, load_plugins  # noqa: E402

PY = sys.executable
EXAMPLES = ROOT / "examples"


def messages(n: int, body: int):
    out = []
    blob = b"x" * body
    for i in range(n // 2):
        req = Message(KIND_REQUEST, i, 0, 1000 + i, 1000 + i, ("10.0.0.1", 40000), ("10.0.0.2", 80), 0, b"")
        out.append(with_data(req, b"GET /api/items/%d?x=1 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: b\r\n"
                                  b"Accept: */*\r\n\r\n" % i))
        resp = Message(KIND_RESPONSE, i, 0, 2000 + i, 2000 + i, req.client, req.server, 0, b"", "GET", "/")
        payload = blob or b'{"id": %d, "ok": true, "items": []}' % i
        out.append(with_data(resp, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)))
    return out


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100_000, help="messages (half requests, half responses)")
    ap.add_argument("--body", type=int, default=0, help="response body bytes (default: a small JSON)")
    args = ap.parse_args()
    msgs = messages(args.n, args.body)
    mb = sum(len(m.data) for m in msgs) / 1e6

    n, base = timed(lambda: sum(1 for _ in apply_plugins(msgs, load_plugins([lambda m: m]))))
    print(f"{len(msgs):,} messages, {mb:.1f} MB of payload")
    print(f"{'through':48s} {'msg/s':>10s} {'MB/s':>8s} {'vs hook':>8s}")
    print(f"{'a Python hook that keeps every message':48s} {n / base:10,.0f} {mb / base:8.1f} {1:8.2f}")
    cmds = [
        ("cat", "cat"),
        ("awk '{ print; fflush() }'", "awk '{ print; fflush() }'"),
        ("examples/middleware_echo.py", f"{PY} {EXAMPLES / 'middleware_echo.py'}"),
        ("examples/middleware_add_header.py", f"{PY} {EXAMPLES / 'middleware_add_header.py'}"),
        ("sh examples/middleware_echo.sh", f"sh {EXAMPLES / 'middleware_echo.sh'}"),
    ]
    for label, cmd in cmds:
        sample = msgs if not label.startswith("sh ") else msgs[: max(2, len(msgs) // 20)]
        with Middleware(cmd) as mw:
            n, dt = timed(lambda: sum(1 for _ in mw.map(sample)))
        smb = sum(len(m.data) for m in sample) / 1e6
        note = "" if sample is msgs else f"  ({len(sample):,} messages)"
        print(f"{label:48s} {n / dt:10,.0f} {smb / dt:8.1f} {(n / dt) / (len(msgs) / base):8.2f}{note}")


if __name__ == "__main__":
    main()
