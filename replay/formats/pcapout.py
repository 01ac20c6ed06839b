"""A log written back as a capture: each recorded connection as a synthetic TCP connection, in a
pcapng or a classic pcap file that Wireshark, tshark, tcpdump and our own core read
(docs/formats-pcap.md).

Theory of operation
-------------------
``write(msg)`` turns one message into packets at once; nothing waits for the end of the log, so
memory stays bounded however long the log is. Per connection (``msg.conn``; replayed messages in
a name space of their own) the writer keeps one small state: addresses, the next sequence number
of each side, the last packet time. Packets then pass through a reorder buffer that writes them in
time order within a window, so a log that interleaves connections still gives a capture whose
clock mostly runs forward.

Rules it keeps:

- a connection opens with SYN, SYN/ACK, ACK, 3, 2 and 1 µs before its first message; it closes
  with FIN/ACK, FIN/ACK, ACK 1 µs after its last message, either at ``close()`` or once a message
  of the log starts more than ``idle_timeout`` seconds (default: the core's own
  ``replay.limits.IDLE_TIMEOUT``, so a connection the core kept whole stays whole) after that
  connection's last packet. The client closes first, except after a close-delimited response
  (RFC 9112 §6.3 rule 8), where the server does. A connection id seen again after its close opens
  a new connection on the same addresses;
- a message's bytes (request: client to server, response: server to client) go in segments of at
  most ``mss`` bytes; the first segment carries ``ts_first``, the last ``ts_last``, those between
  are spread evenly. The receiver ACKs every second segment and the last one of a message; data
  segments carry the ACK of everything the peer sent before;
- sequence numbers start from an ISN derived from the connection id and wrap modulo 2**32;
- within a connection packets never go back in time: a message that starts before the
  connection's last packet is moved to that time (the log's own order within a connection is
  kept). A response that comes before its request (an interim ``100 Continue`` answered while the
  request body was still being sent) waits, at most ``MAX_HELD`` per connection, until its request
  comes; then the two are interleaved by time, the request's first segment first, so the response
  acknowledges part of it as it did on the wire;
- addresses are the recorded ones; a missing or unspecified address or port is replaced by a
  synthetic one derived from the connection id (``synthetic_client``, ``synthetic_server``), in
  the other side's address family;
- ``F_FAILED`` records (a replay's error, not HTTP) and messages without bytes are skipped and
  counted in ``warnings``; ``F_REPLAYED`` messages get connections of their own, apart from the
  recorded connections that share their ids;
- after a message flagged ``gap`` or ``incomplete``, its direction skips the sequence numbers of
  the bytes it lacks (by its Content-Length; else 1), and the next ACK covers them: a reader sees
  the loss there, as the capture had it, instead of taking the next message's bytes as the rest;
- two connections open at once never share addresses and ports (they would read back as one):
  the later one gets another client port;
- IPv4 and IPv6 over Ethernet (link type 1) with fixed, locally administered MACs; IPv4, and TCP
  checksums are correct; IPv4 sets DF and counts its ID per direction;
- pcapng: one section (SHB with a comment naming the source), one interface (IDB: link type 1,
  ``if_tsresol`` 9: nanoseconds), then EPBs. pcap: the classic microsecond format (magic
  ``0xa1b2c3d4`` in this machine's byte order), timestamps truncated to the microsecond, which
  every pcap reader takes; pcapng keeps the nanoseconds;
- ``update_meta`` keeps the metadata but writes nothing: the comment went out with the header.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import os
import struct
import sys
from array import array
from collections import OrderedDict

from replay.errors import OutputError
from replay.events import (F_CLOSE_DELIMITED, F_FAILED, F_GAP, F_INCOMPLETE, F_REPLAYED,
                           KIND_REQUEST)
from replay.limits import IDLE_TIMEOUT
from replay.outputs import reason

DLT_EN10MB = 1                      # https://www.tcpdump.org/linktypes.html
SNAPLEN = 262144                    # tcpdump's default
MSS = 1448                          # 1500 - IPv4 20 - TCP 20 - timestamps option 12
WINDOW = 65535
TTL = 64
MAC_CLIENT = bytes.fromhex("020000000001")   # locally administered (IEEE 802 U/L bit set)
MAC_SERVER = bytes.fromhex("020000000002")
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
SYNTH_SERVER_PORT = 80
HANDSHAKE_LEAD_NS = 3_000           # SYN 3 µs before the first message, SYN/ACK 2, ACK 1
REORDER_WINDOW_NS = 10_000_000_000  # packets wait this long (log time) for earlier ones
REORDER_MAX_BYTES = 32 << 20        # ... or until the reorder buffer holds this many bytes
MAX_HELD = 8                        # responses waiting for their request, per connection
WRITE_CHUNK = 1 << 20

# TCP flags (RFC 9293 §3.1)
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
HOLE = 0x100    # not a packet: sequence numbers skipped (a loss the capture had)

# pcapng (draft-ietf-opsawg-pcapng): block types and option codes
SHB, IDB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT, OPT_COMMENT, SHB_USERAPPL, IF_TSRESOL = 0, 1, 4, 9
PCAP_MAGIC_US = 0xA1B2C3D4

_LITTLE = sys.byteorder == "little"


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum: the complemented value to put in a header."""
    if len(data) & 1:
        data += b"\0"
    s = sum(array("H", data))  # native 16-bit words: the sum is byte-order independent (§2(B))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    if _LITTLE:
        s = ((s & 0xFF) << 8) | (s >> 8)
    return ~s & 0xFFFF


