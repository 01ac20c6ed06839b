#!/usr/bin/env python3
"""Build realistic HTTP/1.1 packet captures (pcap) for replay tests and benchmarks.

What it does
------------
1. Creates a throwaway network namespace (see ``netns.py``) whose loopback has
   a 1500-byte MTU and gro/gso/tso turned off (``--offloads on`` keeps them),
   so the capture holds Ethernet-sized TCP segments like a real NIC would show,
   not 64 KiB loopback super-packets.
2. Generates a deterministic document root (fixed contents and mtimes, so
   ETag/Last-Modified are stable): HTML/CSS/JS/PNG, binary files of
   200 B .. 2 MB, and text/JSON files under ``/gz/`` that nginx always answers
   gzip-compressed with ``Transfer-Encoding: chunked``.
3. Starts nginx in the namespace: static files on 127.0.0.1:PORT, ``/api/``
   proxied (keep-alive upstream) to a second server block on PORT+1 that
   answers every method with 200 + JSON + ``Set-Cookie``.  Request bodies are
   therefore really read by the front server (it buffers them before
   proxying) and ``Expect: 100-continue`` gets a real ``100 Continue``.
   Only the front server logs requests, one access-log line per request.
4. Runs ``tcpdump -i lo -s 0 -B 262144 -w OUT tcp port PORT`` in the namespace (a 256 MiB
   kernel buffer: tcpdump writing a 450 MB file must not drop packets).
5. Drives traffic:

   * default (benchmark) mode: ``wrk`` with ``benchmarks/wrk_mix.lua`` (API
     GETs with cookies and query strings, JSON POST/PUT/DELETE with varied body
     sizes, small/large files, gzip+chunked text, 304s, 404s) until the pcap
     reaches ``--size`` MB (10^6 bytes) or ``--duration`` seconds pass (the
     file lags the wire by tcpdump's ring buffer, so it can end a few percent
     above ``--size``; wrk is stopped, then tcpdump drains and flushes);
   * ``--sample``: a small, varied, deterministic scenario (~40 requests,
     < 300 KB) made with curl and a tiny raw-socket Python client: keep-alive
     GETs with query strings and cookies, JSON/form/chunked POSTs, PUT, DELETE,
     HEAD, chunked gzip responses, ``Expect: 100-continue``, 404, 304 (ETag and
     date), 206 range, 301 redirect, two pipelined requests in one segment,
     HTTP/1.0, ``Connection: close`` and a 128 KiB download.

6. Prints the pcap size, packet count, segment sizes seen, tcpdump drop
   counters and the number of requests nginx logged; ``--verify`` also counts
   ``http.request`` frames with tshark.

Usage::

    sudo python3 benchmarks/make_capture.py --sample -o captures/sample.pcap
    sudo python3 benchmarks/make_capture.py -o /tmp/bench.pcap --size 450 --duration 60
    sudo python3 benchmarks/make_capture.py -o /tmp/b.pcap --size 50 --duration 20 --verify

Rules
-----
* Needs root, iproute2, nginx, tcpdump; wrk (benchmark mode) or curl
  (sample mode); ethtool for offloads; capinfos/tshark are optional.
* All traffic stays on the loopback of a namespace created here; nothing is
  sent anywhere else.
* Every load loop is bounded in count and in time (wrk ``-d``, a hard
  watchdog, per-request timeouts in the sample client).
* The namespace, every process in it and the temporary work directory are
  removed at exit, also on errors, Ctrl-C and SIGTERM.
* Standard library only.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # keep benchmarks/ free of __pycache__

import argparse
import collections
import email.utils
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from netns import Netns, NetnsError, netns_available, start_nginx  # noqa: E402

WRK_SCRIPT = HERE / "wrk_mix.lua"
MB = 1_000_000
#: every generated file gets this mtime (2024-01-01T00:00:00Z): stable ETags
FIXED_MTIME = 1_704_067_200
SESSION_COOKIE = "sid=7f3a9c0e2b41d5a8; Path=/; HttpOnly; SameSite=Lax"
SAMPLE_UA_CURL = "replay-sample-curl/1.0"
SAMPLE_UA_PY = "replay-sample-py/1.0"


# ----------------------------------------------------------------------
# deterministic document root
# ----------------------------------------------------------------------

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
         "mike november oscar papa quebec romeo sierra tango uniform victor whiskey "
         "xray yankee zulu order cart user product search payment shipping invoice "
         "catalog review rating stock price discount coupon session token").split()
SERVICES = ("checkout", "catalog", "auth", "search", "cart", "payments", "shipping")
API_PATHS = ("/api/orders", "/api/products", "/api/users", "/api/cart", "/api/search",
             "/api/login", "/api/events", "/api/sessions", "/api/status")


def _etag(size: int, mtime: int = FIXED_MTIME) -> str:
    """nginx's strong ETag for a static file: "hex(mtime)-hex(size)"."""
    return f'"{mtime:x}-{size:x}"'


