#!/usr/bin/env python3
"""Does ``replay capture`` keep up with the highest rate wrk reaches on this machine?

For each setting of the namespace's loopback (1500-byte MTU; offloads off, then on) this:

1. starts nginx in a throwaway network namespace (the document root, API backend and request mix
   of ``make_capture.py`` / ``wrk_mix.lua``, or ``--mix small``: one 1 KiB file, the highest
   request rate);
2. starts ``replay capture -i lo --port PORT`` in the namespace and waits until it listens;
3. runs ``wrk -t2 -c64 -d DURATION`` at full speed;
4. stops the capture with SIGINT, stops nginx (which flushes its access log), and prints:
   requests nginx served (access-log lines) against requests in the log and whether the
   (method, uri) lists are equal, responses paired, kernel and interface drops, the capture's
   queue peak, and the CPU (user + sys, from ``wait4``) the capture process used.

With ``--baseline tcpdump`` each round is run again with ``tcpdump -w`` recording in place of
``replay capture`` (alternating, ``--rounds`` times), its pcap converted afterwards, and the
share of the requests nginx served that each kept is printed side by side: at saturation,
where neither keeps everything, that share is what to compare.

Usage::

    sudo python3 benchmarks/bench_capture.py                  # realistic mix, offloads off then on
    sudo python3 benchmarks/bench_capture.py --mix small --offloads on --baseline tcpdump --rounds 2
    sudo python3 benchmarks/bench_capture.py --mix small --duration 20 --offloads off

Rules: root, iproute2, ethtool, nginx and wrk are needed; all traffic stays on the loopback of a
namespace created here; wrk runs for a bounded time under a watchdog; the namespace, its
processes and the work directory are removed at exit. Figures are for people to read.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from make_capture import (WRK_SCRIPT, build_docroot, nginx_snippets,  # noqa: E402
                          write_wrk_manifest)
from netns import Netns, NetnsError, netns_available, start_nginx  # noqa: E402

REQUEST_RE = re.compile(r'"(\S+) (\S+) HTTP/[\d.]+"')


def access_log_requests(path: Path) -> tuple[collections.Counter, int]:
    """(method, uri) counts of nginx's access log, and how many it logged as 499 (the client
    closed its connection before the response: wrk does that to requests in flight when it
    stops)."""
    out: collections.Counter = collections.Counter()
    closed = 0
    with open(path, errors="replace") as f:
        for line in f:
            m = REQUEST_RE.search(line)
            out[(m.group(1), m.group(2)) if m else ("?", line.strip())] += 1
            if '" 499 ' in line:
                closed += 1
    return out, closed


def log_summary(paths) -> dict:
    from replay.events import F_INCOMPLETE, KIND_REQUEST
    from replay.log import LogReader

    reqs: collections.Counter = collections.Counter()
    req_ids, resp_ids = set(), set()
    incomplete = unpaired = responses = 0
    meta = {}
    warnings = []
    for p in paths:
        r = LogReader(p)
        warnings += r.warnings
        meta = r.meta
        for m in r:
            if m.kind == KIND_REQUEST:
                reqs[(m.method, m.uri)] += 1
                req_ids.add((m.conn, m.index))
            else:
                responses += 1
                if m.index < 0:
                    unpaired += 1
                else:
                    resp_ids.add((m.conn, m.index))
            if m.flags & F_INCOMPLETE:
                incomplete += 1
    return {"requests": reqs, "responses": responses, "paired": len(req_ids & resp_ids),
            "unanswered": len(req_ids - resp_ids), "unpaired_responses": unpaired,
            "incomplete": incomplete, "meta": meta, "warnings": warnings}


class CaptureProc:
    READY = "capturing on"          # the line on stderr that says it records

    def __init__(self, ns: Netns, out: Path, port: int, extra=()):
        self.out = out
        self._start(ns, [sys.executable, "-m", "replay.cli.main", "capture", "-i", "lo", "--port",
                         str(port), "-o", str(out), *extra])

    def _start(self, ns: Netns, cmd: list) -> None:
        self.proc = ns.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(20) or self.proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} did not start:\n" + "".join(self.lines))
        self.t0 = time.monotonic()
        self.rss_samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self):
        """VmRSS of the capture every 0.1 s (memory must stay flat during a long capture), and
        VmHWM, its peak. (wait4's ru_maxrss is no use here: Linux carries it across fork and
        exec, so it shows this script's own size when the child was forked.)"""
        self.hwm = 0
        while not self.stopped.is_set():    # not poll(): it could reap the child before stop()
            try:
                with open(f"/proc/{self.proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            self.rss_samples.append((time.monotonic() - self.t0,
                                                     int(line.split()[1]) // 1024))
                        elif line.startswith("VmHWM:"):
                            self.hwm = max(self.hwm, int(line.split()[1]) // 1024)
            except OSError:
                return
            time.sleep(0.1)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.READY in line:
                self.ready.set()
        self.ready.set()

    def stop(self, timeout=120.0):
        """SIGINT, then wait; returns (returncode, wall seconds, user s, sys s, peak RSS MiB)."""
        self.t_stop = time.monotonic() - self.t0
        self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                pid, status, ru = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.05)
        self.stopped.set()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - self.t0
        time.sleep(0.1)
        return self.proc.returncode, wall, ru.ru_utime, ru.ru_stime, self.hwm


class TcpdumpProc(CaptureProc):
    """``tcpdump -w`` in place of ``replay capture`` (the baseline of ``--baseline tcpdump``):
    same filter, same snaplen and kernel buffer as replay's defaults; its pcap is converted
    afterwards, offline, so the requests it kept are counted the same way."""

    READY = "listening on"

    def __init__(self, ns: Netns, out: Path, port: int, extra=()):
        self.out = out
        self.pcap = out.with_suffix(".pcap")
        self._start(ns, ["tcpdump", "-i", "lo", "-n", "-s", "262144", "-B", str(64 << 10), "-w",
                         str(self.pcap), "tcp", "port", str(port)])

    def stop(self, timeout=120.0):
        got = super().stop(timeout)
        r = subprocess.run([sys.executable, "-m", "replay.cli.main", "convert", str(self.pcap),
                            "-o", str(self.out), "-q"], capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode != 0:
            raise RuntimeError(f"convert of tcpdump's capture failed: {r.stderr.strip()}")
        m = re.search(r"(\d+) packets dropped by kernel", "".join(self.lines))
        self.kernel_drops = int(m.group(1)) if m else None
        return got


def run_once(args, offloads: bool, work: Path, recorder=CaptureProc) -> dict:
    label = (f"offloads {'on' if offloads else 'off'}"
             + (", tcpdump -w" if recorder is TcpdumpProc else ", replay capture"))
    with Netns("replay-bcap", mtu=args.mtu, offloads=offloads) as ns:
        print(f"\n== {label}: namespace {ns.name}, lo mtu {ns.link_mtu()}, {ns.offload_report}",
              flush=True)
        root = work / "docroot"
        if args.mix == "realistic":
            manifest = build_docroot(root)
            write_wrk_manifest(manifest, work / "manifest.tsv")
            extra_http, extra_server = nginx_snippets(args.port)
        else:
            root.mkdir(parents=True, exist_ok=True)
            (root / "small.bin").write_bytes(os.urandom(1024))
            extra_http = extra_server = ""
        nginx_dir = work / f"nginx-{re.sub(r'[^a-z]+', '-', label)}"
        server = start_nginx(ns, root, args.port, nginx_dir, workers=args.workers,
                             extra_http=extra_http, extra_server=extra_server)
        out = work / f"{re.sub(r'[^a-z]+', '-', label)}.rlog"
        try:
            cap = recorder(ns, out, args.port, args.capture_args)
            try:
                cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections),
                       "-d", f"{int(args.duration)}s", "--timeout", "10s"]
                if args.mix == "realistic":
                    cmd += ["-s", str(WRK_SCRIPT), f"http://127.0.0.1:{args.port}", "--",
                            str(work / "manifest.tsv"), "1"]
                else:
                    cmd += [f"http://127.0.0.1:{args.port}/small.bin"]
                print("running:", " ".join(cmd), flush=True)
                wrk = ns.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
                time.sleep(0.5)  # last ACKs and FINs
            finally:
                rc, wall, utime, stime, rss = cap.stop()
        finally:
            server.stop()
        served, closed_early = access_log_requests(server.access_log)
    summary = log_summary([out])
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", wrk.stdout)
    rps = re.search(r"Requests/sec:\s*([\d.]+)", wrk.stdout)
    tput = re.search(r"Transfer/sec:\s*([\d.]+\w+)", wrk.stdout)
    meta = summary["meta"]
    cap_meta = meta.get("capture", {})
    drops = meta.get("drops", {})
    if recorder is TcpdumpProc:
        drops = {"kernel": cap.kernel_drops, "interface": None}
    logged = summary["requests"]
    n_served, n_logged = sum(served.values()), sum(logged.values())
    res = {
        "label": label, "wrk_requests": int(m.group(1)) if m else None,
        "rps": float(rps.group(1)) if rps else None, "transfer": tput.group(1) if tput else "?",
        "kept": round(sum((served & logged).values()) / n_served, 4) if n_served else None,
        "served": n_served, "logged": n_logged, "same": served == logged,
        "paired": summary["paired"], "unanswered": summary["unanswered"],
        "closed_early": closed_early,
        "unpaired_responses": summary["unpaired_responses"],
        "incomplete": summary["incomplete"], "drops": drops, "rc": rc, "wall": wall,
        "cpu_user": utime, "cpu_sys": stime, "rss": rss, "rss_samples": cap.rss_samples, "packets": cap_meta.get("packets"),
        "bytes": cap_meta.get("bytes"), "queue_peak": cap_meta.get("queue_peak"),
        "queue_waits": cap_meta.get("queue_waits"), "log_bytes": out.stat().st_size,
        "warnings": summary["warnings"], "stderr": "".join(cap.lines),
    }
    if not res["same"]:
        diff = (served - logged) + (logged - served)
        res["diff"] = list(diff.items())[:5]
    report(res)
    return res


def report(r: dict) -> None:
    cpu = r["cpu_user"] + r["cpu_sys"]
    print(f"wrk:              {r['wrk_requests']} requests, {r['rps']} req/s, {r['transfer']}/s")
    print(f"nginx served:     {r['served']} requests (access-log lines)")
    print(f"in the log:       {r['logged']} requests; (method, uri) lists "
          f"{'EQUAL' if r['same'] else 'DIFFER: ' + str(r.get('diff'))}")
    print(f"responses:        {r['paired']} paired, {r['unpaired_responses']} unpaired; "
          f"{r['unanswered']} requests without response (nginx 499, wrk closed first: "
          f"{r['closed_early']}); {r['incomplete']} incomplete messages")
    print(f"drops:            kernel {r['drops'].get('kernel')}, interface "
          f"{r['drops'].get('interface')}")
    print(f"capture:          {r['packets']} packets, {(r['bytes'] or 0) / 1e6:.1f} MB, queue peak "
          f"{(r['queue_peak'] or 0) / 2**20:.1f} MiB ({r['queue_waits']} waits), log "
          f"{r['log_bytes'] / 1e6:.1f} MB, exit {r['rc']}")
    print(f"capture CPU:      user {r['cpu_user']:.1f} s + sys {r['cpu_sys']:.1f} s = {cpu:.1f} s "
          f"over {r['wall']:.1f} s wall ({100 * cpu / r['wall']:.0f} % of one core); "
          f"peak RSS {r['rss']:.0f} MiB")
    samples = r["rss_samples"]
    if samples:
        at = [f"{m} MiB at {t:.0f} s" for t, m in samples[len(samples) // 4::len(samples) // 4 or 1]]
        print("capture RSS:      " + ", ".join(at))
    if r["warnings"]:
        print(f"log warnings:     {r['warnings'][:3]}")
    last = [line for line in r["stderr"].splitlines() if line.strip()][-3:]
    print("capture summary:  " + "\n                  ".join(last))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=20, help="seconds of wrk per run (>= 20)")
    ap.add_argument("-c", "--connections", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="nginx worker processes")
    ap.add_argument("--mix", choices=("realistic", "small"), default="realistic")
    ap.add_argument("--offloads", choices=("off", "on", "both"), default="both")
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (logs, nginx access logs) and print its path")
    ap.add_argument("--baseline", choices=("none", "tcpdump"), default="none",
                    help="tcpdump: each round also records the same load with tcpdump -w (its "
                         "pcap converted afterwards), for the share of served requests each keeps")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds per offload setting (with --baseline, replay and tcpdump alternate)")
    ap.add_argument("--capture-args", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments for replay capture (last on the line)")
    args = ap.parse_args(argv)
    ok, why = netns_available()
    if not ok:
        print(f"error: cannot use network namespaces: {why}", file=sys.stderr)
        return 2
    missing = [t for t in ("nginx", "wrk", "ethtool") if not shutil.which(t)]
    if missing:
        print(f"error: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    from replay import core

    print(f"core: {core.IMPLEMENTATION}; {os.cpu_count()} CPUs; wrk -t{args.threads} "
          f"-c{args.connections} -d{args.duration:g}s, mix {args.mix}, nginx workers {args.workers}")
    if args.baseline == "tcpdump" and not shutil.which("tcpdump"):
        print("error: missing tools: tcpdump", file=sys.stderr)
        return 2
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.offloads]
    recorders = [CaptureProc] + ([TcpdumpProc] if args.baseline == "tcpdump" else [])
    runs = [(o, rec) for o in settings for _ in range(max(1, args.rounds)) for rec in recorders]
    results = []
    for offloads, recorder in runs:
        work = Path(tempfile.mkdtemp(prefix="replay-bcap-"))
        os.chmod(work, 0o755)
        try:
            results.append(run_once(args, offloads, work, recorder))
        except (NetnsError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            if args.keep:
                print(f"kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print("\n== summary")
    for r in results:
        cpu = r["cpu_user"] + r["cpu_sys"]
        print(f"{r['label']:30s} {r['rps'] or 0:9.0f} req/s  served {r['served']:8d}  logged "
              f"{r['logged']:8d} (kept {100 * (r['kept'] or 0):5.1f} %)  "
              f"{'equal' if r['same'] else 'DIFFER'}  paired {r['paired']:8d} "
              f"(+{r['unanswered']} unanswered, {r['closed_early']} x 499)  "
              f"drops {r['drops'].get('kernel')}/{r['drops'].get('interface')}  "
              f"CPU {cpu:5.1f} s ({100 * cpu / r['wall']:.0f} %)")
    if args.baseline == "tcpdump":
        for label in sorted({r["label"].split(",")[0] for r in results}):
            kept = {rec: [r["kept"] for r in results if r["label"].startswith(label + ", " + rec)]
                    for rec in ("replay", "tcpdump")}
            print(f"{label}: share of served requests kept, replay capture "
                  f"{' '.join(f'{100 * k:.1f} %' for k in kept['replay'])}; tcpdump -w "
                  f"{' '.join(f'{100 * k:.1f} %' for k in kept['tcpdump'])}")
    mine = [r for r in results if "replay capture" in r["label"]]
    return 0 if all(r["same"] and not r["drops"].get("kernel") for r in mine) else 1


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(main())
