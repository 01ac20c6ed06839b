"""The compiled core and its pure twin must agree on everything: messages, flags, counters.

Hypothesis builds HTTP/1.1 conversations, cuts them into TCP segments at random, then reorders,
duplicates, overlaps and drops segments, starts sequence numbers near 2**32, and starts some
connections midstream. Both cores see the same packets; the compiled one also through
``feed_batch`` with random batch boundaries. Real captures (tests/data, the shared corpus and the
sample) are compared whole. With ``track_closed=True`` both report the same closed connections
after the same calls.
"""

from __future__ import annotations

import gc
import importlib
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CORPUS, DATA, NO_EXTENSIONS, ROOT, load_compiled
from tests.flow import batch, check_closes, run_closing

pure = importlib.import_module("replay._fastparse_py")
compiled = None if NO_EXTENSIONS else load_compiled()
pytestmark = pytest.mark.skipif(compiled is None, reason="replay._fastparse is not built "
                                "(or REPLAY_NO_EXTENSIONS=1): nothing to compare")

T0 = 1_700_000_000_000_000_000
CLIENT = (bytes([10, 0, 0, 1]), 40000)
SERVER = (bytes([10, 0, 0, 2]), 80)


def frame(src, dst, seq, ack, flags, payload):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src[0], dst[0])
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                      65535, 0, 0)
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp + payload


# -- conversations ------------------------------------------------------------------------------
bodies = st.binary(max_size=300)


@st.composite
def exchange(draw, last):
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT"]))
    uri = "/" + draw(st.text("abcxyz09/?=&%", max_size=20))
    body = draw(bodies) if method in ("POST", "PUT") else b""
    head = f"{method} {uri} HTTP/1.1\r\nHost: t\r\n".encode()
    expect = bool(body) and draw(st.booleans())
    if draw(st.booleans()) or not body:
        req = head + b"Content-Length: %d\r\n" % len(body) + (b"Expect: 100-continue\r\n" if expect else b"") + b"\r\n" + body
    else:
        cut = draw(st.integers(0, len(body)))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        chunked = b"".join(b"%x;e=1\r\n" % len(p) + p + b"\r\n" for p in parts) + b"0\r\nX-T: 1\r\n\r\n"
        req = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked
    rbody = draw(bodies)
    kind = draw(st.sampled_from(["cl", "chunked", "204", "304", "close"] if last else ["cl", "chunked", "204", "304"]))
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" if expect else b""
    if kind == "cl" or method == "HEAD":
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(rbody) + (b"" if method == "HEAD" else rbody)
    elif kind == "chunked":
        resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (
            b"%x\r\n" % len(rbody) + rbody + b"\r\n" if rbody else b"") + b"0\r\n\r\n"
    elif kind in ("204", "304"):
        resp = b"HTTP/1.1 " + kind.encode() + b" X\r\n\r\n"
    else:
        resp = b"HTTP/1.1 200 OK\r\n\r\n" + rbody
    return req, interim + resp


@st.composite
def conversation(draw):
    n = draw(st.integers(1, 5))
    return [draw(exchange(i == n - 1)) for i in range(n)]


def packets_for(conv, draw):
    """The packets of one connection carrying ``conv``, segmented at random."""
    isn = [draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 3000, 2**32 - 1))) for _ in range(2)]
    nxt = [isn[0], isn[1]]
    ends = (CLIENT, SERVER)
    pk = []
    t = [T0]

    def add(side, flags, payload=b""):
        t[0] += draw(st.integers(1, 3_000_000))
        pk.append((t[0], frame(ends[side], ends[1 - side], nxt[side], nxt[1 - side], flags, payload)))
        nxt[side] = (nxt[side] + len(payload) + (1 if flags & 0x03 else 0)) & 0xFFFFFFFF

    add(0, 0x02)
    nxt[1] = isn[1]
    add(1, 0x12)
    add(0, 0x10)
    for req, resp in conv:
        for side, data in ((0, req), (1, resp)):
            i = 0
            while i < len(data):
                size = draw(st.integers(1, 400))
                add(side, 0x18, data[i:i + size])
                i += size
    last_close = conv[-1][1].startswith(b"HTTP/1.1 200 OK\r\n\r\n")
    add(1, 0x11)
    if draw(st.booleans()) or last_close:
        add(0, 0x11)
        add(1, 0x10)
    return pk


