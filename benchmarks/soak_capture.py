#!/usr/bin/env python3
"""Soak: does ``replay capture`` keep a flat memory over a long run of mixed traffic?

Hours of production are compressed into minutes. In a throwaway network namespace this starts
nginx and ``replay capture -i lo --port PORT --immediate`` with rotation (``--rotate-interval``,
30 s) and a short ``--idle-timeout`` (5 s instead of 120 s), then drives, for ``--minutes``:

- *short* connections: a pool of clients that open a connection, send 1-6 keep-alive requests
  (small and large responses, POST bodies from 0 to 1 MB, some pipelined) and close it; a few are
  closed with a RST in the middle of a large response;
- *idle* connections: kept open for 20-90 s, one request every 1-12 s, so the core's idle
  timeout closes them between requests and they come back midstream;
- *half-open* connections: a partial request head and then silence, or no byte at all, held
  until nginx times them out (``client_header_timeout``) or the client drops them (FIN or RST);
  and bare SYNs from a raw socket (the namespace's kernel answers the SYN-ACK with a RST);
- *malformed* requests: heads over 64 KiB (which the core cuts) and a header line without a colon.

Every second it samples the capture process: VmRSS and VmHWM (``/proc/PID/status``), open file
descriptors, and the files rotated so far; each rotated file's closing metadata gives the core's
open connections and buffered bytes at that moment. At the end it stops the capture with SIGINT,
reads every file (any reader warning is a failure), compares the (method, uri) of the requests
in the log with nginx's access log (the malformed and half-open ones, which nginx logs in its own
way or not at all, are counted apart), and prints the figures and a PASS/FAIL line: RSS at the
end against RSS at the end of the warm-up (the first 20 % of the run), within ``--target`` %.

Usage::

    sudo python3 benchmarks/soak_capture.py                       # 10 minutes
    sudo python3 benchmarks/soak_capture.py --minutes 2 --json soak.json

Rules: root, iproute2 and nginx are needed; all traffic stays on the loopback of a namespace made
here; the clients' loops are bounded in time (``--minutes``) and rate (``--rate``); the capture
runs at ``--nice 0`` by default (the machine may be shared); the namespace and its processes are
removed at exit. ``tests/test_soak.py`` runs the same machinery for 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# Query tags of the request kinds nginx logs in its own way (400, 408) or not at all: counted
# apart from the requests that must be in both the log and nginx's access log. c=xo: a head over
# 64 KiB, c=xb: a header line without a colon, c=h: a partial head.
APART = ("c=x", "c=h")
SMALL, MID, BIG = "/small.txt", "/mid.bin", "/big.bin"


def text_blob(size: int, seed: int) -> bytes:
    """JSON-like lines with random values: compresses about as API payloads do."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < size:
        line = (f'{{"id":{rng.randrange(10**9)},"price":{rng.random() * 1000:.2f},'
                f'"sku":"{rng.getrandbits(48):012x}","ok":{"true" if rng.random() < 0.9 else "false"}}}\n')
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


BLOB = text_blob(1 << 20, 7)
REQUEST_RE = re.compile(r'\] "(\S+) (\S+) HTTP/[\d.]+" (\d{3}) ')


# ------------------------------------------------------------------------------------------------
# the clients (run inside the namespace: ``soak_capture.py --client``)
# ------------------------------------------------------------------------------------------------

