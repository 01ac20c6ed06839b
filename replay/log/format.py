"""The .rlog format: constants, and encoding/decoding of headers and blocks (no I/O here).

docs/log-format.md describes every byte; this module is its executable form. Rules it keeps:

- everything is little-endian; every variable-length thing is length-prefixed (no separators);
- a file is a fixed file header followed by self-contained blocks; each block starts with the same
  8-byte sync marker, carries its own lengths and two CRC-32s (header, body), so a reader can check
  it alone and, after a damaged one, find the next by scanning for the marker;
- a data block holds two zstd frames: the *table* (fixed-width columns, then a connection table, an
  address table and a string table) and the *payload* (the messages' bytes: the requests', their
  targets left out where the table holds them, then the others'). The table can be read without
  decompressing the payload;
- the major version changes when an old reader would misread a file; the minor version when it
  adds something an old reader can skip (a longer header, a new block type).
"""

from __future__ import annotations

import struct

try:
    # ISA-L's CRC-32 (the same polynomial and values as zlib's) runs at ~11 GB/s here against
    # zlib's ~3.3: on a log of large bodies the checksums were a tenth of the writer's time
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover  (no wheel for this platform)
    from zlib import crc32

import zstandard as zstd

from replay.core import encode_block
from replay.layout import TABLE_COLUMNS, TABLE_PREFIX, TABLE_ROW_BYTES  # noqa: F401 (the format's)

MAGIC = b"RLOG\r\n\x1a\n"  # PNG-style: catches text-mode (CRLF) damage
VERSION_MAJOR = 2             # what this writer writes
VERSION_MINOR = 1
READ_MAJORS = (1, 2)          # what this reader reads: 1.x data blocks keep their own table layout

# file header: magic, major u16, minor u16, header length u32, flags u32, crc32 u32
FILE_HEADER = struct.Struct("<8sHHII")
FILE_HEADER_LEN = FILE_HEADER.size + 4  # 24

SYNC = b"\xd9\x1f\x6b\xe3\x4c\xa7\x02\x95"

BLOCK_DATA = 1
BLOCK_META = 2
BLOCK_INDEX = 3
BLOCK_SUMMARY = 4
BLOCK_NAMES = {BLOCK_DATA: "data", BLOCK_META: "metadata", BLOCK_INDEX: "index",
               BLOCK_SUMMARY: "summary"}

# block flags
BF_A_ZSTD = 1 << 0   # section A (table / JSON / index entries) is one zstd frame
BF_B_ZSTD = 1 << 1   # section B (payload) is one zstd frame

# block header: sync, type u8, flags u8, header length u16, count u32, t_min i64, t_max i64,
# A stored u32, A raw u32, B stored u32, B raw u32, crc32 of A u32, crc32 of B u32; then the
# crc32 of the header so far u32
BLOCK_HEADER = struct.Struct("<8sBBHIqqIIIIII")
BLOCK_HEADER_LEN = BLOCK_HEADER.size + 4  # 60
CRC = struct.Struct("<I")

# index block entries, then the trailer that ends the file
INDEX_ENTRY = struct.Struct("<QqqIB3x")   # offset u64, t_min i64, t_max i64, count u32, type u8
INDEX_TRAILER = struct.Struct("<Q8s")
INDEX_MAGIC = b"RLOGIDX\n"

MAX_SECTION = 0xFFFFFFFF

