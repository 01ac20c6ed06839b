"""Indexes of run logs too large to hold: sorted runs spilled to a temporary file and merged (an
external merge sort), read back a page at a time.

A section's index (``runs.SectionIndex``) maps each exchange key to the rows of its first
request and its last final answer. Built from a scan of the log's tables, it holds 16 bytes an
exchange, and the scan gathers 13 bytes a message before sorting: at 10 M exchanges, hundreds
of MiB. Here instead:

- the scan's messages are gathered ``RUN`` at a time, reduced to entries ``(key, req, fin)``
  sorted by key and written as one *run* to a temporary file (``TMPDIR``);
- the runs are merged by key into one sorted file of entries: an exchange whose messages fell
  in several runs is one entry (rows ascend with the runs: its request is the smallest request
  row, its final answer the largest answer row, as a single run has them);
- a lookup of a chunk's keys finds each key's page (``PAGE`` entries) in a sparse index of first
  keys kept in memory (8 bytes a page), reads only the pages the keys fall in, and searches them;
- the keys in the order they were written (the candidate's pass goes that way) are a second
  external sort of ``(first row, key)``, read back a segment at a time.

Memory: the sparse index (8 bytes a page), ``RUN`` messages while scanning, ``MERGE_MEMORY``
of the runs while merging, the pages of one chunk while looking up; only the sparse index grows
with the log (0.3 MiB at 10 M exchanges). Disk: 16 bytes an exchange a section, with its runs
32 while they merge, and 8 more for the candidate's keys in written order (up to 64 bytes an
exchange of the candidate's log while both of its sections are built).
"""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np

from replay.errors import InputError

RUN = 1 << 19            # messages of a section gathered before a sorted run is spilled (6.5 MiB)
PAGE = 256               # entries read together from a spilled index (4 KiB)
MERGE_MEMORY = 4 << 20   # bytes of all runs read at a time while merging
MERGE_BATCH = 1 << 16    # ... and at most this many entries of one run
ENTRY = np.dtype([("key", "<u8"), ("req", "<i4"), ("fin", "<i4")])
ORDER = np.dtype([("first", "<i8"), ("key", "<u8")])


