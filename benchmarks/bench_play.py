#!/usr/bin/env python3
"""How precisely and how fast ``replay play`` replays, against nginx in a network namespace.

What it does
------------
1. Synthesises a capture (pcap, nanosecond timestamps, written with ``struct``): ``--requests``
   GETs (default 3000) arriving at ``--rps`` (default 500/s, exponential gaps, seeded) dealt over
   ``--conns`` keep-alive connections (default 16), each answered 200 µs later. Every request has
   a unique URI, so arrivals at the target can be matched to the schedule.
2. Creates a throwaway namespace (``netns.py``), starts nginx (one worker) on its loopback, and
   ``tcpdump --time-stamp-precision=nano`` there, which records when each request reached the
   target's interface.
3. Replays (the pcap, planned whole; with ``--streamed`` its ``.rlog``, whose plan a reading
   process streams as the replay goes) at ``--speed 1`` and ``--speed 10``, each at normal
   priority and with ``--realtime``
   (replay runs inside the namespace) and prints
   lateness p50/p99/max against the recorded schedule twice: from tcpdump's arrival times (the
   deadline of each request is the run's start, from its report, plus its recorded offset divided
   by the speed) and from the tool's own report (time of the ``send`` call - deadline), for
   every request and for those not held by a previous answer (a request whose connection still
   waits for the answer to the one before at its deadline goes when the answer comes: how late
   that is, is the target's doing). After each plain run, the same for the timing baseline,
   ``timed_sender.c`` (compiled with ``cc``): the same schedule, connections and rules in a few
   lines of C, timerfd and epoll, no spin; what any sender gets from this target on this machine.
   With ``--pin``, nginx runs on the last CPU and everything else (replay and its reading
   process, the baseline, tcpdump, wrk) on the others, as with a target on a machine of its own:
   the lateness is then the sender's and not the two competing for the same cores.
   ``--speeds`` chooses the speeds (default 1 and 10); ``--rounds N`` does it all N times,
   replay and the baseline in turn, and ends with each round's |lateness| p99 at the target
   and the number of rounds at 1 ms or less (a timed replay's figures move from run to run with
   whatever else the two cores do: one round says little).
4. At ``--speed max`` (``--loop --duration``) with the same number of connections, prints
   requests/s for replay (asyncio and uvloop event loops) and for ``wrk`` on the same nginx, same
   connections, in the same run, and the ratio (``--no-max``: not).

Usage::

    sudo python3 benchmarks/bench_play.py
    sudo python3 benchmarks/bench_play.py --requests 5000 --max-seconds 8
    sudo python3 benchmarks/bench_play.py --requests 20000 --rps 2000 --conns 32 --streamed \
        --speeds 10 --rounds 6 --no-max

Rules: root, iproute2, nginx, tcpdump, wrk (the wrk line is skipped without it). Traffic stays on
the namespace's loopback. Every run is bounded in time (each subprocess has a timeout; the whole
script has a watchdog). The machine's load is printed: other work on the 2 cores makes the
numbers noisy.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse
import json
import os
import random
import resource
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from netns import Netns, netns_available, start_nginx  # noqa: E402

PORT = 8080
T0 = 1_700_000_000_000_000_000
BODY = b"x" * 512


# -- a capture, packet by packet --------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _frame(src, dst, sport, dport, seq, ack, flags, payload=b""):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                      65535, 0, 0) + payload
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00"
    return eth + ip + tcp


def synth_capture(path, requests, rps, conns, seed=1):
    """Write the capture; return {uri: recorded offset from the first request, ns}."""
    SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
    rnd = random.Random(seed)
    cli, srv = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    pkts = []
    state = {}
    offsets = {}
    t = T0
    for k in range(requests):
        c = k % conns
        uri = f"/f/small.txt?c={c}&i={k}"
        req = (f"GET {uri} HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: bench-play/1.0\r\n"
               f"Accept: */*\r\n\r\n").encode()
        resp = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY
        sport = 40000 + c
        if c not in state:
            cs, ss = 1000 + c * 7919, 50000 + c * 104729
            pkts.append((t - 3_000_000, _frame(cli, srv, sport, PORT, cs, 0, SYN)))
            pkts.append((t - 2_900_000, _frame(srv, cli, PORT, sport, ss, cs + 1, SYN | ACK)))
            pkts.append((t - 2_800_000, _frame(cli, srv, sport, PORT, cs + 1, ss + 1, ACK)))
            state[c] = [cs + 1, ss + 1]
        cs, ss = state[c]
        pkts.append((t, _frame(cli, srv, sport, PORT, cs, ss, PSH | ACK, req)))
        cs += len(req)
        pkts.append((t + 200_000, _frame(srv, cli, PORT, sport, ss, cs, PSH | ACK, resp)))
        ss += len(resp)
        state[c] = [cs, ss]
        offsets[uri] = t - T0
        t += max(1000, int(rnd.expovariate(rps) * 1e9))
    for c, (cs, ss) in state.items():
        sport = 40000 + c
        pkts.append((t + 1_000_000, _frame(cli, srv, sport, PORT, cs, ss, FIN | ACK)))
        pkts.append((t + 1_100_000, _frame(srv, cli, PORT, sport, ss, cs + 1, FIN | ACK)))
        pkts.append((t + 1_200_000, _frame(cli, srv, sport, PORT, cs + 1, ss + 1, ACK)))
    pkts.sort(key=lambda p: p[0])
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1))
        for ts, fr in pkts:
            sec, ns = divmod(ts, 1_000_000_000)
            f.write(struct.pack("<IIII", sec, ns, len(fr), len(fr)))
            f.write(fr)
    return offsets


# -- measuring --------------------------------------------------------------------------------

def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, -(-p * len(s) // 100) - 1)]


def arrivals(pcap):
    """{uri: capture time of its first byte at the target, ns} from tcpdump's file."""
    from replay.events import KIND_REQUEST
    from replay.pipeline import open_input

    out = {}
    for m in open_input(str(pcap)):
        if m.kind == KIND_REQUEST and m.uri not in out:
            out[m.uri] = m.ts_first
    return out


