#!/usr/bin/env python3
"""How soon ``replay shadow`` copies a production request to staging, and up to what rate.

What is measured
----------------
The delay of a copy: from the capture time of the packet that completes a production request
(its last packet, ``ts_last``) to the capture time of the first packet of its copy on the staging
port (``ts_first``), both seen by one tcpdump on the same interface, so both times come from the
same kernel clock. Also: how many of the requests production received reached staging.

How
---
1. A throwaway network namespace (``netns.py``) with two nginx instances on its loopback, one
   worker each: production on ``--port`` (8080) and staging on ``--staging-port`` (8081); both
   answer ``/api/`` with 200 and a small JSON body (``return``: no disk, no upstream), and log
   every request.
2. ``tcpdump -i lo --time-stamp-precision=nano`` on both ports, then ``replay shadow -i lo
   --port PORT --target http://127.0.0.1:STAGING`` (the installed ``replay``; its defaults, so
   ``--nice -10``), started and ready before any traffic.
3. ``wrk -t2`` with a Lua script (written here) sends API-style requests at a steady rate on
   keep-alive connections (one per 100 req/s, at least 8): 80 % GETs with a query string, 20 %
   POSTs of a ~150-byte JSON body. Every request carries a unique id (``rid=THREAD-N`` in the
   URI and ``X-Request-Id``). Pacing aims at absolute deadlines (each wrk thread owns a schedule,
   ``start + k / rate``, read from CLOCK_MONOTONIC through LuaJIT's FFI); wrk's timers count
   whole milliseconds, so requests leave up to 1 ms late but the rate does not drift.
4. After the load, once staging's access log has stopped growing for 1 s (at most 15 s: a
   saturated shadow catches up with its capture first), ``replay shadow`` is stopped (SIGINT;
   its summary is kept), then tcpdump. The pcap is read with replay's own core
   (``replay.pipeline.open_input``): every request on each port, matched by (method, URI).

Figures, per run: the rate wrk asked for and the rate production got (requests in the pcap over
their time span; wrk's own count too), requests at production and at staging (and nginx's access
logs as a cross-check), missing and duplicated copies, the delay p50/p90/p99/p99.9/max, and as a
baseline from the same pcap the production server's own response time (request last packet ->
response first packet); the CPU ``replay shadow`` used (% of one core, from ``wait4``), its own
summary line, tcpdump's drops, and how busy the whole machine was during the load (/proc/stat:
other work on it shows there, and on a virtual machine the time the hypervisor stole).

Limits of the measurement: replay's pcap reader (libpcap) keeps microseconds, so delays are
read to 1 us; the kernel stamps a packet as each capture socket receives it, so a CPU held up
between shadow's socket and tcpdump's stamps the original late and its copy can even appear
first: such negative delays are counted and printed, never dropped (up to 0.4 % of the requests
in the runs made on a 2-CPU virtual machine with steal time; they pull the percentiles down a
little).

Two parts:

1. the delay distribution at ``--rate`` (1000 req/s) for ``--seconds`` (15 s); the target is
   p99 <= 5 ms with every request copied;
2. rate steps (``--steps``, 1000,2000,4000,8000 req/s, ``--step-seconds`` 5 s each): per step,
   received/sent at staging and the delay p99; stepping stops at the first step where staging
   gets less than 100 % (or where the client falls below 80 % of the asked rate: the machine,
   not shadow, is then the limit). The highest step with everything received is reported.

Usage::

    sudo python3 benchmarks/bench_shadow.py
    sudo python3 benchmarks/bench_shadow.py --quick                 # smoke check, ~30 s
    sudo python3 benchmarks/bench_shadow.py --rate 2000 --seconds 20 --steps 1000,4000 --json out.json

Rules: root, iproute2, nginx, tcpdump and wrk (built with LuaJIT, as Debian's) are needed; the
``replay`` package must be importable (``pip install -e .``: the script uses the installed
package and runs ``python -m replay.cli.main``). All traffic stays on the loopback of a namespace
made here; every load is bounded in time (wrk ``-d``, subprocess timeouts, a watchdog for the
whole script) and in rate; the namespace, its processes and the work directory are removed at
exit, also on Ctrl-C and SIGTERM. wrk, nginx, tcpdump and shadow share the machine's cores:
the machine's load is printed, and other work on it makes the figures noisy. Exit status 0 when
the runs completed (the verdict is printed, not turned into a status), 1 on a failure to run, 2
when a requirement is missing.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from figures import plain_json  # noqa: E402
from netns import Netns, NetnsError, netns_available, start_nginx  # noqa: E402

TARGET_P99_MS = 5.0      # the target, at 1000 req/s
CONNS_PER_100 = 1        # client connections per 100 req/s asked
MIN_CONNS = 8
POST_SHARE = 0.2
SETTLE_QUIET = 1.0       # s without a new request at staging before shadow is stopped...
SETTLE_LIMIT = 15.0      # ...but no longer than this after the load (shadow may lag behind)
TCPDUMP_FLUSH = 1.5      # s: tcpdump hands packets over in blocks that time out after 1 s
CLIENT_FLOOR = 0.8       # a step whose client got below this share of the asked rate ends the steps

API_BODY = ('{"ok":true,"items":[{"id":1017,"sku":"a3f9c2","price":12.5},'
            '{"id":2291,"sku":"77b0e1","price":3.99}],"next":null}')

NGINX_API = """
        location /api/ {
            default_type application/json;
            add_header Cache-Control "no-store" always;
            return 200 '%s';
        }