# Data-block table columns, in stored order. Each is stored byte-plane by byte-plane ("shuffled":
# byte 0 of every value, then byte 1, ...), which lets zstd drop the planes that are all zero.
# Stored transformations (undone by the reader; "zz" is zigzag, all arithmetic mod 2**64; "the
# previous row of its connection" is the nearest earlier row of the block with the same conn):
#   conn       0: the next connection of the block's connection table (its first row there);
#              k > 0: connection k-1 of that table
#   index      zz(index - index of the previous row of its connection - 1 for a request);
#              a connection's first row in the block: zz(index)
#   ts_first   zz((ts_first[i] - ts_first[i-1]) / unit), with ts_first[-1] = the block's t_min
#   ts_last    zz((ts_last[i] - ts_first[i]) / unit)
#   extra      zz(data_length - head_length - body_length)  (chunk framing, cut messages)
#   client     0: the client of the previous row of its connection; k > 0: address k-1
#   uri        0: the uri of the previous row of its connection; 1: the next string never named by
#              an earlier row's uri (uri strings come first in the string table, in the order rows
#              first name them); k > 1: string k-2 (0 = None)
#   elided     1: the request's target (its uri string, after the method and a space) is left out
#              of the payload, and put back by the reader
# where unit (u64, first 8 bytes of the table section) is the gcd of all those time deltas.
NUMPY_CODES = {"B": "u1", "H": "<u2", "I": "<u4", "Q": "<u8", "q": "<i8"}
# (replay.layout.TABLE_COLUMNS: kind, flags, conn, index, ts_first, ts_last, status, body_length,
# head_length, extra, client, server (an id into the block's address table), method (0 = None,
# k = string k-1 of the block's string table), uri, elided)
COLUMNS = tuple((name, NUMPY_CODES[code]) for name, code in TABLE_COLUMNS)
ROW_BYTES = TABLE_ROW_BYTES

# Version 1.x tables: the same columns with their values as they are (conn, index, client, uri),
# index stored as i8, no elided column (a payload holds every message's bytes in row order).
COLUMNS_V1 = tuple((name, {"conn": "<u8", "index": "<i8"}.get(name, t))
                   for name, t in COLUMNS if name != "elided")
ROW_BYTES_V1 = sum(int(t[-1]) for _, t in COLUMNS_V1)     # the dtype strings end in their width
TABLE_PREFIX_V1 = 8  # u64 unit

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class FormatError(Exception):
    """Bytes that are not what the format says (the reader turns it into a warning or LogFormatError)."""


# ---------------------------------------------------------------------------------------------
# file header


def pack_file_header() -> bytes:
    head = FILE_HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, FILE_HEADER_LEN, 0)
    return head + CRC.pack(crc32(head))


def unpack_file_header(buf: bytes) -> tuple[int, int, int]:
    """(major, minor, header length); FormatError with a reason when it is not a usable header."""
    if len(buf) < len(MAGIC) or buf[:len(MAGIC)] != MAGIC:
        raise FormatError("not a .rlog file (bad magic)")
    if len(buf) < FILE_HEADER.size:
        raise FormatError("cut short inside its file header")
    _, major, minor, hlen, _flags = FILE_HEADER.unpack_from(buf)
    if major not in READ_MAJORS:
        raise FormatError(f"unsupported .rlog format version {major}.{minor} "
                          f"(this replay reads {' and '.join(f'{m}.x' for m in READ_MAJORS)})")
    if hlen < FILE_HEADER_LEN:
        raise FormatError(f"file header length {hlen} is too small")
    if len(buf) < hlen:
        raise FormatError("cut short inside its file header")
    (crc,) = CRC.unpack_from(buf, hlen - 4)
    if crc32(buf[:hlen - 4]) != crc:
        raise FormatError("file header checksum mismatch")
    return major, minor, hlen


# ---------------------------------------------------------------------------------------------
# blocks


class BlockHeader:
    __slots__ = ("type", "flags", "hlen", "count", "t_min", "t_max", "a_len", "a_raw",
                 "b_len", "b_raw", "a_crc", "b_crc")

    def __init__(self, type, flags, hlen, count, t_min, t_max, a_len, a_raw, b_len, b_raw,
                 a_crc, b_crc):
        self.type = type
        self.flags = flags
        self.hlen = hlen
        self.count = count
        self.t_min = t_min
        self.t_max = t_max
        self.a_len = a_len
        self.a_raw = a_raw
        self.b_len = b_len
        self.b_raw = b_raw
        self.a_crc = a_crc
        self.b_crc = b_crc

    @property
    def body_len(self) -> int:
        return self.a_len + self.b_len

    @property
    def total_len(self) -> int:
        return self.hlen + self.a_len + self.b_len


