#!/usr/bin/env python3
"""How fast the .rlog log writes and reads, and how small it is against ``gzip -6``.

For each capture (``captures/sample.pcap`` by default, or the paths given; ``/tmp/bench.pcap`` is
added when it exists) the messages are first reassembled in memory (not timed), then this prints:

* ``LogWriter`` with its background compression thread and without it: MB/s of HTTP bytes and
  messages/s, to a file in a temporary directory (the file's own fsync at close included);
* ``gzip -6`` of the same bytes in the same run (the baseline), its MB/s and size;
* the log's size against the gzip size, for all messages and for API messages alone
  (``/api/`` URIs: small JSON bodies, where per-message overhead shows most);
* ``LogReader``: iterating every message (MB/s), ``table()`` (the columns only, no payload
  decompression) and a ``read_range`` over a tenth of the time span;
* capture to log as ``replay convert`` does it (core and writer in one process), with and without
  the writer's thread: what the overlap of parsing and compression gains on two cores.

Nothing here is a pass/fail test: the figures are for people to read.

Usage::

    python3 benchmarks/bench_log.py [CAPTURE ...] [--level 1] [--block-bytes 1048576]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replay.limits import LOG_LEVEL  # noqa: E402
from replay.log import LogReader, LogWriter  # noqa: E402
from replay.pipeline import CaptureReader  # noqa: E402


def timed(fn, repeat):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def write_log(path, msgs, **kw):
    def run():
        with LogWriter(path, **kw) as w:
            for m in msgs:
                w.write(m)
        return os.path.getsize(path)
    return run


def bench(cap: Path, tmp: Path, args):
    msgs = list(CaptureReader(str(cap)))
    raw = b"".join(m.data for m in msgs)
    mb = len(raw) / 1e6
    print(f"\n{cap}: {cap.stat().st_size / 1e6:.1f} MB capture, {len(msgs)} messages, "
          f"{mb:.1f} MB of HTTP bytes")
    if not msgs:
        return
    out = tmp / "bench.rlog"
    kw = dict(level=args.level, block_bytes=args.block_bytes)
    dt_gz, gz = timed(lambda: len(gzip.compress(raw, compresslevel=6)), 1)
    print(f"  gzip -6 (baseline)     {mb / dt_gz:8.1f} MB/s            size {gz:>12,}")
    for threads in (True, False):
        dt, size = timed(write_log(out, msgs, threads=threads, **kw), args.repeat)
        print(f"  write ({'thread' if threads else 'inline'})         {mb / dt:8.1f} MB/s "
              f"{len(msgs) / dt:9.0f} msg/s  size {size:>12,}  log/gzip {size / gz:.3f}")
    dt, n = timed(lambda: sum(1 for _ in LogReader(str(out))), args.repeat)
    assert n == len(msgs)
    print(f"  read (open, iterate)   {mb / dt:8.1f} MB/s {len(msgs) / dt:9.0f} msg/s")
    reader = LogReader(str(out))
    dt, table = timed(reader.table, args.repeat)
    print(f"  table()                {len(table) / dt:17.0f} rows/s ({dt * 1000:.1f} ms, "
          f"{len(reader.blocks)} blocks)")
    t0, t1 = reader.time_span()
    mid = t0 + (t1 - t0) // 2
    dt, k = timed(lambda: sum(1 for _ in reader.read_range(mid, mid + (t1 - t0) // 10)), args.repeat)
    print(f"  read_range (1/10 span) {dt * 1000:8.1f} ms for {k} messages")
    reader.close()

    for threads in (True, False):  # what convert does: parsing and writing in one process
        def convert():
            with LogWriter(out, threads=threads, **kw) as w:
                for m in CaptureReader(str(cap)):
                    w.write(m)
        dt, _ = timed(convert, args.repeat)
        print(f"  capture -> log ({'thread' if threads else 'inline'}) {mb / dt:8.1f} MB/s "
              f"{len(msgs) / dt:9.0f} msg/s ({dt:.3f} s)")

    api = [m for m in msgs if (m.uri or "").startswith("/api/")]
    if api:
        araw = b"".join(m.data for m in api)
        agz = len(gzip.compress(araw, compresslevel=6))
        _, asize = timed(write_log(tmp / "api.rlog", api, **kw), 1)
        print(f"  API messages only: {len(api)} messages, {len(araw):,} HTTP bytes, gzip -6 {agz:,}, "
              f"log {asize:,} (log/gzip {asize / agz:.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("captures", nargs="*", type=Path)
    ap.add_argument("--level", type=int, default=LOG_LEVEL)
    ap.add_argument("--block-bytes", type=int, default=1 << 20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    caps = args.captures or [ROOT / "captures" / "sample.pcap"]
    if not args.captures and Path("/tmp/bench.pcap").exists():
        caps.append(Path("/tmp/bench.pcap"))
    print(f"zstd level {args.level}, blocks of up to {args.block_bytes:,} message bytes, "
          f"best of {args.repeat}, {os.cpu_count()} CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="replay-bench-log-"))
    try:
        for cap in caps:
            bench(cap, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
