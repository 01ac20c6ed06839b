"""``replay capture`` on real interfaces: network namespaces made here, a real HTTP server, real
clients (curl, wrk, Python), and the server's own log as the truth.

Every test needs root (network namespaces, packet capture) and skips with the reason otherwise.
Traffic stays inside namespaces these tests create; every namespace is deleted by its fixture.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from netns import Netns, netns_available  # noqa: E402

from replay.events import F_INCOMPLETE, KIND_REQUEST  # noqa: E402
from replay.log import LogReader  # noqa: E402

_ok, _why = netns_available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"needs network namespaces: {_why}")

PORT = 8080

SERVER = textwrap.dedent(r'''
    """HTTP/1.1 server for the capture tests: logs every request (method, uri, body sha256)."""
    import hashlib, json, socket, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    port, log_path = int(sys.argv[1]), sys.argv[2]
    lock = threading.Lock()
    log = open(log_path, "a")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _body(self):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def handle_any(self):
            body = self._body()
            sha = hashlib.sha256(body).hexdigest()
            with lock:
                log.write(json.dumps({"method": self.command, "uri": self.path,
                                      "len": len(body), "sha": sha}) + "\n")
                log.flush()
            if self.path.startswith("/size/"):
                out = b"x" * int(self.path.split("/")[2].split("?")[0])
            else:
                out = ("ok " + sha + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

    Server(("::", port), H).serve_forever()
''')

CLIENT = textwrap.dedent(r'''
    """Python clients for the capture tests: POST bodies of many sizes on keep-alive connections."""
    import http.client, json, random, sys

    host, port, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rng = random.Random(7)
    sent = []

    def post(c, uri, body, chunked=False, method="POST"):
        if chunked:
            c.request(method, uri, body=iter([body[:1000], body[1000:]]), encode_chunked=True,
                      headers={"Content-Type": "application/octet-stream"})
        else:
            c.request(method, uri, body=body, headers={"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        r.read()
        assert r.status == 200, r.status
        sent.append(uri)

    c = http.client.HTTPConnection(host, port, timeout=20)
    if what == "bodies":
        sizes = [0, 1, 100, 1460, 1461, 65535, 65536, 200_000, 1_100_000, 3_000_000]
        for i, n in enumerate(sizes):
            post(c, f"/post/{i}?size={n}", rng.randbytes(n))
        post(c, "/put/1", rng.randbytes(5000), method="PUT")
        post(c, "/chunked/1", rng.randbytes(20_000), chunked=True)
        c2 = http.client.HTTPConnection(host, port, timeout=20)  # a second connection, interleaved
        for i in range(5):
            post(c2, f"/c2/{i}", rng.randbytes(rng.randrange(1, 50_000)))
            c.request("GET", f"/get/{i}?q=a%20b&i={i}")
            c.getresponse().read()
            sent.append(f"/get/{i}")
        c2.close()
    else:
        for i in range(int(what)):
            c.request("GET", f"/n/{i}")
            c.getresponse().read()
            sent.append(f"/n/{i}")
    c.close()
    print(json.dumps(sent))
''')


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------

def replay_argv(*args) -> list[str]:
    return [sys.executable, "-m", "replay.cli.main", *map(str, args)]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


class Server:
    def __init__(self, ns: Netns, workdir: Path, port: int = PORT):
        self.ns, self.port = ns, port
        self.script = workdir / "server.py"
        self.script.write_text(SERVER)
        self.log = workdir / f"server-{port}.jsonl"
        self.log.write_text("")
        self.proc = ns.popen([sys.executable, str(self.script), str(port), str(self.log)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not ns.wait_port(port, timeout=10):
            self.proc.kill()
            raise RuntimeError(f"test server did not start: {self.proc.stderr.read()!r}")

    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def mark(self) -> int:
        return len(self.entries())


class Capture:
    """``replay capture`` running inside a namespace."""

    def __init__(self, ns: Netns | None, *args, wait=True, argv_prefix=()):
        cmd = [*argv_prefix, *replay_argv("capture", *args)]
        if ns is not None:
            cmd = ns.argv(cmd)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env(), start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        if wait and not self.ready.wait(15):
            self.proc.kill()
            raise AssertionError("capture did not start: " + "".join(self.lines))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "capturing on" in line:
                self.ready.set()
        self.ready.set()

    def stop(self, sig=signal.SIGINT, timeout=60) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout=60) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("capture did not stop: " + "".join(self.lines))
        self._t.join(5)
        return self.proc.returncode, "".join(self.lines)


@pytest.fixture
def ns():
    with Netns("replay-test") as n:
        yield n


@pytest.fixture
def server(ns, tmp_path):
    return Server(ns, tmp_path)


def run_client(ns: Netns, tmp_path: Path, host: str, what: str, port: int = PORT) -> list[str]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    r = ns.run([sys.executable, str(script), host, str(port), what], capture_output=True,
               text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def curl(ns: Netns, *args):
    r = ns.run(["curl", "-s", "-S", "-o", "/dev/null", "--max-time", "10", *args],
               capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def read_log(path) -> tuple[list, LogReader]:
    reader = LogReader(path)
    return list(reader), reader


def body_of(m) -> bytes:
    body = m.data[m.head_length:]
    if b"chunked" in m.data[:m.head_length].lower():
        out, rest = [], body
        while True:
            line, _, rest = rest.partition(b"\r\n")
            n = int(line.split(b";")[0], 16)
            if n == 0:
                return b"".join(out)
            out.append(rest[:n])
            rest = rest[n + 2:]
    return body


def check_against_server(msgs, entries, wrk_uri=None, wrk_conns=0):
    """Requests in the log == requests the server logged; bodies byte-exact; responses paired."""
    reqs = [m for m in msgs if m.kind == KIND_REQUEST]
    resps = [m for m in msgs if m.kind != KIND_REQUEST]
    assert collections.Counter((m.method, m.uri) for m in reqs) == \
        collections.Counter((e["method"], e["uri"]) for e in entries)
    by_uri = collections.defaultdict(set)
    for e in entries:
        by_uri[(e["method"], e["uri"])].add(e["sha"])
    for m in reqs:
        assert hashlib.sha256(body_of(m)).hexdigest() in by_uri[(m.method, m.uri)], m.uri
        assert not m.flags & F_INCOMPLETE, (m.uri, m.flags)
    pairs = {(m.conn, m.index) for m in resps if m.index >= 0}
    unpaired = [m for m in reqs if (m.conn, m.index) not in pairs]
    # wrk stops with requests in flight: their responses may be cut by its close
    assert all(m.uri == wrk_uri for m in unpaired), [m.uri for m in unpaired][:5]
    assert len(unpaired) <= wrk_conns
    return reqs, resps


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

def test_capture_equals_server_log(ns, server, tmp_path):
    out = tmp_path / "cap.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out)
    for i in range(5):
        curl(ns, f"http://127.0.0.1:{PORT}/curl/{i}?x=1&y=%20")
    curl(ns, "-X", "POST", "--data-binary", "@" + str(ROOT / "README.md"),
         f"http://127.0.0.1:{PORT}/curl/upload")
    curl(ns, "-I", f"http://127.0.0.1:{PORT}/curl/head")
    run_client(ns, tmp_path, "127.0.0.1", "bodies")
    wrk = None
    if shutil.which("wrk"):
        wrk = ns.run(["wrk", "-t1", "-c4", "-d2s", "--timeout", "5s",
                      f"http://127.0.0.1:{PORT}/wrk"], capture_output=True, text=True, timeout=30)
        assert wrk.returncode == 0, wrk.stderr
    time.sleep(0.2)
    rc, err = cap.stop()
    assert rc == 0, err
    assert "Traceback" not in err
    assert "stopped (SIGINT)" in err and "drops: kernel 0, interface 0" in err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    msgs, reader = read_log(out)
    assert not reader.warnings and reader.indexed
    entries = server.entries()
    assert len(entries) > 30
    reqs, resps = check_against_server(msgs, entries, "/wrk", 4 if wrk else 0)
    assert max(len(body_of(m)) for m in reqs) == 3_000_000  # not cut by any snaplen
    meta = reader.meta
    assert meta["command"] == "capture" and meta["drops"] == {"kernel": 0, "interface": 0}
    assert meta["capture"]["stopped"] == "SIGINT"
    assert meta["stats"]["requests"] == len(reqs)
    info = subprocess.run(replay_argv("info", out), capture_output=True, text=True, env=env())
    assert "capture drops: interface 0, kernel 0" in info.stdout, info.stdout


def test_ipv6_in_immediate_mode(ns, server, tmp_path):
    out = tmp_path / "v6.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--immediate")
    curl(ns, "-g", f"http://[::1]:{PORT}/v6/curl")
    run_client(ns, tmp_path, "::1", "bodies")
    rc, err = cap.stop()
    assert rc == 0, err
    msgs, _ = read_log(out)
    reqs, _ = check_against_server(msgs, server.entries())
    assert {m.client[0] for m in reqs} == {"::1"} and {m.server for m in reqs} == {("::1", PORT)}


def test_any_interface(ns, server, tmp_path):
    out = tmp_path / "any.rlog"
    cap = Capture(ns, "-i", "any", "--port", PORT, "-o", out)
    assert "link type 113" in "".join(cap.lines)  # Linux cooked capture
    for i in range(3):
        curl(ns, f"http://127.0.0.1:{PORT}/any/{i}")
    run_client(ns, tmp_path, "127.0.0.1", "bodies")
    rc, err = cap.stop(signal.SIGTERM)
    assert rc == 0 and "stopped (SIGTERM)" in err, err
    msgs, _ = read_log(out)
    check_against_server(msgs, server.entries())


def _veth_pair(a: Netns, b: Netns, mtu=1500):
    subprocess.run(["ip", "link", "add", "veth0", "netns", a.name, "mtu", str(mtu), "type", "veth",
                    "peer", "name", "veth1", "netns", b.name, "mtu", str(mtu)], check=True)
    for n, dev in ((a, "veth0"), (b, "veth1")):
        n.run(["ip", "link", "set", dev, "up"], check=True)


def test_vlan_interface(tmp_path):
    """A real 802.1Q interface; the capture runs on its parent, where frames carry the tag."""
    with Netns("replay-vc") as cli, Netns("replay-vs") as srv:
        _veth_pair(cli, srv)
        r = cli.run(["ip", "link", "add", "link", "veth0", "name", "veth0.100", "type", "vlan",
                     "id", "100"], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"kernel has no 802.1Q VLAN support: {r.stderr.strip()}")
        srv.run(["ip", "link", "add", "link", "veth1", "name", "veth1.100", "type", "vlan",
                 "id", "100"], check=True)
        cli.run("ip addr add 10.100.0.1/24 dev veth0.100 && ip link set veth0.100 up", check=True)
        srv.run("ip addr add 10.100.0.2/24 dev veth1.100 && ip link set veth1.100 up", check=True)
        server = Server(srv, tmp_path)
        out = tmp_path / "vlan.rlog"
        cap = Capture(cli, "-i", "veth0", "--port", PORT, "-o", out)
        curl(cli, f"http://10.100.0.2:{PORT}/vlan/1")
        run_client(cli, tmp_path, "10.100.0.2", "bodies")
        rc, err = cap.stop()
        assert rc == 0, err
        msgs, _ = read_log(out)
        check_against_server(msgs, server.entries())


INJECT = textwrap.dedent(r'''
    """Send one HTTP exchange as 802.1Q-tagged frames on an interface (raw socket)."""
    import socket, sys
    from scapy.all import Dot1Q, Ether, IP, TCP, Raw

    iface, body = sys.argv[1], b"B" * 3000
    req = (b"POST /tagged HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    c, s = ("10.9.0.1", 40000), ("10.9.0.2", 8080)
    e = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    r = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")

    def pkt(eth, src, dst, flags, seq, ack, data=b""):
        return bytes(eth / Dot1Q(vlan=100) / IP(src=src[0], dst=dst[0]) /
                     TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq, ack=ack) / Raw(data))

    frames = [pkt(e, c, s, "S", 1000, 0), pkt(r, s, c, "SA", 5000, 1001), pkt(e, c, s, "A", 1001, 5001)]
    seq = 1001
    for i in range(0, len(req), 1400):
        frames.append(pkt(e, c, s, "PA", seq, 5001, req[i:i + 1400]))
        seq += len(req[i:i + 1400])
    frames.append(pkt(r, s, c, "PA", 5001, seq, resp))
    frames.append(pkt(e, c, s, "FA", seq, 5001 + len(resp)))
    frames.append(pkt(r, s, c, "FA", 5001 + len(resp), seq + 1))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    for f in frames:
        sock.send(f)
''')


def test_vlan_tagged_frames(tmp_path):
    """802.1Q-tagged frames arriving on an interface without a VLAN device (works on kernels
    without the 8021q module): the filter lets them through and the core decodes them."""
    pytest.importorskip("scapy")
    with Netns("replay-vt") as a, Netns("replay-vr") as b:
        _veth_pair(a, b)
        out = tmp_path / "tagged.rlog"
        cap = Capture(b, "-i", "veth1", "--port", PORT, "-o", out)
        script = tmp_path / "inject.py"
        script.write_text(INJECT)
        r = a.run([sys.executable, str(script), "veth0"], capture_output=True, text=True,
                  timeout=60, env=env())
        assert r.returncode == 0, r.stderr
        time.sleep(0.3)
        rc, err = cap.stop()
        assert rc == 0, err
        msgs, _ = read_log(out)
        assert [(m.kind, m.uri, m.status) for m in msgs] == [(0, "/tagged", 0), (1, "/tagged", 200)]
        assert body_of(msgs[0]) == b"B" * 3000


def test_sigkill_keeps_flushed_messages(ns, server, tmp_path):
    out = tmp_path / "killed.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--flush-interval", "0.3")
    sent = run_client(ns, tmp_path, "127.0.0.1", "20")
    time.sleep(1.2)  # > flush interval + the kernel ring's block timeout
    rc, _ = cap.stop(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    msgs, reader = read_log(out)
    assert len(reader.warnings) <= 1 and not reader.indexed
    assert [m.uri for m in msgs if m.kind == KIND_REQUEST] == sent
    assert sum(m.kind != KIND_REQUEST for m in msgs) == len(sent)


def test_rotation_by_interval_and_size(ns, server, tmp_path):
    pattern = tmp_path / "rot-%H%M%S.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", pattern, "--rotate-interval", "1",
                  "--flush-interval", "0.2")
    t_end = time.monotonic() + 3.3
    while time.monotonic() < t_end:
        run_client(ns, tmp_path, "127.0.0.1", "5")
        time.sleep(0.2)
    rc, err = cap.stop()
    assert rc == 0, err
    files = sorted(tmp_path.glob("rot-*.rlog"), key=lambda p: p.stat().st_mtime)
    assert len(files) >= 3, err
    total = []
    for i, f in enumerate(files):
        msgs, reader = read_log(f)
        assert not reader.warnings and reader.indexed, f
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert reader.meta["part"] >= 1 and "drops" in reader.meta
        total += msgs
    check_against_server(total, server.entries())

    # by size: 1.5 MB incompressible bodies, a new file after each
    out = tmp_path / "size.rlog"
    mark = server.mark()
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--rotate-size", "1M")
    run_client(ns, tmp_path, "127.0.0.1", "bodies")
    rc, err = cap.stop()
    assert rc == 0, err
    files = [out] + sorted(tmp_path.glob("size.*.rlog"), key=lambda p: int(p.name.split(".")[1]))
    assert len(files) >= 3, err
    total = []
    for f in files:
        msgs, reader = read_log(f)
        assert not reader.warnings and reader.indexed, f
        assert sum(len(m.data) for m in msgs[:-1]) < 1 << 20  # full at the message that crossed
        total += msgs
    check_against_server(total, server.entries()[mark:])


def test_count_duration_requests_only(ns, server, tmp_path):
    out = tmp_path / "count.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--count", "4", "--requests-only")
    run_client(ns, tmp_path, "127.0.0.1", "10")
    rc, err = cap.wait(30)  # stops by itself
    assert rc == 0 and "stopped (count)" in err, err
    msgs, _ = read_log(out)
    assert [m.uri for m in msgs] == [f"/n/{i}" for i in range(4)]

    out = tmp_path / "dur.rlog"
    t0 = time.monotonic()
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--duration", "1")
    rc, err = cap.wait(30)
    assert rc == 0 and "stopped (duration)" in err, err
    assert time.monotonic() - t0 < 10


def test_status_line_on_a_terminal(ns, server, tmp_path):
    import pty

    master, slave = pty.openpty()
    out = tmp_path / "tty.rlog"
    p = subprocess.Popen(ns.argv(replay_argv("capture", "-i", "lo", "--port", PORT, "-o", out,
                                             "--duration", "1.5")),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                         env=dict(env(), COLUMNS="200", TERM="xterm"))
    os.close(slave)
    chunks = []

    def pump():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    time.sleep(0.5)
    run_client(ns, tmp_path, "127.0.0.1", "3")
    assert p.wait(30) == 0
    t.join(5)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "open conns" in text and "drops: kernel 0" in text, text
    assert "stopped (duration)" in text


# -- errors: one line, no traceback ----------------------------------------------------------------

def one_line_error(p: subprocess.CompletedProcess):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_unwritable_output_path(ns, tmp_path):
    p = subprocess.run(ns.argv(replay_argv("capture", "-i", "lo", "--port", PORT, "-o",
                                           tmp_path / "missing" / "x.rlog")),
                       capture_output=True, text=True, env=env(), timeout=30)
    assert "does not exist" in one_line_error(p)
    d = tmp_path / "ro"
    d.mkdir()
    p = subprocess.run(ns.argv(replay_argv("capture", "-i", "lo", "--port", PORT, "-o", d)),
                       capture_output=True, text=True, env=env(), timeout=30)
    one_line_error(p)


def test_disk_full_keeps_what_was_written(ns, server, tmp_path):
    d = Path(tempfile.mkdtemp(prefix="replay-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "replay-full", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.strip()}")
    try:
        out = d / "full.rlog"
        cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--flush-interval", "0.3")
        sent = run_client(ns, tmp_path, "127.0.0.1", "20")
        time.sleep(1.0)  # flushed
        run_client(ns, tmp_path, "127.0.0.1", "bodies")  # 4.6 MB of incompressible bodies
        rc, err = cap.stop()
        assert rc == 1, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("replay: ") and "no space left on device" in last, err
        msgs, reader = read_log(out)
        assert [m.uri for m in msgs if m.kind == KIND_REQUEST][:len(sent)] == sent
        assert all(not m.flags & F_INCOMPLETE for m in msgs)
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def test_drop_privileges_with_user(ns, server, tmp_path):
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    # a directory 'nobody' cannot write: one line that names -Z
    closed = Path(tempfile.mkdtemp(prefix="replay-z-"))
    try:
        os.chmod(closed, 0o755)
        p = subprocess.run(ns.argv(replay_argv("capture", "-i", "lo", "--port", PORT, "-Z",
                                               "nobody", "-o", closed / "x.rlog")),
                           capture_output=True, text=True, env=env(), timeout=30)
        line = one_line_error(p)
        assert "permission denied" in line and "nobody" in line
        # a directory it can write: the capture runs as nobody and works
        os.chown(closed, pwd.getpwnam("nobody").pw_uid, -1)
        out = closed / "z.rlog"
        cap = Capture(ns, "-i", "lo", "--port", PORT, "-Z", "nobody", "-o", out)
        sent = run_client(ns, tmp_path, "127.0.0.1", "5")
        rc, err = cap.stop()
        assert rc == 0, err
        assert out.stat().st_uid == pwd.getpwnam("nobody").pw_uid
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        msgs, _ = read_log(out)
        assert [m.uri for m in msgs if m.kind == KIND_REQUEST] == sent
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def _unprivileged_prefix() -> list[str]:
    """A command prefix that runs without CAP_NET_RAW: as 'nobody' when it can run this
    interpreter, otherwise as root with the capture capabilities removed."""
    if shutil.which("runuser"):
        r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", "pass"],
                           capture_output=True)
        if r.returncode == 0:
            return ["runuser", "-u", "nobody", "--"]
    if shutil.which("setpriv"):
        return ["setpriv", "--inh-caps=-net_raw,-net_admin",
                "--bounding-set=-net_raw,-net_admin", "--"]
    pytest.skip("neither runuser nor setpriv can drop the capture capabilities")


def test_permission_denied_says_what_to_do(tmp_path):
    out = Path(tempfile.mkdtemp(prefix="replay-perm-"))
    try:
        os.chmod(out, 0o777)
        p = subprocess.run([*_unprivileged_prefix(),
                            *replay_argv("capture", "-i", "lo", "--port", PORT, "-o",
                                         out / "x.rlog")],
                           capture_output=True, text=True, env=env(), timeout=30)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    line = one_line_error(p)
    assert p.returncode == 77
    assert "sudo" in line and "setcap cap_net_raw,cap_net_admin+eip" in line, line


def test_unknown_interface_and_bad_filter(ns, tmp_path):
    p = subprocess.run(ns.argv(replay_argv("capture", "-i", "nosuch0", "--port", PORT, "-o",
                                           tmp_path / "x.rlog")),
                       capture_output=True, text=True, env=env(), timeout=30)
    line = one_line_error(p)
    assert re.search(r"nosuch0: no such network interface \(interfaces here: lo, any\)", line)
    p = subprocess.run(ns.argv(replay_argv("capture", "-i", "lo", "-f", "tcp port", "-o",
                                           tmp_path / "x.rlog")),
                       capture_output=True, text=True, env=env(), timeout=30)
    assert "bad capture filter" in one_line_error(p)
    p = subprocess.run(ns.argv(replay_argv("capture", "-i", "lo", "-o", tmp_path / "x.rlog")),
                       capture_output=True, text=True, env=env(), timeout=30)
    assert "--port" in one_line_error(p)


def test_port_filter_and_sizes():
    from replay.cli.capture import parse_seconds, parse_size
    from replay.sources.live import port_filter

    assert port_filter([80, 8080], 1) == \
        "(tcp port 80 or tcp port 8080) or (vlan and (tcp port 80 or tcp port 8080))"
    assert port_filter([80], 113) == "tcp port 80"
    assert parse_size("65536", 1024, "-B") == 64 << 20
    assert parse_size("64M", 1024, "-B") == 64 << 20 == parse_size("64MiB", 1, "x")
    assert parse_size("1g", 1, "x") == 1 << 30
    assert parse_seconds("15m", "x") == 900 and parse_seconds("2", "x") == 2


def test_expand_name():
    from replay.capture import expand_name

    t = time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1))
    assert expand_name("c-%Y%m%d-%H%M%S.rlog", t, set()) == "c-20240506-070809.rlog"
    assert expand_name("c.rlog", t, {"c.rlog"}) == "c.1.rlog"
    assert expand_name("c.rlog", t, {"c.rlog", "c.1.rlog"}) == "c.2.rlog"
    assert expand_name("dir.v2/c", t, {"dir.v2/c"}) == "dir.v2/c.1"


ATTACK = textwrap.dedent(r'''
    """A client sending a 100 KB header line in 1460-byte writes, 2 ms apart."""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    try:
        for i in range(0, len(req), 1460):
            s.sendall(req[i:i + 1460])
            time.sleep(0.002)
        print(s.recv(100).split(b"\r\n")[0].decode())
    except OSError as e:  # the server may answer and close before the last write
        print("closed", e)
''')


def test_oversized_head_cannot_stall_a_live_capture(ns, server, tmp_path):
    out = tmp_path / "attack.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--duration", "4", "--immediate")
    script = tmp_path / "attack.py"
    script.write_text(ATTACK)
    t0 = time.monotonic()
    r = ns.run([sys.executable, str(script), "127.0.0.1", str(PORT)], capture_output=True,
               text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    curl(ns, f"http://127.0.0.1:{PORT}/after")
    rc, err = cap.wait(timeout=20)
    assert rc == 0, err
    assert time.monotonic() - t0 < 10, "--duration did not hold"
    msgs, _ = read_log(out)
    reqs = {m.uri: m for m in msgs if m.kind == KIND_REQUEST}
    assert "/after" in reqs and not reqs["/after"].flags & F_INCOMPLETE
    assert reqs["/big"].flags & F_INCOMPLETE and len(reqs["/big"].data) == 64 << 10
    assert "oversize heads: 1" in err


def test_capture_to_kafka(ns, server, tmp_path):
    """``capture -o kafka://``: a Kafka-protocol broker in the namespace (``kafka_broker.py``),
    the capture writes one record per message, and the topic read back holds the requests."""
    import kafka_broker as kb

    why = kb.missing()
    if why:
        pytest.skip(why)
    port = 19092
    url = f"tcp://127.0.0.1:{port}"
    broker = ns.popen([kb.binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                       url, "--storage-engine", "memory://tansu/"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ns.wait_port(port), "the broker did not start"
        topic = f"kafka://127.0.0.1:{port}/captured"
        cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", topic)
        run_client(ns, tmp_path, "127.0.0.1", "10")
        time.sleep(0.2)
        rc, err = cap.stop()
        assert rc == 0, err
        assert "Traceback" not in err and f"-> {topic}" in err, err
        out = tmp_path / "back.rlog"
        p = ns.run(replay_argv("convert", topic, "-o", out), capture_output=True, text=True,
                   env=env(), timeout=60)
        assert p.returncode == 0, p.stderr
        msgs, _ = read_log(out)
        assert [m.uri for m in msgs if m.kind == 0] == [f"/n/{i}" for i in range(10)]
        assert sum(1 for m in msgs if m.kind == 1 and m.status == 200) == 10
    finally:
        broker.terminate()
        broker.wait(5)