def pack_block(btype: int, flags: int, count: int, t_min: int, t_max: int,
               a: bytes, a_raw: int, b: bytes = b"", b_raw: int = 0) -> list:
    """The block as a list of buffers to write in order (header, section A, section B)."""
    if len(a) > MAX_SECTION or len(b) > MAX_SECTION or a_raw > MAX_SECTION or b_raw > MAX_SECTION:
        raise ValueError("a block section exceeds 4 GiB")
    head = BLOCK_HEADER.pack(SYNC, btype, flags, BLOCK_HEADER_LEN, count, t_min, t_max,
                             len(a), a_raw, len(b), b_raw, crc32(a), crc32(b))
    return [head + CRC.pack(crc32(head)), a, b]


def unpack_block_header(buf, offset: int = 0) -> BlockHeader:
    """The block header at ``offset`` of ``buf``; FormatError when it is not a valid one."""
    if len(buf) - offset < BLOCK_HEADER_LEN:
        raise FormatError("cut short")
    (sync, btype, flags, hlen, count, t_min, t_max, a_len, a_raw, b_len, b_raw,
     a_crc, b_crc) = BLOCK_HEADER.unpack_from(buf, offset)
    if sync != SYNC:
        raise FormatError("no sync marker")
    if hlen < BLOCK_HEADER_LEN:
        raise FormatError("bad header length")
    if len(buf) - offset < hlen:
        raise FormatError("cut short")
    (crc,) = CRC.unpack_from(buf, offset + hlen - 4)
    if crc32(buf[offset:offset + hlen - 4]) != crc:
        raise FormatError("header checksum mismatch")
    return BlockHeader(btype, flags, hlen, count, t_min, t_max, a_len, a_raw, b_len, b_raw,
                       a_crc, b_crc)


def check_body(h: BlockHeader, buf, offset: int, want_b: bool = True) -> None:
    """FormatError unless the block body at ``offset`` (start of the block) is whole and matches
    its CRCs (section B's only when ``want_b``)."""
    a0 = offset + h.hlen
    b0 = a0 + h.a_len
    if b0 + h.b_len > len(buf):
        raise FormatError("cut short")
    if crc32(buf[a0:b0]) != h.a_crc:
        raise FormatError("checksum mismatch in section A")
    if want_b and crc32(buf[b0:b0 + h.b_len]) != h.b_crc:
        raise FormatError("checksum mismatch in section B")


def sections(h: BlockHeader, buf, offset: int, dctx, want_b: bool = True):
    """(section A, section B) of a checked block, decompressed; B is None unless ``want_b``."""
    try:
        return _sections(h, buf, offset, dctx, want_b)
    except zstd.ZstdError as e:
        raise FormatError(f"bad zstd frame: {e}") from None


_CHUNK = 1 << 20


def _inflate(dctx, data, raw_len: int, name: str) -> bytes:
    """A zstd section, decompressed without trusting the sizes it declares: memory follows
    the bytes that really come out, never a length read from the file."""
    size = zstd.frame_content_size(data)
    if size == raw_len and raw_len <= 64 * _CHUNK:
        return dctx.decompress(data, max_output_size=raw_len)     # the one-shot fast path
    out = bytearray()
    with dctx.stream_reader(data) as r:
        while True:
            chunk = r.read(_CHUNK)
            if not chunk:
                break
            out += chunk
            if len(out) > raw_len:
                raise FormatError(f"section {name} length mismatch")
    return bytes(out)