class Clients:
    """The traffic mix, on one asyncio loop, bounded by ``seconds`` and ``rate``."""

    def __init__(self, port: int, seconds: float, rate: float, seed: int = 1):
        self.port = port
        self.end = time.monotonic() + seconds
        self.rng = random.Random(seed)
        self.n = 0
        self.sent = collections.Counter()      # requests sent, by kind
        self.events = collections.Counter()    # connections, resets, errors...
        self.statuses = collections.Counter()  # of the responses read whole
        self.rate = rate
        self.held: list = []                   # half-open and silent sockets

    def uri(self, path: str, kind: str) -> str:
        self.n += 1
        return f"{path}?c={kind}&n={self.n}"

    def live(self) -> bool:
        return time.monotonic() < self.end

    async def open(self):
        r, w = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        self.events["connections"] += 1
        return r, w

    async def response(self, r) -> int:
        head = await r.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        self.statuses[status] += 1
        length, chunked = 0, False
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                await r.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await r.readexactly(length)
        return status

    def request(self, kind: str) -> bytes:
        rng = self.rng
        x = rng.random()
        if x < 0.45:
            uri, body, method = self.uri(SMALL, kind), b"", "GET"
        elif x < 0.65:
            uri, body, method = self.uri(MID, kind), b"", "GET"
        elif x < 0.68:
            uri, body, method = self.uri(BIG, kind), b"", "GET"
        else:
            size = rng.choices((0, 10, 1000, 1500, 20_000, 65_536, 200_000, 1_000_000),
                               (4, 4, 4, 4, 4, 2, 1, 0.3))[0]
            start = rng.randrange(len(BLOB) - size + 1)
            uri, body, method = self.uri("/b/post", kind), BLOB[start:start + size], "POST"
        self.sent[kind] += 1
        head = f"{method} {uri} HTTP/1.1\r\nHost: soak\r\nUser-Agent: soak/1\r\n"
        if method == "POST":
            head += f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    @staticmethod
    def reset(w) -> None:
        """Close with a RST (SO_LINGER 0) instead of a FIN."""
        sock = w.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    async def short(self, per_worker_rate: float) -> None:
        rng, gap = self.rng, 1.0 / per_worker_rate
        while self.live():
            r, w = await self.open()
            try:
                n = rng.randint(1, 6)
                if rng.random() < 0.15:            # pipelined: all heads and bodies at once
                    w.write(b"".join(self.request("p") for _ in range(n)))
                    for _ in range(n):
                        await self.response(r)
                    await asyncio.sleep(gap * n)
                else:
                    for _ in range(n):
                        w.write(self.request("k"))
                        await self.response(r)
                        await asyncio.sleep(gap)
                if rng.random() < 0.05:            # a RST in the middle of a large response
                    w.write(f"GET {self.uri(BIG, 'r')} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
                    self.sent["r"] += 1
                    # bounded: a short answer (a 404 of a docroot nginx cannot read) ends early
                    await asyncio.wait_for(r.readexactly(rng.randint(1, 100_000)), 10)
                    self.reset(w)
                    self.events["resets"] += 1
                    continue
                w.close()
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                self.events[f"error {type(e).__name__}"] += 1
                w.transport.abort()

    async def idle(self) -> None:
        rng = self.rng
        while self.live():
            r, w = await self.open()
            until = min(self.end, time.monotonic() + rng.uniform(20, 90))
            try:
                while time.monotonic() < until:
                    w.write(self.request("i"))
                    await self.response(r)
                    await asyncio.sleep(min(rng.uniform(1, 12), max(0.0, until - time.monotonic())))
                w.close()
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.events[f"error {type(e).__name__}"] += 1
                w.transport.abort()

    async def half_open(self) -> None:
        rng = self.rng
        while self.live():
            r, w = await self.open()
            if rng.random() < 0.7:
                w.write(f"GET {self.uri(SMALL, 'h')} HTTP/1.1\r\nHost: soak\r\nX-Partial: ".encode())
                self.sent["h"] += 1
                self.events["partial heads"] += 1
            else:
                self.events["silent connections"] += 1
            self.held.append(w)
            if len(self.held) > 24:                # drop the oldest, half of them with a RST
                old = self.held.pop(0)
                if rng.random() < 0.5:
                    self.reset(old)
                else:
                    old.close()
            await asyncio.sleep(rng.uniform(0.5, 3))

    def syn(self) -> None:
        """A bare SYN from a port no socket owns: the kernel answers the SYN-ACK with a RST."""
        sport = self.rng.randint(20000, 60000)
        seq = self.rng.getrandbits(32)
        hdr = struct.pack("!HHIIBBHHH", sport, self.port, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        src = dst = socket.inet_aton("127.0.0.1")
        pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
        s = pseudo + hdr
        total = sum(struct.unpack(f"!{len(s) // 2}H", s))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        hdr = hdr[:16] + struct.pack("!H", ~total & 0xFFFF) + hdr[18:]
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
            raw.sendto(hdr, ("127.0.0.1", 0))
        self.events["bare SYNs"] += 1

    async def syns(self) -> None:
        while self.live():
            try:
                self.syn()
            except OSError as e:
                self.events[f"error {type(e).__name__}"] += 1
            await asyncio.sleep(self.rng.uniform(0.2, 2))

    async def malformed(self) -> None:
        rng = self.rng
        while self.live():
            await asyncio.sleep(rng.uniform(1, 4))
            r, w = await self.open()
            try:
                if not self.events["oversized heads"] or rng.random() < 0.6:
                    head = f"GET {self.uri(SMALL, 'xo')} HTTP/1.1\r\nHost: soak\r\n"
                    head += "X-Big: " + "a" * rng.randint(66_000, 90_000) + "\r\n"
                    self.events["oversized heads"] += 1
                else:
                    head = f"GET {self.uri(SMALL, 'xb')} HTTP/1.1\r\nHost: soak\r\n"
                    head += "This is not a header line\r\n"
                    self.events["bad header lines"] += 1
                self.sent["x"] += 1
                w.write(head.encode() + b"\r\n")
                await asyncio.wait_for(self.response(r), 5)
                w.close()
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                w.transport.abort()                # nginx may close before reading it all

    async def run(self, short_workers: int = 6, idle_conns: int = 16) -> dict:
        per_worker = max(self.rate * 0.9 / short_workers, 0.1)
        tasks = [self.short(per_worker) for _ in range(short_workers)]
        tasks += [self.idle() for _ in range(idle_conns)]
        tasks += [self.half_open(), self.syns(), self.malformed()]
        # bounded: a read that never completes (a server that went quiet) must not hold the run
        running = [asyncio.ensure_future(t) for t in tasks]
        _, late = await asyncio.wait(running, timeout=max(0.0, self.end - time.monotonic()) + 15)
        for t in late:
            t.cancel()
            self.events["cut_at_end"] += 1
        await asyncio.gather(*late, return_exceptions=True)
        for w in self.held:
            w.close()
        await asyncio.sleep(0.2)
        return {"sent": dict(self.sent), "events": dict(self.events),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}


def client_main(port: int, seconds: float, rate: float, seed: int) -> None:
    out = asyncio.run(Clients(port, seconds, rate, seed).run())
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------

def proc_status(pid: int) -> dict:
    """VmRSS and VmHWM (KiB) and open descriptors of a process, or {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def access_log(path: Path) -> tuple[collections.Counter, collections.Counter]:
    """(method, uri) of the requests nginx logged, and the statuses of those logged apart."""
    kept, apart = collections.Counter(), collections.Counter()
    with open(path, errors="replace") as f:
        for line in f:
            m = REQUEST_RE.search(line)
            if m is None:
                apart["unparsed"] += 1
                continue
            method, uri, status = m.groups()
            if any(t in uri for t in APART):
                apart[status] += 1
            else:
                kept[(method, uri)] += 1
    return kept, apart


def read_logs(paths: list[str]) -> dict:
    """Every file read whole: requests (kept and apart), warnings, the core's closing counters."""
    from replay.events import F_INCOMPLETE, F_TRUNCATED, KIND_REQUEST
    from replay.log import LogReader

    kept, apart = collections.Counter(), collections.Counter()
    warnings, files = [], []
    responses = 0
    for p in paths:
        reader = LogReader(p)
        n = 0
        for m in reader:
            n += 1
            if m.kind != KIND_REQUEST:
                responses += 1
                continue
            uri = m.uri or ""
            if any(t in uri for t in APART):
                flags = ("truncated" if m.flags & F_TRUNCATED else
                         "incomplete" if m.flags & F_INCOMPLETE else "complete")
                apart[f"{uri.split('&')[0].split('?')[-1]} {flags}"] += 1
            else:
                kept[(m.method, uri)] += 1
                if m.flags & F_INCOMPLETE:
                    apart["kept but incomplete"] += 1
        reader.close()
        warnings += [f"{os.path.basename(p)}: {w}" for w in reader.warnings]
        st = reader.meta.get("stats", {})
        files.append({"path": os.path.basename(p), "messages": n, "bytes": os.path.getsize(p),
                      "seconds": reader.meta.get("capture", {}).get("seconds"),
                      "open_connections": st.get("open_connections"),
                      "buffered_bytes": st.get("buffered_bytes"),
                      "expired_connections": st.get("expired_connections")})
    return {"kept": kept, "apart": apart, "warnings": warnings, "files": files,
            "responses": responses}


def window_median(samples: list[dict], t0: float, t1: float) -> float:
    vals = [s["rss_kib"] for s in samples if t0 <= s["t"] <= t1 and s.get("rss_kib")]
    return statistics.median(vals) if vals else float("nan")


def run_soak(seconds: float, *, workdir: Path, port: int = 8080, rotate: str = "30s",
             idle_timeout: str = "5s", rate: float = 300.0, warmup: float = 0.2,
             nice: int = 0, seed: int = 1, log=print,
             replay_argv: tuple = (sys.executable, "-m", "replay.cli.main")) -> dict:
    """Run one soak; returns the figures and the per-second samples (nothing is asserted)."""
    from netns import Netns, start_nginx

    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)   # nginx's workers run unprivileged and read the docroot below
    docroot, outdir = workdir / "docroot", workdir / "logs"
    docroot.mkdir(exist_ok=True)
    outdir.mkdir(exist_ok=True)
    rng = random.Random(seed)
    (docroot / SMALL[1:]).write_bytes(b"small\n" * 30)
    (docroot / MID[1:]).write_bytes(rng.randbytes(32 << 10))     # incompressible, as images
    (docroot / BIG[1:]).write_bytes(text_blob(1 << 20, seed))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with Netns("replay-soak") as ns:
        server = start_nginx(ns, docroot, port=port, workdir=workdir / "nginx",
                             extra_http="client_header_timeout 20s;",
                             extra_server='location /b/ { return 200 "ok\\n"; }')
        cap_cmd = [*replay_argv, "capture", "-i", "lo",
                   "--port", str(port), "-o", str(outdir / "soak-%Y%m%d-%H%M%S.rlog"),
                   "--rotate-interval", rotate, "--idle-timeout", idle_timeout,
                   "--immediate", "--nice", str(nice)]
        cap = ns.popen(cap_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=env)
        lines: list[str] = []
        ready = threading.Event()

        def read_stderr():
            for line in cap.stderr:
                lines.append(line)
                if "capturing on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        if not ready.wait(20) or cap.poll() is not None:
            raise RuntimeError("capture did not start: " + "".join(lines))
        cap_pid = cap.pid
        client = ns.popen([sys.executable, os.path.abspath(__file__), "--client",
                           "--port", str(port), "--seconds", str(seconds), "--rate", str(rate),
                           "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)
        samples: list[dict] = []
        t0 = time.monotonic()
        next_log = t0 + 30
        hard_end = t0 + seconds + 60
        while client.poll() is None and time.monotonic() < hard_end:
            now = time.monotonic()
            st = proc_status(cap_pid)
            if not st:
                break
            samples.append({"t": round(now - t0, 2), "rss_kib": st.get("VmRSS"),
                            "hwm_kib": st.get("VmHWM"), "fds": st.get("fds"),
                            "threads": st.get("Threads"), "files": len(os.listdir(outdir))})
            if now >= next_log:
                log(f"  {now - t0:6.0f} s  RSS {st['VmRSS'] / 1024:6.1f} MiB  "
                    f"HWM {st['VmHWM'] / 1024:6.1f} MiB  fds {st['fds']}  "
                    f"files {samples[-1]['files']}")
                next_log += 30
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        if client.poll() is None:
            client.kill()
        out, err = client.communicate(timeout=30)
        if client.returncode != 0:
            raise RuntimeError(f"clients failed ({client.returncode}): {err[-2000:]}")
        clients = json.loads(out.strip().splitlines()[-1])
        traffic_seconds = time.monotonic() - t0
        time.sleep(1.0)
        final = proc_status(cap_pid)
        cap.send_signal(signal.SIGINT)
        try:
            cap.wait(60)
        except subprocess.TimeoutExpired:
            cap.kill()
            raise RuntimeError("capture did not stop: " + "".join(lines))
        server.stop()
        nginx_kept, nginx_apart = access_log(server.access_log)

    paths = sorted(str(p) for p in outdir.iterdir() if p.suffix == ".rlog")
    logs = read_logs(paths)
    missing = nginx_kept - logs["kept"]
    extra = logs["kept"] - nginx_kept
    warm_t = seconds * warmup
    rss_warm = window_median(samples, warm_t - 5, warm_t + 5)
    rss_end = window_median(samples, seconds - 10, seconds + 60)
    after = [s["rss_kib"] for s in samples if s["t"] >= warm_t and s.get("rss_kib")]
    max_rss = max(s["rss_kib"] for s in samples if s.get("rss_kib"))
    requests = sum(nginx_kept.values())
    summary = next((line.strip() for line in lines if "stopped (" in line), "")
    return {
        "seconds": round(traffic_seconds, 1),
        "capture_rc": cap.returncode,
        "capture_stderr": "".join(lines),
        "capture_summary": summary,
        "clients": clients,
        "requests_nginx": requests,
        "requests_log": sum(logs["kept"].values()),
        "requests_per_s": round(requests / traffic_seconds, 1),
        "responses_log": logs["responses"],
        "missing": sum(missing.values()),
        "missing_examples": [f"{m} {u}" for (m, u) in list(missing)[:5]],
        "extra": sum(extra.values()),
        "extra_examples": [f"{m} {u}" for (m, u) in list(extra)[:5]],
        "nginx_apart": dict(nginx_apart),
        "log_apart": dict(logs["apart"]),
        "files": logs["files"],
        "warnings": logs["warnings"],
        "rss_warmup_kib": rss_warm,
        "rss_end_kib": rss_end,
        "rss_max_after_warmup_kib": max(after) if after else float("nan"),
        "rss_max_kib": max_rss,
        "hwm_end_kib": (final or {}).get("VmHWM"),
        "fds_warmup": next((s["fds"] for s in samples if s["t"] >= warm_t), None),
        "fds_end": (final or {}).get("fds"),
        "growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 2),
        "samples": samples,
    }


def report(r: dict, target: float) -> bool:
    mib = 1024.0
    print(f"duration {r['seconds']:.0f} s; {r['clients']['events'].get('connections', 0):,} "
          f"client connections, {r['clients']['events'].get('bare SYNs', 0):,} bare SYNs; "
          f"{r['requests_nginx']:,} requests nginx logged ({r['requests_per_s']:,.0f}/s)")
    print(f"clients: sent {r['clients']['sent']}, events {r['clients']['events']}, "
          f"statuses {r['clients']['statuses']}")
    print(f"capture: {r['capture_summary']}")
    print(f"files: {len(r['files'])} rotated, {sum(f['bytes'] for f in r['files']):,} bytes; "
          f"reader warnings: {len(r['warnings'])}")
    print("core at each rotation (open connections / buffered bytes): "
          + ", ".join(f"{f['open_connections']}/{f['buffered_bytes']}" for f in r["files"]))
    print(f"requests: log {r['requests_log']:,}, nginx {r['requests_nginx']:,}; missing "
          f"{r['missing']} {r['missing_examples']}, extra {r['extra']} {r['extra_examples']}")
    print(f"apart (malformed, half-open): nginx statuses {r['nginx_apart']}; log {r['log_apart']}")
    print(f"RSS: warm-up end {r['rss_warmup_kib'] / mib:.1f} MiB, end {r['rss_end_kib'] / mib:.1f} "
          f"MiB, max after warm-up {r['rss_max_after_warmup_kib'] / mib:.1f} MiB, max "
          f"{r['rss_max_kib'] / mib:.1f} MiB (VmHWM {(r['hwm_end_kib'] or 0) / mib:.1f} MiB); "
          f"fds {r['fds_warmup']} -> {r['fds_end']}")
    ok_mem = r["growth_pct"] <= target
    ok_log = (not r["warnings"] and r["missing"] == 0 and r["extra"] == 0
              and r["capture_rc"] == 0)
    print(f"{'PASS' if ok_mem and ok_log else 'FAIL'}: RSS growth after warm-up "
          f"{r['growth_pct']:+.1f} % (target {target:g} %); "
          f"{'every file reads, nothing lost' if ok_log else 'LOG CHECK FAILED'}")
    return ok_mem and ok_log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--rotate-interval", default="30s")
    ap.add_argument("--idle-timeout", default="5s")
    ap.add_argument("--rate", type=float, default=300.0,
                    help="requests/s the short-connection clients aim at (default 300)")
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the run (default 0.2)")
    ap.add_argument("--target", type=float, default=10.0, help="RSS growth allowed, %%")
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", help="keep the logs and nginx's files here (default: temporary)")
    ap.add_argument("--json", help="save the figures and the per-second samples")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.port, args.seconds, args.rate, args.seed)
        return 0

    from netns import netns_available

    ok, why = netns_available()
    if not ok:
        print(f"soak_capture: cannot create network namespaces: {why}", file=sys.stderr)
        return 2
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="replay-soak-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        print(f"soak: {seconds:.0f} s, rotate {args.rotate_interval}, idle timeout "
              f"{args.idle_timeout}, rate {args.rate:g}/s, in {workdir}")
        r = run_soak(seconds, workdir=workdir, port=args.port, rotate=args.rotate_interval,
                     idle_timeout=args.idle_timeout, rate=args.rate, warmup=args.warmup,
                     nice=args.nice, seed=args.seed)
    ok = report(r, args.target)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in r.items() if k != "capture_stderr"}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
