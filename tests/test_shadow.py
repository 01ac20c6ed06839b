"""``replay shadow`` in network namespaces: a production server and staging servers on other ports
(Python servers that log each request), real clients, and the staging logs as the truth.

Every test needs root (network namespaces, packet capture) and skips with the reason otherwise.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.test_capture import (PORT, SERVER, Server, curl, env, netns_available, replay_argv,
                                run_client)

sys.path.insert(0, str(__import__("tests.conftest").conftest.ROOT / "benchmarks"))
from netns import Netns  # noqa: E402

_ok, _why = netns_available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"needs network namespaces: {_why}")

STAGING, STAGING2, HUNG = 8081, 8082, 8083

# the test server, logging also the client's port: one staging connection per production one
PEER_SERVER = SERVER.replace('"len": len(body),', '"len": len(body), "peer": self.client_address[1],')

HUNG_SERVER = textwrap.dedent(r'''
    """Accepts connections, reads what comes, never answers."""
    import socket, sys, threading
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(512)
    def sink(c):
        while c.recv(65536):
            pass
    while True:
        c, _ = s.accept()
        threading.Thread(target=sink, args=(c,), daemon=True).start()
''')


class PeerServer(Server):
    def __init__(self, ns, workdir, port):
        d = workdir / f"s{port}"
        d.mkdir()
        (d / "server.py").write_text(PEER_SERVER)
        self.ns, self.port = ns, port
        self.script = d / "server.py"
        self.log = d / "log.jsonl"
        self.log.write_text("")
        self.proc = ns.popen([sys.executable, str(self.script), str(port), str(self.log)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not ns.wait_port(port, timeout=10):
            self.proc.kill()
            raise RuntimeError("test server did not start")


class Shadow:
    """``replay shadow`` running inside a namespace."""

    def __init__(self, ns, *args):
        self.proc = subprocess.Popen(ns.argv(replay_argv("shadow", "-i", "lo", "--port", PORT, *args)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env(), start_new_session=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        if not self.ready.wait(15):
            self.proc.kill()
            raise AssertionError("shadow did not start: " + "".join(self.lines))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "shadowing" in line:
                self.ready.set()
        self.ready.set()

    def stop(self, timeout=20) -> tuple[int, str, float]:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("shadow did not stop: " + "".join(self.lines))
        took = time.monotonic() - t0
        self._t.join(5)
        return self.proc.returncode, "".join(self.lines), took


@pytest.fixture
def ns():
    with Netns("replay-shadow") as n:
        yield n


def wait_count(server, n, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and server.mark() < n:
        time.sleep(0.05)
    return server.entries()


def key(e):
    return (e["method"], e["uri"], e["sha"])


def per_connection(entries):
    """The request sequences of each connection, as a multiset (order kept within each)."""
    by_peer = collections.defaultdict(list)
    for e in entries:
        by_peer[e["peer"]].append(key(e))
    return collections.Counter(tuple(v) for v in by_peer.values())


def traffic(ns, tmp_path, tag):
    for i in range(4):
        curl(ns, f"http://127.0.0.1:{PORT}/{tag}/curl/{i}?x=1")
    curl(ns, "-X", "POST", "--data-binary", "hello shadow", f"http://127.0.0.1:{PORT}/{tag}/post")
    run_client(ns, tmp_path, "127.0.0.1", "bodies")
    run_client(ns, tmp_path, "127.0.0.1", "15")


def test_shadow_one_target_gets_every_request_in_order(ns, tmp_path):
    prod = PeerServer(ns, tmp_path, PORT)
    staging = PeerServer(ns, tmp_path, STAGING)
    sh = Shadow(ns, "--target", f"http://127.0.0.1:{STAGING}")
    traffic(ns, tmp_path, "one")
    want = prod.entries()
    got = wait_count(staging, len(want))
    rc, out, _ = sh.stop()
    assert rc == 0, out
    assert collections.Counter(map(key, got)) == collections.Counter(map(key, want))
    assert per_connection(got) == per_connection(want)
    assert f"sent {len(want)}, answered {len(want)}, dropped 0, errors 0" in out, out


def test_shadow_mirrors_to_two_targets_and_splits(ns, tmp_path):
    prod = PeerServer(ns, tmp_path, PORT)
    a = PeerServer(ns, tmp_path, STAGING)
    b = PeerServer(ns, tmp_path, STAGING2)
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "-t", f"http://127.0.0.1:{STAGING2}")
    traffic(ns, tmp_path, "mirror")
    want = prod.entries()
    for s in (a, b):
        got = wait_count(s, len(want))
        assert collections.Counter(map(key, got)) == collections.Counter(map(key, want))
        assert per_connection(got) == per_connection(want)
    rc, out, _ = sh.stop()
    assert rc == 0, out

    base, base_a, base_b = prod.mark(), a.mark(), b.mark()
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "-t", f"http://127.0.0.1:{STAGING2}",
                "--split")
    for i in range(12):                    # 12 production connections
        curl(ns, f"http://127.0.0.1:{PORT}/split/{i}")
    run_client(ns, tmp_path, "127.0.0.1", "bodies")
    want = prod.entries()[base:]
    end = time.monotonic() + 10
    while time.monotonic() < end and a.mark() - base_a + b.mark() - base_b < len(want):
        time.sleep(0.05)
    rc, out, _ = sh.stop()
    assert rc == 0, out
    got_a, got_b = a.entries()[base_a:], b.entries()[base_b:]
    assert got_a and got_b                 # 14 connections: both get some (hash, fixed ids)
    assert not {e["uri"] for e in got_a} & {e["uri"] for e in got_b}
    assert collections.Counter(map(key, got_a + got_b)) == collections.Counter(map(key, want))
    assert per_connection(got_a + got_b) == per_connection(want)


def test_shadow_hung_target_is_isolated(ns, tmp_path):
    prod = PeerServer(ns, tmp_path, PORT)
    good = PeerServer(ns, tmp_path, STAGING)
    hung_script = tmp_path / "hung.py"
    hung_script.write_text(HUNG_SERVER)
    ns.popen([sys.executable, str(hung_script), str(HUNG)], stdout=subprocess.DEVNULL)
    assert ns.wait_port(HUNG, timeout=10)
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "-t", f"http://127.0.0.1:{HUNG}",
                "--queue", "40", "--timeout", "30", "--drain", "1")
    t0 = time.monotonic()
    for i in range(20):
        curl(ns, f"http://127.0.0.1:{PORT}/hung/{i}")
    run_client(ns, tmp_path, "127.0.0.1", "30")
    assert time.monotonic() - t0 < 15       # production is not slowed
    want = prod.entries()
    got = wait_count(good, len(want))
    missing = collections.Counter(map(key, want)) - collections.Counter(map(key, got))
    rc, out, took = sh.stop()
    assert not missing, (missing, out)
    assert rc == 0, out
    assert took < 1 + 9, (took, out)        # --drain 1, then the summary and exit (CI shares 2 cores)
    lines = [ln for ln in out.splitlines() if f":{HUNG}:" in ln]
    assert len(lines) == 1, out
    line = lines[0]
    assert "answered 0" in line and "queue_full" in line, line
    # what the hung target took is either waiting (dropped: drain) or sent (errors: interrupted)
    n = len(want)
    import re
    sent = int(re.search(r"sent (\d+)", line).group(1))
    dropped = int(re.search(r"dropped (\d+)", line).group(1))
    errors = int(re.search(r"errors (\d+)", line).group(1))
    assert sent == errors and sent + dropped == n, line
    good_line = [ln for ln in out.splitlines() if f":{STAGING}:" in ln][0]
    assert f"answered {n}, dropped 0, errors 0" in good_line, good_line


def test_shadow_refuses_the_captured_server(ns):
    r = ns.run(replay_argv("shadow", "-i", "lo", "--port", PORT, "-t", f"http://127.0.0.1:{PORT}"),
               capture_output=True, text=True, timeout=30, env=env())
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "captured server" in lines[0] and "loop" in lines[0], r.stderr
