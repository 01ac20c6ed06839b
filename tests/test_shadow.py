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

STAGING, STAGING2, HUNG, RESET = 8081, 8082, 8083, 8084

# the test server, logging also the client's port: one staging connection per production one
PEER_SERVER = SERVER.replace('"len": len(body),', '"len": len(body), "peer": self.client_address[1], '
                                                  '"copy": self.headers.get("X-Replay-Copy"),')

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


RESET_SERVER = textwrap.dedent(r'''
    """Accepts connections, reads a request, resets the connection (RST: SO_LINGER 0)."""
    import socket, struct, sys, threading
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(512)
    def reset(c):
        c.recv(65536)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    while True:
        c, _ = s.accept()
        threading.Thread(target=reset, args=(c,), daemon=True).start()
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


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (the shadow runs under ``ip netns exec``)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return []
    out = []
    for k in map(int, kids):
        out += [k, *_children(k)]
    return out


def start_script(ns, tmp_path, source: str, port: int):
    script = tmp_path / f"srv{port}.py"
    script.write_text(source)
    ns.popen([sys.executable, str(script), str(port)], stdout=subprocess.DEVNULL)
    assert ns.wait_port(port, timeout=10)


def test_shadow_amplify_copies_each_connection(ns, tmp_path):
    prod = PeerServer(ns, tmp_path, PORT)
    staging = PeerServer(ns, tmp_path, STAGING)
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "--amplify", "3",
                "--copy-header", "X-Replay-Copy")
    traffic(ns, tmp_path, "amp")
    want = prod.entries()
    got = wait_count(staging, 3 * len(want))
    rc, out, _ = sh.stop()
    assert rc == 0, out
    assert len(got) == 3 * len(want), out
    for copy in "123":
        mine = [e for e in got if e["copy"] == copy]
        assert collections.Counter(map(key, mine)) == collections.Counter(map(key, want)), copy
    # each copy of a production connection is a staging connection of its own, in order
    assert per_connection(got) == collections.Counter(
        {seq: 3 * n for seq, n in per_connection(want).items()})
    assert f"sent {3 * len(want)}, answered {3 * len(want)}, dropped 0" in out, out

    # 1.5: every production connection once or twice, some of each (a stable hash of its id)
    base, base_s = prod.mark(), staging.mark()
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "--amplify", "1.5")
    for i in range(24):
        curl(ns, f"http://127.0.0.1:{PORT}/half/{i}")
    want = prod.entries()[base:]
    time.sleep(1.0)
    rc, out, _ = sh.stop()
    got = staging.entries()[base_s:]
    times = collections.Counter(e["uri"] for e in got)
    assert set(times) == {e["uri"] for e in want}, out
    assert set(times.values()) == {1, 2}, times
    assert 6 <= sum(1 for v in times.values() if v == 2) <= 18, times


def test_shadow_output_log_is_a_report_input(ns, tmp_path):
    from replay.events import F_REPLAYED, KIND_REQUEST
    from replay.log import LogReader

    prod = PeerServer(ns, tmp_path, PORT)
    PeerServer(ns, tmp_path, STAGING)
    PeerServer(ns, tmp_path, STAGING2)
    out_log = tmp_path / "shadow.rlog"
    report_json = tmp_path / "shadow.json"
    a, b = f"http://127.0.0.1:{STAGING}", f"http://127.0.0.1:{STAGING2}"
    sh = Shadow(ns, "-t", a, "-t", b, "--amplify", "2", "-o", out_log, "--report", report_json)
    traffic(ns, tmp_path, "out")
    want = prod.entries()
    time.sleep(1.5)
    rc, out, _ = sh.stop()
    assert rc == 0, out
    n = len(want)
    msgs = list(LogReader(str(out_log)))
    meta = LogReader(str(out_log)).meta
    assert meta["command"] == "shadow" and meta["targets"] == [a, b] and meta["copies"] == 2
    stride = meta["conn_stride"]
    captured = [m for m in msgs if not m.flags & F_REPLAYED]
    replayed = [m for m in msgs if m.flags & F_REPLAYED]
    assert sum(m.kind == KIND_REQUEST for m in captured) == n
    assert sum(m.kind != KIND_REQUEST for m in captured) == n
    prod_keys = collections.Counter((m.conn, m.index) for m in captured if m.kind == KIND_REQUEST)
    for slot in range(4):         # target * copies + copy
        mine = [m for m in replayed if m.conn // stride == slot]
        reqs = collections.Counter((m.conn % stride, m.index) for m in mine if m.kind == KIND_REQUEST)
        assert reqs == prod_keys, slot
        assert sum(m.kind != KIND_REQUEST and m.status == 200 for m in mine) == n, slot
    rep = __import__("json").loads(report_json.read_text())
    assert [t["answered"] for t in rep["targets"]] == [2 * n, 2 * n]

    # the log is an input of replay report: staging against production, and one target
    # against the other (both releases shadowed at once)
    r = ns.run(replay_argv("report", out_log), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "--target" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    js = tmp_path / "r.json"
    r = ns.run(replay_argv("report", out_log, "--target", b, "--json", js, "--fail-on", "status"),
               capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rj = __import__("json").loads(js.read_text())
    assert rj["totals"]["exchanges"] == 2 * n, rj["totals"]
    assert rj["totals"]["unmatched"]["recorded"] == 0
    r = ns.run(replay_argv("report", out_log, "--target", b, "--baseline", out_log,
                           "--baseline-target", a, "--json", js, "--fail-on", "status"),
               capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rj = __import__("json").loads(js.read_text())
    assert rj["totals"]["unmatched"]["baseline"] == 0 and rj["totals"]["exchanges"] == 2 * n


def test_shadow_closes_target_connections_with_production(ns, tmp_path):
    prod = PeerServer(ns, tmp_path, PORT)
    staging = PeerServer(ns, tmp_path, STAGING)
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "--idle", "600")
    for i in range(5):
        curl(ns, f"http://127.0.0.1:{PORT}/close/{i}")      # each curl: a connection, then FIN
    wait_count(staging, len(prod.entries()))

    def open_to_staging():
        r = ns.run(["ss", "-Htn", "state", "established", f"( dport = :{STAGING} )"],
                   capture_output=True, text=True, timeout=10)
        return len(r.stdout.splitlines())

    end = time.monotonic() + 5
    while time.monotonic() < end and open_to_staging():
        time.sleep(0.1)
    still = open_to_staging()
    rc, out, _ = sh.stop()
    assert still == 0, out
    assert rc == 0 and "answered 5, dropped 0, errors 0" in out, out


def test_shadow_resetting_target_loses_no_production_request(ns, tmp_path):
    from replay.events import F_REPLAYED, KIND_REQUEST
    from replay.log import LogReader

    prod = PeerServer(ns, tmp_path, PORT)
    start_script(ns, tmp_path, RESET_SERVER, RESET)
    out_log = tmp_path / "reset.rlog"
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{RESET}", "-o", out_log, "--drain", "1")
    traffic(ns, tmp_path, "reset")
    want = prod.entries()
    time.sleep(1.0)
    rc, out, _ = sh.stop()
    assert rc == 0, out
    msgs = list(LogReader(str(out_log)))
    captured = collections.Counter((m.method, m.uri) for m in msgs
                                   if m.kind == KIND_REQUEST and not m.flags & F_REPLAYED)
    assert captured == collections.Counter((e["method"], e["uri"]) for e in want)
    line = [ln for ln in out.splitlines() if f":{RESET}:" in ln][0]
    assert "answered 0" in line and "reset" in line, line
    import re
    sent = int(re.search(r"sent (\d+)", line).group(1))
    errors = int(re.search(r"errors (\d+)", line).group(1))
    dropped = int(re.search(r"dropped (\d+)", line).group(1))
    assert sent == errors and sent + dropped == len(want) and sent > 0, line
    failed = [m for m in msgs if m.flags & F_REPLAYED and m.kind != KIND_REQUEST]
    assert len(failed) == errors            # each failure has its record, naming the error


def test_shadow_hung_target_memory_stays_bounded(ns, tmp_path):
    PeerServer(ns, tmp_path, PORT)
    start_script(ns, tmp_path, HUNG_SERVER, HUNG)
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{HUNG}", "--queue", "200", "--timeout", "600",
                "--drain", "0.5")
    run_client(ns, tmp_path, "127.0.0.1", "bodies")
    run_client(ns, tmp_path, "127.0.0.1", "300")
    first = rss_kib(sh.proc.pid)
    for _ in range(3):
        run_client(ns, tmp_path, "127.0.0.1", "bodies")
        run_client(ns, tmp_path, "127.0.0.1", "300")
    later = rss_kib(sh.proc.pid)
    rc, out, took = sh.stop()
    assert rc == 0, out
    # three times the traffic after the queue is full: what is held does not grow with it
    assert later - first < 24 * 1024, (first, later)


def test_shadow_dry_run_and_rules(ns, tmp_path):
    prod = PeerServer(ns, tmp_path, PORT)
    staging = PeerServer(ns, tmp_path, STAGING)
    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "--dry-run")
    for i in range(3):
        curl(ns, f"http://127.0.0.1:{PORT}/dry/{i}")
    time.sleep(0.5)
    rc, out, _ = sh.stop()
    assert rc == 0, out
    printed = sh.proc.stdout.read()
    assert [ln.split()[-3] for ln in printed.splitlines()] == [f"/dry/{i}" for i in range(3)], printed
    assert staging.entries() == [] and "3 requests would have been sent" in out

    sh = Shadow(ns, "-t", f"http://127.0.0.1:{STAGING}", "--method", "GET",
                "--path-exclude", "^/admin", "--set-header", "X-Replay-Copy: shadowed")
    curl(ns, f"http://127.0.0.1:{PORT}/keep/1")
    curl(ns, f"http://127.0.0.1:{PORT}/admin/1")
    curl(ns, "-X", "POST", "--data-binary", "x", f"http://127.0.0.1:{PORT}/keep/post")
    curl(ns, f"http://127.0.0.1:{PORT}/keep/2")
    got = wait_count(staging, 2)
    time.sleep(0.5)
    rc, out, _ = sh.stop()
    assert rc == 0, out
    got = staging.entries()
    assert [(e["method"], e["uri"], e["copy"]) for e in got] == \
        [("GET", "/keep/1", "shadowed"), ("GET", "/keep/2", "shadowed")]
    assert len(prod.entries()) == 4 + 3
