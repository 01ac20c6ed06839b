"""The send loop of a replay over plain http (``replay._sendloop`` and its pure twin): both
twins, on real TCP sockets on loopback, under the event loops a replay uses, give a protocol
the same calls as an asyncio transport would: every byte written reaches the peer in order
(including what the socket could not take at once), every byte the peer sent is handed over,
nothing after ``close()``, the peer's end once (kept open if the protocol says so), a reset, a
close or an error of the protocol each end the connection once, on the event loop; what a read
asks to run after it runs after every read of that call, and not for a connection that ended.

Then whole replays, timed and at full speed, with and without the send loop, against one sink:
the same requests sent on the same connections in the same order, the same answers counted.
"""

from __future__ import annotations

import asyncio
import collections
import select
import socket
import struct
import time

import pytest
from play_helpers import SinkThread, spread_capture

if not hasattr(select, "epoll"):
    pytest.skip("the send loop is for Linux (epoll)", allow_module_level=True)

from replay import _sendloop_py as pure  # noqa: E402
from replay.play import session as ps
from replay.play.scheduler import Schedule
from replay.play.sender import Options, parse_target
from replay.play.source import RecordedSource

try:
    from replay import _sendloop as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

TWINS = [pure] + ([compiled] if compiled is not None else [])
IDS = ["pure"] + (["compiled"] if compiled is not None else [])


def _loops():
    out = [asyncio.new_event_loop]
    try:
        import uvloop

        out.append(uvloop.new_event_loop)
    except ImportError:      # pragma: no cover
        pass
    return out


LOOPS = _loops()


class Rec(asyncio.Protocol):
    """A protocol that writes down every call, and can ask for a call after each read."""

    def __init__(self, loop, after=False):
        self.loop = loop
        self.events = []
        self.data = bytearray()
        self.after = after
        self.lost = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data
        if self.after:
            self.transport.after_read(lambda n=len(self.data): self.events.append(("after", n)))

    def eof_received(self):
        self.events.append("eof")
        return False

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc is not None else None))
        if not self.lost.done():
            self.lost.set_result(exc)


def _pair(loop, twin, after=False, by_loop=False, cls=None, rcvbuf=None, family=socket.AF_INET):
    """A SendLoop on ``loop``, one of its transports connected (by the send loop, or by the
    event loop) to a server socket accepted here, its protocol a ``cls`` (``Rec``); (send
    loop, protocol, server socket)."""
    lsn = socket.socket(family)
    lsn.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    lsn.listen(1)
    sock = socket.socket(family)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sl = twin.SendLoop(loop)
    sl.start()
    if by_loop:
        loop.run_until_complete(loop.sock_connect(sock, lsn.getsockname()))
    else:
        loop.run_until_complete(asyncio.wait_for(sl.connect(sock, lsn.getsockname()[:2]), 10))
        assert list(sl.connecting) == [sock.fileno()]      # until it has its transport
    srv, _ = lsn.accept()
    lsn.close()
    proto = (cls or Rec)(loop, after)
    sl.transport(sock, proto)
    return sl, proto, srv


def _until(loop, cond, timeout=10.0):
    async def wait():
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "timed out"
            await asyncio.sleep(0.001)
    loop.run_until_complete(wait())


def _recv_all(srv, n, timeout=10.0):
    srv.settimeout(timeout)
    got = bytearray()
    while len(got) < n:
        b = srv.recv(1 << 20)
        if not b:
            break
        got += b
    return bytes(got)


@pytest.fixture(params=LOOPS, ids=lambda f: f.__module__.split(".")[0])
def loop(request):
    lp = request.param()
    yield lp
    lp.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
