#!/usr/bin/env python3
"""``replay play`` on a production-sized log: startup, memory, whole-command throughput, timing.

What is measured
----------------
1. **Startup and memory** (loopback, no root needed). For a baseline log of 10 000 requests and
   for the production-sized log (``--requests``, default 1 000 000), each made the same way, three
   runs of ``replay play LOG --target http://127.0.0.1:P`` against ``replay sink --record
   arrivals.jsonl`` (started separately, so the arrival time of every request can be read):

   * ``--speed 1 --limit 2000`` and ``--speed max --limit 2000``: seconds from launching the
     command to the FIRST request arriving at the sink (startup), and to the 2000th, the whole
     command's wall time, and the peak RSS of the play process;
   * ``--speed 1 --duration 20`` (``--quick``: 5): peak RSS (the target: <= 200 MiB), RSS
     sampled from ``/proc/PID/status`` every 50 ms, so that the figure once sending started and at
     the end show whether memory grows while replaying.

   Arrival times are the sink's ``ts`` (wall clock at the first byte, the same clock as the launch
   time taken here just before ``fork``); peak RSS is ``ru_maxrss`` from ``wait4`` on the play
   process (``python -m replay.cli.main``, no wrapper in between).
2. **--speed max, whole command, against wrk** (root: a network namespace made with ``netns.py``,
   nginx with one worker answering ``/api/`` with 200 and a small JSON body from memory):
   ``replay play LOG --speed max --connections 32 --limit N`` (N = requests / 5, at least 20 000),
   its wall time from launch to exit, startup included -> requests/s; ``wrk -t2 -c32 -d10s`` on the
   same nginx, same 32 keep-alive connections, just before -> requests/s; the ratio (target
   >= 0.5). Two logs of the large size: ``keep-alive`` (every request on the 32 keep-alive
   connections: like for like with wrk, the one the target is about) and ``mixed`` (the log of
   part 1, whose short connections are opened as recorded, one per 2 requests or so). The
   replay's own rate (from its report: first send to last answer, startup excluded) is printed
   beside each, so the share of the startup shows. wrk and the keep-alive log's replays (one
   process, then ``--workers N`` for each N of ``--workers``, default ``1,2``) take turns
   ``--rounds`` times (default 3; the machine's speed drifts within minutes), each way of
   running judged on the median of its ratios; the mixed log is replayed once, against the
   median wrk.
3. **Timing unchanged**, cheaply: the lateness of the ``--speed 1 --duration`` runs at the sink
   (arrival - deadline, the deadline being the schedule's start from the report plus the
   request's recorded offset), for both logs, and the tool's own lateness from its report. The
   sink shares the machine and its asyncio loop adds its own delay, so this only shows that a
   large log does not make requests late; ``bench_play.py`` measures lateness precisely (tcpdump
   in a namespace).

The log
-------
Written directly with ``replay.log.LogWriter`` (no pcap, no convert) and cached in ``--workdir``
(default /tmp/replay-bench-scale) under a name that holds its size and generator version, so a
rerun starts at once. An API's traffic: ``RATE`` (2000) requests/s recorded, so 1 M requests
span 500 s; 32 keep-alive connections carry 80 % of them (Poisson arrivals, at most one request
outstanding per connection), short connections of 1-3 requests from a pool of clients carry the
rest (about 100 000 connections in 1 M requests). 90 % are ``GET /api/items/N?rid=K&...``, 10 %
``POST /api/orders?rid=K`` with a ~100-byte JSON body; each is answered 200 with a small JSON body
~0.2 ms later. Every URI is unique (``rid``), so arrivals are matched to the schedule.

Usage::

    sudo python3 benchmarks/bench_play_scale.py --quick         # 100 000 requests, ~2 min
    sudo python3 benchmarks/bench_play_scale.py                 # 1 M requests, all parts
    sudo python3 benchmarks/bench_play_scale.py --requests 2000000 --json scale.json
    python3 benchmarks/bench_play_scale.py --loopback-only      # parts 1 and 3, no root needed
    sudo python3 benchmarks/bench_play_scale.py --replay-root ../other-checkout   # another tree

Rules: the ``replay`` that is imported (``pip install -e .``, or ``--replay-root``, which goes
first on the children's ``PYTHONPATH``) is the one measured; the script prints where it lives and
its git commit, and says when that tree has uncommitted changes under ``replay/``. Root,
iproute2, nginx and wrk are needed for part 2; without root the script stops with a one-line
message unless ``--loopback-only`` is given. Every subprocess has a timeout (a replay that
outlives it gets SIGINT, so it still reports, then SIGKILL), a watchdog bounds the whole script,
and the sinks, the namespace and its processes are stopped at exit, also on Ctrl-C and SIGTERM;
the cached logs stay. The machine's load is printed: other work on it makes the figures noisy.
Exit status 0 when the runs completed (targets are printed, not turned into a status), 1 on a
failure to run, 2 when a requirement is missing.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse
import heapq
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from figures import plain_json  # noqa: E402
from netns import Netns, NetnsError, netns_available, start_nginx  # noqa: E402

GEN_VERSION = 1          # bump when the generated log changes: the cache name holds it
RATE = 2000.0            # recorded requests/s (the issue: 1 M requests over 500 s)
LONG_CONNS = 32
LONG_SHARE = 0.8         # of the requests, on the long connections
SHORT_MAX = 3            # requests on a short connection: 1..SHORT_MAX
POST_SHARE = 0.1
RTT_NS = 200_000         # request -> response
MIN_GAP_NS = 500_000     # a keep-alive connection's next request at least this long after the last one
CLIENTS = 5000           # addresses the short connections come from
T0 = 1_700_000_000_000_000_000
SERVER = ("10.0.0.2", 8080)
BASELINE = 10_000        # requests in the baseline log
LIMIT = 2000             # --limit of the startup runs
TARGET_RSS_MIB = 200
TARGET_RATIO = 0.5
WRK_CONNS = 32
NGINX_PORT = 8080
RSS_POLL = 0.05          # s between /proc/PID/status samples
STOP_GRACE = 20          # s a timed-out play gets to stop on SIGINT before SIGKILL

API_BODY = ('{"ok":true,"items":[{"id":1017,"sku":"a3f9c2","price":12.5},'
            '{"id":2291,"sku":"77b0e1","price":3.99}],"next":null}')
NGINX_API = """
        location /api/ {
            default_type application/json;
            access_log off;
            return 200 '%s';
        }
