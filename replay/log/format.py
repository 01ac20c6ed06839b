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

import math
import struct
import zlib

import numpy as np
import zstandard as zstd

from replay.core import (encode_block, gather_rows, make_messages, restore_payload,
                         split_strings)
from replay.events import KIND_REQUEST
from replay.layout import ROW_FIELDS, TABLE_COLUMNS, TABLE_PREFIX

MAGIC = b"RLOG\r\n\x1a\n"  # PNG-style: catches text-mode (CRLF) damage
VERSION_MAJOR = 2             # what this writer writes
VERSION_MINOR = 0
READ_MAJORS = (1, 2)          # what this reader reads: 1.x data blocks keep their own table layout

# file header: magic, major u16, minor u16, header length u32, flags u32, crc32 u32
FILE_HEADER = struct.Struct("<8sHHII")
FILE_HEADER_LEN = FILE_HEADER.size + 4  # 24

SYNC = b"\xd9\x1f\x6b\xe3\x4c\xa7\x02\x95"

BLOCK_DATA = 1
BLOCK_META = 2
BLOCK_INDEX = 3
BLOCK_NAMES = {BLOCK_DATA: "data", BLOCK_META: "metadata", BLOCK_INDEX: "index"}

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
INDEX_ENTRY = np.dtype([("offset", "<u8"), ("t_min", "<i8"), ("t_max", "<i8"), ("count", "<u4"),
                        ("type", "u1"), ("pad", "V3")])
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
_NUMPY_CODES = {"B": "u1", "H": "<u2", "I": "<u4", "Q": "<u8", "q": "<i8"}
# (replay.layout.TABLE_COLUMNS: kind, flags, conn, index, ts_first, ts_last, status, body_length,
# head_length, extra, client, server (an id into the block's address table), method (0 = None,
# k = string k-1 of the block's string table), uri, elided)
COLUMNS = tuple((name, _NUMPY_CODES[code]) for name, code in TABLE_COLUMNS)
COLUMN_DTYPES = [(name, np.dtype(t)) for name, t in COLUMNS]
ROW_BYTES = sum(dt.itemsize for _, dt in COLUMN_DTYPES)

# Version 1.x tables: the same columns with their values as they are (conn, index, client, uri),
# index stored as i8, no elided column (a payload holds every message's bytes in row order).
COLUMNS_V1 = tuple((name, {"conn": "<u8", "index": "<i8"}.get(name, t))
                   for name, t in COLUMNS if name != "elided")
COLUMN_DTYPES_V1 = [(name, np.dtype(t)) for name, t in COLUMNS_V1]
ROW_BYTES_V1 = sum(dt.itemsize for _, dt in COLUMN_DTYPES_V1)
TABLE_PREFIX_V1 = 8  # u64 unit

# What LogReader.table() returns: the columns with absolute values, plus where each row lives.
TABLE_DTYPE = np.dtype([
    ("kind", "u1"), ("flags", "<u4"), ("conn", "<u8"), ("index", "<i8"),
    ("ts_first", "<i8"), ("ts_last", "<i8"), ("status", "<u2"), ("body_length", "<u8"),
    ("head_length", "<u4"), ("data_length", "<u8"), ("data_offset", "<u8"),
    ("client", "<u4"), ("server", "<u4"), ("method", "<u4"), ("uri", "<u4"), ("block", "<u4"),
])

# The rows the core gathers from a block's messages (replay.layout.ROW_FIELDS), as numpy sees them.
ROW_DTYPE = np.dtype([(name, _NUMPY_CODES[code]) for name, code in ROW_FIELDS])

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
    return head + CRC.pack(zlib.crc32(head))


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
    if zlib.crc32(buf[:hlen - 4]) != crc:
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
                             len(a), a_raw, len(b), b_raw, zlib.crc32(a), zlib.crc32(b))
    return [head + CRC.pack(zlib.crc32(head)), a, b]


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
    if zlib.crc32(buf[offset:offset + hlen - 4]) != crc:
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
    if zlib.crc32(buf[a0:b0]) != h.a_crc:
        raise FormatError("checksum mismatch in section A")
    if want_b and zlib.crc32(buf[b0:b0 + h.b_len]) != h.b_crc:
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


