"""Scenario builder for the core's tests: one TCP connection, packet by packet, crafted with scapy.

``Flow`` keeps each side's next sequence number and what it has acknowledged, so a test reads like
the conversation it checks::

    f = Flow()
    f.handshake()
    f.c(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    f.s(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nhi")
    msgs = run(impl, f.packets)

Packets are ``(ts_ns, frame_bytes)``; each new packet is 1 ms after the previous one unless a time
is given. ``send=False`` builds a segment without adding it (to reorder or drop it by hand).
"""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

T0 = 1_700_000_000_000_000_000
MS = 1_000_000
LINKTYPE_ETHERNET = 1


class Flow:
    def __init__(self, client=("10.0.0.1", 40000), server=("10.0.0.2", 80), isn_c=1000, isn_s=5000,
                 t0=T0, mss=1460, link=None, ip_layer=None):
        self.client = client
        self.server = server
        self.v6 = ":" in client[0]
        self.nxt = [isn_c & 0xFFFFFFFF, isn_s & 0xFFFFFFFF]  # 0: client, 1: server
        self.acked = [0, 0]
        self.t = t0
        self.mss = mss
        self.packets: list[tuple[int, bytes]] = []
        self.link = link or ethernet          # IP packet bytes -> frame bytes
        self.ip_layer = ip_layer              # (src, dst) -> scapy IP layer, to add options

    # -- building blocks ----------------------------------------------------------------------
    def frame(self, side, flags, payload=b"", seq=None, ack=None):
        src, dst = (self.client, self.server) if side == 0 else (self.server, self.client)
        if self.ip_layer is not None:
            ipl = self.ip_layer(src[0], dst[0])
        else:
            ipl = IPv6(src=src[0], dst=dst[0]) if self.v6 else IP(src=src[0], dst=dst[0])
        tcp = TCP(sport=src[1], dport=dst[1], flags=flags,
                  seq=self.nxt[side] if seq is None else seq & 0xFFFFFFFF,
                  ack=(self.nxt[1 - side] if ack is None else ack & 0xFFFFFFFF) if "A" in flags else 0,
                  window=65535)
        pkt = ipl / tcp
        if payload:
            pkt = pkt / Raw(payload)
        return self.link(bytes(pkt))

    def tick(self, ts=None):
        if ts is None:
            self.t += MS
        else:
            self.t = ts
        return self.t

    def add(self, side, flags, payload=b"", send=True, ts=None, seq=None, ack=None, advance=True):
        pkt = (self.tick(ts), self.frame(side, flags, payload, seq, ack))
        if advance:
            n = len(payload) + (1 if ("S" in flags or "F" in flags) else 0)
            if seq is None:
                self.nxt[side] = (self.nxt[side] + n) & 0xFFFFFFFF
        if send:
            self.packets.append(pkt)
        return pkt

    # -- conversation -------------------------------------------------------------------------
    def handshake(self):
        self.add(0, "S")
        self.add(1, "SA")
        self.add(0, "A")
        return self

    def segments(self, side, data, size=None, send=True):
        """Send ``data`` from one side in segments of at most ``size`` (default: the MSS)."""
        size = size or self.mss
        out = []
        for i in range(0, len(data), size):
            out.append(self.add(side, "PA", data[i:i + size], send=send))
        return out

    def c(self, data, size=None, send=True):
        return self.segments(0, data, size, send)

    def s(self, data, size=None, send=True):
        return self.segments(1, data, size, send)

    def ack(self, side):
        return self.add(side, "A")

    def lose(self, side, n):
        """``n`` bytes from ``side`` that the capture never sees."""
        self.nxt[side] = (self.nxt[side] + n) & 0xFFFFFFFF

    def fin(self, side):
        return self.add(side, "FA")

    def rst(self, side):
        return self.add(side, "RA")

    def close(self):
        self.fin(0)
        self.fin(1)
        self.ack(0)
        return self


def ethernet(ip: bytes) -> bytes:
    etype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=etype)) + ip


def run(impl, packets, linktype=LINKTYPE_ETHERNET, **engine_opts):
    """Feed packets one by one, then end the input; return (messages, stats)."""
    eng = impl.Engine(linktype, **engine_opts)
    out = []
    for ts, frame in packets:
        out.extend(eng.feed(ts, frame))
    out.extend(eng.finish())
    return out, eng.stats()


def batch(packets):
    """Packets in pcapy-ng ``next_batch`` layout: (buffer, 16-byte records sec, usec, off, caplen)."""
    bufs = []
    meta = []
    off = 0
    for ts, frame in packets:
        sec, ns = divmod(ts, 1_000_000_000)
        meta.append(struct.pack("=IIII", sec, ns // 1000, off, len(frame)))
        bufs.append(frame)
        off += len(frame)
    return b"".join(bufs), b"".join(meta)


def requests(msgs):
    return [m for m in msgs if m.kind == 0]


def responses(msgs):
    return [m for m in msgs if m.kind == 1]


def run_closing(eng, packets, bounds=None):
    """Feed packets to an engine made with ``track_closed=True``, then end the input.

    One ``feed`` per packet, or one ``feed_batch`` per slice ``packets[a:b]`` of consecutive
    ``bounds``. Returns ``(messages, closed_ids)`` per call, the ids taken right after the call,
    in the order a caller handles them.
    """
    calls = []
    if bounds is None:
        for ts, frame in packets:
            calls.append((eng.feed(ts, frame), eng.take_closed()))
    else:
        for a, b in zip(bounds, bounds[1:]):
            calls.append((eng.feed_batch(*batch(packets[a:b])), eng.take_closed()))
    calls.append((eng.finish(), eng.take_closed()))
    return calls


def check_closes(calls, connections):
    """Every connection (ids 0 .. connections-1) is reported closed exactly once, and none of its
    messages comes out in a later call than the one that reported it."""
    closed_at = {}
    for i, (_, ids) in enumerate(calls):
        for cid in ids:
            assert cid not in closed_at, f"connection {cid} reported closed twice"
            closed_at[cid] = i
    assert sorted(closed_at) == list(range(connections))
    for i, (msgs, _) in enumerate(calls):
        for m in msgs:
            assert i <= closed_at[m.conn], f"a message of connection {m.conn} after its close"
    return closed_at
