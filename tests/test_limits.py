"""Size limits of the core: a head that never ends, sent by any client or server, is kept cut and
framing goes on, in every implementation and every command, at once.

Each core run here happens in a child process with a time bound, so that a framer that loops
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

import pytest

from replay.events import F_INCOMPLETE, F_INTERIM, F_RESYNC, F_TRUNCATED
from replay.limits import MAX_HEAD
from tests.flow import Flow, requests, responses, run

BOUND_S = 20


def _child(conn, impl_name, packets, opts):
    import importlib

    impl = importlib.import_module(impl_name)
    conn.send(run(impl, packets, **opts))


def run_bounded(impl, packets, **opts):
    """``run`` in a forked child; fails the test when it takes longer than BOUND_S."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, impl.__name__, packets, opts))
    p.start()
    try:
        if not parent.poll(BOUND_S):
            pytest.fail(f"the core did not return within {BOUND_S} s (a framing loop)")
        return parent.recv()
    finally:
        p.kill()
        p.join()


def big_request(n, path=b"/big"):
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * n + b"\r\n\r\n"


NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
R431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"
R200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_head_over_the_limit_in_many_segments_is_kept_cut_and_framing_goes_on(impl):
    f = Flow().handshake()
    f.c(big_request(100_000))          # 1460-byte segments: the head arrives in ~70 of them
    f.s(R431)
    f.c(NEXT)
    f.s(R200)
    f.close()
    msgs, st = run_bounded(impl, f.packets)
    reqs, resps = requests(msgs), responses(msgs)
    assert [(m.method, m.uri, m.index) for m in reqs] == [("GET", "/big", 0), ("GET", "/next", 1)]
    cut = reqs[0]
    assert cut.data == big_request(100_000)[:MAX_HEAD] and cut.head_length == MAX_HEAD
    assert cut.flags & F_INCOMPLETE and cut.flags & F_TRUNCATED and cut.body_length == 0
    # the server's refusal answers the cut request, the next request is framed and answered
    assert [(m.status, m.index) for m in resps] == [(431, 0), (200, 1)]
    assert reqs[1].data == NEXT and reqs[1].flags & F_RESYNC
    assert not resps[1].flags & (F_INCOMPLETE | F_TRUNCATED)
    assert st["oversize_heads"] == 1 and st["requests"] == 2 and st["responses"] == 2
    assert st["skipped_bytes"] == len(big_request(100_000)) - MAX_HEAD


@pytest.mark.parametrize("size", [1460, 9000, 65483])
def test_head_over_the_limit_is_cut_however_it_arrives(impl, size):
    """Whole in one delivery (loopback's 64 KiB segments, GRO on a NIC) as in 1460-byte pieces:
    the same cut request, the same next one."""
    expected = None
    for req in (big_request(100_000), big_request(MAX_HEAD + 1 - len(big_request(0)))):
        f = Flow(mss=size).handshake()
        f.c(req + NEXT)
        f.s(R431 + R200)
        f.close()
        msgs, st = run_bounded(impl, f.packets)
        reqs = requests(msgs)
        assert [(m.uri, m.index) for m in reqs] == [("/big", 0), ("/next", 1)]
        assert reqs[0].data == req[:MAX_HEAD] and reqs[0].flags & F_TRUNCATED
        assert reqs[1].data == NEXT and st["oversize_heads"] == 1
        assert [(m.status, m.index) for m in responses(msgs)] == [(431, 0), (200, 1)]
        got = [(m.data, m.flags) for m in reqs]
        if req == big_request(100_000):
            expected = expected or got
            assert got == expected


def test_head_just_under_the_limit_is_whole(impl):
    req = big_request(MAX_HEAD - len(big_request(0)))
    assert len(req) == MAX_HEAD
    f = Flow().handshake()
    f.c(req)
    f.s(R200)
    f.close()
    msgs, st = run_bounded(impl, f.packets)
    assert [m.data for m in requests(msgs)] == [req] and st["oversize_heads"] == 0
    assert not requests(msgs)[0].flags & (F_INCOMPLETE | F_TRUNCATED)


def test_the_limit_is_configurable(impl):
    f = Flow().handshake()
    f.c(big_request(100_000))
    f.s(R200)
    f.close()
    msgs, st = run_bounded(impl, f.packets, max_head=256 << 10)
    assert [m.data for m in requests(msgs)] == [big_request(100_000)] and st["oversize_heads"] == 0
    msgs, st = run_bounded(impl, f.packets, max_head=4096)
    assert len(requests(msgs)[0].data) == 4096 and st["oversize_heads"] == 1


