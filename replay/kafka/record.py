"""One message as one Kafka record: the encoding (no I/O here; docs/kafka.md has every byte).

Rules:
- the value is the message's fields as the log holds them (``replay.events.Message``), in a fixed
  little-endian header, then the exact bytes of the message; not JSON, so nothing is lost
  (latency, HTTP version, header order and case all live in those bytes);
- it opens with a magic and a version: ``VERSION`` changes when an older reader would misread a
  record; a reader refuses a version it does not know, naming it;
- the key is the capture run's 8-byte id followed by the connection id (u64, big-endian): one
  connection's messages hash to one partition and stay in order there, and two captures (two
  hosts, or one host restarted) never share a key;
- headers say who wrote the record (``replay-host``) and what it is (``replay-kind``): a tool
  can route or count without decoding the value;
- a record that is not what this says is a ``RecordError`` with the reason; the consumer adds
  where it was (topic, partition, offset).
"""

from __future__ import annotations

import struct

from replay.events import KIND_NAMES, Message
from replay.log.format import unpack_addr

MAGIC = b"RK"
VERSION = 1
# magic 2s, version u8, kind u8, flags u32, conn u64, index i64, ts_first i64, ts_last i64,
# status u16, body_length u64, head_length u32
HEAD = struct.Struct("<2sBBIQqqqHQI")
KEY = struct.Struct(">8sQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
NONE16 = 0xFFFF
NONE32 = 0xFFFFFFFF
H_HOST = "replay-host"
H_KIND = "replay-kind"
KIND_BYTES = tuple(k.encode() for k in KIND_NAMES)


class RecordError(Exception):
    """A record value that is not a replay message record (the reason is the text)."""


_ADDRS: dict = {}             # (ip, port) -> its bytes: a capture has few addresses, many messages
_ADDRS_MAX = 1 << 16


def _addr(a) -> bytes:
    try:
        b = _ADDRS.get(a)
    except TypeError:             # not a tuple: not cached
        return _addr_bytes(a)
    if b is not None:
        return b
    if len(_ADDRS) >= _ADDRS_MAX:
        _ADDRS.clear()
    b = _ADDRS[a] = _addr_bytes(a)
    return b


def _addr_bytes(a) -> bytes:
    ip, port = a
    b = ip.encode("utf-8", "surrogatepass")
    if len(b) > 255 or not 0 <= port <= 0xFFFF:
        raise ValueError(f"address {a!r} does not fit a record (ip <= 255 bytes, port u16)")
    return _U8.pack(len(b)) + b + _U16.pack(port)


def _text(s, size, none, what) -> bytes:
    if s is None:
        return size.pack(none)
    b = s.encode("utf-8", "surrogatepass")
    if len(b) >= none:
        raise ValueError(f"{what} of {len(b)} bytes does not fit a record")
    return size.pack(len(b)) + b


def encode(m: Message) -> bytes:
    """The record value of ``m``; ValueError when a field does not fit."""
    try:
        head = HEAD.pack(MAGIC, VERSION, m.kind, m.flags, m.conn, m.index, m.ts_first, m.ts_last,
                         m.status, m.body_length, m.head_length)
    except struct.error as e:
        raise ValueError(f"a message field does not fit a record: {e}") from None
    return b"".join((head, _addr(m.client), _addr(m.server),
                     _text(m.method, _U16, NONE16, "method"),
                     _text(m.uri, _U32, NONE32, "request-target"), m.data))


def key(run: bytes, conn: int) -> bytes:
    return KEY.pack(run, conn & 0xFFFFFFFFFFFFFFFF)


def split_key(k) -> tuple[bytes, int]:
    """(run id, connection id) of a record key; RecordError when it is not one of ours."""
    if k is None or len(k) != KEY.size:
        raise RecordError(f"key of {0 if k is None else len(k)} bytes, not {KEY.size} "
                          "(run id and connection id)")
    return KEY.unpack(k)


def decode(buf) -> Message:
    """The message of a record value; RecordError with the reason when it is not one."""
    if len(buf) < 3 or buf[:2] != MAGIC:
        raise RecordError("not a replay record (bad magic)")
    if buf[2] != VERSION:
        raise RecordError(f"record format version {buf[2]}, this replay reads {VERSION}")
    if len(buf) < HEAD.size:
        raise RecordError("cut short inside its header")
    (_, _, kind, flags, conn, index, tf, tl, status, blen, hlen) = HEAD.unpack_from(buf)
    if kind >= len(KIND_NAMES):
        raise RecordError(f"unknown message kind {kind}")
    mv = memoryview(buf)
    off = HEAD.size
    try:
        addrs = []
        for _ in range(2):
            addr, off = unpack_addr(mv, off)
            addrs.append(addr)
        (n,) = _U16.unpack_from(mv, off)
        off += 2
        method = None
        if n != NONE16:
            method = bytes(mv[off:off + n]).decode("utf-8", "surrogatepass")
            off += n
        (n,) = _U32.unpack_from(mv, off)
        off += 4
        uri = None
        if n != NONE32:
            if off + n > len(mv):
                raise RecordError("cut short inside its request-target")
            uri = bytes(mv[off:off + n]).decode("utf-8", "surrogatepass")
            off += n
    except (struct.error, UnicodeDecodeError) as e:
        raise RecordError(f"bad record header: {e}") from None
    if off > len(buf):
        raise RecordError("cut short inside its header")
    return Message(kind, conn, index, tf, tl, addrs[0], addrs[1], flags, bytes(mv[off:]),
                   method, uri, status, blen, hlen)
