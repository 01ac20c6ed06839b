"""Runs: the output logs of ``replay play -o`` and ``replay shadow -o``, read as exchanges and
joined by recorded request.

A run log holds, for each request the replay sent, the request as sent and the target's answer
(flag ``replayed``; a request that got no complete answer has a ``failed`` record whose data is
the error's kind), then, after the replay, the recorded requests and responses of the same
exchanges (no ``replayed`` flag). ``conn`` and ``index`` are those of the recorded request; with
``--loop``, pass ``k`` used ``conn + k * conn_stride`` (the ``conn_stride`` of the log's meta).

A shadow log holds production's requests and responses as captured (no ``replayed`` flag) and
each target's answers (``replayed``) whose ``conn`` is production's plus ``slot * conn_stride``,
``slot = target * copies + copy``: one target's answers are the conn range
``[target * copies * conn_stride, (target + 1) * copies * conn_stride)``, read with that range's
start subtracted, so that a copy is a pass as with ``--loop``. A log of several targets is read
for one of them (``RunLog(path, target=...)``).

Timing of a replayed request: ``ts_first`` is when it was due by the schedule, ``ts_last`` when
its bytes were written (the same for ``--speed max``, and in logs of older releases). So, to the
last byte of the answer: service time = answer end - ts_last; latency from the intended send =
answer end - ts_first (what a client on the recorded schedule would have felt).

Theory of operation: the candidate's replayed exchanges are read once, in written order (a
replayed request and its answer are written together), in chunks. Every other section — the
recorded exchanges inside the candidate's log, a baseline's and a noise run's replayed ones — is
indexed first from its blocks' tables alone (no payload is decompressed): for each exchange key,
the row of its request and of its final answer (``SectionIndex``, 12 bytes per message). Each
chunk's counterparts are then read by row, block by block, with recently read blocks kept
decompressed. The order of the sections may differ as much as it likes (``--speed max`` runs
whole connections one after another; the recording interleaves them by time): the join is
exact, and memory holds the indexes, a chunk and a few blocks, never the logs' bodies.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from replay.errors import InputError
from replay.events import F_FAILED, F_INTERIM, F_REPLAYED, KIND_REQUEST

WINDOW = 10_000     # exchanges open at once while a section is read in written order


@dataclass(slots=True)
class Exchange:
    key: tuple                    # (recorded conn, index, pass) replayed; (conn, index) recorded
    request: object = None        # Message
    response: object = None       # the final response (Message), or None
    error: str | None = None      # replayed: the error kind when no complete answer came

    @property
    def complete(self) -> bool:
        return self.request is not None and (self.response is not None or self.error is not None)

    @property
    def status(self):
        """The final status (int), the error kind (str), or None when unanswered."""
        if self.error is not None:
            return self.error
        return self.response.status if self.response is not None else None

    @property
    def service_ns(self) -> int | None:
        """Replayed: answer end - send; recorded: answer end - request start."""
        if self.response is None or self.request is None:
            return None
        return self.response.ts_last - self.request.ts_last if self.replayed else \
            self.response.ts_last - self.request.ts_first

    @property
    def intended_ns(self) -> int | None:
        """Answer end - when the request was due (recorded: - request start)."""
        if self.response is None or self.request is None:
            return None
        return self.response.ts_last - self.request.ts_first

    @property
    def replayed(self) -> bool:
        return len(self.key) == 3


def exchanges(messages, stride: int | None, window: int = WINDOW, base: int = 0):
    """Messages of one section -> exchanges, as they complete (or are pushed out of the window).
    ``base`` is subtracted from each replayed conn (a shadow target's range)."""
    open_: OrderedDict = OrderedDict()
    gone: OrderedDict = OrderedDict()     # keys pushed out: their late messages are dropped
    for m in messages:
        if stride:
            c = m.conn - base
            key = (c % stride, m.index, c // stride)
        else:
            key = (m.conn, m.index)
        ex = open_.get(key)
        if ex is None:
            if key in gone:
                continue
            ex = open_[key] = Exchange(key)
        if m.kind == KIND_REQUEST:
            if ex.request is None:
                ex.request = m
        elif m.flags & F_FAILED:
            ex.error = m.data.decode("ascii", "replace") or "error"
        elif not m.flags & F_INTERIM:
            ex.response = m
        if ex.complete:
            del open_[key]
            yield ex
        elif len(open_) > window:
            k, old = open_.popitem(last=False)
            gone[k] = None
            if len(gone) > window:
                gone.popitem(last=False)
            yield old
    yield from open_.values()


class SectionIndex:
    """Rows of the request and of the final answer of each exchange of one section of a log, by
    key ``conn << 32 | index`` (the message's own conn: a replayed one includes its pass)."""

    def __init__(self, reader, replayed: bool, conns: tuple | None = None):
        req_k, req_r, fin_k, fin_r = [], [], [], []
        for b in list(reader.blocks):
            t = reader.columns(b, ("kind", "flags", "conn", "index"))
            if t is None:
                continue
            c = t.cols
            sel = ((c["flags"] & F_REPLAYED) != 0) if replayed else ((c["flags"] & F_REPLAYED) == 0)
            if conns is not None:
                sel &= (c["conn"] >= np.uint64(conns[0])) & (c["conn"] < np.uint64(conns[1]))
            if not sel.any():
                continue
            key = (c["conn"].astype(np.uint64) << np.uint64(32)) | (c["index"].astype(np.uint64) & np.uint64(0xFFFFFFFF))
            rows = np.arange(b.first_row, b.first_row + t.n, dtype=np.int32)
            is_req = sel & (c["kind"] == KIND_REQUEST)
            is_fin = sel & (c["kind"] != KIND_REQUEST) & ((c["flags"] & F_INTERIM) == 0) & (c["index"] >= 0)
            req_k.append(key[is_req])
            req_r.append(rows[is_req])
            fin_k.append(key[is_fin])
            fin_r.append(rows[is_fin])
        self.req = self._sorted(req_k, req_r, first=True)
        self.fin = self._sorted(fin_k, fin_r, first=False)

    @staticmethod
    def _sorted(keys, rows, first: bool):
        if not keys:
            return np.zeros(0, np.uint64), np.zeros(0, np.int32)
        k = np.concatenate(keys)
        keys.clear()
        r = np.concatenate(rows)
        rows.clear()
        # rows ascend as concatenated: a stable sort by key keeps them ascending within a key
        order = np.argsort(k, kind="stable")
        k, r = k[order], r[order]
        del order
        if len(k):
            # one row per key: the first request, the last final answer
            keep = np.ones(len(k), dtype=bool)
            if first:
                keep[1:] = k[1:] != k[:-1]
            else:
                keep[:-1] = k[1:] != k[:-1]
            k, r = k[keep], r[keep]
        return k, r

    @staticmethod
    def _find(table, want):
        k, r = table
        if not len(k):
            return np.full(len(want), -1, dtype=np.int64)
        pos = np.searchsorted(k, want)
        pos = np.minimum(pos, len(k) - 1)
        return np.where(k[pos] == want, r[pos], -1)

    def rows(self, want: np.ndarray):
        """(request rows, final answer rows) of the keys ``want`` (-1: none)."""
        return self._find(self.req, want), self._find(self.fin, want)

    def __len__(self) -> int:
        return len(self.req[0]) + len(self.fin[0])


def key_of(conn: int, index: int) -> int:
    return (conn << 32) | (index & 0xFFFFFFFF)


class Section:
    """One section of a run log, read by key: ``get(keys)`` -> Exchange or None for each."""

    def __init__(self, path: str, replayed: bool, cache_blocks: int = 8,
                 conns: tuple | None = None):
        from replay.log import LogReader

        self.reader = LogReader(path, cache_blocks=cache_blocks)
        self.index = SectionIndex(self.reader, replayed, conns)
        self.replayed = replayed
        self.found = 0

    def get(self, keys: list, ex_keys: list) -> list:
        """Exchanges for ``keys`` (ints from ``key_of``); ``ex_keys`` are the keys the Exchange
        objects carry."""
        want = np.fromiter(keys, dtype=np.uint64, count=len(keys))
        req_rows, fin_rows = self.index.rows(want)
        rows = np.concatenate([req_rows[req_rows >= 0], fin_rows[fin_rows >= 0]])
        rows.sort()
        got = dict(self.reader.messages_at(rows)) if len(rows) else {}
        out = []
        for i, k in enumerate(ex_keys):
            rq, fn = int(req_rows[i]), int(fin_rows[i])
            if rq < 0 and fn < 0:
                out.append(None)
                continue
            ex = Exchange(k, got.get(rq), None)
            m = got.get(fn)
            if m is not None:
                if m.flags & F_FAILED:
                    ex.error = m.data.decode("ascii", "replace") or "error"
                else:
                    ex.response = m
            out.append(ex)
        self.found += sum(1 for x in out if x is not None)
        return out


class RunLog:
    """One output log of ``replay play -o``, or one target's part of a ``replay shadow -o`` log."""

    def __init__(self, path: str, target: str | None = None, option: str = "--target"):
        from replay.log import LogReader, is_rlog

        if not is_rlog(path):
            from replay.sources.pcapfile import is_capture

            if is_capture(path):
                raise InputError(f"{path}: a capture, not a replay's output log (make one with "
                                 "replay play ... -o run.rlog)")
            LogReader(path)          # raises the clear error for missing or empty files
            raise InputError(f"{path}: not a .rlog log")
        self.path = path
        self._reader = LogReader(path)
        meta = self._reader.meta
        command = meta.get("command")
        if command not in ("play", "shadow"):
            raise InputError(f"{path}: not the output of replay play or shadow (its command is "
                             f"{command or 'unknown'}): run replay play ... -o run.rlog")
        self.meta = meta
        self.stride = int(meta.get("conn_stride") or 0) or None
        self.base = 0                  # replayed conns start here (a shadow target's range)
        self.conns = None              # (lo, hi) of the replayed conns read, or None: all
        self._target = str(meta.get("target", "?"))
        if command == "shadow":
            self._pick_target(target, option)
        elif target is not None:
            raise InputError(f"{path}: a log of replay play has one target ({self._target}): "
                             f"{option} is for shadow logs")

    def _pick_target(self, target, option: str) -> None:
        targets = [str(t) for t in self.meta.get("targets") or []]
        copies = int(self.meta.get("copies") or 1)
        if not targets or not self.stride:
            raise InputError(f"{self.path}: a shadow log without its targets in the metadata")
        if target is None:
            if len(targets) > 1:
                raise InputError(f"{self.path}: holds the answers of {len(targets)} targets "
                                 f"({', '.join(targets)}): choose one with {option}")
            i = 0
        else:
            i = _target_index(target, targets)
            if i is None:
                raise InputError(f"{self.path}: no target {target} in this log (it holds "
                                 f"{', '.join(targets)})")
        self._target = targets[i]
        self.base = i * copies * self.stride
        self.conns = (self.base, self.base + copies * self.stride)

    @property
    def warnings(self) -> list:
        return self._reader.warnings

    @property
    def target(self) -> str:
        return self._target

    def replayed(self, window: int = WINDOW):
        """The replayed exchanges, in written order."""
        from replay.log import LogReader

        reader = LogReader(self.path)
        try:
            if self.conns is None:
                msgs = reader.select(lambda c: (c["flags"] & F_REPLAYED) != 0)
            else:
                lo, hi = np.uint64(self.conns[0]), np.uint64(self.conns[1])
                msgs = reader.select(lambda c: ((c["flags"] & F_REPLAYED) != 0) &
                                     (c["conn"] >= lo) & (c["conn"] < hi))
            yield from exchanges(msgs, self.stride or (1 << 62), window, self.base)
        finally:
            self._absorb(reader)
            reader.close()

    def section(self, replayed: bool) -> Section:
        return Section(self.path, replayed, conns=self.conns if replayed else None)

    def done(self, section: Section | None = None) -> None:
        """A section of this log is read: keep its warnings, close it."""
        if section is not None:
            self._absorb(section.reader)
            section.reader.close()

    def close(self) -> None:
        self._reader.close()

    def _absorb(self, reader) -> None:
        for w in reader.warnings:
            if w not in self._reader.warnings:
                self._reader.warnings.append(w)


def _target_index(given: str, targets: list) -> int | None:
    """The position of ``given`` among a shadow log's targets: as written there, or the same
    URL once parsed (``staging:8080``, ``http://staging:8080/``)."""
    if given in targets:
        return targets.index(given)
    from replay.errors import UsageError
    from replay.play.sender import parse_target

    try:
        want = parse_target(given)
    except UsageError:
        return None
    for i, t in enumerate(targets):
        try:
            have = parse_target(t, resolve=False)
        except UsageError:
            continue
        if have.port == want.port and have.addr in (want.addr, want.host):
            return i
    return None


def merge_runs(paths: list, dest: str) -> str:
    """The output logs of several ``replay play`` runs (N replayers of one Kafka group, or N
    hosts replaying one log) as one run log at ``dest``, so that a report over them is the report
    of one run: every exchange counted once, histograms built from all of them (exact, not an
    average of per-run percentiles).

    Connection ids are renumbered so that runs never share one and each replayed exchange still
    pairs with the recorded exchange beside it: with run k's ``conn_stride`` s_k, a conn
    ``c = r + i * s_k`` (recorded conn r, pass i) becomes ``o_k + r + i * S``, where n_k is the
    largest r of run k plus one, S the sum of the n_k and o_k the sum of those before k (read
    from the logs' block tables first); the merged log's stride is S."""
    from replay.log import LogReader, LogWriter

    runs = [RunLog(p) for p in paths]
    for r in runs:
        if r.meta.get("command") != "play":
            raise InputError(f"{r.path}: only logs of replay play merge (this one is of "
                             f"{r.meta.get('command')}); report a shadow log on its own")
    strides = [r.stride or (1 << 40) for r in runs]
    spans = []
    for r, st in zip(runs, strides):
        top = 0
        for b in list(r._reader.blocks):
            t = r._reader.columns(b)
            if t is not None and t.n:
                top = max(top, int((t.cols["conn"] % np.uint64(st)).max()) + 1)
        spans.append(top)
    total = sum(spans)
    if total >= 1 << 31:
        raise InputError("these runs' connection ids do not fit one merged log")
    meta = dict(runs[0].meta)
    targets = sorted({str(r.meta.get("target", "?")) for r in runs})
    meta.update({"conn_stride": total, "merged_from": [os.path.basename(p) for p in paths],
                 "target": targets[0] if len(targets) == 1 else " + ".join(targets)})
    offset = 0
    with LogWriter(dest, meta=meta) as w:
        for r, s, n in zip(runs, strides, spans):
            reader = LogReader(r.path)
            try:
                for m in reader:
                    rec, it = m.conn % s, m.conn // s
                    m.conn = offset + rec + it * total
                    w.write(m)
            finally:
                r._absorb(reader)
                reader.close()
                r.close()
            offset += n
    return dest