def _http_date(ts: int = FIXED_MTIME) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _log_text(rng: random.Random, size: int) -> str:
    """Application-log-like text (compresses ~5-8x, like real logs)."""
    lines, total, t = [], 0, 0
    while total < size:
        t += rng.randint(1, 900)
        svc = rng.choice(SERVICES)
        line = (f"2024-01-01T{t // 3_600_000 % 24:02d}:{t // 60_000 % 60:02d}:{t // 1000 % 60:02d}."
                f"{t % 1000:03d}Z {rng.choice(('INFO', 'INFO', 'INFO', 'WARN', 'DEBUG'))} "
                f"service={svc} trace={rng.getrandbits(64):016x} "
                f"path={rng.choice(API_PATHS)} status={rng.choice((200, 200, 200, 201, 304, 404))} "
                f"latency_ms={rng.randint(1, 1500)} msg=\"{_sentence(rng, rng.randint(3, 12))}\"\n")
        lines.append(line)
        total += len(line)
    return "".join(lines)[:size]


def _png(rng: random.Random, w: int, h: int) -> bytes:
    """A valid RGB PNG with noisy pixels."""
    raw = b"".join(b"\x00" + bytes(rng.randrange(256) if (x + y) % 3 else 200
                                   for x in range(w * 3)) for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _product(rng: random.Random, i: int) -> dict:
    return {"id": 1000 + i, "sku": f"SKU-{rng.getrandbits(32):08X}",
            "name": _sentence(rng, 3).title(), "price": round(rng.uniform(3, 400), 2),
            "currency": "EUR", "stock": rng.randint(0, 250),
            "rating": round(rng.uniform(1, 5), 1), "tags": rng.sample(WORDS, 3)}


def api_documents(seed: int = 7) -> dict[str, str]:
    """JSON bodies returned by the API backend for GETs, keyed by location."""
    rng = random.Random(seed)
    users = [{"id": 1000 + i, "name": _sentence(rng, 2).title(),
              "email": f"user{1000 + i}@example.com", "plan": rng.choice(("free", "pro", "team"))}
             for i in range(6)]
    docs = {
        "/api/users": {"users": users, "total": len(users)},
        "/api/products": {"page": 1, "per_page": 20,
                          "items": [_product(rng, i) for i in range(20)]},
        "/api/search": {"hits": [{"id": 1000 + i, "score": round(rng.random(), 4),
                                  "title": _sentence(rng, 5)} for i in range(12)],
                        "took_ms": 17},
        "/api/cart": {"cart_id": "c-5f2c9a1e", "items": [
            {"sku": f"SKU-{rng.getrandbits(32):08X}", "qty": rng.randint(1, 3)} for _ in range(3)],
            "total": 129.7, "currency": "EUR"},
        "/api/status": {"status": "ok", "version": "1.4.2"},
    }
    return {k: json.dumps(v, separators=(",", ":")) for k, v in docs.items()}


def build_docroot(root: Path, seed: int = 1) -> list[dict]:
    """Write the document root; return a manifest (one dict per file)."""
    rng = random.Random(seed)
    files: dict[str, tuple[str, bytes]] = {}  # path -> (category, content)

    css = "".join(f".c-{i} {{ margin: {i % 7}px; color: #{rng.getrandbits(24):06x}; "
                  f"font-size: {10 + i % 9}px; }}\n" for i in range(120))
    js = "".join(f"function h{i}(e){{ return fetch('/api/{rng.choice(('users', 'cart', 'products'))}"
                 f"?id='+e+'&v={i}').then(r => r.json()); }}\n" for i in range(160))
    index = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Replay shop</title>\n"
             "<link rel=\"stylesheet\" href=\"/static/css/site.css\">\n"
             "<script src=\"/static/js/app.js?v=3.1.4\" defer></script></head>\n<body>\n"
             "<img src=\"/static/img/logo.png\" alt=\"logo\">\n"
             + "".join(f"<p class=\"c-{i}\">{_sentence(rng, 18)}</p>\n" for i in range(25))
             + "</body></html>\n")
    guide = ("<!doctype html>\n<html><head><title>Guide</title></head><body>\n"
             + "".join(f"<h2>Section {i}</h2>\n<p>{_sentence(rng, 120)}</p>\n" for i in range(160))
             + "</body></html>\n")
    files["/index.html"] = ("page", index.encode())
    files["/docs/guide.html"] = ("page", guide.encode())
    files["/static/css/site.css"] = ("small", css.encode())
    files["/static/js/app.js"] = ("small", js.encode())
    files["/static/img/logo.png"] = ("small", _png(rng, 48, 48))
    for label, size in (("200", 200), ("512", 512), ("1k", 1024), ("2k", 2048), ("4k", 4096),
                        ("8k", 8192), ("16k", 16384), ("32k", 32768), ("64k", 65536),
                        ("128k", 131072), ("256k", 262144), ("512k", 524288),
                        ("1m", 1_048_576), ("2m", 2_097_152)):
        cat = "small" if size <= 32768 else "large"
        files[f"/static/files/blob-{label}.bin"] = (cat, rng.randbytes(size))
    files["/gz/report-8k.txt"] = ("gz", _log_text(rng, 8192).encode())
    files["/gz/report-32k.txt"] = ("gz", _log_text(rng, 32768).encode())
    files["/gz/events-256k.txt"] = ("gz", _log_text(rng, 262144).encode())
    files["/gz/catalog-64k.json"] = ("gz", json.dumps(
        {"items": [_product(rng, i) for i in range(360)]}, indent=1).encode()[:65536])

    manifest = []
    for path, (cat, data) in sorted(files.items()):
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (FIXED_MTIME, FIXED_MTIME))
        manifest.append({"category": cat, "path": path, "size": len(data),
                         "etag": _etag(len(data)), "last_modified": _http_date()})
    return manifest