@st.composite
def capture(draw):
    pk = packets_for(draw(conversation()), draw)
    if draw(st.booleans()):
        pk = pk[3:]  # already open when the capture began
    ops = draw(st.lists(st.tuples(st.sampled_from(["swap", "dup", "drop", "merge"]),
                                  st.integers(0, 10**6)), max_size=8))
    for op, r in ops:
        if len(pk) < 2:
            break
        i = r % (len(pk) - 1)
        if op == "swap":
            pk[i], pk[i + 1] = pk[i + 1], pk[i]
        elif op == "dup":
            pk.insert(i + 1, pk[i])
        elif op == "drop":
            del pk[i]
        else:  # an overlapping retransmission: the bytes of two segments in one
            a, b = pk[i][1], pk[i + 1][1]
            if a[34:38] == b[34:38] and len(a) > 54 and len(b) > 54:
                seq = int.from_bytes(a[38:42], "big")
                merged = a[54:] + b[54:]
                ip_src, ip_dst = a[26:30], a[30:34]
                sport, dport = int.from_bytes(a[34:36], "big"), int.from_bytes(a[36:38], "big")
                ack = int.from_bytes(a[42:46], "big")
                pk.insert(i + 2, (pk[i + 1][0] + 1, frame((ip_src, sport), (ip_dst, dport), seq, ack, 0x18, merged)))
    # a second connection interleaved, to exercise connection lookup
    if draw(st.booleans()):
        other = [(ts, fr[:34] + (40001).to_bytes(2, "big") + fr[36:]) if fr[34:36] == (40000).to_bytes(2, "big")
                 else (ts, fr[:36] + (40001).to_bytes(2, "big") + fr[38:]) for ts, fr in pk]
        merged = []
        for x, y in zip(pk, other):
            merged += [x, y]
        pk = merged
    if draw(st.booleans()):
        pk.sort(key=lambda p: p[0])
    return pk


def run_feed(mod, packets, **opts):
    eng = mod.Engine(1, **opts)
    out = []
    for ts, fr in packets:
        out += eng.feed(ts, fr)
    out += eng.finish()
    return out, eng.stats()


def run_batches(mod, packets, cuts, **opts):
    eng = mod.Engine(1, **opts)
    out = []
    bounds = sorted({c % (len(packets) + 1) for c in cuts} | {0, len(packets)})
    for a, b in zip(bounds, bounds[1:]):
        buf, meta = batch(packets[a:b])  # microsecond records, as pcapy-ng hands them over
        out += eng.feed_batch(buf, meta)
    out += eng.finish()
    return out, eng.stats()