def test_response_head_over_the_limit(impl):
    f = Flow().handshake()
    f.c(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    f.s(b"HTTP/1.1 200 OK\r\nSet-Cookie: " + b"c" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nok")
    f.c(NEXT)
    f.s(R200)
    f.close()
    msgs, st = run_bounded(impl, f.packets)
    resps = responses(msgs)
    assert [(m.status, m.index, m.uri) for m in resps] == [(200, 0, "/a"), (200, 1, "/next")]
    assert resps[0].flags & F_TRUNCATED and len(resps[0].data) == MAX_HEAD
    assert resps[1].data == R200 and st["oversize_heads"] == 1


def test_start_line_over_the_limit(impl):
    f = Flow().handshake()
    f.c(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
    f.s(R200)
    f.c(b"GET /" + b"p" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    f.c(NEXT)
    f.s(R200)
    f.close()
    msgs, st = run_bounded(impl, f.packets)
    assert [m.uri for m in requests(msgs)] == ["/first", "/next"]
    assert st["resyncs"] >= 1


def _replay_framer(impl, chunks, stats=False):
    fr = impl.ResponseFramer()
    fr.expect("GET")
    fr.expect("GET")
    out = []
    for i, c in enumerate(chunks):
        out += fr.feed(c, i)
    out += fr.eof(len(chunks))
    return (out, fr.stats()) if stats else out


def test_target_sending_an_endless_head_slowly(impl):
    wire = (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n" + R200)
    chunks = [wire[i:i + 1000] for i in range(0, len(wire), 1000)]
    t = time.monotonic()
    out = _replay_framer(impl, chunks)
    assert time.monotonic() - t < BOUND_S
    assert [(m.status, m.index, bool(m.flags & F_TRUNCATED)) for m in out] == [
        (200, 0, True), (200, 1, False)]


@pytest.mark.parametrize("command", ["ls", "info"])
def test_commands_read_a_capture_with_an_endless_head_at_once(tmp_path, command):
    from scapy.utils import wrpcap
    from scapy.layers.l2 import Ether

    f = Flow().handshake()
    f.c(big_request(100_000))
    f.s(R431)
    f.close()
    pcap = tmp_path / "attack.pcap"
    wrpcap(str(pcap), [Ether(frame) for _, frame in f.packets])
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", command, str(pcap)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t < BOUND_S
    if command == "ls":
        assert "/big  [incomplete,truncated]" in p.stdout and " 431 GET " in p.stdout
    else:
        assert "oversize heads 1" in p.stdout


def test_convert_takes_the_limits_as_flags(tmp_path):
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    f = Flow().handshake()
    f.c(big_request(10_000))
    f.s(R200)
    f.close()
    pcap, out = tmp_path / "h.pcap", tmp_path / "h.rlog"
    wrpcap(str(pcap), [Ether(frame) for _, frame in f.packets])
    argv = [sys.executable, "-m", "replay.cli.main"]
    p = subprocess.run([*argv, "convert", pcap, "-o", out, "--max-head", "4k"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "oversize heads: 1" in p.stderr, p.stderr
    p = subprocess.run([*argv, "ls", out, "--format", "jsonl"], capture_output=True, text=True,
                       timeout=60)
    assert '"bytes": 4096, "flags": ["incomplete", "truncated"]' in p.stdout
    for bad in (["--max-head", "10"], ["--idle-timeout", "nan"], ["--idle-timeout", "1e999999999"],
                ["--max-stream-buffer", "x"]):
        p = subprocess.run([*argv, "convert", pcap, "-o", out, *bad], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and bad[0] in p.stderr, p.stderr


def test_garbage_one_byte_at_a_time_then_a_response(impl):
    """While resynchronising, a read without a line end costs no search: 1-byte reads of
    garbage frame as one whole read does, and the next status line is found."""
    import random

    rnd = random.Random(5)
    garbage = bytes(rnd.choice(b"abcdefgh \t\x00\xff") for _ in range(20_000))
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx" + garbage + b"\r\n" + R200

    def frame(chunks):
        out, st = _replay_framer(impl, chunks, stats=True)
        return [(m.status, m.index, m.data) for m in out], st["skipped_bytes"]

    whole = frame([wire])
    assert frame([wire[i:i + 1] for i in range(len(wire))]) == whole
    assert [s for s, _, _ in whole[0]] == [200, 200] and whole[0][1][2] == R200


def test_an_interim_response_with_an_oversize_head_stays_interim(impl):
    f = Flow().handshake()
    f.c(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    f.s(b"HTTP/1.1 100 Continue\r\nX-Big: " + b"c" * 80_000 + b"\r\n\r\n")
    f.c(b"ok")
    f.s(R200)
    f.close()
    msgs, _ = run_bounded(impl, f.packets)
    resps = responses(msgs)
    assert [(m.status, m.index, bool(m.flags & F_INTERIM)) for m in resps] == [(100, 0, True), (200, 0, False)]


def test_midstream_tiny_segments_of_lines_that_are_not_http(impl):
    """A connection seen without its SYN is sniffed for a first start line; each of 3,000
    3-byte segments of non-HTTP lines searched everything again (a spoofed stream cost the
    capture a second per 2,000 packets). Only the line still open is searched now; the
    outcome is that of one whole delivery."""
    junk = b"ab\n" * 3000 + b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"

    def frame(size):
        f = Flow()                                   # no handshake: midstream
        f.c(junk, size=size)
        f.s(R200)
        f.close()
        msgs, st = run_bounded(impl, f.packets)
        return [(m.kind, m.uri, m.status) for m in msgs], st["skipped_bytes"]

    assert frame(3) == frame(len(junk)) == ([(0, "/x", 0), (1, "/x", 200)], 9000)