def write_wrk_manifest(manifest: list[dict], path: Path) -> None:
    """Tab-separated file list for wrk_mix.lua: category path size etag last-modified."""
    with open(path, "w") as f:
        for m in manifest:
            f.write(f"{m['category']}\t{m['path']}\t{m['size']}\t{m['etag']}\t{m['last_modified']}\n")


# ----------------------------------------------------------------------
# nginx configuration
# ----------------------------------------------------------------------

def nginx_snippets(port: int) -> tuple[str, str]:
    """(extra_http, extra_server) config for netns.start_nginx."""
    backend = port + 1
    docs = api_documents()
    api_locations = []
    # longest prefix wins in nginx, so order does not matter
    for loc, body in [*docs.items(), ("/api/", None)]:
        if body is None:
            body = '{"ok":true,"path":"$uri","query":"$args"}'
        assert "'" not in body and "$" not in body.replace("$uri", "").replace("$args", "")
        extra_cookie = ('add_header Set-Cookie "cart_items=3; Path=/; Max-Age=86400" always;'
                        if loc == "/api/cart" else "")
        api_locations.append(f"""
        location {loc} {{
            default_type application/json;
            add_header Set-Cookie "{SESSION_COOKIE}" always;
            {extra_cookie}
            add_header Cache-Control "no-store" always;
            if ($request_method !~ "^(GET|HEAD)$") {{
                return 200 '{{"ok":true,"method":"$request_method","path":"$uri","received_bytes":$api_body_len}}';
            }}
            return 200 '{body}';
        }}""")
    extra_http = f"""
    map $content_length $api_body_len {{ "" 0; default $content_length; }}

    upstream api_backend {{
        server 127.0.0.1:{backend};
        keepalive 32;
    }}

    # API backend: answers every method with 200 + JSON; not captured, not logged
    server {{
        listen 127.0.0.1:{backend};
        access_log off;
        {''.join(api_locations)}
    }}
"""
    extra_server = """
        # JSON API: the front server reads (buffers) request bodies, then proxies
        location /api/ {
            proxy_pass http://api_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }

        location = /old-page {
            return 301 /index.html;
        }
"""
    return extra_http, extra_server


# ----------------------------------------------------------------------
# tcpdump
# ----------------------------------------------------------------------