@pytest.mark.parametrize("by_loop", [False, True], ids=["own-connect", "loop-connect"])
def test_bytes_both_ways_then_the_peers_end(loop, twin, by_loop):
    sl, proto, srv = _pair(loop, twin, by_loop=by_loop)
    assert not sl.connecting
    t = proto.transport
    assert t.get_extra_info("peername") == srv.getsockname()
    assert t.get_extra_info("sockname") == srv.getpeername()
    t.write(b"GET / HTTP/1.1\r\n\r\n")
    t.write(bytearray(b"second"))
    t.write(memoryview(b"-third"))
    assert _recv_all(srv, 30) == b"GET / HTTP/1.1\r\n\r\nsecond-third"
    srv.sendall(b"HTTP/1.1 200 OK\r\n")
    _until(loop, lambda: len(proto.data) == 17)
    srv.sendall(b"Content-Length: 0\r\n\r\n")
    srv.shutdown(socket.SHUT_WR)
    loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert bytes(proto.data) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert proto.events == ["made", "data", "eof", ("lost", None)]
    assert t.is_closing() and not sl.transports
    t.write(b"ignored")          # after the end: nothing happens, as with asyncio
    sl.close()
    srv.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_write_the_socket_cannot_take_goes_out_whole_and_in_order(loop, twin):
    """16 MiB to a peer that does not read yet: the rest waits for the socket, later writes
    queue behind it, ``close`` sends it all before the end."""
    sl, proto, srv = _pair(loop, twin)
    t = proto.transport
    big = bytes(range(256)) * (16 * 4096)
    t.write(big)
    assert len(t.pending) > 0            # the socket took only part of it
    t.write(b"tail")
    t.close()
    assert t.is_closing() and proto.events == ["made"]     # not lost before it is written
    got = bytearray()
    srv.setblocking(False)

    async def drain():
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                b = srv.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not b:
                return
            got.extend(b)
    loop.run_until_complete(drain())
    loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert bytes(got) == big + b"tail"
    assert proto.events == ["made", ("lost", None)]
    sl.close()
    srv.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_reset_ends_the_connection_with_its_error(loop, twin):
    sl, proto, srv = _pair(loop, twin)
    proto.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    _recv_all(srv, 18)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    srv.close()                                  # RST
    exc = loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert isinstance(exc, ConnectionResetError)
    assert proto.events == ["made", ("lost", "ConnectionResetError")]
    sl.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_write_to_a_reset_connection_ends_it_with_its_error(loop, twin):
    sl, proto, srv = _pair(loop, twin)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    srv.close()
    time.sleep(0.05)                             # the RST is in before the loop looks
    proto.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    exc = loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert isinstance(exc, (ConnectionResetError, BrokenPipeError))
    assert proto.events[0] == "made" and proto.events.count(proto.events[-1]) == 1
    sl.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_abort_ends_at_once_and_tells_the_protocol_on_the_loop(loop, twin):
    sl, proto, srv = _pair(loop, twin)
    t = proto.transport
    t.write(b"x" * (8 << 20))            # (what waits is dropped)
    t.abort()
    assert proto.events == ["made"] and t.is_closing()       # connection_lost comes soon
    t.abort()
    t.close()
    loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert proto.events == ["made", ("lost", None)]
    srv.settimeout(10)
    while srv.recv(1 << 20):             # the peer sees the end (after what left before it)
        pass
    sl.close()
    srv.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_what_a_read_asks_runs_after_the_reads_unless_the_connection_ended(loop, twin):
    sl, proto, srv = _pair(loop, twin, after=True)
    srv.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    _until(loop, lambda: ("after", 27) in proto.events)
    assert proto.events == ["made", "data", ("after", 27)]
    # an answer and the peer's end in one go: the end is read in the same call, the callback
    # of the read before it does not run (the connection is over)
    srv.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    srv.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert proto.events == ["made", "data", ("after", 27), "data", "eof", ("lost", None)]
    assert sl.calls >= 2
    sl.close()
    srv.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_refused_connect_and_one_given_up(loop, twin):
    """A port nobody listens on: the future fails with ConnectionRefusedError and the socket
    leaves the set; a connect given up (``forget``) leaves nothing behind either."""
    sl = twin.SendLoop(loop)
    sl.start()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    addr = free.getsockname()
    free.close()
    sock = socket.socket()
    sock.setblocking(False)
    with pytest.raises(ConnectionRefusedError):
        loop.run_until_complete(asyncio.wait_for(sl.connect(sock, addr), 10))
    assert not sl.connecting and not sl.transports
    sock.close()
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)
    sock = socket.socket()
    sock.setblocking(False)
    fut = sl.connect(sock, lsn.getsockname())
    fut.cancel()                  # as a timeout would
    sl.forget(sock)
    sock.close()
    loop.run_until_complete(asyncio.sleep(0.05))
    assert not sl.connecting and not sl.transports
    sl.close()
    lsn.close()


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_many_connections_each_get_their_own_bytes(loop, twin):
    n = 40
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(n)
    sl = twin.SendLoop(loop)
    sl.start()
    protos, servers = [], []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        loop.run_until_complete(sl.connect(s, lsn.getsockname()))
        servers.append(lsn.accept()[0])
        p = Rec(loop)
        sl.transport(s, p)
        protos.append(p)
    for i, (p, srv) in enumerate(zip(protos, servers)):
        p.transport.write(b"req %d" % i)
    for i, (p, srv) in enumerate(zip(protos, servers)):
        assert _recv_all(srv, len(b"req %d" % i)) == b"req %d" % i
        srv.sendall(b"answer %d " % i * (1 + i * 997))
        srv.close()
    loop.run_until_complete(asyncio.wait_for(asyncio.gather(*(p.lost for p in protos)), 20))
    for i, p in enumerate(protos):
        assert bytes(p.data) == b"answer %d " % i * (1 + i * 997)
        assert p.events == ["made", "data", "eof", ("lost", None)]
    assert not sl.transports
    sl.close()
    lsn.close()