class Tcpdump:
    def __init__(self, ns, path):
        self.path = path
        self.proc = ns.popen(["tcpdump", "-i", "lo", "-n", "-s", "0", "-B", "65536",
                              "--time-stamp-precision=nano", "-w", str(path),
                              f"tcp dst port {PORT}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline and "listening" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise SystemExit("tcpdump did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        m = re.search(r"(\d+) packets dropped by kernel", err or "")
        return int(m.group(1)) if m else 0


def replay(ns, cap, workdir, *args, timeout=120):
    rep = Path(workdir) / f"report-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "replay.cli.main", "play", str(cap), "--target",
           f"http://127.0.0.1:{PORT}", "--report", str(rep), "-q", *map(str, args)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = ns.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"replay play failed ({r.returncode}): {r.stderr.strip()}")
    out = json.loads(rep.read_text())
    # the whole command's CPU (its start, and the process reading a log, included)
    out["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def fmt_ms(v):
    return f"{v / 1e6:8.3f}"


def timed_run(ns, cap, workdir, offsets, speed, *extra):
    title = f"speed {speed:>4}" + (" " + " ".join(extra) if extra else "")
    return measured(ns, workdir, offsets, speed, title,
                    lambda: replay(ns, cap, workdir, "--speed", speed, *extra))


def measured(ns, workdir, offsets, speed, title, run):
    """``run()`` (a replay or the baseline, returning its report) with tcpdump at the target;
    prints the lateness at the target and the sender's own, all and not held by an answer."""
    pcap = Path(workdir) / f"arrivals-{speed}.pcap"
    td = Tcpdump(ns, pcap)
    rep = run()
    time.sleep(1.5)       # tcpdump hands packets over in blocks that time out after 1 s
    dropped = td.stop()
    arr = arrivals(pcap)
    start = rep["schedule"]["start_unix_ns"]
    late = [arr[u] - (start + int(off / speed)) for u, off in offsets.items() if u in arr]
    absl = [abs(x) for x in late]
    tool, free = rep["lateness_ms"], rep.get("lateness_not_held_ms") or {}
    print(f"{title}: {rep['answered']}/{len(offsets)} answered, {rep.get('error_total', 0)} errors, "
          f"{len(late)} arrivals seen by tcpdump ({dropped} dropped), "
          f"{rep['held_by_response']} held by a previous response")
    print(f"  lateness at the target (tcpdump), ms   p50 {fmt_ms(pct(late, 50))}  "
          f"p99 {fmt_ms(pct(late, 99))}  max {fmt_ms(max(late) if late else float('nan'))}  "
          f"|p99| {fmt_ms(pct(absl, 99))}  min {fmt_ms(min(late) if late else float('nan'))}")
    print(f"  lateness of the send (sender's own), ms p50 {tool['p50']:8.3f}  "
          f"p99 {tool['p99']:8.3f}  max {tool['max']:8.3f}")
    if free:
        print(f"    of those not held by an answer, ms   p50 {free['p50']:8.3f}  "
              f"p99 {free['p99']:8.3f}  max {free['max']:8.3f}")
    if "cpu_s" in rep:
        print(f"  CPU of the sender: {rep['cpu_s']:.2f} s ({rep['cpu_s'] / max(1, rep['answered']) * 1e6:.0f} µs a request)")
    return late, rep


# -- the timing baseline: the same schedule sent by a few lines of C ----------------------------

def build_baseline(workdir):
    """Compile ``timed_sender.c`` (timerfd + epoll, no spin): the path of the program, or None
    without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    exe = Path(workdir) / "timed_sender"
    r = subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).with_name("timed_sender.c"))],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        print(f"timed_sender.c did not compile: {r.stderr.strip()[:300]}")
        return None
    return exe


def write_schedule(path, offsets):
    """``offsets`` ({uri: offset}) as the baseline reads them: "offset connection uri", in time
    order (the connection is the uri's ``c=``)."""
    with open(path, "w") as f:
        for uri, off in sorted(offsets.items(), key=lambda kv: kv[1]):
            f.write(f"{off} {int(uri.split('c=')[1].split('&')[0])} {uri}\n")


def baseline(ns, exe, schedule, speed):
    """Run the baseline at ``speed``: its figures in the shape of a replay's report."""
    r = ns.run([str(exe), str(schedule), str(PORT), str(speed)], capture_output=True, text=True,
               timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"timed_sender failed ({r.returncode}): {r.stderr.strip()}")
    d = json.loads(r.stdout)
    return {"schedule": {"start_unix_ns": d["start_unix_ns"]}, "answered": d["answered"],
            "held_by_response": d["held"], "lateness_ms": d["lateness_ms"],
            "lateness_not_held_ms": d["lateness_not_held_ms"],
            "cpu_s": d["cpu_user_s"] + d["cpu_sys_s"]}


def pin(server):
    """nginx (its master and workers) on the last CPU; this process, and so everything it
    starts from now on, on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("--pin: one CPU only, nothing pinned")
        return
    os.sched_setaffinity(server.proc.pid, {cpus[-1]})     # first: a worker forked later inherits
    kids = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                          text=True).stdout.split()
    for pid in map(int, kids):
        os.sched_setaffinity(pid, {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    print(f"pinned: nginx on CPU {cpus[-1]}, the senders and tcpdump on "
          f"{', '.join(map(str, cpus[:-1]))}")


def wrk_run(ns, seconds, conns):
    r = ns.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", f"http://127.0.0.1:{PORT}/f/small.txt"],
               capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    return float(m.group(1)) if m else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rps", type=float, default=500.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="length of each --speed max run")
    ap.add_argument("--play-args", default="", help="more options for the timed runs of play, "
                    "e.g. '--spin-us 0' (the variants are run after the plain ones)")
    ap.add_argument("--watchdog", type=float, default=300.0, help="hard limit for the whole script, s")
    ap.add_argument("--streamed", action="store_true",
                    help="replay the capture converted to a .rlog (a plan streamed by a reading "
                         "process as the replay goes) instead of the pcap (planned whole)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the timing baseline (timed_sender.c, compiled with cc)")
    ap.add_argument("--speeds", default="1,10", help="the timed runs' speeds (default 1,10)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="the timed runs, replay and baseline in turn, this many times")
    ap.add_argument("--no-max", action="store_true", help="no --speed max runs")
    ap.add_argument("--pin", action="store_true",
                    help="nginx on the last CPU, the senders and tcpdump on the others (the "
                         "target as on a machine of its own)")
    args = ap.parse_args()

    ok, why = netns_available()
    if not ok:
        raise SystemExit(f"cannot create network namespaces: {why}")
    for prog in ("nginx", "tcpdump"):
        if not shutil.which(prog):
            raise SystemExit(f"{prog} not installed")
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(SystemExit("watchdog: too long")))
    signal.alarm(int(args.watchdog))

    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on {os.cpu_count()} cpus "
          "(other work on this machine makes the figures noisy)")
    with tempfile.TemporaryDirectory(prefix="bench-play-") as work, Netns("bplay") as ns:
        os.chmod(work, 0o755)
        cap = Path(work) / "capture.pcap"
        t = time.perf_counter()
        offsets = synth_capture(cap, args.requests, args.rps, args.conns)
        span = max(offsets.values()) / 1e9
        print(f"capture: {args.requests} requests on {args.conns} connections over {span:.2f} s "
              f"({args.requests / span:.0f} requests/s), made in {time.perf_counter() - t:.2f} s")
        if args.streamed:
            log = Path(work) / "capture.rlog"
            subprocess.run([sys.executable, "-m", "replay.cli.main", "convert", str(cap), "-o",
                            str(log), "-q"], check=True, cwd=str(ROOT), timeout=300)
            cap = log
            print("replaying its .rlog: the plan streamed by a reading process")
        www = Path(work) / "www"
        (www / "f").mkdir(parents=True)
        (www / "f" / "small.txt").write_bytes(BODY)
        server = start_nginx(ns, www, port=PORT, workdir=Path(work) / "nginx", workers=1)
        try:
            if args.pin:
                pin(server)
            replay(ns, cap, work, "--speed", "max", "--limit", "200")      # warm-up
            variants = [(), ("--realtime",)]
            if args.play_args:
                variants.append(tuple(args.play_args.split()))
            exe = build_baseline(work) if not args.no_baseline else None
            schedule = Path(work) / "schedule.txt"
            write_schedule(schedule, offsets)
            speeds = [int(x) for x in args.speeds.split(",") if x.strip()]
            p99s = {}          # (title, speed) -> |lateness| p99 at the target of each round
            for rnd in range(args.rounds):
                if args.rounds > 1:
                    print(f"-- round {rnd + 1} of {args.rounds}")
                for extra in variants:
                    for speed in speeds:
                        late, _ = timed_run(ns, cap, work, offsets, speed, *extra)
                        p99s.setdefault((" ".join(("replay",) + extra), speed), []).append(
                            pct([abs(x) for x in late], 99))
                        if exe is not None and not extra:
                            late, _ = measured(ns, work, offsets, speed,
                                               f"baseline (timed_sender.c) speed {speed:>4}",
                                               lambda: baseline(ns, exe, schedule, speed))
                            p99s.setdefault(("baseline", speed), []).append(
                                pct([abs(x) for x in late], 99))
            if exe is None:
                print("no timing baseline (no C compiler, or --no-baseline)")
            if args.rounds > 1:
                print(f"|lateness| p99 at the target, ms, in each of {args.rounds} rounds:")
                for (title, speed), vals in p99s.items():
                    within = sum(v <= 1e6 for v in vals)
                    print(f"  {title:30} speed {speed:>3}: "
                          + " ".join(f"{v / 1e6:6.3f}" for v in vals)
                          + f"   ({within} of {len(vals)} at 1 ms or less)")
            if args.no_max:
                return
            print(f"speed max, {args.conns} connections, {args.max_seconds:g} s each:")
            rates = {}
            for ev in ("asyncio", "uvloop"):
                rep = replay(ns, cap, work, "--speed", "max", "--loop", "--duration", args.max_seconds,
                             "--connections", args.conns, "--event-loop", ev,
                             timeout=args.max_seconds + 60)
                rates[ev] = rep["requests_per_s"] or 0.0
                print(f"  replay ({ev:7}): {rates[ev]:9.0f} requests/s  ({rep['answered']} answered, "
                      f"{rep['error_total']} errors, latency p50 {rep['latency_ms']['p50']:.3f} ms "
                      f"p99 {rep['latency_ms']['p99']:.3f} ms)")
            if shutil.which("wrk"):
                w = wrk_run(ns, int(args.max_seconds), args.conns)
                if w:
                    best = max(rates.values())
                    print(f"  wrk -t2 -c{args.conns}:    {w:9.0f} requests/s")
                    print(f"  replay / wrk: {best / w:.2f} (best loop); target >= 0.50")
            else:
                print("  wrk not installed: no baseline")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