class Tcpdump:
    """tcpdump writing a pcap inside a namespace; stop() returns its counters.

    Note on the counters: on ``lo`` the kernel shows every packet to the
    socket twice (outgoing and incoming copy) and libpcap drops the outgoing
    copy itself, so "received by filter" is about twice "captured".
    """

    BLOCK_TIMEOUT = 1.5  # > tcpdump's 1000 ms packet-buffer timeout

    def __init__(self, ns: Netns, out: Path, port: int, buffer_kib: int = 262144,
                 immediate: bool = False) -> None:
        self.ns, self.out, self.port, self.buffer_kib = ns, out, port, buffer_kib
        self.immediate = immediate
        self.proc: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self.stats: dict[str, int] = {}

    def start(self, timeout: float = 10.0) -> "Tcpdump":
        if self.out.exists():
            self.out.unlink()
        cmd = ["tcpdump", "-i", "lo", "-s", "0", "-B", str(self.buffer_kib), "-n",
               "-Z", "root", "-w", str(self.out), f"tcp port {self.port}"]
        if self.immediate:
            cmd.insert(1, "--immediate-mode")
        self.proc = self.ns.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, errors="replace")
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("tcpdump did not start:\n" + "".join(self.stderr_lines))
        time.sleep(0.2)  # let the capture settle before traffic starts
        return self

    def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "listening on" in line:
                self._ready.set()

    def size(self) -> int:
        try:
            return self.out.stat().st_size
        except FileNotFoundError:
            return 0

    def stop(self, timeout: float = 15.0) -> dict[str, int]:
        p = self.proc
        if p is None:
            return self.stats
        if p.poll() is None:
            # With TPACKET_V3 the kernel hands packets to libpcap in blocks, a
            # partly filled block only after tcpdump's 1 s timeout; SIGINT
            # drops what has not been handed over yet.  So wait for the last
            # block before asking tcpdump to stop (it then flushes the file).
            if not self.immediate:
                time.sleep(self.BLOCK_TIMEOUT)
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        time.sleep(0.1)  # let the reader thread drain stderr
        text = "".join(self.stderr_lines)
        for key in ("captured", "received by filter", "dropped by kernel"):
            m = re.search(rf"(\d+) packets? {key}", text)
            if m:
                self.stats[key] = int(m.group(1))
        self.proc = None
        return self.stats

    def __enter__(self) -> "Tcpdump":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# ----------------------------------------------------------------------
# pcap inspection
# ----------------------------------------------------------------------

def pcap_stats(path: Path) -> dict:
    """Packet count, frame and TCP payload sizes, MSS options of a classic pcap."""
    st = {"packets": 0, "bytes_on_wire": 0, "max_frame": 0, "max_tcp_payload": 0,
          "frames_over_1514": 0, "data_segments": 0, "mss": collections.Counter(),
          "payload_hist": collections.Counter(), "linktype": None}
    with open(path, "rb") as f:
        gh = f.read(24)
        if len(gh) < 24:
            return st
        magic = gh[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            e = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            e = ">"
        else:
            raise ValueError(f"{path}: not a classic pcap file (pcapng?)")
        linktype = struct.unpack(e + "I", gh[20:24])[0] & 0x0FFFFFFF
        st["linktype"] = linktype
        l2 = {1: 14, 113: 16, 276: 20, 0: 4, 101: 0}.get(linktype)
        rec = struct.Struct(e + "IIII")
        while True:
            h = f.read(16)
            if len(h) < 16:
                break
            _, _, incl, orig = rec.unpack(h)
            data = f.read(incl)
            st["packets"] += 1
            st["bytes_on_wire"] += orig
            st["max_frame"] = max(st["max_frame"], orig)
            if orig > 1514:
                st["frames_over_1514"] += 1
            if l2 is None or len(data) < l2 + 20:
                continue
            ip = data[l2:]
            if ip[0] >> 4 != 4 or ip[9] != 6:
                continue
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack(">H", ip[2:4])[0]
            tcp = ip[ihl:]
            if len(tcp) < 20:
                continue
            doff = (tcp[12] >> 4) * 4
            payload = total - ihl - doff
            if payload > 0:
                st["data_segments"] += 1
                st["max_tcp_payload"] = max(st["max_tcp_payload"], payload)
                b = ("<=100" if payload <= 100 else "101-1447" if payload < 1448
                     else "1448 (full)" if payload == 1448 else ">1448")
                st["payload_hist"][b] += 1
            if tcp[13] & 0x02:  # SYN: read the MSS option
                opts, i = tcp[20:doff], 0
                while i < len(opts):
                    kind = opts[i]
                    if kind == 0:
                        break
                    if kind == 1:
                        i += 1
                        continue
                    if i + 1 >= len(opts):
                        break
                    ln = opts[i + 1]
                    if kind == 2 and ln == 4:
                        st["mss"][struct.unpack(">H", opts[i + 2:i + 4])[0]] += 1
                    i += max(ln, 2)
    return st


def capinfos_packets(path: Path) -> int | None:
    """Packet count according to capinfos (None if capinfos is unavailable)."""
    if not shutil.which("capinfos"):
        return None
    r = subprocess.run(["capinfos", "-c", "-M", str(path)], capture_output=True, text=True)
    m = re.search(r"Number of packets:\s*(\d+)", r.stdout)
    return int(m.group(1)) if m else None


def tshark_requests(path: Path, timeout: float = 1800) -> tuple[int, int] | None:
    """(HTTP requests, frames carrying them) as dissected by tshark; None if no tshark.

    Pipelined requests sent in one segment are one frame with several
    ``http.request.method`` occurrences, so both numbers are reported.
    """
    if not shutil.which("tshark"):
        return None
    r = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", "http.request",
                        "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
                        "-e", "http.request.method"],
                       capture_output=True, text=True, timeout=timeout)
    frames = [line for line in r.stdout.splitlines() if line.strip()]
    return sum(len(line.split(",")) for line in frames), len(frames)


