#!/usr/bin/env python3
"""How fast `replay convert` turns a capture into a log, against `tcpdump -r` in the same run.

For one capture (made by ``make_capture.py`` when it does not exist yet) this prints:

* ``tcpdump -r FILE -w /dev/null``: the baseline, best of ``--repeat`` runs;
* ``replay convert`` with the compiled core and with the pure twin (``REPLAY_NO_EXTENSIONS=1``):
  wall time, ratio to the baseline, MB/s and packets/s, peak memory (max RSS of the process);
* peak memory on the first half of the capture too, to show whether memory stays flat as the
  capture grows;
* the log's size against the HTTP bytes it holds and against ``gzip -6`` of those bytes;
* requests in the log against the lines of nginx's access log, when ``--access-log`` is given;
* with ``--against DIR`` (a checkout of another release, its extension built in place): that
  release's convert, timed in turn with this one and tcpdump, the ratios of both to the same
  baseline.

Usage::

    sudo python3 benchmarks/make_capture.py -o /tmp/replay-bench.pcap --size 450 \\
        --keep-access-log /tmp/replay-bench.access.log
    python3 benchmarks/bench_convert.py /tmp/replay-bench.pcap --access-log /tmp/replay-bench.access.log
    python3 benchmarks/bench_convert.py --api 100000     # small API messages: per-message cost
    git worktree add /tmp/before v1 && (cd /tmp/before && python3 setup.py build_ext --inplace)
    python3 benchmarks/bench_convert.py --skip-pure --repeat 8 --against /tmp/before

Nothing here is a pass/fail test: the figures are for people to read.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_timed(cmd, env=None):
    """Run a command; return (wall seconds, max RSS in MiB, stderr)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({code}):\n{err}")
    return dt, ru.ru_maxrss / 1024, err