# -- whole replays, with and without the send loop --------------------------------------------

def _replay(plan, url, send_loop, speed=None, timed_pump=True):
    tgt = parse_target(url)
    sched = Schedule(plan.t0, plan.span_ns, plan.requests, speed=speed)
    s = ps.PlaySession(plan, sched, tgt, Options(connections=64, timeout=10, send_loop=send_loop,
                                                 timed_pump=timed_pump),
                       ps.About("in", tgt.display))
    report = s.run()
    used = s.player.send_loop is not None
    assert used is send_loop and (not used or s.player.send_loop.calls > 0)
    dues = s.player.dues
    assert (dues is not None) is (timed_pump and speed is not None)
    if dues is not None and speed == 1.0:
        assert dues.n > 0             # answers let requests go, each at its deadline
    return report


def _sent(log, stream, *args):
    """A replay of ``log`` against a sink (``_replay(plan, url, *args)``): its report, and what
    it sent, as the comparisons below need it."""
    src = RecordedSource(log, stream=stream)
    with SinkThread() as sink:
        plan = src.plan(parse_target(sink.url).host_header)
        report = _replay(plan, sink.url, *args)
        order = {c: [r.split(b" ")[1] for r in v] for c, v in sink.by_conn().items()}
    d = report.to_dict()
    return report, (d["attempted"], d["answered"], d["sent"], d["bytes"], d["errors"],
                    d["statuses"], d["connections"]["opened"],
                    collections.Counter(tuple(v) for v in order.values()))


@pytest.mark.parametrize("speed", [None, 10.0], ids=["max", "10x"])
@pytest.mark.parametrize("stream", [False, True], ids=["planned", "streamed"])
def test_replay_sends_the_same_with_and_without_the_send_loop(tmp_path, stream, speed):
    from tests.test_play_stream import to_log

    cap = spread_capture(tmp_path / "in.pcap", n=300, conns=12, span_ns=300_000_000)
    log = to_log(str(cap), tmp_path / "in.rlog")
    got = {send_loop: _sent(log, stream, send_loop, speed)[1] for send_loop in (True, False)}
    assert got[True][1] == 300 and got[True] == got[False]


@pytest.mark.parametrize("speed", [1.0, 10.0], ids=["1x", "10x"])
@pytest.mark.parametrize("send_loop,stream", [(True, True), (False, True), (True, False)],
                         ids=["sendloop-streamed", "asyncio-streamed", "sendloop-planned"])