def access_log_summary(path: Path) -> tuple[int, collections.Counter, collections.Counter]:
    """(lines, status counter, method counter) of the nginx access log."""
    statuses, methods, n = collections.Counter(), collections.Counter(), 0
    with open(path, errors="replace") as f:
        for line in f:
            n += 1
            m = re.search(r'"(\S*)[^"]*" (\d{3}) ', line)
            if m:
                methods[m.group(1) or "-"] += 1
                statuses[m.group(2)] += 1
    return n, statuses, methods


# ----------------------------------------------------------------------
# traffic: wrk (benchmark mode)
# ----------------------------------------------------------------------

def run_wrk(ns: Netns, cap: Tcpdump, args, manifest_path: Path) -> str:
    """Run wrk until the pcap is big enough or the duration is over."""
    limit = int(args.size * MB)
    cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections),
           "-d", f"{int(args.duration)}s", "--timeout", "10s", "--latency",
           "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{args.port}",
           "--", str(manifest_path), str(args.seed)]
    print("running:", " ".join(cmd), flush=True)
    out_file = tempfile.TemporaryFile(mode="w+")
    proc = ns.popen(cmd, stdout=out_file, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    hard_deadline = t0 + args.duration + 15  # watchdog on top of wrk's own -d
    reason, last_print = "wrk finished (duration)", t0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if cap.size() >= limit:
                reason = f"pcap reached {args.size:g} MB"
                break
            if now >= hard_deadline:
                reason = "watchdog"
                break
            if now - last_print >= 5:
                print(f"  {now - t0:5.1f}s  pcap {cap.size() / MB:8.1f} MB", flush=True)
                last_print = now
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # wrk stops and prints its summary
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    print(f"stopped after {time.monotonic() - t0:.1f}s: {reason}", flush=True)
    out_file.seek(0)
    return out_file.read()


# ----------------------------------------------------------------------
# traffic: sample mode (runs INSIDE the namespace, via --_sample-client)
# ----------------------------------------------------------------------

class RawHTTP:
    """A tiny HTTP/1.1 client on a raw socket (for pipelining and HTTP/1.0)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, method: str, path: str, headers: list[tuple[str, str]] = (),
                body: bytes = b"", version: str = "HTTP/1.1") -> bytes:
        hdrs = [("Host", self.host), ("User-Agent", SAMPLE_UA_PY), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append(("Content-Length", str(len(body))))
        head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs)
        return head.encode() + b"\r\n" + body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("connection closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("connection closed mid-line")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("connection closed before response headers")
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        if head or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers up to the empty line
                        pass
                    return status, headers, body
                body += self._take(size)
                self._take(2)
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        while self._fill():  # HTTP/1.0 style: body until close
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def close(self) -> None:
        self.sock.close()


def sample_client(port: int, workdir: Path) -> int:
    """The --sample scenario.  Runs inside the namespace; prints one line per response."""
    base = f"http://127.0.0.1:{port}"
    results: list[str] = []
    failures = 0

    def pause() -> None:
        time.sleep(0.05)  # keep connections apart in the capture's timeline

    def curl(label: str, *argv: str) -> None:
        nonlocal failures
        cmd = ["curl", "-sS", "--max-time", "20", "-A", SAMPLE_UA_CURL,
               "-w", "%{http_code} %{method} %{url_effective}\\n"]
        for a in argv:  # curl's -o applies to one URL: give every URL its own
            cmd += ["-o", "/dev/null", a] if a.startswith("http://") else [a]
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=30)
        if r.returncode != 0:
            failures += 1
        for line in r.stdout.splitlines():
            results.append(f"[curl {label}] {line}")
        if r.stderr.strip():
            results.append(f"[curl {label}] stderr: {r.stderr.strip()}")
        pause()

    def raw(label: str, conn: RawHTTP, method: str, head: bool = False) -> None:
        status, headers, body = conn.response(head=head)
        te = headers.get("transfer-encoding", "")
        ce = headers.get("content-encoding", "")
        results.append(f"[py {label}] {status} {method} body={len(body)}"
                       + (f" te={te}" if te else "") + (f" ce={ce}" if ce else ""))

    json_hdr = ["-H", "Content-Type: application/json", "-H", "Accept: application/json"]
    cookies = "session=5f2c9a1e; theme=dark; consent=analytics"
    files = {p.name: p for p in (workdir / "docroot").rglob("*") if p.is_file()}

    # 1. browser-like keep-alive session: 6 GETs with cookies + query strings, one connection
    curl("keepalive", "-b", cookies, "-H", "Accept-Language: en-US,en;q=0.8",
         f"{base}/index.html", f"{base}/static/css/site.css",
         f"{base}/static/js/app.js?v=3.1.4", f"{base}/static/img/logo.png",
         f"{base}/api/users?id=1001&fields=name,email",
         f"{base}/api/products?page=2&per_page=20&sort=price&order=desc&q=running+shoes")
    # 2. JSON POST (small body)
    order = json.dumps({"cart_id": "c-5f2c9a1e", "items": [{"sku": "SKU-1A2B3C4D", "qty": 2},
                        {"sku": "SKU-99AA0017", "qty": 1}], "shipping": {"method": "express",
                        "country": "DE", "zip": "10115"}, "coupon": "WINTER24"})
    curl("post-json", "-b", cookies, *json_hdr, "--data-binary", order, f"{base}/api/orders")
    # 3. HEAD of a large file
    curl("head", "-I", f"{base}/static/files/blob-512k.bin")
    # 4. chunked + gzip responses (static text and JSON API), same connection
    curl("gzip", "-H", "Accept-Encoding: gzip", "-b", cookies,
         f"{base}/gz/report-32k.txt", f"{base}/api/products?page=1&per_page=20")
    # 5. Expect: 100-continue POST with a ~3 KiB JSON body
    big = json.dumps({"batch": 17, "events": [
        {"type": "click", "target": f"#btn-{i}", "ts": 1704067200000 + i * 37,
         "meta": {"page": "/index.html", "ab": i % 3}} for i in range(30)]})
    body_file = workdir / "expect-body.json"
    body_file.write_text(big)
    curl("expect-100", *json_hdr, "-H", "Expect: 100-continue",
         "--data-binary", f"@{body_file}", f"{base}/api/events?source=web&batch=17")
    # 6. two 404s on one connection
    curl("404", f"{base}/static/img/missing.png", f"{base}/no/such/page?ref=home")
    # 7. conditional GETs -> 304 (ETag, then date), one connection thanks to --next
    css_etag = _etag(files["site.css"].stat().st_size)
    curl("304", "-H", f"If-None-Match: {css_etag}", f"{base}/static/css/site.css",
         "--next", "-sS", "--max-time", "20", "-A", SAMPLE_UA_CURL,
         "-w", "%{http_code} %{method} %{url_effective}\\n",
         "-H", f"If-Modified-Since: {_http_date()}", f"{base}/static/js/app.js?v=3.1.4")
    # 8. range request -> 206, redirect -> 301 + 200
    curl("range", "-r", "0-1023", f"{base}/static/files/blob-64k.bin")
    curl("redirect", "-L", f"{base}/old-page")
    # 9. chunked request body (Transfer-Encoding: chunked upload)
    logs_file = workdir / "ingest-body.txt"
    logs_file.write_text(_log_text(random.Random(3), 2500))
    curl("chunked-upload", "-H", "Transfer-Encoding: chunked", "-H", "Content-Type: text/plain",
         "--data-binary", f"@{logs_file}", f"{base}/api/logs/ingest?host=web-3")

    # 10. two pipelined requests written in ONE segment, then a Connection: close request
    c = RawHTTP(port)
    c.send(c.request("GET", "/api/cart?session=5f2c9a1e&currency=EUR",
                     [("Cookie", cookies), ("Accept", "application/json")])
           + c.request("GET", "/static/files/blob-1k.bin", [("Accept", "*/*")]))
    raw("pipelined-1", c, "GET")
    raw("pipelined-2", c, "GET")
    c.send(c.request("GET", "/api/status", [("Connection", "close")]))
    raw("conn-close", c, "GET")
    c.close()
    pause()

    # 11. HTTP/1.0 request without keep-alive
    c = RawHTTP(port)
    c.send(c.request("GET", "/static/files/blob-200.bin?legacy=1", version="HTTP/1.0"))
    raw("http/1.0", c, "GET")
    c.close()
    pause()

    # 12. API session on one keep-alive connection: GET/PUT/POST(form)/PATCH/DELETE/HEAD
    c = RawHTTP(port)
    ck = ("Cookie", cookies + "; sid=7f3a9c0e2b41d5a8")
    for method, path, extra, body in [
        ("POST", "/api/login", [("Content-Type", "application/x-www-form-urlencoded")],
         b"username=alice%40example.com&password=correct+horse&remember=1"),
        ("GET", "/api/users?id=1002", [ck, ("Accept", "application/json")], b""),
        ("GET", "/api/search?q=blue%20shoes&lang=en&page=1", [ck, ("Accept-Encoding", "gzip")], b""),
        ("PUT", "/api/users/1002", [ck, ("Content-Type", "application/json")],
         json.dumps({"name": "Alice Example", "plan": "pro", "newsletter": True}).encode()),
        ("PATCH", "/api/cart/items/SKU-1A2B3C4D", [ck, ("Content-Type", "application/json")],
         b'{"qty":3}'),
        ("HEAD", "/api/status", [ck], b""),
        ("GET", "/index.html", [ck, ("Accept-Encoding", "gzip, deflate"),
                                ("Referer", f"http://127.0.0.1:{port}/old-page")], b""),
        ("OPTIONS", "/api/orders", [("Origin", "http://shop.example"),
                                    ("Access-Control-Request-Method", "POST"),
                                    ("Access-Control-Request-Headers", "content-type")], b""),
        ("POST", "/api/orders?source=web", [ck, ("Content-Type", "application/json"),
                                            ("Origin", "http://shop.example")],
         json.dumps({"cart_id": "c-5f2c9a1e", "items": [{"sku": f"SKU-{i:08X}", "qty": i % 3 + 1}
                                                       for i in range(12)],
                     "note": "leave at the door"}).encode()),
        ("GET", "/api/cart?session=5f2c9a1e", [ck, ("If-None-Match", '"stale-etag"')], b""),
        ("GET", "/api/search?q=caf%C3%A9&lang=fr&page=2", [ck], b""),
        ("GET", "/api/products?page=3&per_page=10&sort=rating&order=asc", [ck], b""),
        ("DELETE", "/api/sessions/5f2c9a1e", [ck], b""),
    ]:
        c.send(c.request(method, path, extra, body))
        raw("api-session", c, method, head=(method == "HEAD"))
    c.close()
    pause()

    # 13. a large download (128 KiB)
    curl("large", "-b", cookies, f"{base}/static/files/blob-128k.bin")

    print("\n".join(results))
    return 1 if failures else 0


def run_sample(ns: Netns, args, workdir: Path) -> str:
    cmd = [sys.executable, "-B", str(Path(__file__).resolve()), "--_sample-client",
           str(args.port), str(workdir)]
    r = ns.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"sample client failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


# ----------------------------------------------------------------------
# main
# ----------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Build a realistic HTTP capture with nginx + tcpdump in a throwaway netns.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-o", "--output", type=Path,
                    help="pcap to write (default: captures/sample.pcap with --sample, "
                         "else /tmp/replay-bench.pcap)")
    ap.add_argument("--sample", action="store_true",
                    help="small deterministic scenario with curl + python client instead of wrk")
    ap.add_argument("--size", type=float, default=450, help="stop when the pcap reaches this many MB (10^6 B)")
    ap.add_argument("--duration", type=float, default=60, help="stop after this many seconds")
    ap.add_argument("-c", "--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("-t", "--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--offloads", choices=("on", "off"), default="off",
                    help="gro/gso/tso on the namespace loopback")
    ap.add_argument("--mtu", type=int, default=1500, help="loopback MTU in the namespace")
    ap.add_argument("--port", type=int, default=8080, help="nginx port (the API backend uses PORT+1)")
    ap.add_argument("--workers", type=int, default=1, help="nginx worker_processes")
    ap.add_argument("--seed", type=int, default=1, help="seed for the wrk request mix")
    ap.add_argument("--keep-access-log", type=Path, metavar="PATH",
                    help="copy nginx's access log here")
    ap.add_argument("--verify", action="store_true",
                    help="also count http.request frames with tshark and compare with nginx")
    ap.add_argument("--_sample-client", nargs=2, metavar=("PORT", "WORKDIR"),
                    dest="sample_client", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.output is None:
        args.output = (HERE.parent / "captures" / "sample.pcap" if args.sample
                       else Path("/tmp/replay-bench.pcap"))
    if args.size <= 0 or args.duration <= 0 or args.connections <= 0 or args.threads <= 0:
        ap.error("--size, --duration, --connections and --threads must be positive")
    if args.connections < args.threads:
        ap.error("--connections must be >= --threads (wrk requirement)")
    return args


def _on_sigterm(signum, frame):  # turn SIGTERM/SIGHUP into a normal unwinding exit
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sample_client:
        return sample_client(int(args.sample_client[0]), Path(args.sample_client[1]))

    ok, why = netns_available()
    if not ok:
        print(f"error: cannot use network namespaces: {why}", file=sys.stderr)
        return 2
    need = ["nginx", "tcpdump", "curl" if args.sample else "wrk"]
    missing = [t for t in need if not shutil.which(t)]
    if missing:
        print(f"error: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.sample and not WRK_SCRIPT.exists():
        print(f"error: {WRK_SCRIPT} not found", file=sys.stderr)
        return 2

    # Ctrl-C/SIGINT -> KeyboardInterrupt even if we were started with SIGINT
    # ignored (background job of a non-interactive shell); SIGTERM/SIGHUP ->
    # SystemExit.  Either way the with/finally blocks stop wrk, flush tcpdump,
    # stop nginx and delete the namespace.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)

    out = args.output.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="replay-capture-"))
    os.chmod(work, 0o755)  # nginx workers run unprivileged and must reach the docroot
    try:
        with Netns("replay-cap", mtu=args.mtu, offloads=(args.offloads == "on")) as ns:
            print(f"namespace {ns.name}: lo mtu={ns.link_mtu()}, offloads {ns.offload_report}")
            manifest = build_docroot(work / "docroot")
            write_wrk_manifest(manifest, work / "manifest.tsv")
            extra_http, extra_server = nginx_snippets(args.port)
            server = start_nginx(ns, work / "docroot", args.port, work / "nginx",
                                 workers=args.workers, extra_http=extra_http,
                                 extra_server=extra_server)
            try:
                cap = Tcpdump(ns, out, args.port, immediate=args.sample).start()
                try:
                    if args.sample:
                        client_out = run_sample(ns, args, work)
                    else:
                        client_out = run_wrk(ns, cap, args, work / "manifest.tsv")
                    time.sleep(0.5)  # let the last FIN/ACKs and log lines land
                finally:
                    tcp_stats = cap.stop()
            finally:
                server.stop()
            access_log = server.access_log
            if args.keep_access_log:
                args.keep_access_log.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(access_log, args.keep_access_log)
            logged, statuses, methods = access_log_summary(access_log)
            offload_report, mtu = ns.offload_report, ns.mtu
        report(args, out, client_out, tcp_stats, logged, statuses, methods, offload_report, mtu)
    except NetnsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: namespace and processes cleaned up; {out} may be partial",
              file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args, out: Path, client_out: str, tcp_stats: dict, logged: int,
           statuses: collections.Counter, methods: collections.Counter,
           offload_report: str, mtu: int) -> None:
    print()
    print("---- client output " + "-" * 50)
    print(client_out.rstrip())
    print("---- result " + "-" * 57)
    st = pcap_stats(out)
    size = out.stat().st_size
    print(f"pcap:             {out}")
    print(f"size:             {size} bytes ({size / MB:.2f} MB, {size / 2**20:.2f} MiB)")
    cap_n = capinfos_packets(out)
    print(f"packets:          {st['packets']} (capinfos: {cap_n if cap_n is not None else 'n/a'})")
    print("tcpdump:          " + ", ".join(f"{v} {k}" for k, v in tcp_stats.items()))
    print(f"loopback:         mtu {mtu}, offloads {offload_report}")
    print(f"frames:           max {st['max_frame']} B on the wire, "
          f"{st['frames_over_1514']} larger than 1514 B; link type {st['linktype']}")
    print(f"tcp payload:      max {st['max_tcp_payload']} B in {st['data_segments']} data segments; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(st["payload_hist"].items())))
    print("SYN MSS options:  " + ", ".join(f"{k} x{v}" for k, v in sorted(st["mss"].items())))
    print(f"nginx requests:   {logged} access-log lines; status "
          + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
          + "; methods " + ", ".join(f"{k}: {v}" for k, v in methods.most_common()))
    if args.verify:
        t = tshark_requests(out)
        if t is None:
            print("tshark:           not installed")
        else:
            n, frames = t
            verdict = "MATCH" if n == logged else f"DIFFERENCE {n - logged:+d}"
            print(f"tshark:           {n} HTTP requests in {frames} http.request frames "
                  f"vs {logged} nginx log lines: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