""" % API_BODY

WRK_LUA = r"""
-- API-style requests at a steady rate, each with a unique id (written by bench_shadow.py).
-- args: RATE_PER_THREAD POST_SHARE SEED
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk, bench_timespec *ts);
]]
local tsbuf = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, tsbuf)             -- CLOCK_MONOTONIC
  return tonumber(tsbuf.tv_sec) * 1000 + tonumber(tsbuf.tv_nsec) / 1e6
end

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end

local terms = { "running+shoes", "blue%20jacket", "usb-c+cable", "coffee", "tent%202p",
                "gift+card", "caf%C3%A9", "wireless+mouse", "socks", "desk+lamp" }
local sorts = { "price", "rating", "newest", "relevance" }
local agents = { "okhttp/4.12.0", "python-requests/2.31.0",
                 "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0" }

function init(args)
  interval = 1000 / tonumber(args[1])       -- ms between two requests of this thread
  post_share = tonumber(args[2])
  math.randomseed(tonumber(args[3]) * 1000 + tid)
  n = 0
  k = 0
  start = nil
end

-- called when a connection is free for its next request: it takes the thread's next slot
function delay()
  local t = now_ms()
  if start == nil then start = t + 5 end
  local due = start + k * interval
  k = k + 1
  if due <= t then return 0 end
  return math.ceil(due - t)
end

