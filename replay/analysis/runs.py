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

Theory of operation: every section — the candidate's replayed exchanges, the recorded ones
inside its log, a baseline's and a noise run's replayed ones — is indexed first from its blocks'
tables alone (no payload is decompressed): for each exchange key, the row of its first request
and of its last final answer (``SectionIndex``, 16 bytes per exchange; past ``spill.RUN``
messages, a ``spill.SpilledIndex`` in a temporary file read a page at a time, so that memory
does not grow with the log). The candidate's keys are
then taken in chunks in the order they were written (so its blocks are read once, in order),
and each chunk's counterparts by row, block by block, with recently read blocks kept
decompressed. A chunk comes out as columns (``Batch``: statuses, times, rows) and the bytes of
its answers, never one Python object per message. The order of the sections may differ as much
as it likes (``--speed max`` runs whole connections one after another; the recording
interleaves them by time): the join is exact, and memory holds the (small or spilled) indexes,
a chunk and a few blocks, never the logs' bodies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from replay.analysis import spill
from replay.errors import InputError
from replay.events import F_FAILED, F_INTERIM, F_REPLAYED, KIND_REQUEST



@dataclass(slots=True)
class Exchange:
    key: tuple                    # (recorded conn, index, pass) replayed; (conn, index) recorded
    request: object = None        # Message
    response: object = None       # the final response (Message), or None
    error: str | None = None      # replayed: the error kind when no complete answer came

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