settings.register_profile("differential", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(settings.get_profile("differential"))
@given(capture(), st.lists(st.integers(0, 10**6), max_size=4), st.sampled_from([4 << 20, 700]),
       st.sampled_from([64 << 10, 48]))
def test_compiled_equals_pure(packets, cuts, cap, max_head):
    # a 48-byte head limit makes most heads of the generated messages oversize
    opts = dict(max_stream_buffer=cap, max_head=max_head)
    want = run_feed(pure, packets, **opts)
    assert run_feed(compiled, packets, **opts) == want
    rounded = [(ts - ts % 1000, fr) for ts, fr in packets]
    assert run_batches(compiled, packets, cuts, **opts) == run_feed(pure, rounded, **opts)


VALID = frame(CLIENT, SERVER, 2**32 - 5, 7, 0x18, b"GET / HTTP/1.1\r\n\r\n")


@st.composite
def mutated(draw):
    """A valid Ethernet/IPv4/TCP frame with some bytes changed and perhaps cut short."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


@given(st.one_of(st.binary(max_size=200), mutated()), st.integers(0, 64))
@settings(max_examples=500, deadline=None)
def test_decode_agrees_on_any_bytes(data, skip):
    for lt in sorted(pure.SUPPORTED_LINKTYPES):
        assert compiled.decode(lt, data) == pure.decode(lt, data)
        off = min(skip, len(data))
        assert compiled.decode(lt, data, off) == pure.decode(lt, data, off)


def _captures():
    paths = sorted(DATA.glob("*.pcap*")) + [ROOT / "captures" / "sample.pcap"]
    if (CORPUS / "pcaps").is_dir():
        paths += sorted((CORPUS / "pcaps").glob("*.pcap*"))
    return paths


def _both_on(path: Path, **opts) -> list:
    """(source, engine) of the pure and then the compiled core on the capture at ``path``."""
    from replay.sources.pcapfile import PcapFile

    out = []
    for mod in (pure, compiled):
        src = PcapFile(str(path), batch_size=256)
        if src.linktype not in mod.SUPPORTED_LINKTYPES:
            pytest.skip(f"link type {src.linktype}")
        out.append((src, mod.Engine(src.linktype, **opts)))
    return out


@pytest.mark.parametrize("path", _captures(), ids=lambda p: p.name)
def test_real_captures_identical(path: Path):
    results = []
    for src, eng in _both_on(path):
        out = []
        for buf, meta in src.batches():
            out += eng.feed_batch(buf, meta)
        out += eng.finish()
        results.append((out, eng.stats()))
    assert results[0] == results[1]


# -- closed connections -------------------------------------------------------------------------
@st.composite
def closing_capture(draw):
    """A random capture stretched in time (gaps of 1 ms to 3 s, so that a short idle timeout
    expires connections midway), with perhaps an RST on some segments."""
    pk = [(T0 + (ts - T0) * 1000, fr) for ts, fr in draw(capture())]
    for r in draw(st.lists(st.integers(0, 10**6), max_size=2)):
        ts, fr = pk[r % len(pk)]
        pk[r % len(pk)] = (ts, fr[:47] + bytes([fr[47] | 0x04]) + fr[48:])  # the TCP flags byte
    return pk


@settings(settings.get_profile("differential"))
@given(closing_capture(), st.lists(st.integers(0, 10**6), max_size=4), st.sampled_from([120, 2]))
def test_closed_connections_agree(packets, cuts, idle):
    opts = dict(idle_timeout=idle, track_closed=True)
    eng = pure.Engine(1, **opts)
    want = run_closing(eng, packets)
    check_closes(want, eng.stats()["connections"])
    assert run_closing(compiled.Engine(1, **opts), packets) == want
    bounds = sorted({c % (len(packets) + 1) for c in cuts} | {0, len(packets)})
    want = run_closing(pure.Engine(1, **opts), packets, bounds)
    assert run_closing(compiled.Engine(1, **opts), packets, bounds) == want


@pytest.mark.parametrize("path", _captures(), ids=lambda p: p.name)
def test_real_captures_close_alike(path: Path):
    results = []
    for src, eng in _both_on(path, track_closed=True):
        calls = [(eng.feed_batch(buf, meta), eng.take_closed()) for buf, meta in src.batches()]
        calls.append((eng.finish(), eng.take_closed()))
        check_closes(calls, eng.stats()["connections"])
        results.append(calls)
    assert results[0] == results[1]


# -- heads: the compiled core reads most heads in C, the rest as the twin does ------------------
# Start lines and header fields chosen to sit on each rule of that reading: Content-Length lists,
# repeats, white space, signs and 18/19/25-digit values; Transfer-Encoding lists over several
# fields; obs-fold lines; Upgrade in any case; start lines the twin refuses (two spaces, no
# version, a 33-letter method, a status of two digits, tabs); names with white space of any
# kind around them, and names one letter longer.
START_REQ = [b"GET /a HTTP/1.1", b"POST /x?y=1 HTTP/1.0", b"GET  HTTP/1.1", b"GET /a  HTTP/1.1",
             b"get /a HTTP/1.1", b"M" * 33 + b" /a HTTP/1.1", b"M" * 32 + b" /a HTTP/1.1",
             b"GET /a HTTP/1.1\r", b"GET /\x80\xff HTTP/1.1", b"GET /a HTTX/1.1", b"GET /a",
             b"OPTIONS * HTTP/1.1", b"CONNECT h:443 HTTP/1.1", b"GET\t/a HTTP/1.1"]
START_RESP = [b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 200\tOK", b"HTTP/1.1 20 OK",
              b"HTTP/1.1  200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 204 No Content",
              b"HTTP/1.0 304 x", b"HTTP/1.1 101 Switching", b"HTTP/1.1 100 Continue",
              b"HTTP/1.1 200 OK\r\r", b"HTTP/2 200 OK", b"HTTP/1.1 404 N\xffope"]
FIELDS = [b"Host: t", b"Content-Length: 3", b"content-length: 3", b"Content-Length : 3",
          b"Content-Length: 3, 3", b"Content-Length: 3,4", b"Content-Length: 3,", b"Content-Length:",
          b"Content-Length: +3", b"Content-Length: 0003", b"Content-Length:\t3 \t",
          b"Content-Length: 999999999999999999", b"Content-Length: 1000000000000000000",
          b"Content-Length: 1234567890123456789012345", b"Content-Length: 12345678901234567890x",
          b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
          b"Transfer-Encoding: chunked, gzip", b"TRANSFER-ENCODING: CHUNKED ",
          b"Transfer-Encoding: gzip", b"Transfer-Encoding: ,", b"Transfer-Encoding:",
          b"Upgrade: websocket", b"UPGRADE :x", b"Connection: upgrade", b" folded: line",
          b"\tfolded", b"no colon here", b":empty name", b"X: a:b", b"Content-Length\t: 3",
          b"X-Long: " + b"v" * 40, b"\x0bContent-Length: 3", b"Upgrade\x0c:x",
          b"Transfer-Encoding\r: chunked", b"Content-Lengthy: 3", b"Upgrades: x"]


@st.composite
def odd_head_capture(draw):
    def head(starts):
        lines = [draw(st.sampled_from(starts))]
        lines += draw(st.lists(st.sampled_from(FIELDS), max_size=6))
        eol = draw(st.sampled_from([b"\r\n", b"\n"]))
        return eol.join(lines) + eol + eol + draw(st.sampled_from([b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n"]))

    conv = [(head(START_REQ), head(START_RESP)) for _ in range(draw(st.integers(1, 3)))]
    return packets_for(conv, draw)


@settings(settings.get_profile("differential"))
@given(odd_head_capture(), st.sampled_from([64 << 10, 48]))
def test_heads_read_alike(packets, max_head):
    opts = dict(max_head=max_head)
    assert run_feed(compiled, packets, **opts) == run_feed(pure, packets, **opts)


@settings(settings.get_profile("differential"))
@given(st.lists(st.tuples(st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]),
                          st.lists(st.sampled_from(START_RESP + FIELDS + [b"", b"abc", b"0"]),
                                   min_size=1, max_size=8),
                          st.sampled_from([b"\r\n", b"\n"])), min_size=1, max_size=4))
def test_response_framers_agree(script):
    fs = [m.ResponseFramer(("127.0.0.1", 5000), ("127.0.0.1", 80)) for m in (compiled, pure)]
    outs = [[], []]
    for method, lines, eol in script:
        for f, out in zip(fs, outs):
            f.expect(method)
            out += f.feed(eol.join(lines) + eol, 1)
    for f, out in zip(fs, outs):
        out += f.eof(2)
    assert outs[0] == outs[1]
    assert fs[0].stats() == fs[1].stats()


# -- rows (Engine(rows=True)): the messages kept as table rows for the log writer ---------------
def run_rows(mod, packets, cuts, records, max_bytes, direct_from=None, hand_over=None,
             direct_spare=None, **opts):
    """``Engine(rows=True)`` through ``feed_batch``, its blocks taken after each call as
    ``LogWriter.write_rows`` takes them, and the rest at the end. ``direct_from``: the rows'
    (the compiled core frames a Content-Length message of that many bytes or more into memory
    its row takes; 1: every one), ``direct_spare`` (how much of such memory, all framers
    together, may be reserved and not filled yet; 0: it grows as the bytes come);
    ``hand_over``: the rows' too (a block of that many bytes or more taken from the buffer's
    start takes its memory)."""
    eng = mod.Engine(1, rows=True, **opts)
    for name, value in (("direct_from", direct_from), ("hand_over", hand_over),
                        ("direct_spare", direct_spare)):
        if value is not None:
            setattr(eng.rows, name, value)
    blocks = []

    def take():
        while count := eng.rows.block_end(records, max_bytes):
            blocks.append(eng.rows.take(count))

    bounds = sorted({c % (len(packets) + 1) for c in cuts} | {0, len(packets)})
    for a, b in zip(bounds, bounds[1:]):
        assert eng.feed_batch(*batch(packets[a:b])) == []
        take()
    assert eng.finish() == []
    take()
    if len(eng.rows):
        blocks.append(eng.rows.take(len(eng.rows)))
    assert len(eng.rows) == 0 and eng.rows.nbytes == 0 and eng.rows.spare == 0
    return blocks, eng.stats()


def check_blocks(blocks, want):
    """The blocks hold the messages ``want``, in order: as messages, in their byte counts, and
    encoded as the twin encodes them."""
    assert [m for b in blocks for m in b.messages()] == want
    at = 0
    for b in blocks:
        part = want[at:at + len(b)]
        assert b.nbytes == sum(len(m.data) for m in part)
        assert b.encode() == pure.encode_block(part)
        at += len(b)


def writer_cuts(msgs, records, max_bytes):
    """Where LogWriter.write cuts ``msgs`` into blocks: the block sizes."""
    sizes, count, size = [], 0, 0
    for m in msgs:
        count += 1
        size += len(m.data)
        if count >= records or size >= max_bytes:
            sizes.append(count)
            count = size = 0
    return sizes + ([count] if count else [])


@settings(settings.get_profile("differential"))
@given(capture(), st.lists(st.integers(0, 10**6), max_size=4), st.integers(1, 12),
       st.sampled_from([1, 200, 1 << 20]), st.sampled_from([None, 1, 64]),
       st.sampled_from([{}, dict(max_message=90, max_head=48)]))
def test_rows_are_the_messages(packets, cuts, records, max_bytes, hand_over, limits):
    """The rows' blocks hold the messages, cut where the writer cuts them, with every
    Content-Length message of the compiled core framed into memory of its own or none, blocks
    taking the buffer's memory at any size, and messages and heads over their limits."""
    want, stats = run_batches(pure, packets, cuts, **limits)
    for mod, direct_from in ((pure, None), (compiled, None), (compiled, 1)):
        blocks, got_stats = run_rows(mod, packets, cuts, records, max_bytes, direct_from,
                                     hand_over if mod is compiled else None, **limits)
        assert got_stats == stats
        assert [len(b) for b in blocks] == writer_cuts(want, records, max_bytes)
        check_blocks(blocks, want)


