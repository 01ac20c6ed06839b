#!/usr/bin/env python3
"""The streamed replay's reading side, both implementations of the core side by side.

What is measured, on the API log of ``bench_play_scale.py`` (made and cached the same way, in
``--workdir``): for its first ``--requests`` requests (default 200,000),

* ``read``: the log's messages made (``LogReader``, with the core ``replay.core`` picked: the
  same in both columns), the baseline every plan pays;
* ``plan``: the same messages through ``StreamPlanner`` (Host set to the target, the recorded
  status and pipelining found, each request's body length);
* ``pack``/``unpack``: the planned requests through the reader's pipe format in batches of
  ``stream.BATCH`` (``pack_planned``, ``unpack_planned``), against ``pickle`` of the same
  batches (what crossed the pipe before);

each in µs a request, best of ``--repeat`` runs, for the compiled core and its pure twin, and
the ratio of the two. Every message is held in memory here, so the collector's passes over them
weigh on ``plan``; streamed, as in a replay, planning costs less (about 5 µs compiled). No root,
no network.

Usage::

    python3 benchmarks/bench_plan.py
    python3 benchmarks/bench_plan.py --requests 50000 --repeat 5
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse  # noqa: E402
import itertools  # noqa: E402
import pickle  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def measure(mod, path: str, n: int, repeat: int) -> dict:
    from replay.log import LogReader
    from replay.play.stream import BATCH, index_header

    header = index_header(LogReader(path))
    best: dict = {}

    def keep(name, seconds, count):
        v = 1e6 * seconds / max(1, count)
        best[name] = min(best.get(name, v), v)

    for _ in range(repeat):
        t = time.perf_counter()
        msgs = list(itertools.islice(LogReader(path), 2 * n))
        keep("read", time.perf_counter() - t, n)
        planner = mod.StreamPlanner("127.0.0.1:8080", False, header)
        t = time.perf_counter()
        out = []
        for m in msgs:
            out += planner.push(m)
        out += planner.finish()
        keep("plan", time.perf_counter() - t, len(out))
        batches = [[(0, (r, None, None)) for r, _, _ in out[i:i + BATCH]]
                   for i in range(0, len(out), BATCH)]
        t = time.perf_counter()
        packed = [mod.pack_planned(b) for b in batches]
        keep("pack", time.perf_counter() - t, len(out))
        t = time.perf_counter()
        for blob, others in packed:
            mod.unpack_planned(blob, others)
        keep("unpack", time.perf_counter() - t, len(out))
        t = time.perf_counter()
        pickled = [pickle.dumps(b, protocol=5) for b in batches]
        keep("pickle dumps", time.perf_counter() - t, len(out))
        t = time.perf_counter()
        for p in pickled:
            pickle.loads(p)
        keep("pickle loads", time.perf_counter() - t, len(out))
        del msgs, out, batches, packed, pickled
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/replay-bench-scale",
                    help="where the API log is made once and kept")
    args = ap.parse_args(argv)
    import bench_play_scale as B

    from replay import _fastparse_py as pure

    try:
        from replay import _fastparse as compiled
    except ImportError:
        compiled = None
        print("the compiled core is not built: the pure twin only")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log, _ = B.ensure_log(work, max(args.requests, 10_000), keepalive=True)
    print(f"log {log.name}: its first {args.requests:,} requests, best of {args.repeat}")
    got = {}
    for name, mod in (("compiled", compiled), ("pure", pure)):
        if mod is not None:
            got[name] = measure(mod, str(log), args.requests, args.repeat)
    print(f"{'us a request':14s}" + "".join(f"{k:>10s}" for k in got) +
          ("   pure / compiled" if len(got) == 2 else ""))
    for step in got["pure"]:
        row = "".join(f"{got[k][step]:10.2f}" for k in got)
        ratio = f"   {got['pure'][step] / got['compiled'][step]:.1f}x" if len(got) == 2 else ""
        print(f"{step:14s}{row}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