""" % API_BODY
UAS = ("shop-ios/5.12.1 (iPhone; iOS 17.4)", "shop-android/5.12.0 (Pixel 7; Android 14)",
       "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
       "python-requests/2.31.0")


class Failure(Exception):
    """A run could not be made (a program did not start, a timeout, a failed command)."""


# -- the log -----------------------------------------------------------------------------------

def synth_log(path: Path, requests: int, long_share: float = LONG_SHARE, seed: int = 1) -> dict:
    """Write an API-style .rlog of ``requests`` exchanges, messages in time order; its figures.

    ``long_share`` of the requests go on the ``LONG_CONNS`` keep-alive connections, the rest on
    short connections (none when it is 1)."""
    from replay.events import KIND_REQUEST, KIND_RESPONSE, Message
    from replay.log import LogWriter

    rnd = random.Random(seed)
    expo, randint, rand = rnd.expovariate, rnd.randint, rnd.random
    long_rate = long_share * RATE / LONG_CONNS
    short_rate = (1 - long_share) * RATE / ((1 + SHORT_MAX) / 2)   # connections/s
    resp_head = {}
    heap = []                # (ts, seq, what, state): what 0 request due, 1 message ready, 2 new short conn
    seq = 0
    next_conn = 0
    clients = [f"10.{16 + i // 250}.{i // 250 % 250}.{1 + i % 250}" for i in range(CLIENTS)]
    port = 32768
    for c in range(LONG_CONNS):
        # conn: [id, client, next index, requests left (-1 unlimited), token, user agent]
        st = [next_conn, (clients[c], 40000 + c), 0, -1, f"{rnd.getrandbits(128):032x}",
              UAS[c % len(UAS)]]
        next_conn += 1
        heap.append((T0 + int(expo(long_rate) * 1e9), seq, 0, st))
        seq += 1
    if short_rate > 0:
        heap.append((T0 + int(expo(short_rate) * 1e9), seq, 2, None))
        seq += 1
    heapq.heapify(heap)
    emitted = conns_short = 0
    first = last = None
    t_gen = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with LogWriter(tmp, meta={"source": f"bench_play_scale.py synthetic v{GEN_VERSION}",
                              "requests": requests}) as w:
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            t, _, what, st = pop(heap)
            if what == 1:
                w.write(st)
                continue
            if emitted >= requests:
                continue
            if what == 2:
                port = port + 1 if port < 60999 else 32768
                st = [next_conn, (clients[randint(0, CLIENTS - 1)], port), 0, randint(1, SHORT_MAX),
                      f"{rnd.getrandbits(128):032x}", UAS[randint(0, len(UAS) - 1)]]
                next_conn += 1
                conns_short += 1
                push(heap, (t + 1_000_000, seq, 0, st))      # after its handshake
                push(heap, (t + int(expo(short_rate) * 1e9), seq + 1, 2, None))
                seq += 2
                continue
            conn, client, index = st[0], st[1], st[2]
            if rand() < POST_SHARE:
                body = (f'{{"item":{randint(1, 99999)},"qty":{randint(1, 5)},'
                        f'"note":"{rnd.getrandbits(64):016x}","currency":"EUR"}}')
                uri = f"/api/orders?rid={emitted}"
                head = (f"POST {uri} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: {st[5]}\r\n"
                        f"Accept: application/json\r\nAuthorization: Bearer {st[4]}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
                method = "POST"
            else:
                body = ""
                uri = (f"/api/items/{randint(1, 99999)}?rid={emitted}&fields=id,sku,price"
                       f"&page={randint(1, 20)}")
                head = (f"GET {uri} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: {st[5]}\r\n"
                        f"Accept: application/json\r\nAuthorization: Bearer {st[4]}\r\n\r\n")
                method = "GET"
            data = (head + body).encode()
            w.write(Message(KIND_REQUEST, conn, index, t, t, client, SERVER, 0, data, method, uri,
                            0, len(body), len(head)))
            rbody = API_BODY.replace("1017", str(1000 + emitted % 9000), 1)
            rh = resp_head.get(len(rbody))
            if rh is None:
                rh = resp_head[len(rbody)] = (
                    "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
                    "Content-Type: application/json\r\nCache-Control: no-store\r\n"
                    f"Content-Length: {len(rbody)}\r\nConnection: keep-alive\r\n\r\n")
            tr = t + RTT_NS
            push(heap, (tr, seq, 1, Message(KIND_RESPONSE, conn, index, tr, tr, client, SERVER, 0,
                                            (rh + rbody).encode(), method, uri, 200, len(rbody),
                                            len(rh))))
            seq += 1
            emitted += 1
            first = t if first is None else first
            last = t
            st[2] = index + 1
            if st[3] < 0:
                push(heap, (t + max(MIN_GAP_NS, int(expo(long_rate) * 1e9)), seq, 0, st))
                seq += 1
            elif st[3] > 1:
                st[3] -= 1
                push(heap, (tr + randint(2_000_000, 40_000_000), seq, 0, st))
                seq += 1
    os.replace(tmp, path)
    return {"requests": emitted, "connections": next_conn, "long_connections": LONG_CONNS,
            "short_connections": conns_short, "span_s": round((last - first) / 1e9, 3),
            "bytes": path.stat().st_size, "made_in_s": round(time.perf_counter() - t_gen, 1)}


def ensure_log(workdir: Path, requests: int, keepalive: bool = False) -> tuple[Path, dict]:
    """The cached log of ``requests`` exchanges (``keepalive``: all on the long connections),
    made first when missing."""
    from replay.log.format import VERSION_MAJOR, VERSION_MINOR

    kind = "api-keepalive" if keepalive else "api"
    # the log format's version in the name too: a log written by an older replay is made again
    path = workdir / (f"{kind}-{requests}-r{RATE:.0f}-v{GEN_VERSION}"
                      f"-rlog{VERSION_MAJOR}.{VERSION_MINOR}.rlog")
    info = path.with_suffix(".json")
    if path.exists() and info.exists():
        stats = json.loads(info.read_text())
        stats["cached"] = True
        return path, stats
    print(f"  making {path.name} ...", flush=True)
    stats = synth_log(path, requests, 1.0 if keepalive else LONG_SHARE)
    info.write_text(json.dumps(stats) + "\n")
    stats["cached"] = False
    return path, stats


def recorded_offsets(log: Path, until_s: float) -> dict:
    """{uri: recorded ts_first, ns} of the requests in the first ``until_s`` seconds."""
    from replay.events import KIND_REQUEST
    from replay.log import LogReader

    out = {}
    with LogReader(str(log)) as r:
        t_end = None
        for m in r:
            if t_end is None:
                t_end = m.ts_first + int(until_s * 1e9)
            if m.ts_first > t_end:
                break
            if m.kind == KIND_REQUEST:
                out[m.uri] = m.ts_first
    return out


# -- processes ---------------------------------------------------------------------------------

def replay_argv(*args) -> list[str]:
    return [sys.executable, "-m", "replay.cli.main", *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def run_measured(argv, timeout: float, cwd: Path, ns: Netns | None = None) -> dict:
    """Run ``argv`` to its end (killed after ``timeout``); wall time, RSS samples, peak RSS.

    The child is reaped with ``wait4`` (not ``Popen.wait``) to get its own ``ru_maxrss``.
    """
    log = cwd / f"cmd-{time.monotonic_ns()}.txt"
    with open(log, "wb") as out:
        launch = time.time_ns()
        t0 = time.perf_counter()
        proc = (ns.popen if ns else subprocess.Popen)(argv, stdout=out, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL, cwd=str(cwd),
                                                       start_new_session=True)
    samples = []           # (s since launch, RSS KiB)
    stopping = False
    try:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter() - t0
            if now > timeout and not stopping:
                os.kill(proc.pid, signal.SIGINT)        # play stops as on Ctrl-C and reports
                stopping = True
            elif now > timeout + STOP_GRACE:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            rss = _rss_kib(proc.pid)
            if rss:
                samples.append((now, rss))
            time.sleep(RSS_POLL)
    except BaseException:
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            proc.returncode = -9
        raise
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text(errors="replace").strip()
    log.unlink()
    if stopping:
        raise Failure(f"{' '.join(map(str, argv[-12:]))}: still running after {timeout:.0f} s, "
                      f"stopped (exit {proc.returncode}); its last words: {output[-600:]!r}")
    return {"launch_unix_ns": launch, "wall_s": wall, "returncode": proc.returncode,
            "maxrss_mib": ru.ru_maxrss / 1024, "samples": samples, "output": output}


class Sink:
    """``replay sink --record`` on a loopback port of its own, started before the replay."""

    def __init__(self, work: Path, name: str):
        self.port = free_port()
        self.record = work / f"arrivals-{name}.jsonl"
        self.proc = subprocess.Popen(replay_argv("sink", "--port", self.port, "--record", self.record),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, cwd=str(work), start_new_session=True)
        deadline = time.monotonic() + 20
        line = ""
        while "listening" not in line:
            line = self.proc.stderr.readline()
            if (not line and self.proc.poll() is not None) or time.monotonic() > deadline:
                self.stop()
                raise Failure(f"replay sink did not start: {line.strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate(timeout=5)

    def arrivals(self) -> list[tuple[int, str]]:
        """(arrival, Unix ns; uri) of every request the sink got, in arrival order."""
        out = []
        if self.record.exists():
            with open(self.record) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue          # a torn last line
                    out.append((round(r["ts"] * 1e9), r["uri"]))
            self.record.unlink()
        out.sort()
        return out


# -- figures -----------------------------------------------------------------------------------

def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(p * len(s) / 100) - 1)]


def rss_at(samples, t: float) -> float | None:
    """RSS (MiB) of the sample nearest after ``t`` s since launch."""
    for s, kib in samples:
        if s >= t:
            return kib / 1024
    return samples[-1][1] / 1024 if samples else None


def play_run(log: Path, extra, work: Path, timeout: float, offsets: dict | None = None) -> dict:
    """One ``replay play`` run against a fresh sink: startup, arrivals, memory (and lateness)."""
    name = f"{time.monotonic_ns()}"
    sink = Sink(work, name)
    report = work / f"report-{name}.json"
    try:
        m = run_measured(replay_argv("play", log, "--target", f"http://127.0.0.1:{sink.port}",
                                     "--report", report, "-q", *extra), timeout, work)
    finally:
        sink.stop()
    arr = sink.arrivals()
    if m["returncode"] != 0 or not report.exists():
        raise Failure(f"replay play {' '.join(map(str, extra))}: exit {m['returncode']}: "
                      f"{m['output'][-300:]}")
    rep = json.loads(report.read_text())
    report.unlink()
    launch = m["launch_unix_ns"]
    first = (arr[0][0] - launch) / 1e9 if arr else None
    r = {"args": " ".join(map(str, extra)), "wall_s": round(m["wall_s"], 3),
         "arrived": len(arr), "answered": rep["answered"], "errors": rep["error_total"],
         "first_request_s": round(first, 3) if first is not None else None,
         f"request_{LIMIT}_s": round((arr[LIMIT - 1][0] - launch) / 1e9, 3) if len(arr) >= LIMIT else None,
         "peak_rss_mib": round(m["maxrss_mib"], 1),
         "rss_at_first_request_mib": rss_at(m["samples"], first) if first is not None else None,
         "rss_at_end_mib": m["samples"][-1][1] / 1024 if m["samples"] else None,
         "tool_lateness_ms": rep.get("lateness_ms"), "connect_ms": rep.get("connect_ms"),
         "held_by_response": rep.get("held_by_response")}
    if first is not None and len(arr) > 1:
        r["sending_s"] = round((arr[-1][0] - arr[0][0]) / 1e9, 3)
        r["arrivals_per_s"] = round((len(arr) - 1) / r["sending_s"], 1) if r["sending_s"] else None
    if offsets is not None and arr:
        sched = rep["schedule"]
        start, t0, speed = sched["start_unix_ns"], sched["t0_ns"], float(sched.get("speed") or 1)
        late = [(ts - (start + (offsets[u] - t0) / speed)) / 1e6 for ts, u in arr if u in offsets]
        r["sink_lateness_ms"] = {"matched": len(late), "p50": round(pct(late, 50), 3),
                                 "p99": round(pct(late, 99), 3), "max": round(max(late), 3)}
    return r


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_run(label: str, r: dict) -> None:
    print(f"    {label:<26} first request {fmt(r['first_request_s'], '7.2f')} s, "
          f"{LIMIT}th {fmt(r[f'request_{LIMIT}_s'], '7.2f')} s, wall {r['wall_s']:7.2f} s, "
          f"peak RSS {r['peak_rss_mib']:7.1f} MiB ({r['arrived']} arrived, {r['errors']} errors)")


# -- the parts ---------------------------------------------------------------------------------

def part_startup(name: str, log: Path, args, work: Path) -> dict:
    """Part 1 (and 3) for one log."""
    t_run = 300 if args.quick else 900
    print(f"  {name}: {log.name}", flush=True)
    out = {}
    out["speed1_limit"] = r = play_run(log, ["--speed", "1", "--limit", LIMIT], work, t_run)
    print_run(f"--speed 1 --limit {LIMIT}", r)
    out["max_limit"] = r = play_run(log, ["--speed", "max", "--limit", LIMIT], work, t_run)
    print_run(f"--speed max --limit {LIMIT}", r)
    offsets = recorded_offsets(log, args.duration + 2)
    out["speed1_duration"] = r = play_run(log, ["--speed", "1", "--duration", f"{args.duration:g}s"],
                                          work, t_run + args.duration, offsets)
    print_run(f"--speed 1 --duration {args.duration:g}", r)
    late, tool = r.get("sink_lateness_ms") or {}, r["tool_lateness_ms"] or {}
    print(f"{'':31}RSS when sending began {fmt(r['rss_at_first_request_mib'], '.1f')} MiB, "
          f"at the end {fmt(r['rss_at_end_mib'], '.1f')} MiB; {r['arrived']} requests in "
          f"{fmt(r.get('sending_s'), '.1f')} s")
    print(f"{'':31}lateness at the sink ms p50 {fmt(late.get('p50'), '.3f')} p99 "
          f"{fmt(late.get('p99'), '.3f')} max {fmt(late.get('max'), '.3f')}; tool's own p50 "
          f"{fmt(tool.get('p50'), '.3f')} p99 {fmt(tool.get('p99'), '.3f')} max "
          f"{fmt(tool.get('max'), '.3f')}; connect p99 {fmt((r['connect_ms'] or {}).get('p99'), '.3f')}",
          flush=True)
    return out


def wrk_run(ns: Netns, seconds: int, conns: int) -> float | None:
    r = ns.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
                f"http://127.0.0.1:{NGINX_PORT}/api/items/1017?rid=0&fields=id,sku,price&page=1"],
               capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    if not m:
        raise Failure(f"wrk: no rate in its output: {(r.stderr or r.stdout).strip()[-200:]}")
    return float(m.group(1))


def max_run(ns: Netns, log: Path, n: int, work: Path, workers: int = 1) -> dict:
    """One ``replay play --speed max`` against nginx, timed from launch to exit."""
    report = work / f"report-max-{time.monotonic_ns()}.json"
    more = ["--workers", workers] if workers > 1 else []
    m = run_measured(replay_argv("play", log, "--target", f"http://127.0.0.1:{NGINX_PORT}",
                                 "--speed", "max", "--connections", WRK_CONNS, "--limit", n,
                                 "--report", report, "-q", *more),
                     300 + n / 500, work, ns=ns)
    if m["returncode"] != 0 or not report.exists():
        raise Failure(f"replay play --speed max: exit {m['returncode']}: {m['output'][-300:]}")
    rep = json.loads(report.read_text())
    return {"log": log.name, "limit": n, "answered": rep["answered"], "errors": rep["error_total"],
            "wall_s": round(m["wall_s"], 3),
            "whole_command_rps": round(rep["answered"] / m["wall_s"], 1),
            "replay_own_rps": rep["requests_per_s"], "peak_rss_mib": round(m["maxrss_mib"], 1),
            "connections_opened": rep["connections"]["opened"]}


def print_max_run(what: str, r: dict, against: str, more: str = "") -> None:
    own = r["replay_own_rps"] or 0
    print(f"  replay, {what}: {r['whole_command_rps']:.0f} requests/s whole command "
          f"({r['answered']} answered, {r['errors']} errors in {r['wall_s']:.2f} s, "
          f"{r['connections_opened']} connections opened; {own:.0f}/s once sending; "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB)")
    print(f"    / {against}: {r['ratio']:.3f} whole command, {own / r['wrk_rps']:.3f} once "
          f"sending{more}")


def part_throughput(logs: dict, args, work: Path) -> dict:
    """Part 2: the whole ``--speed max`` command against wrk, same nginx, same connections. wrk
    and the keep-alive log's replays (one process, then each ``--workers`` count) take turns,
    ``--rounds`` times: this machine's speed drifts by tens of % within minutes, so each ratio
    is of runs next to each other, and each way of running is judged on the median (the lower
    middle one) of its ratios. The mixed log is replayed once, against the median wrk."""
    n = max(20_000, args.requests // 5)
    secs = 3 if args.quick else 10
    www = work / "www"
    www.mkdir(exist_ok=True)
    ways = {"keep-alive": 1, **{f"keep-alive --workers {w}": w for w in args.workers if w > 1}}
    rounds: dict = {name: [] for name in ways}
    wrks = []
    with Netns("bscale") as ns:
        server = start_nginx(ns, www, port=NGINX_PORT, workdir=work / "nginx", workers=1,
                             extra_server=NGINX_API)
        try:
            print(f"  namespace {ns.name}, nginx (1 worker) :{NGINX_PORT} answering /api/ with "
                  f"{len(API_BODY)} bytes of JSON; replay play --speed max --connections "
                  f"{WRK_CONNS} --limit {n}", flush=True)
            wrk_run(ns, 1, WRK_CONNS)                                   # warm-up
            for k in range(args.rounds):
                w = wrk_run(ns, secs, WRK_CONNS)
                wrks.append(w)
                line = [f"  round {k + 1}: wrk -t2 -c{WRK_CONNS} -d{secs}s {w:.0f}/s"]
                for name, workers in ways.items():
                    r = max_run(ns, logs["keep-alive"], n, work, workers)
                    r["wrk_rps"], r["ratio"] = w, round(r["whole_command_rps"] / w, 3)
                    rounds[name].append(r)
                    line.append(f"{name} {r['whole_command_rps']:.0f}/s ({r['ratio']:.3f})")
                print("; ".join(line), flush=True)
            mixed = max_run(ns, logs["mixed"], n, work) if "mixed" in logs else None
        finally:
            server.stop()
    wrk = statistics.median_low(wrks)
    runs = {}
    for name in ways:
        mid = runs[name] = sorted(rounds[name], key=lambda r: r["ratio"])[(args.rounds - 1) // 2]
        each = ", ".join(format(r["ratio"], ".3f") for r in rounds[name])
        print_max_run(f"{name} log, the median of {args.rounds} rounds", mid,
                      f"wrk of its round ({mid['wrk_rps']:.0f}/s)", f" (rounds: {each})")
    if mixed is not None:
        mixed["wrk_rps"], mixed["ratio"] = wrk, round(mixed["whole_command_rps"] / wrk, 3)
        runs["mixed"] = mixed
        print_max_run("mixed log", mixed, f"the median wrk ({wrk:.0f}/s)")
    best = max(runs[name]["ratio"] for name in ways)
    print(f"  target (keep-alive log, whole command / wrk >= {TARGET_RATIO}, the median round, "
          f"best of the worker counts): "
          f"{'MET' if best >= TARGET_RATIO else 'NOT MET'} ({best:.3f})", flush=True)
    # each run carries the wrk rate it is divided by (its round's; the mixed log's: the median)
    return {"limit": n, "connections": WRK_CONNS, "wrk_rps": wrk, "wrk_seconds": secs,
            "rounds": rounds, "runs": runs}


# -- main --------------------------------------------------------------------------------------

def replay_origin() -> dict:
    from replay import core

    root = Path(core.__file__).resolve().parent.parent
    info = {"path": str(root), "core": core.IMPLEMENTATION, "commit": None, "dirty": None}
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            info["commit"] = r.stdout.strip()
            d = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "replay"],
                               capture_output=True, text=True, timeout=10)
            info["dirty"] = bool(d.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests in the large log")
    ap.add_argument("--quick", action="store_true",
                    help="100 000 requests, a 5 s timed run, 3 s wrk runs")
    ap.add_argument("--duration", type=float, default=20.0, help="length of the timed run, s")
    ap.add_argument("--workdir", default="/tmp/replay-bench-scale",
                    help="where the generated logs are cached")
    ap.add_argument("--loopback-only", action="store_true",
                    help="part 1 (and 3) only, without root: no namespace, no nginx, no wrk")
    ap.add_argument("--replay-root", metavar="DIR",
                    help="measure the replay package in DIR (a checkout) instead of the installed one")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    ap.add_argument("--workers", default="1,2", type=lambda v: [int(x) for x in v.split(",")],
                    help="part 2: the keep-alive log is also replayed with play --workers N for "
                         "each N of this list (1: the plain command)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="part 2: wrk and the keep-alive log's replays take turns this many times")
    ap.add_argument("--watchdog", type=float, default=0.0,
                    help="hard limit for the whole script, s (0: from the sizes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.duration = 100_000, 5.0
    if args.requests < BASELINE or args.duration < 1 or args.rounds < 1:
        ap.error(f"--requests must be >= {BASELINE}, --duration >= 1 and --rounds >= 1")

    me = "bench_play_scale.py"
    if not args.loopback_only:
        if os.geteuid() != 0:
            print(f"{me}: part 2 needs root (network namespace): sudo python3 benchmarks/{me}, "
                  "or --loopback-only for parts 1 and 3", file=sys.stderr)
            return 2
        missing = [t for t in ("nginx", "wrk") if not shutil.which(t)]
        if missing:
            print(f"{me}: missing programs: {', '.join(missing)} (or --loopback-only)", file=sys.stderr)
            return 2
        ok, why = netns_available()
        if not ok:
            print(f"{me}: cannot use network namespaces: {why}", file=sys.stderr)
            return 2
    if args.replay_root:
        root = str(Path(args.replay_root).resolve())
        if not (Path(root) / "replay" / "__init__.py").exists():
            ap.error(f"--replay-root {args.replay_root}: no replay package there")
        sys.path.insert(0, root)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        origin = replay_origin()
    except ImportError as e:
        print(f"{me}: the replay package is not importable ({e}): pip install -e .", file=sys.stderr)
        return 2

    limit = args.watchdog or ((900 if args.quick else 600 + args.requests / 400 + 2 * args.duration)
                              + 60 * args.rounds * len(args.workers))

    def on_alarm(*_):
        raise Failure(f"watchdog: the script ran longer than {limit:.0f} s")

    def on_term(signum, _frame):
        print(f"{me}: terminated", file=sys.stderr)
        sys.exit(128 + signum)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.alarm(int(limit))

    load = os.getloadavg()
    print(f"replay {origin['commit'] or '?'}{' (+ uncommitted changes)' if origin['dirty'] else ''} "
          f"from {origin['path']}, {origin['core']} core; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} (other work on this machine makes the figures noisy)")
    out = {"replay": origin, "machine": {"cpus": os.cpu_count(), "load_average": load[:2]},
           "settings": {"requests": args.requests, "baseline": BASELINE, "rate": RATE,
                        "limit": LIMIT, "duration": args.duration, "quick": args.quick}}
    cache = Path(args.workdir)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-play-scale-"))
    os.chmod(work, 0o755)
    status = 0
    try:
        print("\n== logs")
        logs = {}
        wanted = [("baseline", BASELINE, False), ("large", args.requests, False)]
        if not args.loopback_only:
            wanted.append(("keep-alive", args.requests, True))
        for name, n, keepalive in wanted:
            path, stats = ensure_log(cache, n, keepalive)
            logs[name] = path
            out.setdefault("logs", {})[name] = dict(stats, path=str(path))
            print(f"  {name:10} {stats['requests']:>9} requests on {stats['connections']} connections "
                  f"({stats['long_connections']} keep-alive), {stats['span_s']:.0f} s recorded, "
                  f"{stats['bytes'] / 2**20:.1f} MiB"
                  + (" (cached)" if stats["cached"] else f", made in {stats['made_in_s']} s"),
                  flush=True)

        print("\n== 1. startup and memory (replay sink on loopback; launch -> arrival at the sink)")
        out["startup"] = {name: part_startup(name, logs[name], args, work)
                          for name in ("baseline", "large")}
        b, l = out["startup"]["baseline"], out["startup"]["large"]
        print(f"  {args.requests} vs {BASELINE} requests: startup x{_ratio(l, b, 'max_limit', 'first_request_s')} "
              f"(speed max), peak RSS x{_ratio(l, b, 'speed1_duration', 'peak_rss_mib')} (timed run)")
        rss = l["speed1_duration"]["peak_rss_mib"]
        print(f"  peak RSS of the timed run on the large log: {rss:.0f} MiB (target <= "
              f"{TARGET_RSS_MIB}: {'MET' if rss <= TARGET_RSS_MIB else 'NOT MET'})")
        print("  3. timing: lateness above, at the sink (bench_play.py measures it with tcpdump)")

        if not args.loopback_only:
            print("\n== 2. --speed max, the whole command against wrk")
            out["throughput"] = part_throughput({"keep-alive": logs["keep-alive"],
                                                 "mixed": logs["large"]}, args, work)
    except (Failure, NetnsError) as e:
        print(f"{me}: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"{me}: interrupted", file=sys.stderr)
        status = 130
    finally:
        signal.alarm(0)
        shutil.rmtree(work, ignore_errors=True)
    if args.json and "startup" in out:
        Path(args.json).write_text(json.dumps(plain_json(out), indent=2) + "\n")
        print(f"figures written to {args.json}")
    return status


def _ratio(large: dict, base: dict, run: str, key: str) -> str:
    a, b = large[run][key], base[run][key]
    return f"{a / b:.1f}" if a is not None and b else "-"


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(main())