def _sections(h, buf, offset, dctx, want_b):
    a0 = offset + h.hlen
    a = buf[a0:a0 + h.a_len]
    a = _inflate(dctx, a, h.a_raw, "A") if h.flags & BF_A_ZSTD else bytes(a)
    if len(a) != h.a_raw:
        raise FormatError("section A length mismatch")
    b = None
    if want_b:
        b0 = a0 + h.a_len
        b = buf[b0:b0 + h.b_len]
        b = _inflate(dctx, b, h.b_raw, "B") if h.flags & BF_B_ZSTD else bytes(b)
        if len(b) != h.b_raw:
            raise FormatError("section B length mismatch")
    return a, b


# ---------------------------------------------------------------------------------------------
# data blocks


def unpack_addr(mv, off: int):
    """((ip, port), offset after it) of an address as tables store it: u8 length, the ip's
    text, u16 port. struct.error or UnicodeDecodeError when the bytes are not one."""
    (ln,) = U8.unpack_from(mv, off)
    ip = bytes(mv[off + 1:off + 1 + ln]).decode("utf-8", "surrogatepass")
    (port,) = U16.unpack_from(mv, off + 1 + ln)
    return (ip, port), off + 3 + ln


def encode_table(msgs: list) -> tuple[bytes, list, int, int, tuple]:
    """(table section, payload parts, t_min, t_max, summary) of a data block holding ``msgs``
    (raw; ``summary`` as ``encode_block`` gives it, for the summary block); the
    payload section is the parts one after another: the requests' bytes in row order, each with
    its target left out where the ``elided`` column says so, then the other messages' bytes.

    ValueError when a field does not fit its column (see docs/log-format.md for the ranges).
    The work is the core's ``encode_block`` (``COLUMNS`` above says what it stores); decoding
    is ``replay.log.table.Table``.
    """
    table, payload, t_min, t_max, summary = encode_block(msgs)
    return table, [payload], t_min, t_max, summary


# ---------------------------------------------------------------------------------------------
# the summary block (2.1): what a replay needs before it reads the log's first block

SUMMARY_HEAD = struct.Struct("<QqqQQQ")  # requests, first, last, any conn, max conn, connections
SUMMARY_MAX_CONNS = 2_000_000            # more connections in one log: no summary (a scan)
SUMMARY_MAX_RAW = SUMMARY_HEAD.size + 16 * SUMMARY_MAX_CONNS    # the largest section A


