"""Fuzz every harness for a long time and print what each reached.

    python benchmarks/fuzz_long.py                          # 1 h per harness, corpora in fuzz-work/
    python benchmarks/fuzz_long.py --hours 8 engine rlog    # chosen harnesses
    python benchmarks/fuzz_long.py --minutes 5 --work /tmp/fz -- -max_len=65536

The harnesses run one after the other (libFuzzer uses one core each; ``--jobs`` runs that many
at once). Each keeps its corpus in ``WORK/NAME/corpus``, so a later run starts where this one
stopped, and leaves any failing input beside it (``crash-*``, ``timeout-*``, ``oom-*``). At the
end: per harness, executions, exec/s, libFuzzer's coverage (``cov`` edges, ``ft`` features),
corpus size and failures, as a table and, with ``--json FILE``, as JSON.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fuzz.run import HARNESSES, command_line, run, summary_line  # noqa: E402


def main(argv=None) -> int:
    ap, argv, extra = command_line(__doc__, argv)
    time_arg = ap.add_mutually_exclusive_group()
    time_arg.add_argument("--hours", type=float, default=None, help="per harness (default 1)")
    time_arg.add_argument("--minutes", type=float, default=None, help="per harness")
    ap.add_argument("--work", type=Path, default=ROOT / "fuzz-work", help="corpora and failing inputs")
    ap.add_argument("--jobs", type=int, default=1, help="harnesses fuzzed at once")
    ap.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes is not None else (args.hours or 1.0) * 3600
    names = args.harness or list(HARNESSES)
    print(f"fuzzing {', '.join(names)} for {seconds:.0f} s each in {args.work}", file=sys.stderr)

    def one(name):
        r = run(name, args.work, seconds=seconds, timeout=args.timeout,
                rss_limit_mb=args.rss_limit_mb, extra=extra)
        print(summary_line(r), file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, names))
    print("\nper harness: executions, exec/s, cov (edges) and ft (features) as libFuzzer counts them")
    for r in results:
        print(summary_line(r))
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "tail"} for r in results],
                                        indent=2))
    return 0 if all(r["returncode"] == 0 and not r["artifacts"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
