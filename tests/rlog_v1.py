"""Version 1.x data blocks, written as the release before format 2.0 wrote them, from the rows
the core gathers: for the tests that check such logs still read (``replay.log.table.Table``)."""

from __future__ import annotations

import math

import numpy as np

from replay.core import gather_rows
from replay.layout import ROW_FIELDS
from replay.log.format import NUMPY_CODES, U64
from replay.log.table import COLUMN_DTYPES_V1

# The rows the core gathers from a block's messages (replay.layout.ROW_FIELDS), as numpy sees them.
ROW_DTYPE = np.dtype([(name, NUMPY_CODES[code]) for name, code in ROW_FIELDS])


def _zigzag(q: np.ndarray) -> np.ndarray:
    """int64 -> uint64, small magnitudes to small numbers (bijective, wrapping)."""
    return ((q << 1) ^ (q >> 63)).view(np.uint64)


def _planes(a: np.ndarray) -> bytes:
    return a.view(np.uint8).reshape(len(a), a.itemsize).T.tobytes()


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


def _rows(msgs) -> tuple:
    """``gather_rows`` of the core (either): (rows as a structured array, tail, payload)."""
    rows, tail, payload = gather_rows(msgs)
    return np.frombuffer(rows, dtype=ROW_DTYPE), tail, payload


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