def _large_body_packets(case):
    """One connection: a 200 KB POST and a 300 KB answer in 1,448-byte segments, then a GET;
    ``case`` says what happens on the way (see the test)."""
    body = bytes(range(256)) * 800
    req = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    get = b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n"
    rbody = body + body[:100_000]
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(rbody) + rbody
    ok = b"HTTP/1.1 204 No Content\r\n\r\n"
    pk, t, nxt = [], [T0], [1000, 5000]
    ends = (CLIENT, SERVER)

    def add(side, flags, payload=b"", skip=False):
        t[0] += 20_000
        if not skip:
            pk.append((t[0], frame(ends[side], ends[1 - side], nxt[side], nxt[1 - side], flags,
                                   payload)))
        nxt[side] += len(payload) + (1 if flags & 0x03 else 0)

    add(0, 0x02)
    add(1, 0x12)
    add(0, 0x10)
    if case == "syn-inside":
        del pk[:]                       # a capture started in the middle of the connection
    client = req + get if case in ("pipelined", "gap-across-end") else req
    segs = [client[i:i + 1448] for i in range(0, len(client), 1448)]
    for k, seg in enumerate(segs):
        # a segment lost in the middle of the body; or the one across its end and the next head
        lost = (case == "gap-inside" and k == 40) or (case == "gap-across-end" and k == len(segs) - 1)
        if case == "syn-inside" and k == 27:
            nxt[0] = 123_456            # a SYN-ACK from the client's side inside the body, which
            add(0, 0x12)                # moves the stream's sequence: the rest after it
        add(0, 0x18, seg, skip=lost)
    if case == "gap-across-end":
        add(0, 0x18, get)               # the GET after the lost one
    for k in range(0, len(resp), 1448):
        add(1, 0x18, resp[k:k + 1448], skip=case == "reset" and k > 100_000)
        if case == "reset" and k > 150_000:
            add(1, 0x04)                # a reset in the middle of the answer
            return pk
        if case == "cut" and k > 150_000:
            return pk                   # the capture ends in the middle of the answer's body
    if case != "pipelined":
        add(0, 0x18, get)
    add(1, 0x18, ok)
    add(0, 0x11)
    add(1, 0x11)
    add(0, 0x10)
    return pk