def test_timed_replay_sends_the_same_with_and_without_the_timed_pump(tmp_path, send_loop, stream,
                                                                    speed):
    """A timed replay whose answers send the next requests at their deadlines (``DueSends``)
    sends what the connection tasks alone send: the same requests, on the same connections, in
    the same order, with the same counts; and each request is sent at or after its deadline (no
    lateness below zero)."""
    from tests.test_play_stream import to_log

    cap = spread_capture(tmp_path / "in.pcap", n=300, conns=12, span_ns=300_000_000)
    log = to_log(str(cap), tmp_path / "in.rlog")
    got = {}
    for timed_pump in (True, False):
        report, got[timed_pump] = _sent(log, stream, send_loop, speed, timed_pump)
        assert min(report.lateness) >= 0 and len(report.lateness) == 300
    assert got[True][1] == 300 and got[True] == got[False]


def _limited(tmp_path, cap, stream, limit):
    """A 1x replay of ``cap`` (as a log: planned whole or streamed) with ``--limit``: the session,
    its schedule, its report and the request targets the sink got, sorted."""
    from tests.test_play_stream import to_log

    log = to_log(str(cap), tmp_path / "in.rlog")
    src = RecordedSource(log, stream=stream)
    with SinkThread() as sink:
        plan = src.plan(parse_target(sink.url).host_header)
        tgt = parse_target(sink.url)
        sched = Schedule(plan.t0, plan.span_ns, plan.requests, speed=1.0)
        s = ps.PlaySession(plan, sched, tgt, Options(connections=8, timeout=10, limit=limit),
                           ps.About("in", tgt.display))
        report = s.run()
        got = sorted(r.split(b" ")[1] for v in sink.by_conn().values() for r in v)
    return s, sched, report, got


@pytest.mark.parametrize("stream", [False, True], ids=["planned", "streamed"])
def test_timed_limit_ends_the_run_without_waiting_for_held_deadlines(tmp_path, stream):
    """``--limit`` reached while another connection holds its next request for a deadline a
    second away: that connection's task is told at once, and the run ends then, not at that
    deadline (requests 1 s apart, alternating between two connections; the 4th is due at 3 s)."""
    cap = spread_capture(tmp_path / "in.pcap", n=8, conns=2, span_ns=7_000_000_000)
    s, sched, report, got = _limited(tmp_path, cap, stream, 3)
    d = report.to_dict()
    assert d["attempted"] == d["sent"] == d["answered"] == 3
    assert got == [b"/r/0", b"/r/1", b"/r/2"]
    if not stream:        # (streamed, the 4th is handed to its connection 0.3 s before it is due)
        assert s.player.dues.n >= 1                   # the 4th was held for its deadline
    assert report.ended_ns < sched.start + 2_800_000_000


@pytest.mark.parametrize("stream", [False, True], ids=["planned", "streamed"])
def test_timed_limit_counts_requests_in_deadline_order(tmp_path, stream):
    """``--limit 2`` with connection A's requests at 0 and 100 ms and connection B's first at
    350 ms: A's two are sent, not B's, also when B's task is made as its first request is handed
    over (streamed, 300 ms ahead); a request is tried from ``lead`` before it is due."""
    from play_helpers import MS, T0, get, ok_response, write_capture

    cap = write_capture(tmp_path / "in.pcap", [
        [(T0, get("/a/0"), ok_response()), (T0 + 100 * MS, get("/a/1"), ok_response())],
        [(T0 + 350 * MS, get("/b/0"), ok_response()), (T0 + 400 * MS, get("/b/1"), ok_response())],
    ])
    report, got = _limited(tmp_path, cap, stream, 2)[2:]
    d = report.to_dict()
    assert got == [b"/a/0", b"/a/1"]
    assert d["attempted"] == d["sent"] == d["answered"] == 2


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback (::1) here")
@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_ipv6_connections(loop, twin):
    sl, proto, srv = _pair(loop, twin, family=socket.AF_INET6)
    assert proto.transport.get_extra_info("peername")[:2] == srv.getsockname()[:2]
    proto.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    assert _recv_all(srv, 18) == b"GET / HTTP/1.1\r\n\r\n"
    srv.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    srv.close()
    loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert bytes(proto.data) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert proto.events == ["made", "data", "eof", ("lost", None)]
    sl.close()


