"""Harness: the whole core (decode, reassembly, HTTP framing, pairing) on a TCP conversation.

The input is read as a program that builds one connection, so that mutations stay TCP and the
fuzzer spends its time in the reassembler and the framers rather than in the checks that drop a
random frame. Read front to back with ``atheris.FuzzedDataProvider`` (integers little-endian;
past the end every read is 0), which lets ``seeds()`` write real conversations in the same form:

    opts u8         bit 0 no handshake (midstream), 1 IPv6, 2 raw IP link (else Ethernet),
                    3 a 700-byte stream buffer, 4 sequence numbers just below 2**32,
                    5-7 packets per batch (1 + 8 * value)
    isn_c u32, isn_s u32
    then operations, each ``op u8`` (bit 0 the side: 0 client, 1 server; bits 1-3 the kind;
    bits 4-7 an argument) and its operands:
      0-2 data     len u16, segment size u16 (0: 1460), len bytes sent in order
      3   reorder  u8: swap two neighbouring packets that many from the end
      4   repeat   u8: send again the packet that many from the end (a retransmission)
      5   lose     u16: bytes of the side the capture never sees (a hole)
      6   control  argument % 4: FIN, RST, a bare ACK, a SYN (port reuse or retransmission)
      7   wait     u16: ms of silence (past the 120 s idle timeout at the top of its range)

Both cores get the same packets in the same batches; the messages of every batch and the final
counters must be equal, and only ``ReplayError`` may escape.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's replay

import os
import struct

import atheris

with atheris.instrument_imports(include=["replay"]):
    from replay import _fastparse_py as pure
    from replay.errors import ReplayError

from fuzz._common import T0, batch, capture_messages, capture_paths, compiled_core, differ, main

compiled = compiled_core()

CLIENT_V4 = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
CLIENT_V6 = (bytes(15) + b"\x01", bytes(15) + b"\x02")
PORTS = (40000, 80)
# Bytes per direction: past the core's 64 KiB head limit, so that oversize heads are reached.
MAX_SIDE_BYTES = int(os.environ.get("REPLAY_FUZZ_MAX_SIDE_BYTES", 200_000))
MAX_PACKETS = 3000
MAX_SEGMENT = 65_000        # an IP packet's length field holds 65,535 bytes, headers included
MAX_OPS = 400
MS = 1_000_000


def frame(v6, raw, side, seq, ack, flags, payload):
    src, dst = (CLIENT_V6 if v6 else CLIENT_V4)[side], (CLIENT_V6 if v6 else CLIENT_V4)[1 - side]
    sport, dport = PORTS[side], PORTS[1 - side]
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                      65535, 0, 0)
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, 20 + len(payload), 6, 64, src, dst)
        etype = b"\x86\xdd"
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
        etype = b"\x08\x00"
    pkt = ip + tcp + payload
    return pkt if raw else b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + etype + pkt


def build(data: bytes):
    """(linktype, engine options, batches of packets) described by ``data``."""
    fdp = atheris.FuzzedDataProvider(data)
    opts = fdp.ConsumeUInt(1)
    v6, raw = bool(opts & 2), bool(opts & 4)
    isn = [fdp.ConsumeUInt(4), fdp.ConsumeUInt(4)]
    if opts & 16:
        isn = [0xFFFFFFFF - (i & 0xFFF) for i in isn]
    nxt = list(isn)
    budget = [MAX_SIDE_BYTES, MAX_SIDE_BYTES]
    pk: list = []
    t = [T0]

    def add(side, flags, payload=b"", seq=None):
        t[0] += MS
        s = nxt[side] if seq is None else seq
        pk.append((t[0], frame(v6, raw, side, s, nxt[1 - side], flags, payload)))
        if seq is None:
            nxt[side] = (nxt[side] + len(payload) + (1 if flags & 0x03 else 0)) & 0xFFFFFFFF

    if not opts & 1:
        add(0, 0x02)
        add(1, 0x12)
        add(0, 0x10)
    ops = 0
    while fdp.remaining_bytes() and ops < MAX_OPS and len(pk) < MAX_PACKETS:
        ops += 1
        op = fdp.ConsumeUInt(1)
        side, kind, arg = op & 1, (op >> 1) & 7, op >> 4
        if kind <= 2:
            n = min(fdp.ConsumeUInt(2), budget[side])
            seg = min(fdp.ConsumeUInt(2) or 1460, MAX_SEGMENT)
            payload = fdp.ConsumeBytes(n)
            budget[side] -= len(payload)
            for i in range(0, len(payload), seg):
                if len(pk) >= MAX_PACKETS:
                    break
                add(side, 0x18, payload[i:i + seg])
        elif kind == 3:
            k = fdp.ConsumeUInt(1)
            if len(pk) >= 2:
                j = len(pk) - 2 - k % (len(pk) - 1)
                pk[j], pk[j + 1] = pk[j + 1], pk[j]
        elif kind == 4:
            k = fdp.ConsumeUInt(1)
            if pk:
                t[0] += MS
                pk.append((t[0], pk[len(pk) - 1 - k % len(pk)][1]))
        elif kind == 5:
            nxt[side] = (nxt[side] + fdp.ConsumeUInt(2)) & 0xFFFFFFFF
        elif kind == 6:
            c = arg % 4
            if c == 0:
                add(side, 0x11)
            elif c == 1:
                add(side, 0x14)
            elif c == 2:
                add(side, 0x10)
            else:
                add(side, 0x02 if side == 0 else 0x12, seq=(nxt[side] - 1) & 0xFFFFFFFF)
        else:
            t[0] += fdp.ConsumeUInt(2) * 2 * MS
    per = 1 + 8 * (opts >> 5)
    batches = [pk[i:i + per] for i in range(0, len(pk), per)]
    linktype = 101 if raw else 1
    engine_opts = {"max_stream_buffer": 700} if opts & 8 else {}
    return linktype, engine_opts, batches


def run(mod, linktype, engine_opts, batches):
    try:
        eng = mod.Engine(linktype, **engine_opts)
        outs = [eng.feed_batch(*batch(b)) for b in batches]
        outs.append(eng.finish())
        return outs, eng.stats()
    except ReplayError as e:
        return type(e).__name__, str(e)


def TestOneInput(data: bytes) -> None:
    linktype, engine_opts, batches = build(data)
    want = run(pure, linktype, engine_opts, batches)
    if compiled is not None:
        got = run(compiled, linktype, engine_opts, batches)
        if got != want:
            raise differ("Engine.feed_batch", want, got)


# -- seeds ----------------------------------------------------------------------------------------
def encode(exchanges, opts=0, isn_c=1000, isn_s=5000, seg=1460, close=True) -> bytes:
    """The program of a conversation: (side, bytes) in order, then FIN from both sides."""
    out = bytearray([opts]) + struct.pack("<II", isn_c, isn_s)
    for side, data in exchanges:
        out += bytes([side]) + struct.pack("<HH", len(data), seg) + data
    if close:
        out += bytes([0x0C, 0x0D])  # FIN from the client, then from the server
    return bytes(out)


def seeds():
    """One conversation per connection of each capture, its messages in order, cut to fit."""
    for path in capture_paths():
        by_conn: dict = {}
        for m in capture_messages(path):
            by_conn.setdefault(m.conn, []).append((m.kind, m.data))
        for i, msgs in enumerate(list(by_conn.values())[:40]):
            used = [0, 0]
            ex = []
            for kind, data in msgs:
                data = data[:4096]
                if used[kind] + len(data) > MAX_SIDE_BYTES:
                    break
                used[kind] += len(data)
                ex.append((kind, data))
            if ex:
                yield encode(ex, opts=(i % 8) << 5 | (16 if i % 3 == 1 else 0),
                             seg=(536, 1460, 97)[i % 3])
    yield encode([(0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
                  (1, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")])


if __name__ == "__main__":
    main(TestOneInput)