def _zigzag(q: np.ndarray) -> np.ndarray:
    """int64 -> uint64, small magnitudes to small numbers (bijective, wrapping)."""
    return ((q << 1) ^ (q >> 63)).view(np.uint64)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return ((z >> np.uint64(1)) ^ (np.uint64(0) - (z & np.uint64(1)))).view(np.int64)


def _planes(a: np.ndarray) -> bytes:
    return a.view(np.uint8).reshape(len(a), a.itemsize).T.tobytes()


def _unplanes(buf, dt: np.dtype, n: int, offset: int) -> np.ndarray:
    planes = np.frombuffer(buf, dtype=np.uint8, count=n * dt.itemsize, offset=offset)
    return planes.reshape(dt.itemsize, n).T.copy().view(dt).reshape(n)


def _times(tf: np.ndarray, tl: np.ndarray):
    """(zz ts_first column, zz ts_last column, unit, t_min, t_max) as version 1 stores them."""
    t_min = int(min(tf.min(), tl.min()))
    t_max = int(max(tf.max(), tl.max()))
    prev = np.empty_like(tf)
    prev[0] = t_min
    prev[1:] = tf[:-1]
    d1 = tf - prev        # wraps mod 2**64: still exact after the reader's wrapping sum
    d2 = tl - tf
    unit = math.gcd(*d1.tolist(), *d2.tolist())
    if not 0 < unit < (1 << 62):
        unit = 1
    return _zigzag(d1 // unit), _zigzag(d2 // unit), unit, t_min, t_max


def _previous(rank: np.ndarray):
    """(order, first): ``order`` sorts rows by connection rank, row order kept within one;
    ``first[j]`` is True where ``order[j]`` is its connection's first row."""
    order = np.argsort(rank, kind="stable")
    sr = rank[order]
    first = np.ones(len(rank), dtype=bool)
    first[1:] = sr[1:] != sr[:-1]
    return order, first


def _rows(msgs) -> tuple:
    """``gather_rows`` of the core (either): (rows as a structured array, tail, payload)."""
    rows, tail, payload = gather_rows(msgs)
    return np.frombuffer(rows, dtype=ROW_DTYPE), tail, payload


def encode_table(msgs: list) -> tuple[bytes, list, int, int]:
    """(table section, payload parts, t_min, t_max) of a data block holding ``msgs`` (raw); the
    payload section is the parts one after another: the requests' bytes in row order, each with
    its target left out where the ``elided`` column says so, then the other messages' bytes.

    ValueError when a field does not fit its column (see docs/log-format.md for the ranges).
    The work is the core's ``encode_block`` (``COLUMNS`` above says what it stores); decoding
    is here (``Table``).
    """
    table, payload, t_min, t_max = encode_block(msgs)
    return table, [payload], t_min, t_max


def encode_table_v1(msgs: list) -> tuple[bytes, list, int, int]:
    """A version 1.x data block's (table section, payload parts, t_min, t_max), for tests that
    check that such logs still read."""
    r, tail, _ = _rows(msgs)
    with np.errstate(over="ignore"):
        zf, zl, unit, t_min, t_max = _times(r["ts_first"], r["ts_last"])
    cols = {"ts_first": zf, "ts_last": zl, "extra": _zigzag(r["extra"].view(np.int64))}
    out = bytearray(U64.pack(unit))
    for name, dt in COLUMN_DTYPES_V1:
        out += _planes((cols[name] if name in cols else r[name]).astype(dt))
    out += tail
    return bytes(out), [bytes(m.data) for m in msgs], t_min, t_max


# the columns a version 2 column is decoded from, besides its own
_NEEDS = {"index": ("conn", "kind"), "client": ("conn",), "uri": ("conn",), "ts_last": ("ts_first",)}


class Table:
    """The decoded table section of one data block: absolute columns, addresses, strings."""

    __slots__ = ("n", "cols", "addrs", "strings", "major")

    def __init__(self, buf, n: int, t_min: int, columns_only: bool = False, names=None,
                 major: int = VERSION_MAJOR):
        """``columns_only``: the numeric columns alone; ``names`` (with it): only those of
        ``COLUMNS``, ``extra`` excepted (``ts_last`` brings ``ts_first``; no ``data_length``).
        ``major``: the file's major version (1.x tables have their own layout)."""
        v1 = major == 1
        dtypes = COLUMN_DTYPES_V1 if v1 else COLUMN_DTYPES
        prefix = TABLE_PREFIX_V1 if v1 else TABLE_PREFIX
        row_bytes = ROW_BYTES_V1 if v1 else ROW_BYTES
        if len(buf) < prefix + row_bytes * n:
            raise FormatError("table section too short")
        self.n = n
        self.major = major
        (unit,) = U64.unpack_from(buf, 0)
        known = {name for name, _ in dtypes} - {"elided"}
        want = None
        if names is not None:
            unknown = set(names) - known | {"extra"} & set(names)
            if unknown:
                raise ValueError(f"not a column that can be asked for: {sorted(unknown)}")
            want = set(names)
            for name in names:
                want.update(_NEEDS.get(name, ()) if not v1 or name == "ts_last" else ())
        cols = {}
        off = prefix
        for name, dt in dtypes:
            if want is None or name in want:
                cols[name] = _unplanes(buf, dt, n, off)
            off += dt.itemsize * n
        with np.errstate(over="ignore"):
            if not v1:
                off = self._decode(cols, buf, off)
            u = np.int64(unit if unit < (1 << 63) else 1)
            if "ts_first" in cols:
                first = np.cumsum(_unzigzag(cols["ts_first"]) * u) + np.int64(t_min)
                cols["ts_first"] = first
                if "ts_last" in cols:
                    cols["ts_last"] = first + _unzigzag(cols.pop("ts_last")) * u
            if names is None:
                extra = _unzigzag(cols.pop("extra")).view(np.uint64)
                cols["data_length"] = cols["body_length"] + cols["head_length"].astype(np.uint64) + extra
            else:
                for name in set(cols) - set(names):
                    if name != "ts_first" or "ts_last" not in names:
                        del cols[name]
        self.cols = cols
        if columns_only:            # a scan of the index: addresses and strings not decoded
            self.addrs = self.strings = None
            return
        mv = memoryview(buf)
        try:
            (na,) = U32.unpack_from(mv, off)
            off += 4
            addrs = []
            for _ in range(na):
                addr, off = unpack_addr(mv, off)
                addrs.append(addr)
            (ns,) = U32.unpack_from(mv, off)
            strings, off = split_strings(bytes(buf), off + 4, ns)
        except (struct.error, ValueError) as e:       # UnicodeDecodeError is a ValueError
            raise FormatError(f"bad table section: {e}") from None
        if off != len(buf):
            raise FormatError("bad table section: trailing bytes")
        self.addrs = addrs
        self.strings = strings

    def _decode(self, cols: dict, buf, off: int) -> int:
        """Version 2: the stored codes of ``cols`` made values (see ``COLUMNS``); the offset
        after the connection table."""
        n = self.n
        (nconn,) = U32.unpack_from(buf, 8)
        if len(buf) < off + 8 * nconn:
            raise FormatError("table section too short")
        if "conn" not in cols:
            return off + 8 * nconn
        code = cols["conn"].astype(np.int64)
        new = code == 0
        if int(np.count_nonzero(new)) != nconn:
            raise FormatError("bad table section: connection table does not match its rows")
        rank = code - 1
        rank[new] = np.arange(nconn)
        if n and int(rank.max()) >= nconn:
            raise FormatError("bad table section: connection out of range")
        table = np.cumsum(_unzigzag(_unplanes(buf, np.dtype("<u8"), nconn, off)))
        cols["conn"] = table.view(np.uint64)[rank]
        if not ({"index", "client", "uri"} & cols.keys()):
            return off + 8 * nconn
        order, first = _previous(rank)
        starts = np.flatnonzero(first)
        group = np.cumsum(first) - 1

        def inherit(explicit, values):
            es = explicit[order]
            if not es[first].all():
                raise FormatError("bad table section: a connection's first row inherits")
            pos = np.maximum.accumulate(np.where(es, np.arange(n), 0))
            out = np.empty_like(values)
            out[order] = values[order][pos]
            return out

        if "index" in cols:
            step = np.zeros(n, dtype=np.int64)
            is_first = np.zeros(n, dtype=bool)
            is_first[order[first]] = True
            step[~is_first & (cols["kind"] == KIND_REQUEST)] = 1
            v = (_unzigzag(cols["index"]) + step)[order]
            cs = np.cumsum(v)
            index = np.empty(n, dtype=np.int64)
            index[order] = cs - (cs[starts] - v[starts])[group]
            cols["index"] = index
        if "client" in cols:
            code = cols["client"].astype(np.int64)
            cols["client"] = inherit(code != 0, code - 1).astype(np.uint32)
        if "uri" in cols:
            code = cols["uri"].astype(np.int64)
            fresh = code == 1
            values = code - 2
            values[fresh] = np.arange(1, int(np.count_nonzero(fresh)) + 1)
            cols["uri"] = inherit(code != 0, values).astype(np.uint32)
        return off + 8 * nconn

    def data_offsets(self) -> np.ndarray:
        offs = np.zeros(self.n, dtype=np.uint64)
        if self.n > 1:
            np.cumsum(self.cols["data_length"][:-1], out=offs[1:])
        return offs

    def payload(self, stored) -> bytes:
        """The messages' bytes in row order (what ``data_offsets`` finds them in) from a block's
        stored payload section: version 2 stores the requests first, targets left out."""
        if self.major == 1 or not self.n:
            return stored
        c = self.cols
        kind = c["kind"]
        rq = np.flatnonzero(kind == KIND_REQUEST)
        if not c["elided"].any() and (not len(rq) or rq[-1] == len(rq) - 1):
            if int(c["data_length"].sum(dtype=np.uint64)) != len(stored) \
                    or (c["data_length"] > len(stored)).any():     # no wrapping
                raise FormatError("payload length does not match the table")
            return stored         # nothing left out, the requests first already
        try:
            return restore_payload(bytes(stored), kind, c["data_length"], c["elided"],
                                   c["method"], c["uri"], self.strings)
        except ValueError as e:
            raise FormatError(str(e)) from None

    def messages(self, payload, rows=None) -> list:
        """The Message objects of this block (all rows, or the given row numbers)."""
        c = self.cols
        lens = c["data_length"]
        offs = self.data_offsets()
        if self.n and int(offs[-1]) + int(lens[-1]) != len(payload) or not self.n and payload:
            raise FormatError("payload length does not match the table")
        if rows is None:
            rows = slice(None)
        try:
            return make_messages(
                *(np.ascontiguousarray(c[name][rows]) for name in (
                    "kind", "conn", "index", "ts_first", "ts_last", "client", "server", "flags")),
                np.ascontiguousarray(offs[rows]), np.ascontiguousarray(lens[rows]),
                *(np.ascontiguousarray(c[name][rows]) for name in (
                    "method", "uri", "status", "body_length", "head_length")),
                bytes(payload), self.addrs, self.strings)
        except IndexError:
            raise FormatError("bad table section: id out of range") from None


# ---------------------------------------------------------------------------------------------
# index blocks


def encode_index(entries: list, index_offset: int) -> bytes:
    """Section A of an index block: entries (offset, t_min, t_max, count, type), then the trailer."""
    arr = np.zeros(len(entries), dtype=INDEX_ENTRY)
    for i, (off, t0, t1, cnt, bt) in enumerate(entries):
        arr[i] = (off, t0, t1, cnt, bt, b"\0\0\0")
    return arr.tobytes() + INDEX_TRAILER.pack(index_offset, INDEX_MAGIC)


def decode_index(buf) -> np.ndarray:
    n, rest = divmod(len(buf) - INDEX_TRAILER.size, INDEX_ENTRY.itemsize)
    if n < 0 or rest:
        raise FormatError("bad index length")
    return np.frombuffer(buf, dtype=INDEX_ENTRY, count=n)