class Half(Rec):
    """Keeps its side open at the peer's end (``eof_received`` true), as a half-closed client."""

    def eof_received(self):
        self.events.append("eof")
        return True


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_the_peers_end_kept_open_is_read_once_and_writes_still_go(loop, twin):
    sl, proto, srv = _pair(loop, twin, cls=Half)
    srv.sendall(b"bye")
    srv.shutdown(socket.SHUT_WR)
    _until(loop, lambda: "eof" in proto.events)
    calls = sl.calls
    loop.run_until_complete(asyncio.sleep(0.1))
    assert sl.calls - calls < 5            # nothing left to read: no call after call
    assert proto.events == ["made", "data", "eof"] and not proto.transport.is_closing()
    proto.transport.write(b"still here")
    assert _recv_all(srv, 10) == b"still here"
    proto.transport.close()
    loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert proto.events[-1] == ("lost", None)
    sl.close()
    srv.close()


class ClosesAtOnce(Rec):
    def data_received(self, data):
        super().data_received(data)
        self.transport.write(b"w" * (8 << 20))      # (more than the socket takes at once)
        self.transport.close()                    # closing, not closed: that waits first


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_nothing_is_read_after_close(loop, twin):
    """A protocol that closes in ``data_received`` while more bytes wait to be read (more than
    one read takes) gets no more of them, while what it wrote before closing waits to go."""
    import threading

    sl, proto, srv = _pair(loop, twin, cls=ClosesAtOnce, rcvbuf=4 << 20)
    srv.settimeout(10)
    srv.sendall(b"z" * (2 << 20))
    srv.shutdown(socket.SHUT_WR)
    time.sleep(0.1)

    def drain():               # (our close, with bytes left unread, resets the connection)
        try:
            _recv_all(srv, 8 << 20)
        except OSError:
            pass
    reader = threading.Thread(target=drain)
    reader.start()
    loop.run_until_complete(asyncio.wait_for(proto.lost, 20))
    reader.join(20)
    assert proto.events == ["made", "data", ("lost", None)]
    assert 0 < len(proto.data) <= twin.READ_SIZE
    sl.close()
    srv.close()


class Boom(Rec):
    def data_received(self, data):
        super().data_received(data)
        raise ValueError("a bug in the protocol")


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_an_error_in_the_protocol_closes_the_connection_with_it(loop, twin):
    seen = []
    loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
    sl, proto, srv = _pair(loop, twin, cls=Boom)
    srv.sendall(b"x")
    exc = loop.run_until_complete(asyncio.wait_for(proto.lost, 10))
    assert isinstance(exc, ValueError) and proto.events == ["made", "data", ("lost", "ValueError")]
    assert [type(c["exception"]) for c in seen] == [ValueError]
    assert not sl.transports and proto.transport.protocol is None     # no cycle left
    sl.close()
    srv.close()


class Refuses(Rec):
    def connection_made(self, transport):
        raise RuntimeError("no")


@pytest.mark.parametrize("twin", TWINS, ids=IDS)
def test_a_protocol_that_fails_to_start_leaves_nothing_behind(loop, twin):
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)
    sl = twin.SendLoop(loop)
    sl.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    loop.run_until_complete(asyncio.wait_for(sl.connect(sock, lsn.getsockname()), 10))
    with pytest.raises(RuntimeError):
        sl.transport(sock, Refuses(loop))
    assert not sl.transports and not sl.connecting
    sock.close()
    # the next socket (likely the same descriptor number) works as a new one
    sl2, proto, srv = _pair(loop, twin)
    proto.transport.write(b"ok")
    assert _recv_all(srv, 2) == b"ok"
    sl.close()
    sl2.close()
    srv.close()
    lsn.close()