def best(runs):
    """The fastest of ``runs``, with the median wall time of all of them appended."""
    return (*min(runs, key=lambda r: r[0]), sorted(r[0] for r in runs)[len(runs) // 2])


def alternating(cmds, repeat):
    """``repeat`` runs of each of ``cmds`` (``(cmd, env)`` pairs), one of each in turn, so that
    a machine busier at one moment than another weighs on all of them alike."""
    runs = [[] for _ in cmds]
    for _ in range(repeat):
        for out, (cmd, env) in zip(runs, cmds):
            out.append(run_timed(cmd, env))
    return [best(r) for r in runs]


def packets_in(path):
    out = subprocess.run(["capinfos", "-M", "-c", str(path)], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if "Number of packets" in line:
            return int(line.split(":")[1].strip())
    return None


def api_capture(n: int) -> Path:
    """The API-style capture of ``n`` exchanges (made once, then cached beside its log)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_play_scale

    work = Path("/tmp/replay-bench-scale")
    work.mkdir(exist_ok=True)
    log, _ = bench_play_scale.ensure_log(work, n)
    cap = log.with_suffix(".pcap")
    if not cap.exists():
        tmp = cap.with_suffix(".tmp.pcap")
        subprocess.run([sys.executable, "-m", "replay.cli.main", "convert", str(log), "-o", str(tmp),
                        "-q"], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        tmp.rename(cap)
    return cap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("capture", nargs="?", default="/tmp/replay-bench.pcap")
    ap.add_argument("--size", type=int, default=450, help="MB, when the capture must be made")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--access-log", type=Path, help="nginx access log of the capture's server")
    ap.add_argument("--skip-pure", action="store_true", help="do not time the pure-Python twin")
    ap.add_argument("--api", type=int, metavar="N",
                    help="instead of CAPTURE, an API-style capture of N exchanges (small JSON "
                         "requests and answers, 32 keep-alive connections and short ones), made "
                         "from bench_play_scale.py's log with `replay convert LOG -o X.pcap` and "
                         "cached in /tmp/replay-bench-scale")
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help="a checkout of another release (extension built in place): its "
                         "compiled convert timed in turn with this one")
    args = ap.parse_args()
    if args.against and not (args.against / "replay" / "__init__.py").exists():
        raise SystemExit(f"{args.against}: not a checkout of replay")

    cap = Path(args.capture)
    if args.api:
        cap = api_capture(args.api)
    elif not cap.exists():
        access = cap.with_suffix(".access.log")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_capture.py"), "-o", str(cap),
                        "--size", str(args.size), "--keep-access-log", str(access)], check=True)
        args.access_log = args.access_log or access
    size = cap.stat().st_size
    mb = size / 1e6
    npk = packets_in(cap)
    tmp = Path(tempfile.mkdtemp(prefix="replay-bench-"))
    try:
        replay = [sys.executable, "-m", "replay.cli.main"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env_pure = dict(env, REPLAY_NO_EXTENSIONS="1")
        out = tmp / "out.rlog"

        # the package's bytecode, as an installed one has it (pip writes it at install time;
        # with PYTHONDONTWRITEBYTECODE each run would compile replay's modules again)
        for tree in [ROOT] + ([args.against] if args.against else []):
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "replay")],
                           check=True)
        # (PYTHONSAFEPATH: not the current directory first, which may be this checkout)
        env_against = (dict(os.environ, PYTHONPATH=str(args.against.resolve()), PYTHONSAFEPATH="1")
                       if args.against else None)
        print(f"capture: {cap} ({mb:.1f} MB, {npk} packets); best of {args.repeat}, "
              "tcpdump and the compiled convert in turn (median in brackets)")
        convert = replay + ["convert", str(cap), "-o", str(out), "-q"]
        impls = [("compiled", env)] + ([] if args.skip_pure else [("pure", env_pure)])
        for name, e in list(impls):
            check = subprocess.run(replay[:1] + ["-c", "import replay.core as c; print(c.IMPLEMENTATION)"],
                                   env=e, capture_output=True, text=True).stdout.strip()
            if check != name:
                print(f"replay convert ({name}): not available (core is {check})")
                impls.remove((name, e))
        if args.against:        # (its compiled core, from that checkout)
            got = subprocess.run(replay[:1] + ["-c", "import replay, replay.core as c; "
                                               "print(c.IMPLEMENTATION, replay.__file__)"],
                                 env=env_against, capture_output=True, text=True).stdout.split()
            if got[:1] != ["compiled"] or not got[1].startswith(str(args.against.resolve())):
                raise SystemExit(f"{args.against}: its compiled core does not load "
                                 f"({' from '.join(got) or 'no replay'})")
        tcpdump = ["tcpdump", "-r", str(cap), "-w", "/dev/null"]
        timed = alternating([(tcpdump, None)] + [(convert, e) for name, e in impls[:1]
                                                 if name == "compiled"]
                            + ([(convert, env_against)] if args.against else []), args.repeat)
        base, base_rss, _, base_med = timed[0]
        print(f"tcpdump -r:            {base:7.3f} s  {mb / base:8.1f} MB/s  "
              f"{npk / base:10.0f} packets/s  peak {base_rss:6.1f} MiB  ({base_med:.3f} s)")
        results = {}
        for name, e in impls:
            if name == "compiled":
                dt, rss, err, med = timed[1]
            else:
                dt, rss, err, med = best([run_timed(convert, e)])
            results[name] = dt
            print(f"replay convert ({name:8s}): {dt:7.3f} s  {mb / dt:8.1f} MB/s  "
                  f"{npk / dt:10.0f} packets/s  peak {rss:6.1f} MiB  ratio {dt / base:5.1f}x "
                  f"tcpdump  ({med:.3f} s, {med / base_med:.1f}x)")
        if args.against:
            dt, rss, _, med = timed[-1]
            print(f"replay convert (against {args.against}): {dt:7.3f} s  {mb / dt:8.1f} MB/s  "
                  f"peak {rss:6.1f} MiB  ratio {dt / base:5.1f}x tcpdump  ({med:.3f} s, "
                  f"{med / base_med:.1f}x)")

        # memory as the capture grows: first half
        half = tmp / "half.pcap"
        subprocess.run(["tcpdump", "-r", str(cap), "-c", str(npk // 2), "-w", str(half)],
                       check=True, capture_output=True)
        _, rss_half, _ = run_timed(replay + ["convert", str(half), "-o", str(tmp / "half.rlog"), "-q"], env)
        _, rss_full, _ = run_timed(replay + ["convert", str(cap), "-o", str(out), "-q"], env)
        print(f"peak memory: {rss_half:.1f} MiB on the first half, {rss_full:.1f} MiB on the whole")

        # the log's size against the HTTP bytes it holds and against gzip -6 of them
        sys.path.insert(0, str(ROOT))
        from replay.log import LogReader

        reader = LogReader(str(out))
        raw = bytearray()
        requests = 0
        for m in reader:
            raw += m.data
            requests += m.kind == 0
        gz = len(gzip.compress(bytes(raw), compresslevel=6))
        logsize = out.stat().st_size
        print(f"log: {logsize / 1e6:.1f} MB for {len(raw) / 1e6:.1f} MB of HTTP bytes "
              f"({logsize / len(raw):.3f}); gzip -6 of those bytes: {gz / 1e6:.1f} MB "
              f"(log / gzip = {logsize / gz:.3f})")
        api = bytearray()
        for m in reader:
            if (m.uri or "").startswith("/api/"):
                api += m.data
        if api:
            # API-style traffic alone: the same comparison on its own log
            from replay.log import LogWriter

            api_log = tmp / "api.rlog"
            with LogWriter(str(api_log)) as w:
                for m in reader:
                    if (m.uri or "").startswith("/api/"):
                        w.write(m)
            agz = len(gzip.compress(bytes(api), compresslevel=6))
            print(f"API messages only: log {api_log.stat().st_size / 1e6:.2f} MB, "
                  f"gzip -6 {agz / 1e6:.2f} MB (log / gzip = {api_log.stat().st_size / agz:.3f})")
        if args.access_log and args.access_log.exists():
            lines = sum(1 for _ in open(args.access_log))
            print(f"requests: {requests} in the log, {lines} in nginx's access log")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