@pytest.mark.parametrize("case", ["plain", "pipelined", "gap-inside", "gap-across-end", "cut",
                                  "reset", "syn-inside"])
def test_large_bodies_framed_into_their_own_memory(case):
    """Content-Length bodies of hundreds of KB (over ``ROWS_DIRECT_FROM``), which the compiled
    core frames into memory of their own: the same rows and blocks as the twin's, whether the
    body ends inside a segment that also starts the next request, loses a segment inside or
    across its end, is cut by the end of the capture or a reset, or (in a capture started
    mid-connection) has a SYN inside it that moves its stream's sequence; fed a packet a call
    and in one; that memory the message's whole length at once, or grown as the bytes come
    (``direct_spare`` 0), or the one and then the other."""
    packets = _large_body_packets(case)
    want, stats = run_batches(pure, packets, [])
    assert any(len(m.data) > 200_000 for m in want)
    every = list(range(1, len(packets)))
    for mod, spare in ((pure, None), (compiled, None), (compiled, 0), (compiled, 250_000)):
        for records, max_bytes, cuts in ((1, 1 << 20, []), (3, 1 << 20, every),
                                         (500, 64 << 10, [])):
            blocks, got_stats = run_rows(mod, packets, cuts, records, max_bytes,
                                         direct_spare=spare)
            assert got_stats == stats
            check_blocks(blocks, want)