class Summary:
    """The recorded (not ``F_REPLAYED``) requests of a log, gathered block by block from
    ``encode_block``'s summaries: how many, the least and greatest ``ts_first``, the greatest
    conn of any recorded message, and the greatest request index of each connection.

    Memory: up to ``DICT_MAX`` connections in a dict (a short capture or convert never imports
    numpy); past that in two numpy arrays (16 bytes a connection), the blocks' own summaries put
    together with them once they hold as many entries again (at least ``COMPACT_FROM``): about
    twice the connections' 16 bytes between those times, 64 MB at ``SUMMARY_MAX_CONNS``, and
    briefly once more while they are merged. ``LogWriter`` adds the blocks' summaries in its
    writing thread, never the caller's."""

    __slots__ = ("requests", "first", "last", "max_conn", "_last_of", "_conns", "_lasts",
                 "_pending", "_pending_n")

    DICT_MAX = 50_000
    COMPACT_FROM = 65_536

    def __init__(self):
        self.requests = self.first = self.last = 0
        self.max_conn = -1
        self._last_of: dict | None = {}
        self._conns = self._lasts = None
        self._pending: list = []
        self._pending_n = 0

    def add(self, block) -> bool:
        """Take one block's summary; False once it is known that there are more than
        ``SUMMARY_MAX_CONNS`` connections (the summary is then given up; ``holds`` tells for
        sure)."""
        requests, first, last, max_conn, conns, lasts = block
        if max_conn > self.max_conn:
            self.max_conn = max_conn
        if not requests:
            return True
        if self.requests:
            self.first, self.last = min(self.first, first), max(self.last, last)
        else:
            self.first, self.last = first, last
        self.requests += requests
        d = self._last_of
        if d is not None:
            for c, i in zip(conns, lasts):
                if c not in d or i > d[c]:
                    d[c] = i
            if len(d) > self.DICT_MAX:
                self._to_arrays()
        elif len(conns):
            import numpy as np

            self._pending.append((np.array(conns, dtype=np.uint64), np.array(lasts, dtype=np.int64)))
            self._pending_n += len(conns)
            if self._pending_n >= max(self.COMPACT_FROM, len(self._conns)):
                self._compact()
        return self._count() <= SUMMARY_MAX_CONNS

    def _count(self) -> int:
        return len(self._last_of) if self._last_of is not None else len(self._conns)

    def _to_arrays(self) -> None:
        import numpy as np

        d, self._last_of = self._last_of, None
        self._conns = np.array(list(d), dtype=np.uint64)
        self._lasts = np.array(list(d.values()), dtype=np.int64)
        order = np.argsort(self._conns, kind="stable")
        self._conns, self._lasts = self._conns[order], self._lasts[order]

    def _compact(self) -> None:
        """The blocks' summaries put together (each connection once, with its greatest index),
        then merged into the sorted arrays: a sort of the new part only, one copy of the rest."""
        import numpy as np

        if not self._pending:
            return
        c = np.concatenate([p[0] for p in self._pending])
        i = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_n = [], 0
        order = np.argsort(c, kind="stable")
        c, i = c[order], i[order]
        starts = np.flatnonzero(np.concatenate(([True], c[1:] != c[:-1])))
        c, i = c[starts], np.maximum.reduceat(i, starts)
        mc, ml = self._conns, self._lasts
        if not len(mc):
            self._conns, self._lasts = c, i
            return
        j = np.searchsorted(mc, c)
        at = np.minimum(j, len(mc) - 1)
        found = mc[at] == c
        ml[at[found]] = np.maximum(ml[at[found]], i[found])
        new = ~found
        self._conns = np.insert(mc, j[new], c[new])
        self._lasts = np.insert(ml, j[new], i[new])

    def holds(self) -> bool:
        """Whether the summary holds its log (no more than ``SUMMARY_MAX_CONNS`` connections)."""
        if self._last_of is None:
            self._compact()
        return self._count() <= SUMMARY_MAX_CONNS

    def section(self) -> bytes:
        """Section A of its summary block (``encode_summary``)."""
        d = self._last_of
        if d is not None:
            conns = sorted(d)
            n = len(conns)
            deltas = [c - p for c, p in zip(conns, [0] + conns[:-1])]
            body = struct.pack(f"<{n}Q", *deltas) + struct.pack(f"<{n}q", *(d[c] for c in conns))
        else:
            import numpy as np

            self._compact()
            conns, lasts = self._conns, self._lasts
            n = len(conns)
            deltas = np.diff(conns, prepend=np.uint64(0))
            body = deltas.astype("<u8").tobytes() + lasts.astype("<i8").tobytes()
        return SUMMARY_HEAD.pack(self.requests, self.first, self.last, int(self.max_conn >= 0),
                                 max(self.max_conn, 0), n) + body


def encode_summary(s: Summary) -> bytes:
    """Section A of a summary block (raw): ``SUMMARY_HEAD``, then the connections in increasing
    order as u64 differences from the one before (the first from 0), then the last request index
    of each as i64."""
    return s.section()


# ---------------------------------------------------------------------------------------------
# index blocks


def encode_index(entries: list, index_offset: int) -> bytes:
    """Section A of an index block: entries (offset, t_min, t_max, count, type), then the trailer."""
    return b"".join(INDEX_ENTRY.pack(*e) for e in entries) + INDEX_TRAILER.pack(index_offset,
                                                                               INDEX_MAGIC)
