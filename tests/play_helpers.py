"""Helpers for the replay tests: captures built with ``flow.Flow``, and real servers on loopback.

- ``write_capture(path, conns)``: one TCP connection per entry of ``conns``, each a list of
  ``(t_ns, request, response)``; the request goes out at ``t_ns`` and its response 1 ms later
  (``pipelined=True`` in a 4th field sends the request before the previous response);
- ``SinkThread``: ``replay.sink.Sink`` on its own event loop in a thread, keeping every request
  with its raw bytes;
- ``FaultServer``: a loopback TCP server that misbehaves on purpose (reset, garbage, silence).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow import MS, T0, Flow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "captures" / "sample.pcap"


def ok_response(body=b"hello"):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def get(uri, host=b"example.test", extra=b""):
    return b"GET " + uri.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


def write_capture(path, conns, t0=T0):
    """A pcap (written with scapy's ``wrpcap``) of the given connections; returns ``path``."""
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    packets = []
    for ci, items in enumerate(conns):
        f = Flow(client=("10.0.0.1", 40000 + ci), t0=items[0][0] - 5 * MS)
        f.handshake()
        pend = []
        for idx, item in enumerate(items):
            t, req, resp = item[:3]
            f.t = t - MS
            f.c(req)
            pend.append(resp)
            nxt = items[idx + 1] if idx + 1 < len(items) else None
            if nxt is None or not (len(nxt) > 3 and nxt[3]):
                for r in pend:
                    f.s(r)
                pend = []
        for r in pend:
            f.s(r)
        f.close()
        packets += f.packets
    packets.sort(key=lambda p: p[0])
    pkts = []
    for ts, frame in packets:
        p = Ether(frame)
        p.time = ts / 1e9
        pkts.append(p)
    wrpcap(str(path), pkts)
    return path


def spread_capture(path, n=11, conns=2, span_ns=1_000_000_000, t0=T0):
    """``n`` GETs evenly over ``span_ns``, dealt round-robin over ``conns`` connections."""
    per = [[] for _ in range(conns)]
    for i in range(n):
        t = t0 + (span_ns * i) // (n - 1)
        per[i % conns].append((t, get(f"/r/{i}"), ok_response()))
    return write_capture(path, per, t0)


class SinkThread:
    """A ``Sink`` on its own loop in a daemon thread; ``records`` holds (record, raw) in arrival order."""

    def __init__(self, host="127.0.0.1", ssl=None):
        self.host = host
        self.ssl = ssl
        self.records = []
        self.lock = threading.Lock()
        self.loop = None
        self.sink = None
        self._ready = threading.Event()
        self._thread = None
        self._error = None

    def _on_request(self, rec, raw):
        with self.lock:
            self.records.append((rec, raw))

    def __enter__(self):
        from replay.sink import Sink

        def run():
            self.loop = asyncio.new_event_loop()
            try:
                self.sink = Sink(self.host, 0, on_request=self._on_request, keep_raw=True, ssl=self.ssl)
                self.loop.run_until_complete(self.sink.start())
            except BaseException as e:  # noqa: BLE001 - reported in the test's thread
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.sink.close())
            self.loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self):
        return self.sink.port

    @property
    def url(self):
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl else 'http'}://{h}:{self.port}"

    def by_conn(self):
        """Raw requests grouped by connection, each list in arrival order."""
        out = {}
        with self.lock:
            for rec, raw in self.records:
                out.setdefault(rec["conn"], []).append(raw)
        return out

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class FaultServer:
    """Accepts connections on loopback and misbehaves: ``mode`` is one of

    - ``reset``: reads the request, then closes with RST (SO_LINGER 0);
    - ``garbage``: answers every request with bytes that are not HTTP, and keeps the connection;
    - ``silent``: reads and never answers;
    - ``close``: reads the request, then closes cleanly without answering;
    - ``slow``: answers 200, after 300 ms when the request's target contains ``/slow``;
    - ``idle``: answers 200 and keeps the connection, but closes it (FIN, no ``Connection:
      close``) after ``idle`` seconds without a request, as servers do after their keep-alive
      timeout;
    - ``close-reused``: answers the first request of a connection, then closes on the next one
      without answering (a keep-alive timeout that fires as the request arrives);
    - ``stall``: answers the first two requests of a connection, then reads and never answers.
    """

    def __init__(self, mode, idle=0.2):
        self.mode = mode
        self.idle = idle
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._conns = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        self.sock.settimeout(0.05)
        deadline = time.monotonic() + 60        # bounded: a test never needs more
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            self._conns.append(c)
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        c.settimeout(self.idle if self.mode == "idle" else 5)
        served = 0
        try:
            while not self._stop.is_set():
                try:
                    data = c.recv(65536)
                except socket.timeout:
                    if self.mode == "idle":
                        c.close()
                        return
                    raise
                if not data:
                    break
                if self.mode == "idle" or (self.mode == "close-reused" and not served):
                    served += 1
                    c.sendall(ok_response())
                    continue
                if self.mode == "close-reused":
                    c.close()
                    return
                if self.mode == "stall":
                    served += 1
                    if served <= 2:
                        c.sendall(ok_response())
                    continue
                if self.mode == "reset":
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    c.close()
                    return
                if self.mode == "close":
                    c.close()
                    return
                if self.mode == "slow":
                    if b"/slow" in data.split(b"\r\n", 1)[0]:
                        time.sleep(0.3)
                    c.sendall(ok_response())
                if self.mode == "garbage":
                    c.sendall(b"\x00\x01\x02 this is not http at all \xff\xfe\r\n\r\n" * 4)
        except OSError:
            pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def server_tls_context(tmp_path):
    """A server-side SSL context with a fresh self-signed certificate (openssl); the test skips
    when openssl is missing or fails."""
    import shutil
    import ssl
    import subprocess

    import pytest

    if not shutil.which("openssl"):
        pytest.skip("openssl not installed (needed to make a test certificate)")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                        "-out", cert, "-days", "1", "-subj", "/CN=localhost"], capture_output=True)
    if r.returncode:
        pytest.skip("openssl could not make a certificate")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replay_cmd():
    return [sys.executable, "-m", "replay.cli.main"]


def env():
    e = dict(os.environ)
    e.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return e