def synthetic_client(conn: int, v6: bool):
    """The client address used when the log has none: 10.0.0.1 + conn (mod 2**24 - 3), or
    fd00::1:0:0:0 + conn; port 1024 + conn % 60000."""
    if v6:
        ip = ipaddress.IPv6Address((0xFD00 << 112) + (1 << 48) + (conn % (1 << 48)))
    else:
        ip = ipaddress.IPv4Address((10 << 24) + 1 + conn % ((1 << 24) - 3))
    return ip, 1024 + conn % 60000


def synthetic_server(v6: bool):
    """The server address used when the log has none: 10.255.255.254 or fd00::2:0:0:1, port 80."""
    if v6:
        return ipaddress.IPv6Address((0xFD00 << 112) + (2 << 48) + 1), SYNTH_SERVER_PORT
    return ipaddress.IPv4Address((10 << 24) + (1 << 24) - 2), SYNTH_SERVER_PORT


def _parse_ip(text):
    """An ``ipaddress`` object, or None for a missing, unparsable or unspecified address."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(str(text).strip("[]").split("%")[0])
    except ValueError:
        return None
    return None if ip.is_unspecified else ip


def _port(p):
    try:
        p = int(p)
    except (TypeError, ValueError):
        return 0
    return p if 0 < p < 65536 else 0


def _endpoint(addr):
    if not addr:
        return None, 0
    try:
        ip, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return None, 0
    return _parse_ip(ip), _port(port)


def endpoints(msg, conn: int):
    """``((client ip, port), (server ip, port))`` of ``msg``, synthetic where the log has none."""
    cip, cport = _endpoint(msg.client)
    sip, sport = _endpoint(msg.server)
    if sip is not None and cip is not None and sip.version != cip.version:
        cip = None  # one family per connection: the server's
    v6 = (sip or cip).version == 6 if (sip or cip) is not None else False
    if cip is None or not cport:
        synth_ip, synth_port = synthetic_client(conn, v6)
        cip = cip or synth_ip
        cport = cport or synth_port
    if sip is None or not sport:
        synth_ip, synth_port = synthetic_server(v6)
        sip = sip or synth_ip
        sport = sport or synth_port
    return (cip, cport), (sip, sport)


def _isn(conn: int, side: int) -> int:
    """A fixed, well-spread initial sequence number for one side of one connection."""
    return ((conn * 2 + side + 1) * 0x9E3779B1) & 0xFFFFFFFF


class _Side:
    __slots__ = ("ip", "port", "mac", "nxt", "ip_id", "unacked", "last")

    def __init__(self, ip, port, mac, isn):
        self.ip = ip
        self.port = port
        self.mac = mac
        self.nxt = isn          # next sequence number, advanced as packets go into the file
        self.ip_id = 0
        self.unacked = 0        # data segments sent since the peer last acknowledged
        self.last = 0           # time of this side's latest packet: its clock never goes back


class _Conn:
    __slots__ = ("key", "sides", "v6", "floor", "last_flags", "held", "max_req", "opened",
                 "active")

    def __init__(self, key, client, server, v6, t0):
        self.key = key
        self.sides = (client, server)
        self.v6 = v6
        self.floor = 0          # the handshake's last packet: nothing of the connection before it
        self.last_flags = 0
        self.held: list = []    # responses waiting for their request
        self.max_req = -1       # highest request index written
        self.opened = False     # the handshake waits for the first segment
        self.active = t0        # latest time seen on it (held messages count): for idleness

    @property
    def last_ts(self) -> int:
        return max(self.sides[0].last, self.sides[1].last)


class PcapWriter:
    """Messages in, a pcap or pcapng capture out (the ``LogWriter`` protocol)."""

    def __init__(self, path, fd: int | None = None, meta: dict | None = None,
                 format: str = "pcapng", mss: int = MSS, idle_timeout: float = IDLE_TIMEOUT,
                 reorder_window: float = REORDER_WINDOW_NS / 1e9,
                 reorder_max_bytes: int = REORDER_MAX_BYTES):
        if format not in ("pcap", "pcapng"):
            raise ValueError(f"unknown capture format {format!r}")
        if not 1 <= mss <= SNAPLEN - 14 - 60 - 60:
            raise ValueError("mss out of range")
        self.path = os.fspath(path)
        self.format = format
        self.mss = mss
        self.idle_ns = int(idle_timeout * 1e9)
        self.window_ns = int(reorder_window * 1e9)
        self.reorder_max_bytes = reorder_max_bytes
        self.meta = dict(meta or {})
        self.records_written = 0    # messages turned into packets
        self.packets_written = 0
        self.connections = 0        # TCP connections opened
        self.skipped_failed = 0
        self.skipped_empty = 0
        self._conns: OrderedDict = OrderedDict()   # key -> _Conn, least recently active first
        self._tuples: set = set()   # (client ip, port, server ip, port) of the open connections
        self._heap: list = []
        self._heap_bytes = 0
        self._tick = 0
        self._horizon = None        # latest ts_first seen: the reorder window's reference
        self._buf = bytearray()
        self._closed = False
        if fd is None:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create: {reason(e)}") from None
        self._fd = fd
        self._buf += self._file_header()

    # -- the LogWriter protocol -----------------------------------------------------------------

    @property
    def warnings(self) -> list:
        out = []
        if self.skipped_failed:
            out.append(f"{self.path}: {self.skipped_failed} failed replay records left out "
                       "(they hold an error, not HTTP)")
        if self.skipped_empty:
            out.append(f"{self.path}: {self.skipped_empty} messages without bytes left out")
        return out

    def write(self, msg) -> None:
        if self._closed:
            raise ValueError("write to a closed PcapWriter")
        if msg.flags & F_FAILED:
            self.skipped_failed += 1
            return
        if not msg.data:
            self.skipped_empty += 1
            return
        t0 = max(0, int(msg.ts_first))
        self._close_idle(t0)
        if self._horizon is None or t0 > self._horizon:
            self._horizon = t0
        key = (bool(msg.flags & F_REPLAYED), msg.conn)
        c = self._conns.get(key)
        if c is None:
            c = self._open(key, msg)
        else:
            self._conns.move_to_end(key)
        c.active = max(c.active, int(msg.ts_last))
        self.records_written += 1
        if msg.kind == KIND_REQUEST:
            if msg.index > c.max_req:
                c.max_req = msg.index
            early = [h for h in c.held if h.index < msg.index]
            mine = [h for h in c.held if h.index == msg.index]
            c.held = [h for h in c.held if h.index > msg.index]
            self._send(c, early)
            self._send(c, [msg])
            # an answer given while the request was still being sent: never before its first byte
            self._send(c, mine, floor=max(0, int(msg.ts_first)))
        elif msg.index > c.max_req and msg.index >= 0:
            c.held.append(msg)
            if len(c.held) > MAX_HELD:
                self._send(c, [c.held.pop(0)])
        else:
            self._send(c, [msg])
        self._drain(False)

    def update_meta(self, meta: dict) -> None:
        self.meta.update(meta)

    def close(self, fsync: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for c in list(self._conns.values()):
                self._finish(c)
            self._conns.clear()
            self._drain(True)
            self._flush()
            if fsync:
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass  # a pipe or /dev/null
        finally:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- connections ------------------------------------------------------------------------------

    def _open(self, key, msg) -> _Conn:
        replayed, conn = key
        synth_id = conn * 2 + replayed if conn >= 0 else -conn
        (cip, cport), (sip, sport) = endpoints(msg, synth_id)
        port = 1024 + synth_id % 60000
        while (cip, cport, sip, sport) in self._tuples:   # two open connections would read as one
            cport, port = port, 1024 + (port - 1024 + 1) % 60000
        self._tuples.add((cip, cport, sip, sport))
        client = _Side(cip, cport, MAC_CLIENT, _isn(synth_id, 0))
        server = _Side(sip, sport, MAC_SERVER, _isn(synth_id, 1))
        c = _Conn(key, client, server, sip.version == 6, max(0, int(msg.ts_first)))
        self._conns[key] = c
        self.connections += 1
        return c

    def _handshake(self, c: _Conn, t0: int) -> None:
        """SYN, SYN/ACK, ACK just before ``t0``, the time of the connection's first segment."""
        c.opened = True
        t = max(0, t0 - HANDSHAKE_LEAD_NS)
        self._packet(c, 0, SYN, t, b"")
        self._packet(c, 1, SYN | ACK, t + 1000, b"")
        self._packet(c, 0, ACK, t + 2000, b"")
        c.floor = t + 2000

    def _finish(self, c: _Conn) -> None:
        client, server = c.sides
        self._tuples.discard((client.ip, client.port, server.ip, server.port))
        self._send(c, c.held)
        c.held = []
        if not c.opened:
            return
        t = c.last_ts + 1000
        first = 1 if c.last_flags & F_CLOSE_DELIMITED else 0
        self._packet(c, first, FIN | ACK, t, b"")
        self._packet(c, 1 - first, FIN | ACK, t + 1000, b"")
        self._packet(c, first, ACK, t + 2000, b"")

    def _close_idle(self, now: int) -> None:
        conns = self._conns
        while conns:
            key, c = next(iter(conns.items()))
            if now - max(c.active, c.last_ts) <= self.idle_ns:
                break
            del conns[key]
            self._finish(c)

    # -- messages to segments ---------------------------------------------------------------------

    def _segments(self, msg, floor: int = 0):
        """``(side, payload, ts, last)`` for each segment of ``msg``."""
        side = 0 if msg.kind == KIND_REQUEST else 1
        data = msg.data
        mss = self.mss
        t0 = max(floor, int(msg.ts_first))
        t1 = max(t0, int(msg.ts_last))
        span = t1 - t0
        n = (len(data) + mss - 1) // mss
        if n == 1 and span and len(data) > 1:   # two times need two segments: the last byte apart
            return [(side, data[:-1], t0, False), (side, data[-1:], t1, True)]
        return [(side, data[i * mss:(i + 1) * mss],
                 t0 + (span * i // (n - 1) if n > 1 else 0), i == n - 1) for i in range(n)]

    def _send(self, c: _Conn, msgs, floor: int = 0) -> None:
        for m in msgs:
            segs = self._segments(m, floor)
            if not c.opened:
                self._handshake(c, segs[0][2])
            for side, payload, ts, last in segs:
                self._packet(c, side, PSH | ACK if last else ACK, ts, payload)
                me, peer = c.sides[side], c.sides[1 - side]
                peer.unacked = 0
                me.unacked += 1
                if last or me.unacked >= 2:   # delayed ACK (RFC 9293 §3.8.6.3)
                    self._packet(c, 1 - side, ACK, ts, b"")
                    me.unacked = 0
            if m.flags & (F_GAP | F_INCOMPLETE):
                # bytes the capture lost: a hole in the sequence space as long as the message
                # lacks, which the next ACK covers, so a reader sees the loss there instead of
                # framing the next message's bytes as the rest of this one
                self._packet(c, side, HOLE, segs[-1][2], _missing(m))
            c.last_flags = m.flags

    # -- packets ----------------------------------------------------------------------------------

    def _packet(self, c: _Conn, side: int, flags: int, ts: int, payload: bytes) -> None:
        """Queue a packet; its sequence and acknowledgment numbers are set when it is written, so
        an ACK covers exactly what the peer's packets before it in the file carried."""
        me = c.sides[side]
        if flags & (SYN | FIN | HOLE) or payload:   # what takes sequence space keeps its order
            ts = max(ts, me.last, c.floor)
            me.last = ts
        else:                                # a pure ACK may pass the side's data: it takes none
            ts = max(ts, c.floor)
        self._tick += 1
        heapq.heappush(self._heap, (ts, self._tick, c, side, flags, payload))
        self._heap_bytes += (0 if flags == HOLE else len(payload)) + 80

    def _frame(self, c: _Conn, side: int, flags: int, payload: bytes) -> bytes:
        me, peer = c.sides[side], c.sides[1 - side]
        syn = flags & SYN
        seq = me.nxt
        ack = peer.nxt if flags & ACK else 0
        me.nxt = (seq + len(payload) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF
        opts = struct.pack("!BBH", 2, 4, self.mss) if syn else b""   # MSS (RFC 9293 §3.1)
        tcp_len = 20 + len(opts) + len(payload)
        tcp = bytearray(struct.pack("!HHIIBBHHH", me.port, peer.port, seq, ack,
                                    (20 + len(opts)) << 2, flags, WINDOW, 0, 0))
        tcp += opts
        tcp += payload
        src, dst = me.ip.packed, peer.ip.packed
        if c.v6:
            pseudo = src + dst + struct.pack("!IxxxB", tcp_len, 6)      # RFC 8200 §8.1
            ip = struct.pack("!IHBB", 6 << 28, tcp_len, 6, TTL) + src + dst
            etype = ETH_IPV6
        else:
            pseudo = src + dst + struct.pack("!xBH", 6, tcp_len)        # RFC 9293 §3.1
            me.ip_id = (me.ip_id + 1) & 0xFFFF
            hdr = struct.pack("!BBHHHBBH", 0x45, 0, 20 + tcp_len, me.ip_id, 0x4000, TTL, 6, 0) \
                + src + dst
            ip = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
            etype = ETH_IPV4
        struct.pack_into("!H", tcp, 16, checksum(pseudo + bytes(tcp)))
        return peer.mac + me.mac + struct.pack("!H", etype) + ip + bytes(tcp)

    def _drain(self, everything: bool) -> None:
        heap = self._heap
        limit = None if everything or self._horizon is None else self._horizon - self.window_ns
        while heap and (limit is None or heap[0][0] <= limit
                        or self._heap_bytes > self.reorder_max_bytes):
            ts, _, c, side, flags, payload = heapq.heappop(heap)
            self._heap_bytes -= (0 if flags == HOLE else len(payload)) + 80
            if flags == HOLE:
                me = c.sides[side]
                me.nxt = (me.nxt + payload) & 0xFFFFFFFF
                continue
            self._buf += self._record(ts, self._frame(c, side, flags, payload))
            self.packets_written += 1
            if len(self._buf) >= WRITE_CHUNK:
                self._flush()

    # -- file format ------------------------------------------------------------------------------

    def _file_header(self) -> bytes:
        if self.format == "pcap":
            return struct.pack("=IHHiIII", PCAP_MAGIC_US, 2, 4, 0, 0, SNAPLEN, DLT_EN10MB)
        from replay import __version__

        comment = "replay: a log written back as a capture, synthetic TCP around each message"
        if self.meta.get("source"):
            comment += f"; source: {self.meta['source']}"
        info = {k: self.meta[k] for k in ("command", "source", "tool") if k in self.meta}
        if info:
            comment += "\n" + json.dumps(info, sort_keys=True)
        shb = struct.pack("=IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(
            (OPT_COMMENT, comment.encode()), (SHB_USERAPPL, f"replay {__version__}".encode()))
        idb = struct.pack("=HHI", DLT_EN10MB, 0, SNAPLEN) + _options((IF_TSRESOL, b"\x09"))
        return _block(SHB, shb) + _block(IDB, idb)

    def _record(self, ts: int, frame: bytes) -> bytes:
        n = len(frame)
        if self.format == "pcap":
            sec, ns = divmod(ts, 1_000_000_000)
            return struct.pack("=IIII", sec & 0xFFFFFFFF, ns // 1000, n, n) + frame
        body = struct.pack("=IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, n, n) + frame \
            + b"\0" * (-n % 4)
        return _block(EPB, body)

    def _flush(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        off = 0
        try:
            while off < len(data):
                off += os.write(self._fd, memoryview(data)[off:])
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None


def _missing(msg) -> int:
    """Bytes a message cut by a loss lacks, by its Content-Length; 1 when that says nothing."""
    from replay.httpmsg import header_value

    try:
        n = int(header_value(msg.data, msg.head_length, b"content-length") or "")
    except ValueError:
        return 1
    return max(1, min(n - (len(msg.data) - msg.head_length), 1 << 30))


def _options(*opts) -> bytes:
    out = bytearray()
    for code, value in opts:
        out += struct.pack("=HH", code, len(value)) + value + b"\0" * (-len(value) % 4)
    out += struct.pack("=HH", OPT_ENDOFOPT, 0)
    return bytes(out)


def _block(kind: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("=II", kind, n) + body + struct.pack("=I", n)


def open_writer(path, fd: int, meta: dict, format: str = "pcapng", **options):
    """The ``replay.formats`` entry point: ``format`` is ``pcap`` or ``pcapng``; ``options`` go to
    ``PcapWriter`` (``mss``, ``idle_timeout``, ``reorder_window``, ``reorder_max_bytes``); those it
    does not know (a log's ``level``) are ignored."""
    known = {k: v for k, v in options.items()
             if k in ("mss", "idle_timeout", "reorder_window", "reorder_max_bytes")}
    return PcapWriter(path, fd=fd, meta=meta, format=format, **known)