def entries(keys: np.ndarray, rows: np.ndarray, is_req: np.ndarray) -> np.ndarray:
    """Messages (key, row, is a request), rows ascending, reduced to one entry per key sorted by
    key: the row of its first request and of its last final answer (-1: none)."""
    order = np.argsort(keys, kind="stable")      # stable: rows stay ascending within a key
    keys = keys[order]
    rows = rows[order]
    is_req = is_req[order]
    del order
    new = np.ones(len(keys), dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    out = np.empty(int(new.sum()), dtype=ENTRY)
    out["key"] = keys[new]
    del keys
    slot = np.cumsum(new, dtype=np.int64) - 1     # each message's exchange
    del new
    out["req"] = -1
    out["fin"] = -1
    for sel, first, field in ((is_req, True, "req"), (~is_req, False, "fin")):
        p = np.flatnonzero(sel)
        s = slot[p]
        one = np.ones(len(p), dtype=bool)         # the first request, the last final answer
        if first:
            one[1:] = s[1:] != s[:-1]
        else:
            one[:-1] = s[1:] != s[:-1]
        out[field][s[one]] = rows[p[one]]
    return out


def first_rows(req: np.ndarray, fin: np.ndarray) -> np.ndarray:
    """The first row of each exchange: the smaller of its request's and its answer's (-1: none)."""
    req, fin = req.astype(np.int64), fin.astype(np.int64)
    return np.where(req < 0, fin, np.where(fin < 0, req, np.minimum(req, fin)))


def _combine(e: np.ndarray) -> np.ndarray:
    """Entries sorted by key, one key's from several runs in run order: one entry per key."""
    k = e["key"]
    new = np.ones(len(e), dtype=bool)
    new[1:] = k[1:] != k[:-1]
    if new.all():
        return e
    starts = np.flatnonzero(new)
    req = e["req"].astype(np.int64)
    req[req < 0] = np.iinfo(np.int64).max
    first = np.minimum.reduceat(req, starts)
    first[first == np.iinfo(np.int64).max] = -1
    last = np.maximum.reduceat(e["fin"], starts)
    out = e[starts]
    out["req"] = first
    out["fin"] = last
    return out


class _File:
    """A temporary file of fixed-size records, written at its end, read at any offset."""

    def __init__(self, dtype):
        self.dtype = dtype
        try:
            self.f = tempfile.TemporaryFile(prefix="replay-report-")
        except OSError as e:
            raise InputError(f"report: cannot make a temporary index file in "
                             f"{tempfile.gettempdir()}: {e.strerror} (set TMPDIR)") from None
        self.fd = self.f.fileno()
        self.n = 0

    def append(self, a: np.ndarray) -> int:
        """Writes ``a``; its position (in records)."""
        at = self.n
        view = memoryview(np.ascontiguousarray(a)).cast("B")
        off = at * self.dtype.itemsize
        try:
            while len(view):
                done = os.pwrite(self.fd, view, off)
                if not done:            # a full disk may first write short, then nothing
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[done:]
                off += done
        except OSError as e:
            raise InputError(f"report: cannot write its temporary index in "
                             f"{tempfile.gettempdir()}: {e.strerror} (it needs up to 64 bytes "
                             f"an exchange; set TMPDIR elsewhere)") from None
        self.n += len(a)
        return at

    def read(self, at: int, count: int) -> np.ndarray:
        """``count`` records from ``at`` (fewer only past the end)."""
        size = self.dtype.itemsize
        count = max(0, min(count, self.n - at))
        try:
            data = os.pread(self.fd, count * size, at * size)
        except OSError as e:
            data = e
        if not isinstance(data, bytes) or len(data) != count * size:
            why = data.strerror if isinstance(data, OSError) else "cut short"
            raise InputError(f"report: cannot read back its temporary index in "
                             f"{tempfile.gettempdir()}: {why}")
        return np.frombuffer(data, dtype=self.dtype, count=count)

    def close(self) -> None:
        self.f.close()


class Runs:
    """Sorted runs of records (unique in ``field`` within a run), merged in order of ``field``."""

    def __init__(self, dtype, field: str):
        self.file = _File(dtype)
        self.field = field
        self.runs: list = []          # (position, length)

    def add(self, run: np.ndarray) -> None:
        if len(run):
            self.runs.append((self.file.append(run), len(run)))

    def merged(self, combine=None):
        """The records of every run in order of ``field``, in batches (``combine``: a function
        making one record of a batch's equal keys, which all come in the same batch)."""
        f, field = self.file, self.field
        left = [list(r) for r in self.runs]          # [position, remaining] of each run
        # what is read of each run at a time: the runs share one budget, so that the merge's
        # memory does not grow with their number
        each = max(1, min(MERGE_BATCH, MERGE_MEMORY // (max(1, len(left)) * f.dtype.itemsize)))
        bufs = []
        for r in left:
            bufs.append(f.read(r[0], min(each, r[1])))
            r[0] += len(bufs[-1])
            r[1] -= len(bufs[-1])
        while any(len(b) for b in bufs):
            # what every run holds up to the smallest last key of the runs with more to read:
            # nothing later in any run can sort before it
            more = [b[field][-1] for b, r in zip(bufs, left) if r[1] and len(b)]
            bound = min(more) if more else None
            parts = []
            for i, b in enumerate(bufs):
                if not len(b):
                    continue
                cut = len(b) if bound is None else int(np.searchsorted(b[field], bound, "right"))
                parts.append(b[:cut])
                rest = b[cut:]
                r = left[i]
                if not len(rest) and r[1]:
                    rest = f.read(r[0], min(each, r[1]))
                    r[0] += len(rest)
                    r[1] -= len(rest)
                bufs[i] = rest
            batch = np.concatenate(parts)
            batch = batch[np.argsort(batch[field], kind="stable")]   # equal keys in run order
            yield combine(batch) if combine is not None else batch

    def close(self) -> None:
        self.file.close()


class SpilledIndex:
    """A section's index in a temporary file: ``rows(want)`` as ``SectionIndex.rows``, and the
    keys in written order (``in_order()``)."""

    def __init__(self, runs: Runs):
        self.file = _File(ENTRY)
        sparse = []
        try:
            for batch in runs.merged(_combine):
                at = self.file.append(batch)
                # a copy: a view would keep the whole batch, and so the whole index
                sparse.append(batch["key"][(-at) % PAGE::PAGE].copy())
        finally:
            runs.close()
        self.sparse = np.concatenate(sparse) if sparse else np.empty(0, dtype=np.uint64)
        self.n = self.file.n
        self.order = None

    def __len__(self) -> int:
        return self.n

    def rows(self, want: np.ndarray):
        n = len(want)
        req = np.full(n, -1, dtype=np.int64)
        fin = np.full(n, -1, dtype=np.int64)
        if not self.n or not n:
            return req, fin
        page = np.searchsorted(self.sparse, want, side="right") - 1
        inside = page >= 0
        pages = np.unique(page[inside])
        if not len(pages):
            return req, fin
        cut = np.flatnonzero(np.diff(pages) != 1) + 1      # runs of consecutive pages: one read
        starts, ends = pages[np.r_[0, cut]], pages[np.r_[cut - 1, len(pages) - 1]] + 1
        buf = np.concatenate([self.file.read(a * PAGE, (z - a) * PAGE)
                              for a, z in zip(starts.tolist(), ends.tolist())])
        pos = np.minimum(np.searchsorted(buf["key"], want), len(buf) - 1)
        hit = inside & (buf["key"][pos] == want)
        req[hit] = buf["req"][pos[hit]]
        fin[hit] = buf["fin"][pos[hit]]
        return req, fin

    def in_order(self) -> "OrderedKeys":
        """The keys in the order of their first row: a second external sort, made once."""
        if self.order is None:
            order = Runs(ORDER, "first")
            try:
                for at in range(0, self.n, RUN):
                    e = self.file.read(at, RUN)
                    o = np.empty(len(e), dtype=ORDER)
                    o["first"] = first_rows(e["req"], e["fin"])
                    o["key"] = e["key"]
                    order.add(o[np.argsort(o["first"], kind="stable")])
                keys = _File(np.dtype("<u8"))
                for batch in order.merged():
                    keys.append(np.ascontiguousarray(batch["key"]))
            finally:
                order.close()
            self.order = keys
        return OrderedKeys(self.order)

    def close(self) -> None:
        self.file.close()
        if self.order is not None:
            self.order.close()


class OrderedKeys:
    """A section's keys in written order, in a file: ``len()`` and slices (``keys[a:b]``)."""

    def __init__(self, file: _File):
        self.file = file

    def __len__(self) -> int:
        return self.file.n

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, step = s.indices(self.file.n)
        if step != 1:
            raise ValueError("OrderedKeys: contiguous slices only")
        return self.file.read(a, max(0, b - a))