def _many_large_bodies(seed):
    """One to four connections at once, each one to three requests with Content-Length bodies
    of up to 400 KB and answers of up to 300 KB (or a 101 after an Upgrade), their segments
    (536 to 65,000 bytes) interleaved, a few lost, swapped, sent twice, or after a SYN that
    moves their stream; the connections end with FIN, RST, nothing, or idle past the timeout.
    Some start mid-connection."""
    rng = random.Random(seed)
    server = (bytes([10, 0, 0, 200]), 80)
    pk, queues = [], []
    ends = []
    t = T0
    for ci in range(rng.randint(1, 4)):
        e = ((bytes([10, 0, 0, ci + 1]), 40000), server)
        nxt = [rng.randrange(1 << 32), rng.randrange(1 << 32)]
        if rng.random() < 0.8:              # a handshake; else a capture started mid-connection
            for side, flags in ((0, 0x02), (1, 0x12), (0, 0x10)):
                t += 1000
                pk.append((t, frame(e[side], e[1 - side], nxt[side], nxt[1 - side], flags, b"")))
                nxt[side] = (nxt[side] + (flags & 0x02 and 1)) & 0xFFFFFFFF
        req = resp = b""
        for _ in range(rng.randint(1, 3)):
            n = rng.choice([10, 40_000, 70_000, 200_000, 400_000])
            upgrade = rng.random() < 0.1
            req += (b"POST /u HTTP/1.1\r\nHost: a\r\n"
                    + (b"Connection: Upgrade\r\nUpgrade: x\r\n" if upgrade else b"")
                    + b"Content-Length: %d\r\n\r\n" % n + bytes([65 + ci]) * n)
            if upgrade:
                resp += b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
                break
            m = rng.choice([5, 50_000, 300_000])
            resp += b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % m + b"r" * m
        for side, data in ((0, req), (1, resp)):
            mss = rng.choice([536, 1448, 9000, 65000])
            queues.append([(e, side, (nxt[side] + i) & 0xFFFFFFFF, data[i:i + mss])
                           for i in range(0, len(data), mss)])
            nxt[side] = (nxt[side] + len(data)) & 0xFFFFFFFF
        ends.append((e, nxt))
    order = []
    while any(queues):
        order.append(rng.choice([q for q in queues if q]).pop(0))
    for i in range(len(order) - 1):
        if rng.random() < 0.02:
            order[i], order[i + 1] = order[i + 1], order[i]
    for e, side, seq, data in order:
        t += rng.choice([1000, 20_000])
        r = rng.random()
        if r < 0.01:
            continue                        # lost
        if rng.random() < 0.003:            # a SYN-ACK just before: the stream's sequence set
            pk.append((t, frame(e[side], e[1 - side], (seq - 1) & 0xFFFFFFFF, 0, 0x12, b"")))
        pk.append((t, frame(e[side], e[1 - side], seq, 0, 0x18, data)))
        if r > 0.995:                       # sent twice
            pk.append((t, frame(e[side], e[1 - side], seq, 0, 0x18, data)))
    for e, nxt in ends:
        t += 1000
        how = rng.choice(["fin", "rst", "none", "idle"])
        if how == "fin":
            pk.append((t, frame(e[0], e[1], nxt[0], nxt[1], 0x11, b"")))
            pk.append((t, frame(e[1], e[0], nxt[1], nxt[0] + 1, 0x11, b"")))
        elif how == "rst":
            pk.append((t, frame(e[0], e[1], nxt[0], nxt[1], 0x14, b"")))
        elif how == "idle":
            t += 5_000_000_000
    # a later packet of another connection: the idle ones expire
    pk.append((t + 5_000_000_000, frame((bytes([10, 9, 9, 9]), 1), server, 1, 0, 0x02, b"")))
    return pk, sorted(rng.sample(range(len(pk)), min(len(pk), rng.randint(0, 6))))


@pytest.mark.skipif(compiled is None, reason="the compiled core is not built")
@pytest.mark.parametrize("seed", range(12))
def test_many_large_bodies_at_once(seed):
    """Several connections framing large bodies into memory of their own at once, with loss,
    reordering, duplicates, SYNs inside, upgrades, and every way of ending: the same rows as
    the twin's whether that memory is each message's whole length, grown as the bytes come,
    or the one until the room held unfilled reaches 100,000 bytes; and none held unfilled at
    the end. Every fifth with a ``max_message`` under the largest bodies."""
    packets, cuts = _many_large_bodies(seed)
    opts = dict(idle_timeout=2.0, **({"max_message": 150_000} if seed % 5 == 0 else {}))
    want, stats = run_batches(pure, packets, cuts, **opts)
    for spare in (None, 0, 100_000):
        blocks, got_stats = run_rows(compiled, packets, cuts, 1000, 1 << 30, direct_spare=spare,
                                     **opts)
        assert got_stats == stats
        check_blocks(blocks, want)


