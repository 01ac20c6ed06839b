"""Run the fuzz harnesses under libFuzzer: seeds from real captures, a corpus kept per harness.

    python fuzz/run.py                         # every harness, 20 s each
    python fuzz/run.py engine rlog --seconds 600 --work fuzz-work
    python fuzz/run.py decode --runs 5000 -- -max_len=2048     # after --: libFuzzer's own flags

Each harness gets ``WORK/NAME/corpus`` (what the fuzzer keeps, reused by the next run) and
``WORK/NAME/seeds`` (written from tests/data and the shared capture corpus when absent); a
crash, hang or leak leaves its input as ``WORK/NAME/crash-*``/``timeout-*``/``oom-*``, which
``python fuzz/fuzz_NAME.py FILE`` runs again. Every input must return within ``--timeout``
seconds and the process stay under ``--rss-limit-mb``. The summary gives, per harness, the
executions, exec/s and libFuzzer's coverage counts (``cov``: edges, ``ft``: features).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HARNESSES = ("decode", "engine", "framer", "rlog", "rules", "middleware")

_STATUS = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+).*?exec/s: (\d+)")
_EXECS = re.compile(rb"stat::number_of_executed_units: (\d+)")
_RATE = re.compile(rb"stat::average_exec_per_sec: (\d+)")


def write_seeds(name: str, directory: Path) -> int:
    """Write the harness's seeds into ``directory`` (once); return how many are there."""
    directory.mkdir(parents=True, exist_ok=True)
    have = list(directory.iterdir())
    if have:
        return len(have)
    sys.path.insert(0, str(ROOT))
    mod = importlib.import_module(f"fuzz.fuzz_{name}")
    n = 0
    seen = set()
    for data in mod.seeds():
        if data in seen:
            continue
        seen.add(data)
        (directory / f"seed-{n:05d}").write_bytes(data)
        n += 1
    return n


def run(name: str, work: Path, seconds: float | None = None, runs: int | None = None,
        timeout: int = 5, rss_limit_mb: int = 2048, extra=(), quiet: bool = True) -> dict:
    """Fuzz one harness; return its numbers and any crash files."""
    base = work / name
    corpus = base / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    nseeds = write_seeds(name, base / "seeds")
    before = set(base.glob("*-*"))
    cmd = [sys.executable, str(HERE / f"fuzz_{name}.py"), f"-timeout={timeout}",
           f"-rss_limit_mb={rss_limit_mb}", f"-artifact_prefix={base}/", "-print_final_stats=1"]
    if seconds is not None:
        cmd.append(f"-max_total_time={int(seconds)}")
    if runs is not None:
        cmd.append(f"-runs={runs}")
    cmd += list(extra) + [str(corpus), str(base / "seeds")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        log.seek(0)
        out = log.read()
    elapsed = time.monotonic() - t0
    status = _STATUS.findall(out)
    execs = _EXECS.findall(out)
    rate = _RATE.findall(out)
    crashes = sorted(str(p) for p in set(base.glob("*-*")) - before
                     if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak", "slow"))
    result = {
        "harness": name,
        "returncode": proc.returncode,
        "seconds": round(elapsed, 1),
        "seeds": nseeds,
        "executions": int(execs[-1]) if execs else (int(status[-1][0]) if status else 0),
        "exec_per_s": int(rate[-1]) if rate else (int(status[-1][3]) if status else 0),
        "cov": int(status[-1][1]) if status else 0,
        "ft": int(status[-1][2]) if status else 0,
        "corpus": len(list(corpus.iterdir())),
        "artifacts": crashes,
        "tail": out[-6000:].decode("utf-8", "replace"),
    }
    if not quiet or proc.returncode:
        sys.stderr.write(result["tail"])
    return result


def summary_line(r: dict) -> str:
    state = "ok" if r["returncode"] == 0 else f"FAILED (exit {r['returncode']})"
    line = (f"{r['harness']:<11} {r['executions']:>10} execs {r['exec_per_s']:>6} exec/s "
            f"cov {r['cov']:>5} ft {r['ft']:>6} corpus {r['corpus']:>5}  {r['seconds']:>7.1f} s  {state}")
    for a in r["artifacts"]:
        line += f"\n    {a}"
    return line


def command_line(doc: str, argv=None):
    """(a parser that takes harness names, our arguments, libFuzzer's own: those after ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("harness", nargs="*", choices=(*HARNESSES, []), default=[])
    return ap, argv, extra


def main(argv=None) -> int:
    ap, argv, extra = command_line(__doc__, argv)
    ap.add_argument("--seconds", type=float, default=None, help="per harness (default 20)")
    ap.add_argument("--runs", type=int, default=None, help="executions per harness")
    ap.add_argument("--work", type=Path, default=None, help="corpora and crashes (default: a temporary directory)")
    ap.add_argument("--timeout", type=int, default=5, help="seconds one input may take")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("-v", "--verbose", action="store_true", help="libFuzzer's output")
    args = ap.parse_args(argv)
    if args.seconds is None and args.runs is None:
        args.seconds = 20
    names = args.harness or list(HARNESSES)
    with tempfile.TemporaryDirectory(prefix="replay-fuzz-") as tmp:
        work = args.work or Path(tmp)
        results = [run(n, work, args.seconds, args.runs, args.timeout, args.rss_limit_mb, extra,
                       quiet=not args.verbose) for n in names]
        for r in results:
            print(summary_line(r))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
