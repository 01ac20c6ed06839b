"""The decoding side of the .rlog format (numpy): a data block's table as columns, index entries.

``replay.log.format`` holds the format's constants and what a writer needs (no numpy, so that
``convert`` and ``capture`` start without it); this module is what readers add: ``Table`` (a
block's table section decoded into absolute columns, its addresses and strings, its payload
put back in row order and its Message objects made by the core), and the index block's entries
as a structured array.
"""

from __future__ import annotations

import struct

import numpy as np

from replay.core import make_messages, restore_payload, split_strings
from replay.events import KIND_REQUEST
from replay.log.format import (COLUMNS, COLUMNS_V1, INDEX_TRAILER, ROW_BYTES,
                               ROW_BYTES_V1, TABLE_PREFIX, TABLE_PREFIX_V1, U32, U64,
                               VERSION_MAJOR, FormatError, unpack_addr)

COLUMN_DTYPES = [(name, np.dtype(t)) for name, t in COLUMNS]
COLUMN_DTYPES_V1 = [(name, np.dtype(t)) for name, t in COLUMNS_V1]
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("t_min", "<i8"), ("t_max", "<i8"), ("count", "<u4"),
                        ("type", "u1"), ("pad", "V3")])

# What LogReader.table() returns: the columns with absolute values, plus where each row lives.
TABLE_DTYPE = np.dtype([
    ("kind", "u1"), ("flags", "<u4"), ("conn", "<u8"), ("index", "<i8"),
    ("ts_first", "<i8"), ("ts_last", "<i8"), ("status", "<u2"), ("body_length", "<u8"),
    ("head_length", "<u4"), ("data_length", "<u8"), ("data_offset", "<u8"),
    ("client", "<u4"), ("server", "<u4"), ("method", "<u4"), ("uri", "<u4"), ("block", "<u4"),
])


def _unzigzag(z: np.ndarray) -> np.ndarray:
    return ((z >> np.uint64(1)) ^ (np.uint64(0) - (z & np.uint64(1)))).view(np.int64)


def _unplanes(buf, dt: np.dtype, n: int, offset: int) -> np.ndarray:
    planes = np.frombuffer(buf, dtype=np.uint8, count=n * dt.itemsize, offset=offset)
    return planes.reshape(dt.itemsize, n).T.copy().view(dt).reshape(n)


def _previous(rank: np.ndarray):
    """(order, first): ``order`` sorts rows by connection rank, row order kept within one;
    ``first[j]`` is True where ``order[j]`` is its connection's first row."""
    order = np.argsort(rank, kind="stable")
    sr = rank[order]
    first = np.ones(len(rank), dtype=bool)
    first[1:] = sr[1:] != sr[:-1]
    return order, first


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


def decode_index(buf) -> np.ndarray:
    n, rest = divmod(len(buf) - INDEX_TRAILER.size, INDEX_DTYPE.itemsize)
    if n < 0 or rest:
        raise FormatError("bad index length")
    return np.frombuffer(buf, dtype=INDEX_DTYPE, count=n)


def decode_summary(buf):
    """``(requests, first, last, max_conn, conns, last_index)`` of a summary block's section A
    (``format.encode_summary``); FormatError when it does not hold together."""
    from replay.log.format import SUMMARY_HEAD

    if len(buf) < SUMMARY_HEAD.size:
        raise FormatError("summary too short")
    requests, first, last, any_conn, max_conn, n = SUMMARY_HEAD.unpack_from(buf, 0)
    if len(buf) != SUMMARY_HEAD.size + 16 * n or n > requests or any_conn > 1 \
            or not any_conn and (max_conn or n):
        raise FormatError("summary length does not match its counts")
    if not any_conn:
        max_conn = -1
    deltas = np.frombuffer(buf, dtype="<u8", count=n, offset=SUMMARY_HEAD.size)
    if n > 1 and not np.all(deltas[1:] > 0):
        raise FormatError("summary connections out of order")
    with np.errstate(over="ignore"):
        conns = np.cumsum(deltas, dtype=np.uint64)
    if n and (int(conns[-1]) > max_conn or n > 1 and not np.all(conns[1:] > conns[:-1])):
        raise FormatError("summary connections out of range")
    last_index = np.frombuffer(buf, dtype="<i8", count=n, offset=SUMMARY_HEAD.size + 8 * n)
    return requests, first, last, max_conn, conns, last_index.astype(np.int64)