def _c_heap() -> int | None:
    """Bytes glibc's malloc has handed out (mallinfo2), None elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    mallinfo2.restype = Info
    gc.collect()
    m = mallinfo2()
    return m.uordblks + m.hblkhd


def _idle_after_a_cut_response(n_conns: int, seg: int) -> float:
    """C heap a connection holds, idle, after one 2 MB chunked response cut into ``seg``-byte
    segments (its framer saw thousands of deliveries in one message)."""
    eng = compiled.Engine(1, rows=True)
    t = T0
    before = _c_heap()

    def feed(fr):
        nonlocal t
        t += 1000
        eng.feed(t, fr)
        while n := eng.rows.block_end(1, 1):
            eng.rows.take(n)

    body = b"x" * 2_000_000
    resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body \
        + b"\r\n0\r\n\r\n"
    q = b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
    for c in range(n_conns):
        cl, sv = (bytes([10, 0, c >> 8 & 255, c & 255]), 40000), (bytes([10, 0, 0, 2]), 80)
        cs, ss = 1000, 5000
        feed(frame(cl, sv, cs, 0, 0x02, b""))
        feed(frame(sv, cl, ss, cs + 1, 0x12, b""))
        cs, ss = cs + 1, ss + 1
        feed(frame(cl, sv, cs, ss, 0x18, q))
        cs += len(q)
        for i in range(0, len(resp), seg):
            feed(frame(sv, cl, ss, cs, 0x18, resp[i:i + seg]))
            ss += len(resp[i:i + seg])
    assert eng.stats()["responses"] == n_conns
    return (_c_heap() - before) / n_conns


@pytest.mark.skipif(compiled is None or _c_heap() is None,
                    reason="the compiled core is not built, or no glibc mallinfo2")
def test_an_idle_framer_gives_back_the_room_of_a_message_cut_small():
    # 20,000 deliveries in one message: the framer's array of them held 800 KiB afterwards
    small = _idle_after_a_cut_response(100, 100)
    large = _idle_after_a_cut_response(100, 60_000)
    assert small < large + 8 * 1024, (small, large)


@pytest.mark.skipif(compiled is None, reason="the compiled core is not built")
def test_engine_dropped_in_a_body_gives_its_room_back():
    """An engine let go in the middle of a body framed into memory of its own (a convert
    stopped by an error, without ``finish()``): its rows, still held, count no room unfilled
    once the engine's cycle is collected."""
    body = bytes(300_000)
    head = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    data = head + body[:100_000]
    packets = [(T0, frame(CLIENT, SERVER, 1000, 5000, 0x02, b"")),
               (T0 + 1000, frame(SERVER, CLIENT, 5000, 1001, 0x12, b""))]
    packets += [(T0 + 2000 + i, frame(CLIENT, SERVER, 1001 + i, 5001, 0x18, data[i:i + 1448]))
                for i in range(0, len(data), 1448)]
    eng = compiled.Engine(1, rows=True)
    eng.feed_batch(*batch(packets))
    rows = eng.rows
    assert rows.spare == len(head) + len(body) - len(data)
    del eng
    gc.collect()
    assert rows.spare == 0 and len(rows) == 0


CLAIMS = """
import resource
from tests.flow import batch
from tests.test_differential import T0, frame
import replay._fastparse as core

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) << 10

eng = core.Engine(1, rows=True)
# what the process has, and 1 GiB more: the 24 GB the heads claim would not fit
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (1 << 30),) * 2)
packets, t = [], T0
server = (bytes([10, 1, 0, 2]), 80)
for i in range(3000):
    client = (bytes([10, 0, i >> 8, i & 255]), 40000)
    head = b"POST /u HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 8000000\\r\\n\\r\\n"
    packets += [(t, frame(client, server, 1000, 5000, 0x02, b"")),
                (t + 1000, frame(server, client, 5000, 1001, 0x12, b"")),
                (t + 2000, frame(client, server, 1001, 5001, 0x18, head + b"z" * 100))]
    t += 3000
for k in range(0, len(packets), 3000):
    eng.feed_batch(*batch(packets[k:k + 3000]))
eng.finish()
messages = eng.rows.take(len(eng.rows)).messages()
assert len(messages) == 3000 and all(len(m.data) == len(head) + 100 for m in messages)
print("ok", eng.stats()["incomplete_messages"])
"""