function request()
  n = n + 1
  local id = tid .. "-" .. n
  local headers = {
    ["User-Agent"] = agents[math.random(#agents)],
    ["Accept"] = "application/json",
    ["Authorization"] = "Bearer eyJhbGciOiJIUzI1NiJ9.c2hhZG93LWJlbmNo.x7Kq",
    ["X-Request-Id"] = id,
  }
  if math.random() < post_share then
    headers["Content-Type"] = "application/json"
    local body = string.format(
      '{"request_id":"%s","customer":%d,"lines":[{"sku":"%06x","qty":%d}],"total":%.2f,"currency":"EUR"}',
      id, math.random(1, 999999), math.random(0, 16777215), math.random(1, 9), math.random() * 500)
    return wrk.format("POST", "/api/v1/orders?rid=" .. id, headers, body)
  end
  return wrk.format("GET", string.format("/api/v1/items?rid=%s&q=%s&page=%d&sort=%s", id,
                    terms[math.random(#terms)], math.random(1, 20), sorts[math.random(#sorts)]),
                    headers)
end
"""


class Failure(Exception):
    """A run could not be made (a program did not start, a timeout)."""


def pct(values, p):
    """Nearest-rank percentile of ``values`` (sorted or not); nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(p * len(s) / 100) - 1)]


def cpu_times() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs, from /proc/stat. Steal: time the hypervisor
    ran something else while a virtual CPU wanted to run."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    v = v[:8]                                # guest times are already in user and nice
    idle, steal = v[3] + v[4], v[7]          # idle + iowait; steal
    return sum(v) - idle - steal, steal, sum(v)


def wait_quiet(path: Path) -> float:
    """Wait until staging's access log stops growing (a lagging shadow catches up first);
    return the seconds waited."""
    t0 = time.monotonic()
    n, since = _lines(path), t0
    while time.monotonic() - t0 < SETTLE_LIMIT:
        time.sleep(0.1)
        m = _lines(path)
        if m != n:
            n, since = m, time.monotonic()
        elif time.monotonic() - since >= SETTLE_QUIET:
            break
    return time.monotonic() - t0


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


# -- the processes ----------------------------------------------------------------------------

class Tcpdump:
    """tcpdump on the namespace's loopback, both ports, nanosecond stamps."""

    def __init__(self, ns: Netns, path: Path, ports):
        self.path = path
        expr = " or ".join(f"tcp port {p}" for p in ports)
        self.proc = ns.popen(["tcpdump", "-i", "lo", "-n", "-s", "0", "-B", "131072",
                              "--time-stamp-precision=nano", "-w", str(path), expr],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        line = ""
        while "listening" not in line:
            line = self.proc.stderr.readline()
            if (not line and self.proc.poll() is not None) or time.monotonic() > deadline:
                raise Failure(f"tcpdump did not start: {line.strip()}")

    def stop(self) -> int:
        """Stop it; return the packets it says the kernel dropped."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        m = re.search(r"(\d+) packets dropped by kernel", err or "")
        return int(m.group(1)) if m else -1


class Shadow:
    """``replay shadow`` in the namespace; stderr kept; CPU from wait4 at the end."""

    def __init__(self, ns: Netns, port: int, target: str, extra=()):
        cmd = [sys.executable, "-m", "replay.cli.main", "shadow", "-i", "lo", "--port", str(port),
               "--target", target, *extra]
        # cwd "/": ``-m`` puts the working directory first on sys.path, and a checkout there
        # (without its compiled core) would stand in for the installed package
        self.proc = ns.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             cwd="/")
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.ready.wait(20) or self.proc.poll() is not None:
            raise Failure("replay shadow did not start: " + "".join(self.lines).strip())
        self.t0 = time.monotonic()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "shadowing" in line:
                self.ready.set()
        self.ready.set()

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGINT (Ctrl-C), wait; its exit code, summary lines and CPU."""
        wall = time.monotonic() - self.t0
        # wait4 (not Popen.send_signal, which reaps a dead child first and loses its rusage)
        pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
        if not pid:
            os.kill(self.proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        killed = False
        while not pid:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.proc.pid, signal.SIGKILL)
                killed = True
                pid, status, ru = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.05)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(5)
        out = "".join(self.lines)
        target_line = next((ln.strip() for ln in self.lines if "sent " in ln and "answered" in ln), "")
        nums = {k: int(v.replace(",", "")) for k, v in
                re.findall(r"(sent|answered|dropped|errors) ([\d,]+)", target_line)}
        m = re.search(r"stopped .*?([\d,]+) requests captured; drops: kernel ([\d,]+), interface "
                      r"([\d,]+)", out)
        capture = dict(zip(("captured", "kernel_drops", "interface_drops"),
                           (int(x.replace(",", "")) for x in m.groups()))) if m else {}
        return {"rc": self.proc.returncode, "killed": killed, "output": out.strip(),
                "target_line": target_line, "counts": nums, "capture": capture,
                "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall}


def run_wrk(ns: Netns, lua: Path, port: int, rate: float, seconds: float, conns: int,
            seed: int) -> dict:
    threads = 2
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
           "-s", str(lua), f"http://127.0.0.1:{port}", "--", f"{rate / threads:g}",
           f"{POST_SHARE:g}", str(seed)]
    try:
        r = ns.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise Failure(f"wrk did not end within {seconds + 30:.0f} s") from None
    if r.returncode != 0:
        raise Failure(f"wrk failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", r.stdout)
    rps = re.search(r"Requests/sec:\s*([\d.]+)", r.stdout)
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", r.stdout)
    errs = re.search(r"Socket errors: (.*)", r.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    return {"cmd": " ".join(cmd), "requests": int(m.group(1)) if m else None,
            "rps": float(rps.group(1)) if rps else None,
            "latency_avg": lat.group(1) if lat else None,
            "latency_max": lat.group(3) if lat else None,
            "socket_errors": errs.group(1).strip() if errs else "",
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


# -- the pcap ---------------------------------------------------------------------------------

def analyse(pcap: Path, prod_port: int, staging_port: int) -> dict:
    """Match each production request to its copy at staging, by (method, URI)."""
    from replay.events import F_INCOMPLETE, KIND_REQUEST, KIND_RESPONSE
    from replay.pipeline import open_input

    prod: dict = {}              # key -> (ts_first, ts_last, conn, index)
    prod_dup = 0
    staging: dict = {}           # key -> ts_first of the first copy
    staging_dup = 0
    staging_other = 0            # staging requests that match no production request
    incomplete = 0
    req_last: dict = {}          # (conn, index) -> ts_last of a production request
    served = []                  # production response time: request last -> response first, ns
    reader = open_input(str(pcap), ports=(prod_port, staging_port))
    for m in reader:
        port = m.server[1]
        if m.kind == KIND_REQUEST:
            if m.flags & F_INCOMPLETE:
                incomplete += 1
            key = (m.method, m.uri)
            if port == prod_port:
                if key in prod:
                    prod_dup += 1
                    continue
                prod[key] = (m.ts_first, m.ts_last, m.conn, m.index)
                req_last[(m.conn, m.index)] = m.ts_last
            elif port == staging_port:
                if key in staging:
                    staging_dup += 1
                else:
                    staging[key] = m.ts_first
        elif m.kind == KIND_RESPONSE and port == prod_port and m.index >= 0:
            t = req_last.pop((m.conn, m.index), None)
            if t is not None:
                served.append(m.ts_first - t)
    delays = []
    worst = (None, -1)
    missing = []
    for key, (first, last, conn, index) in prod.items():
        t = staging.get(key)
        if t is None:
            missing.append(key)
            continue
        d = t - last
        delays.append(d)
        if d > worst[1]:
            worst = ((key, index), d)
    for key in staging:
        if key not in prod:
            staging_other += 1
    firsts = [v[0] for v in prod.values()]
    span = (max(firsts) - min(firsts)) / 1e9 if len(firsts) > 1 else 0.0
    ms = [d / 1e6 for d in delays]
    served_ms = [d / 1e6 for d in served]
    n = len(prod)
    return {
        "production": n, "staging": len(delays), "received_pct": 100.0 * len(delays) / n if n else 0.0,
        "missing": len(missing), "missing_examples": [" ".join(k) for k in missing[:5]],
        "staging_duplicates": staging_dup, "staging_unmatched": staging_other,
        "production_duplicates": prod_dup, "incomplete": incomplete,
        "production_rate": (n - 1) / span if span else 0.0, "span_s": span,
        "delay_ms": {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
                     "p99.9": pct(ms, 99.9), "max": max(ms) if ms else float("nan"),
                     "mean": sum(ms) / len(ms) if ms else float("nan"),
                     "min": min(ms) if ms else float("nan"),
                     "negative": sum(1 for x in ms if x < 0)},
        "worst": {"request": " ".join(worst[0][0]) if worst[0] else None,
                  "index_on_connection": worst[0][1] if worst[0] else None},
        "production_response_ms": {"p50": pct(served_ms, 50), "p99": pct(served_ms, 99),
                                   "max": max(served_ms) if served_ms else float("nan")},
        "reader_warnings": list(reader.warnings)[:5],
    }


# -- one run ----------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, ns: Netns, work: Path):
        self.args, self.ns, self.work = args, ns, work
        self.lua = work / "shadow_api.lua"
        self.lua.write_text(WRK_LUA)
        (work / "www").mkdir()
        self.prod = start_nginx(ns, work / "www", args.port, work / "nginx-prod", workers=1,
                                extra_server=NGINX_API)
        self.staging = start_nginx(ns, work / "www", args.staging_port, work / "nginx-staging",
                                   workers=1, extra_server=NGINX_API)
        self.seq = 0

    def close(self):
        for s in (self.prod, self.staging):
            s.stop()

    def run(self, rate: float, seconds: float) -> dict:
        a = self.args
        self.seq += 1
        conns = max(MIN_CONNS, math.ceil(rate * CONNS_PER_100 / 100))
        pcap = self.work / f"run{self.seq}-{rate:g}.pcap"
        logs0 = (_lines(self.prod.access_log), _lines(self.staging.access_log))
        load = os.getloadavg()[0]
        dump = Tcpdump(self.ns, pcap, (a.port, a.staging_port))
        shadow = None
        try:
            shadow = Shadow(self.ns, a.port, f"http://127.0.0.1:{a.staging_port}", a.shadow_args)
            cpu0 = cpu_times()
            client = run_wrk(self.ns, self.lua, a.port, rate, seconds, conns, self.seq)
            cpu1 = cpu_times()
            settled = wait_quiet(self.staging.access_log)
            sh = shadow.stop()
            shadow = None
            time.sleep(TCPDUMP_FLUSH)
        finally:
            if shadow is not None:
                shadow.proc.kill()
            drops = dump.stop()
        logs = (_lines(self.prod.access_log) - logs0[0], _lines(self.staging.access_log) - logs0[1])
        res = analyse(pcap, a.port, a.staging_port)
        if not a.keep:
            pcap.unlink()
        res.update({"rate_asked": rate, "seconds": seconds, "connections": conns,
                    "client": client, "shadow": sh, "tcpdump_drops": drops, "settle_s": settled,
                    "nginx_logged": {"production": logs[0], "staging": logs[1]},
                    "load_average": load,
                    "machine_busy_pct": 100.0 * (cpu1[0] - cpu0[0]) / max(1, cpu1[2] - cpu0[2]),
                    "machine_steal_pct": 100.0 * (cpu1[1] - cpu0[1]) / max(1, cpu1[2] - cpu0[2]),
                    "shadow_cpu_pct": 100.0 * sh["cpu_s"] / sh["wall_s"] if sh["wall_s"] else 0.0})
        return res


# -- output -----------------------------------------------------------------------------------

def fmt(v, width=7, digits=2):
    return f"{v:{width}.{digits}f}" if isinstance(v, float) and not math.isnan(v) else f"{'-':>{width}}"


def print_run(r: dict) -> None:
    c, d, s = r["client"], r["delay_ms"], r["shadow"]
    print(f"client (wrk):     asked {r['rate_asked']:.0f} req/s on {r['connections']} connections for "
          f"{r['seconds']:g} s; wrk: {c['requests']} requests, {c['rps']} req/s, latency avg "
          f"{c['latency_avg']} max {c['latency_max']}"
          + (f"; socket errors: {c['socket_errors']}" if c["socket_errors"] else "")
          + (f"; non-2xx: {c['non_2xx']}" if c["non_2xx"] else ""))
    print(f"production:       {r['production']} requests in the pcap, {r['production_rate']:.0f} "
          f"req/s over {r['span_s']:.1f} s (nginx logged {r['nginx_logged']['production']})")
    print(f"staging:          {r['staging']} of them received = {r['received_pct']:.2f} % "
          f"(missing {r['missing']}, duplicates {r['staging_duplicates']}, unmatched "
          f"{r['staging_unmatched']}; nginx logged {r['nginx_logged']['staging']})")
    if r["missing_examples"]:
        print(f"                  missing, e.g.: {'; '.join(r['missing_examples'][:3])}")
    print(f"delay, ms:        p50 {fmt(d['p50'], 0, 3)}  p90 {fmt(d['p90'], 0, 3)}  "
          f"p99 {fmt(d['p99'], 0, 3)}  p99.9 {fmt(d['p99.9'], 0, 3)}  max {fmt(d['max'], 0, 3)}  "
          f"mean {fmt(d['mean'], 0, 3)}  (max: {r['worst']['request']}, request "
          f"#{r['worst']['index_on_connection']} of its connection)")
    if d["negative"]:
        print(f"                  {d['negative']} copies stamped before their original's last "
              f"packet (min {d['min']:.3f} ms): the kernel stamps a packet as each capture socket "
              f"gets it; probably a CPU held up in between (steal) stamped tcpdump's original late")
    pr = r["production_response_ms"]
    print(f"baseline:         production nginx answers in p50 {fmt(pr['p50'], 0, 3)} ms, p99 "
          f"{fmt(pr['p99'], 0, 3)} ms, max {fmt(pr['max'], 0, 3)} ms (request last packet -> "
          f"response first packet, same pcap)")
    print(f"replay shadow:    CPU {r['shadow_cpu_pct']:.0f} % of one core over {s['wall_s']:.1f} s "
          f"(stopped {r['settle_s']:.1f} s after the load); "
          f"exit {s['rc']}{' (killed: did not stop)' if s['killed'] else ''}; tcpdump drops "
          f"{r['tcpdump_drops']}")
    cap = s["capture"]
    if cap:
        print(f"                  captured {cap['captured']} requests; its capture's drops: kernel "
              f"{cap['kernel_drops']}, interface {cap['interface_drops']}")
    print("                  " + (s["target_line"] or "(no summary line)"))
    print(f"machine:          {r['machine_busy_pct']:.0f} % of all {os.cpu_count()} CPUs busy during "
          f"the load (everything, this benchmark included), {r['machine_steal_pct']:.1f} % stolen "
          f"by the hypervisor; load average {r['load_average']:.2f} before it")
    if s["rc"] != 0 or not s["target_line"]:
        print("                  shadow output:\n" + "\n".join("    " + ln for ln in
                                                             s["output"].splitlines()[-15:]))
    if r["reader_warnings"]:
        print(f"pcap warnings:    {r['reader_warnings']}")


def print_steps(steps: list[dict]) -> None:
    print(f"{'asked':>7} {'client':>8} {'prod':>8} {'staging':>8} {'received':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>8} {'shadow':>7} {'shadow':>8} {'shadow':>7} {'machine':>8} "
          f"{'steal':>6} {'drops':>6}")
    print(f"{'req/s':>7} {'req/s':>8} {'reqs':>8} {'reqs':>8} {'':>9} {'':>7} {'':>7} {'':>8} "
          f"{'CPU %':>7} {'captured':>8} {'dropped':>7} {'busy %':>8} {'%':>6} {'tcpd.':>6}")
    for r in steps:
        d = r["delay_ms"]
        print(f"{r['rate_asked']:7.0f} {r['production_rate']:8.0f} {r['production']:8d} "
              f"{r['staging']:8d} {r['received_pct']:8.2f}% {fmt(d['p50'])} {fmt(d['p99'])} "
              f"{fmt(d['max'], 8)} {r['shadow_cpu_pct']:7.0f} "
              f"{r['shadow']['capture'].get('captured', -1):8d} "
              f"{r['shadow']['counts'].get('dropped', -1):7d} {r['machine_busy_pct']:8.0f} "
              f"{r['machine_steal_pct']:6.1f} {r['tcpdump_drops']:6d}")


def all_received(r: dict) -> bool:
    return r["production"] > 0 and r["staging"] == r["production"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0, help="req/s of the delay run (part 1)")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of the delay run")
    ap.add_argument("--steps", default="1000,2000,4000,8000",
                    help="req/s of the rate steps (part 2), comma-separated; '' skips part 2")
    ap.add_argument("--step-seconds", type=float, default=5.0, help="length of each rate step")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: a 3 s delay run and steps 1000,2000 of 2 s")
    ap.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    ap.add_argument("--port", type=int, default=8080, help="production port")
    ap.add_argument("--staging-port", type=int, default=8081)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (pcaps, nginx logs)")
    ap.add_argument("--watchdog", type=float, default=0.0,
                    help="hard limit for the whole script, s (0: from the run lengths)")
    ap.add_argument("--shadow-args", nargs=argparse.REMAINDER, default=[],
                    help="extra arguments for replay shadow (last on the line)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.step_seconds, args.steps = 3.0, 2.0, "1000,2000"
    try:
        steps = [float(x) for x in args.steps.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--steps {args.steps!r}: comma-separated numbers expected")
    if args.rate <= 0 or args.seconds < 1 or args.step_seconds < 1 or any(s <= 0 for s in steps):
        ap.error("rates must be > 0 and run lengths >= 1 s")
    if len(steps) > 12 or max(steps + [args.rate]) > 100_000:
        ap.error("at most 12 steps, at most 100000 req/s")

    if os.geteuid() != 0:
        print("bench_shadow.py: must run as root (network namespaces, packet capture): "
              "sudo python3 benchmarks/bench_shadow.py", file=sys.stderr)
        return 2
    missing = [t for t in ("nginx", "tcpdump", "wrk") if not shutil.which(t)]
    if missing:
        print(f"bench_shadow.py: missing programs: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        from replay import core
    except ImportError as e:
        print(f"bench_shadow.py: the replay package is not importable ({e}): pip install -e .",
              file=sys.stderr)
        return 2
    ok, why = netns_available()
    if not ok:
        print(f"bench_shadow.py: cannot use network namespaces: {why}", file=sys.stderr)
        return 2

    per_run = 45       # s around each run: starts, settle, drain, flush, pcap reading
    limit = args.watchdog or (args.seconds + sum(args.step_seconds for _ in steps)
                              + per_run * (1 + len(steps)) + 60)

    def on_alarm(*_):
        raise Failure(f"watchdog: the script ran longer than {limit:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    def on_term(signum, _frame):
        print("bench_shadow.py: terminated", file=sys.stderr)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must reach the cleanup even when started from a shell that ignores SIGINT (&)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.alarm(int(limit))

    load = os.getloadavg()
    print(f"replay from {Path(core.__file__).parent.parent}, {core.IMPLEMENTATION} core; {os.cpu_count()} CPUs, load average {load[0]:.2f} "
          f"{load[1]:.2f} (wrk, 2 nginx, tcpdump and shadow share them)")
    out = {"machine": {"cpus": os.cpu_count(), "load_average": load[:2],
                       "core": core.IMPLEMENTATION,
                       "replay": str(Path(core.__file__).parent.parent)},
           "settings": {"rate": args.rate, "seconds": args.seconds, "steps": steps,
                        "step_seconds": args.step_seconds, "post_share": POST_SHARE,
                        "shadow_args": args.shadow_args, "target_p99_ms": TARGET_P99_MS}}
    work = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    os.chmod(work, 0o755)
    status = 0
    try:
        with Netns("bshadow") as ns:
            bench = Bench(args, ns, work)
            try:
                print(f"namespace {ns.name}; production nginx :{args.port}, staging nginx "
                      f":{args.staging_port}; replay shadow -i lo --port {args.port} --target "
                      f"http://127.0.0.1:{args.staging_port} {' '.join(args.shadow_args)}".rstrip())
                print(f"\n== 1. delay at {args.rate:.0f} req/s for {args.seconds:g} s")
                r = bench.run(args.rate, args.seconds)
                print_run(r)
                out["delay_run"] = r
                ok = all_received(r) and r["delay_ms"]["p99"] <= TARGET_P99_MS
                print(f"target (p99 <= {TARGET_P99_MS:g} ms, every request copied): "
                      f"{'MET' if ok else 'NOT MET'} (p99 {fmt(r['delay_ms']['p99'], 0, 3)} ms, "
                      f"{r['received_pct']:.2f} % received)")

                results = []
                stop_why = "all steps run"
                if steps:
                    print(f"\n== 2. rate steps, {args.step_seconds:g} s each: {args.steps}")
                for rate in steps:
                    r = bench.run(rate, args.step_seconds)
                    results.append(r)
                    print(f"-- {rate:.0f} req/s")
                    print_run(r)
                    if not all_received(r):
                        stop_why = f"staging got {r['received_pct']:.2f} % at {rate:.0f} req/s"
                        break
                    if r["production_rate"] < CLIENT_FLOOR * rate:
                        stop_why = (f"the client reached {r['production_rate']:.0f} of {rate:.0f} "
                                    f"req/s: this machine, not shadow, is the limit")
                        break
                if results:
                    print(f"\n== summary of the rate steps (stopped: {stop_why})")
                    print_steps(results)
                    full = [r for r in results if all_received(r)]
                    best = max(full, key=lambda r: r["production_rate"]) if full else None
                    if best:
                        print(f"highest rate with every request at staging: "
                              f"{best['production_rate']:.0f} req/s (step {best['rate_asked']:.0f}), "
                              f"delay p99 {fmt(best['delay_ms']['p99'], 0, 3)} ms")
                    else:
                        print("no step had every request at staging")
                    out["steps"] = results
                    out["steps_stopped"] = stop_why
                    out["highest_full_rate"] = best["production_rate"] if best else None
            finally:
                bench.close()
    except (Failure, NetnsError) as e:
        print(f"bench_shadow.py: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("bench_shadow.py: interrupted", file=sys.stderr)
        status = 130
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json and "delay_run" in out:
        Path(args.json).write_text(json.dumps(plain_json(out), indent=2) + "\n")
        print(f"figures written to {args.json}")
    return status


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(main())