class SectionIndex:
    """Rows of the first request and of the last final answer of each exchange of one section
    of a log, by key ``conn << 32 | index`` (the message's own conn: a replayed one includes its
    pass): ``keys`` ascending, ``req`` and ``fin`` their rows (-1: none), 16 bytes an exchange.

    Built from the blocks' tables alone (``scan``: the sections of one log in one reading),
    into arrays that grow (13 bytes a message selected while building), not a list of small
    ones: those would stay in the heap as fragments. A section of more than ``spill.RUN``
    messages gets a ``spill.SpilledIndex`` instead, with the same ``rows``/``in_order``."""

    def __init__(self, keys, req, fin):
        self.keys, self.req, self.fin = keys, req, fin

    def rows(self, want: np.ndarray):
        """(request rows, final answer rows) of the keys ``want`` (-1: none)."""
        k = self.keys
        if not len(k):
            none = np.full(len(want), -1, dtype=np.int64)
            return none, none.copy()
        pos = np.minimum(np.searchsorted(k, want), len(k) - 1)
        hit = k[pos] == want
        return (np.where(hit, self.req[pos], -1).astype(np.int64),
                np.where(hit, self.fin[pos], -1).astype(np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def in_order(self) -> np.ndarray:
        """Every key, in the order of its first row."""
        return self.keys[np.argsort(spill.first_rows(self.req, self.fin), kind="stable")]

    def close(self) -> None:
        pass

    @classmethod
    def scan(cls, reader, specs) -> list:
        """One index for each ``(replayed, conns)`` of ``specs`` (conns: (lo, hi) or None)."""
        blocks = list(reader.blocks)
        builders = [_Builder(replayed, conns, max(1 << 16, sum(b.count for b in blocks) // 4))
                    for replayed, conns in specs]
        for b in blocks:
            t = reader.columns(b, ("kind", "flags", "conn", "index"))
            if t is None:
                continue
            c = t.cols
            req = c["kind"] == KIND_REQUEST
            final = req | (((c["flags"] & F_INTERIM) == 0) & (c["index"] >= 0))
            replayed = (c["flags"] & F_REPLAYED) != 0
            for bd in builders:
                bd.add(b, c, req, final & (replayed if bd.replayed else ~replayed))
        reader.release_pages()
        return [bd.finish() for bd in builders]


class _Builder:
    """The messages of one section, gathered block by block, then sorted into its index; past
    ``spill.RUN`` messages, gathered in sorted runs spilled to a temporary file and merged."""

    def __init__(self, replayed: bool, conns, cap: int):
        self.replayed, self.conns = replayed, conns
        cap = min(cap, spill.RUN)
        self.keys = np.empty(cap, dtype=np.uint64)
        self.rows = np.empty(cap, dtype=np.int32)
        self.is_req = np.empty(cap, dtype=bool)
        self.m = 0
        self.runs = None

    def add(self, b, c, req, sel) -> None:
        if self.conns is not None:
            sel &= (c["conn"] >= np.uint64(self.conns[0])) & (c["conn"] < np.uint64(self.conns[1]))
        pos = np.flatnonzero(sel)
        k, m = len(pos), self.m
        if not k:
            return
        if m + k > len(self.keys):
            if m and m + k > spill.RUN:
                if self.runs is None:
                    self.runs = spill.Runs(spill.ENTRY, "key")
                self.runs.add(self._entries())
                m = self.m = 0
            if m + k > len(self.keys):
                cap = max(m + k, min(len(self.keys) * 2, spill.RUN))
                self.keys, self.rows, self.is_req = (np.resize(a, cap) for a in
                                                     (self.keys, self.rows, self.is_req))
        self.keys[m:m + k] = key_of(c["conn"][pos], c["index"][pos])
        self.rows[m:m + k] = pos + b.first_row
        self.is_req[m:m + k] = req[pos]
        self.m = m + k

    def _entries(self) -> np.ndarray:
        m = self.m
        return spill.entries(self.keys[:m], self.rows[:m], self.is_req[:m])

    def finish(self):
        e = self._entries()
        self.keys = self.rows = self.is_req = None
        if self.runs is None:
            return SectionIndex(*(np.ascontiguousarray(e[f]) for f in ("key", "req", "fin")))
        self.runs.add(e)
        del e
        return spill.SpilledIndex(self.runs)


def key_of(conn: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The keys of exchanges (arrays): ``conn << 32 | index`` as uint64."""
    return (conn.astype(np.uint64) << np.uint64(32)) | (index.astype(np.uint64) & np.uint64(0xFFFFFFFF))


ERRORS: dict = {}        # the error kinds of failed records -> code (status = -2 - code)
ERROR_NAMES: list = []
NONE = -1               # status of an exchange without a final answer


def error_code(kind: str) -> int:
    got = ERRORS.get(kind)
    if got is None:
        got = ERRORS[kind] = -2 - len(ERROR_NAMES)
        ERROR_NAMES.append(kind)
    return got


def status_of(code: int):
    """A status code of a ``Batch`` as ``Exchange.status`` gives it: int, error kind or None."""
    if code >= 0:
        return code
    return None if code == NONE else ERROR_NAMES[-2 - code]


class Batch:
    """Exchanges of one section for a list of keys, as columns (numpy arrays aligned with the
    keys) and, where asked, the bytes of their messages (lists). ``status``: the final answer's
    (>= 0), ``NONE``, or an error kind's code (``status_of``)."""

    __slots__ = ("n", "found", "has_req", "has_resp", "status", "req_first", "req_last",
                 "resp_last", "method", "uri", "req_data", "resp_data", "resp_head",
                 "req_rows", "fin_rows", "replayed")

    def service(self) -> tuple:
        """(values ns, where valid): answer end - send (replayed), - request start (recorded)."""
        ok = self.has_req & self.has_resp
        return self.resp_last - (self.req_last if self.replayed else self.req_first), ok

    def intended(self) -> tuple:
        return self.resp_last - self.req_first, self.has_req & self.has_resp


class Section:
    """One section of a run log, read by key: ``take(keys)`` -> ``Batch``.

    Rows are those of the log's blocks as they were when the section was indexed: a block
    found damaged later leaves its exchanges missing, the others keep their rows."""

    def __init__(self, reader, blocks: list, index: SectionIndex, replayed: bool):
        self.reader = reader
        self.blocks = blocks
        self.starts = np.array([b.first_row for b in blocks], dtype=np.int64)
        self.index = index
        self.replayed = replayed
        self.found = 0

    @classmethod
    def open(cls, path: str, specs, cache_blocks: int = 8) -> list:
        """A Section for each ``(replayed, conns)`` of ``specs``, indexed in one reading of the
        log's tables; each has its own reader (and cache of blocks)."""
        from replay.log import LogReader

        readers = []
        try:
            for _ in specs:
                readers.append(LogReader(path, cache_blocks=cache_blocks))
            blocks = list(readers[0].blocks)
            indexes = SectionIndex.scan(readers[0], specs)
        except BaseException:
            for r in readers:
                r.close()
            raise
        return [cls(r, blocks, ix, replayed) for r, ix, (replayed, _) in zip(readers, indexes, specs)]

    def keys_in_order(self):
        """Every key of the section, in the order their first message was written: an array,
        or for a spilled index an ``OrderedKeys`` (``len()`` and slices read from its file)."""
        return self.index.in_order()

    def take(self, keys: np.ndarray, data: bool = True, req_data: bool = False,
             light: bool = False, count: bool = True) -> Batch:
        """The exchanges of ``keys`` (ints of ``key_of``). ``data``: the answers' bytes;
        ``req_data``: the requests' bodies (raw, after the head) where they have one;
        ``light``: only which exist (``found``, ``has_req``), from the index, no block read;
        ``count``: count them in ``found``."""
        n = len(keys)
        req_rows, fin_rows = self.index.rows(keys)
        bt = Batch()
        bt.n = n
        bt.replayed = self.replayed
        bt.req_rows, bt.fin_rows = req_rows, fin_rows
        bt.status = np.full(n, NONE, dtype=np.int64)
        bt.req_first = np.zeros(n, dtype=np.int64)
        bt.req_last = np.zeros(n, dtype=np.int64)
        bt.resp_last = np.zeros(n, dtype=np.int64)
        bt.resp_head = np.zeros(n, dtype=np.int64)
        bt.has_req = np.zeros(n, dtype=bool)
        bt.has_resp = np.zeros(n, dtype=bool)
        bt.method = [None] * n
        bt.uri = [None] * n
        bt.req_data = [None] * n
        bt.resp_data = [None] * n if data else None
        if light:
            bt.has_req = req_rows >= 0
        for rows, is_req in (() if light else ((req_rows, True), (fin_rows, False))):
            pos = np.flatnonzero(rows >= 0)
            if not len(pos):
                continue
            order = np.argsort(rows[pos], kind="stable")
            pos = pos[order]
            rs = rows[pos]
            bi = np.searchsorted(self.starts, rs, side="right") - 1
            edges = np.flatnonzero(np.diff(bi)) + 1
            for a, z in zip([0, *edges.tolist()], [*edges.tolist(), len(rs)]):
                b = self.blocks[int(bi[a])]
                got = self.reader.block(b)
                if got is None:
                    continue            # damaged: these exchanges are missing (a warning says so)
                table, payload = got
                local = rs[a:z] - b.first_row
                p = pos[a:z]
                c = table.cols
                if is_req:
                    self._requests(bt, p, local, table, payload, req_data)
                else:
                    self._answers(bt, p, local, c, table, payload, data)
        found = bt.has_req | ((fin_rows >= 0) if light else (bt.status != NONE))
        bt.found = found
        if count:
            self.found += int(found.sum())
        return bt

    @staticmethod
    def _requests(bt, p, local, table, payload, req_data):
        c = table.cols
        bt.has_req[p] = True
        bt.req_first[p] = c["ts_first"][local]
        bt.req_last[p] = c["ts_last"][local]
        strings = table.strings
        meth, uri = bt.method, bt.uri
        for i, mi, ui in zip(p.tolist(), c["method"][local].tolist(), c["uri"][local].tolist()):
            meth[i] = strings[mi]
            uri[i] = strings[ui]
        if req_data:
            head = c["head_length"][local].astype(np.int64)
            lens = c["data_length"][local].astype(np.int64)
            sel = np.flatnonzero(lens > head)
            if len(sel):
                start = table.data_offsets()[local[sel]].astype(np.int64)
                rd = bt.req_data
                for i, o, h, ln in zip(p[sel].tolist(), start.tolist(), head[sel].tolist(),
                                       lens[sel].tolist()):
                    rd[i] = payload[o + h:o + ln]

    @staticmethod
    def _answers(bt, p, local, c, table, payload, data):
        flags = c["flags"][local]
        failed = (flags & F_FAILED) != 0
        bt.status[p] = c["status"][local]
        bt.resp_last[p] = c["ts_last"][local]
        bt.has_resp[p] = ~failed
        bt.resp_head[p] = c["head_length"][local]
        offs = lens = None
        if failed.any():
            offs = table.data_offsets()
            lens = c["data_length"]
            for i, o, ln in zip(p[failed].tolist(), offs[local[failed]].tolist(),
                                lens[local[failed]].tolist()):
                bt.status[i] = error_code(bytes(payload[o:o + ln]).decode("ascii", "replace") or "error")
        if data:
            if offs is None:
                offs = table.data_offsets()
                lens = c["data_length"]
            ok = ~failed
            rd = bt.resp_data
            for i, o, ln in zip(p[ok].tolist(), offs[local[ok]].tolist(), lens[local[ok]].tolist()):
                rd[i] = payload[o:o + ln]

    def exchange(self, bt: Batch, i: int, key: tuple):
        """Exchange ``i`` of a batch as an ``Exchange`` of Message objects (for examples)."""
        rq, fn = int(bt.req_rows[i]), int(bt.fin_rows[i])
        if not bt.found[i]:
            return None
        ex = Exchange(key)
        for row, is_req in ((rq, True), (fn, False)):
            if row < 0:
                continue
            b = self.blocks[int(np.searchsorted(self.starts, row, side="right") - 1)]
            got = self.reader.block(b)
            if got is None:
                continue
            table, payload = got
            (m,) = table.messages(payload, rows=[row - b.first_row])
            if is_req:
                ex.request = m
            elif m.flags & F_FAILED:
                ex.error = m.data.decode("ascii", "replace") or "error"
            else:
                ex.response = m
        return ex


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

    def section(self, replayed: bool) -> Section:
        return Section.open(self.path, [(replayed, self.conns if replayed else None)])[0]

    def sections(self) -> tuple:
        """(the replayed section, the recorded one), indexed in one reading."""
        return tuple(Section.open(self.path, [(True, self.conns), (False, None)]))

    def done(self, section: Section | None = None) -> None:
        """A section of this log is read: keep its warnings, close it."""
        if section is not None:
            self._absorb(section.reader)
            section.reader.close()
            section.index.close()

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