@pytest.mark.skipif(compiled is None, reason="the compiled core is not built")
def test_claimed_lengths_are_not_memory_taken():
    """Three thousand connections each send a head claiming an 8 MB body, and 100 bytes of it:
    the compiled core, which frames such messages into memory of their own, sizes that memory
    by the bytes that came (64 KiB at first, doubled as more come), not by the claim: it runs
    within 1 GiB more address space than it started with (the claims add up to 24 GB)."""
    done = subprocess.run([sys.executable, "-c", CLAIMS], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "3000"]


@pytest.mark.parametrize("direct_from", [None, 1], ids=["direct-default", "direct-all"])
@pytest.mark.parametrize("path", _captures(), ids=lambda p: p.name)
def test_real_captures_rows_identical(path: Path, direct_from):
    """The rows' blocks of the two cores alike; ``direct_from`` 1: every Content-Length message
    of the compiled core framed into memory of its own."""
    encoded = []
    for src, eng in _both_on(path, rows=True):
        if direct_from is not None:
            eng.rows.direct_from = direct_from
        blocks = []
        for buf, meta in src.batches():
            eng.feed_batch(buf, meta)
            while count := eng.rows.block_end(500, 1 << 20):
                blocks.append(eng.rows.take(count))
        eng.finish()
        if len(eng.rows):
            blocks.append(eng.rows.take(len(eng.rows)))
        encoded.append([(len(b), b.encode()) for b in blocks])
    assert encoded[0] == encoded[1]


@pytest.mark.parametrize("mod", [pure, compiled], ids=["pure", "compiled"])
def test_row_buffer_takes_only_what_it_holds(mod):
    eng = mod.Engine(1, rows=True)
    packets = [(T0 + i, frame(CLIENT, SERVER, 1000 + 18 * i, 7, 0x18,
                              b"GET / HTTP/1.1\r\n\r\n")) for i in range(3)]
    for ts, fr in packets:
        assert eng.feed(ts, fr) == []
    rows = eng.rows
    assert len(rows) == 3 and rows.nbytes == 54
    assert rows.block_end(5, 1000) == 0          # not a block yet
    assert rows.block_end(2, 1000) == 2
    assert rows.block_end(5, 36) == 2            # the bytes reach the limit at the second
    for bad in (0, 4, -1):
        with pytest.raises(ValueError):
            rows.take(bad)
    first = rows.take(1)
    assert len(first) == 1 and len(rows) == 2 and rows.nbytes == 36
    assert [m.data for m in first.messages()] == [b"GET / HTTP/1.1\r\n\r\n"]
    assert first.encode() == first.encode()     # encoding leaves the block as it was


@pytest.mark.parametrize("mod", [pure, compiled], ids=["pure", "compiled"])
def test_row_buffer_takes_in_any_order(mod):
    """Blocks taken from the front of the buffer, after other takes, with rows left behind or
    none, and rows added between: each block holds its messages, and the rows left theirs
    (the compiled buffer hands its memory to a block of ``hand_over`` bytes or more taken from
    its start with at most a quarter of its bytes after it, and copies otherwise)."""
    eng = mod.Engine(1, rows=True)
    eng.rows.hand_over = 40
    reqs = [b"GET /%02d HTTP/1.1\r\n\r\n" % i for i in range(23)]      # 20 bytes each
    seq, fed = 1000, 0

    def add(n):
        nonlocal seq, fed
        for data in reqs[fed:fed + n]:
            assert eng.feed(T0 + seq, frame(CLIENT, SERVER, seq, 7, 0x18, data)) == []
            seq += len(data)
        fed += n

    rows = eng.rows
    add(2)
    z = rows.take(1)            # under hand_over: a copy
    add(4)
    a = rows.take(4)            # 80 bytes from the start, 20 after: the buffer itself
    add(4)
    b = rows.take(1)            # under hand_over, after rows added to a new buffer
    c = rows.take(2)            # after a take: a copy
    add(8)
    d = rows.take(8)            # 160 bytes from the start (compacted), 40 after: the buffer
    e = rows.take(2)            # the buffer again, nothing after it
    add(5)
    f = rows.take(5)            # the buffer, into an empty one
    got = [[m.data for m in blk.messages()] for blk in (z, a, b, c, d, e, f)]
    assert got == [reqs[0:1], reqs[1:5], reqs[5:6], reqs[6:8], reqs[8:16], reqs[16:18],
                   reqs[18:23]]
    assert len(rows) == 0 and rows.nbytes == 0
    assert [blk.nbytes for blk in (z, a, b, c, d, e, f)] == [20 * len(g) for g in got]
    assert [blk.encode() for blk in (z, a, b, c, d, e, f)] == \
        [pure.encode_block(blk.messages()) for blk in (z, a, b, c, d, e, f)]
