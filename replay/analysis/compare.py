"""One pass over a candidate run and its references, per endpoint: what changed, and whether it
is a regression (``replay.analysis.verdict``).

Theory of operation: the candidate's replayed exchanges drive (``replay.analysis.runs``), in
the order they were written, in chunks of ``CHUNK``; for each chunk, the *baseline* (another
run's replayed exchanges with the same keys, or without ``--baseline`` the recorded exchanges
inside the candidate's log), the *noise* run's and the recording's are taken by key, as
columns. Counts, matrices, histograms and timelines are added per chunk with numpy; only
answers that differ are compared one by one. The chunks form segments of ``SEGMENT``
exchanges; what is sampled (repeated requests, values checked for a random look) starts afresh
in each, so that worker processes, each given whole segments and merged in order, report
exactly what one process does. Per endpoint, only counters, HDR histograms and a few examples
are kept:
- statuses: a matrix baseline -> candidate (an error kind counts as a status), and how often
  the candidate's differs from the baseline's, and the noise run's from the baseline's;
- latency: service time and latency from the intended send, per run (HDR, 2 significant
  digits, 1 µs to 1 h); the recording's latency (request start to response end at the capture
  point); how many candidate requests were held back (sent more than 1 ms after they were due,
  behind an earlier answer on their connection);
- fields (``replay.analysis.diff``), compared when both answered with the same status: how
  often each differs candidate vs baseline and baseline vs noise; without a noise run, also how
  often it changes between repeated identical requests of the baseline (which then stand in
  for a noise run in the same rule: headers count over every endpoint, being the same
  everywhere), and whether its values look random (dates, epoch times, UUIDs, long tokens) on
  nearly every exchange: such a field is a *noise suspect*, reported apart, not as a regression;
- examples: the first three exchanges of each (endpoint, kind, field), with both bodies cut to
  ``EXAMPLE_BYTES`` and a curl command that sends the request to the candidate.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import shlex
import signal
from collections import Counter, OrderedDict

import numpy as np

from replay.analysis import diff as D
from replay.analysis.endpoints import OTHER, Endpoints
from replay.errors import InputError, ReplayError
from replay.analysis.runs import RunLog, key_of, status_of
from replay.hist import Hist
from replay.analysis.verdict import (PERCENTILES, Thresholds, latency_regressed, rate_regressed)

CHUNK = 8192            # candidate exchanges whose counterparts are read together
MAX_WORKERS = 4
URI_MEMORY = 20_000     # request-targets whose endpoint is remembered
EXAMPLES = 3
EXAMPLE_BYTES = 4096
HELD_NS = 1_000_000
REPEAT_MEMORY = 20_000      # request identities whose last baseline answer is kept
REPEAT_BYTES = 8 << 20      # ... in one ring of this size
REPEAT_SAMPLE = 1_000       # repeats compared per endpoint and segment (a rate needs no more)
RANDOM_SAMPLE = 50          # differing values per field and segment checked for a random look
REPEAT_TRACK = 8_192        # answers remembered per endpoint and segment (to find repeats)
SEGMENT = 65_536            # candidate exchanges sampled on their own (see Analysis.run)
TIMELINE_BUCKETS = 120
CURVE = (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100)

_RANDOM = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?"          # ISO 8601
    r"|[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT"             # RFC 9110 date
    r"|1[5-9]\d{8}(\d{3})?(\.\d+)?"                                           # epoch s or ms
    r"|[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
    r"|[A-Za-z0-9+/_=\-]{20,}")


def _random_looking(v) -> bool:
    if isinstance(v, bool) or v is None:
        return False
    s = str(v)
    return bool(_RANDOM.fullmatch(s)) and not s.isalpha()


def _pcts(hist) -> dict:
    h = hist.flush()
    n = h.get_total_count()
    out = {"count": n}
    for p in PERCENTILES:
        out[f"p{p}"] = round(h.get_value_at_percentile(p) / 1000, 3) if n else None
    out["max"] = round(h.get_max_value() / 1000, 3) if n else None
    return out


def status_class(s) -> str:
    if s is None:
        return "none"
    if isinstance(s, str):
        return s
    return f"{s // 100}xx"


class _LogHist:
    """A small histogram for the timeline: buckets 10 % wide from 1 µs, enough for a p99 curve."""

    __slots__ = ("counts", "n")
    STEP = math.log(1.1)

    def __init__(self):
        self.counts = Counter()
        self.n = 0

    def merge(self, other):
        self.counts.update(other.counts)
        self.n += other.n

    def percentile(self, p):
        if not self.n:
            return None
        want = math.ceil(self.n * p / 100)
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= want:
                return math.exp((b + 1) * self.STEP) / 1000     # ms, the bucket's upper edge
        return None


class _Run:
    """Per run (candidate, baseline, noise): totals, overall histogram, timeline.

    The timeline has at most 2 * TIMELINE_BUCKETS buckets: when a run outlasts them, the buckets
    are merged in pairs and their width doubles."""

    def __init__(self, label):
        self.label = label
        self.hist = Hist()
        self.t0 = None              # the run's first request: its timeline starts there
        self.width = 100_000_000    # buckets start at 100 ms and double as the run outlasts them
        self.buckets: dict = {}
        self.statuses = Counter()
        self.count = 0

    def add_batch(self, bt, mask):
        """The exchanges of a ``runs.Batch`` where ``mask`` is true."""
        idx = np.flatnonzero(mask)
        if not len(idx):
            return
        self.count += len(idx)
        for v, k in zip(*[a.tolist() for a in np.unique(bt.status[idx], return_counts=True)]):
            st = status_of(v)
            self.statuses[st if isinstance(st, str) else status_class(st)] += k
        svc, ok = bt.service()
        svc, ok = svc[idx], ok[idx]
        self.hist.extend(svc[ok])
        hr = bt.has_req[idx]
        if not hr.any():
            return
        ts, svc, ok = bt.req_first[idx][hr], svc[hr], ok[hr]
        if self.t0 is None:
            self.t0 = int(ts[0])
        rel = np.maximum(ts - self.t0, 0)
        b = rel // self.width
        while int(b.max()) >= 2 * TIMELINE_BUCKETS:
            self._coarser()
            b = rel // self.width
        buckets = self.buckets
        for bb, k in zip(*[a.tolist() for a in np.unique(b, return_counts=True)]):
            got = buckets.get(bb)
            if got is None:
                got = buckets[bb] = [0, _LogHist()]
            got[0] += k
        us = svc[ok] // 1000
        bins = np.where(us > 1, np.log(np.maximum(us, 1)) / _LogHist.STEP, 0).astype(np.int64)
        for v, k in zip(*[a.tolist() for a in np.unique(b[ok] * 4096 + bins, return_counts=True)]):
            h = buckets[v // 4096][1]
            h.counts[v % 4096] += k
            h.n += k

    def merge(self, other: "_Run") -> None:
        """Another process's part of the same run (a worker's): counts added, timelines on
        one width from the earlier start. Exact when both started from the same ``t0`` and
        width (a worker inherits the parent's: the first chunk is read before it starts); a
        part that began its own timeline (its run had no request in that chunk) lands within
        one bucket of where one process would have put it."""
        self.count += other.count
        self.statuses.update(other.statuses)
        self.hist.merge(other.hist)
        if other.t0 is None:
            return
        t0 = other.t0 if self.t0 is None else min(self.t0, other.t0)
        if self.t0 is None:
            self.t0, self.width = t0, other.width
        while self.width < other.width:
            self._coarser()
        while other.width < self.width:
            other._coarser()
        while True:
            # both parts' buckets counted from the earlier start, on the width they now share
            parts = [{b + (r.t0 - t0) // r.width: v for b, v in r.buckets.items()}
                     for r in (self, other)]
            if max((max(p, default=0) for p in parts), default=0) < 2 * TIMELINE_BUCKETS:
                break
            self._coarser()
            other._coarser()
        self.t0, self.buckets = t0, parts[0]
        for b, (n, h) in parts[1].items():
            got = self.buckets.get(b)
            if got is None:
                self.buckets[b] = [n, h]
            else:
                got[0] += n
                got[1].merge(h)

    def _coarser(self):
        old = self.buckets
        self.buckets = {}
        self.width *= 2
        for b, (n, h) in old.items():
            got = self.buckets.get(b // 2)
            if got is None:
                self.buckets[b // 2] = [n, h]
            else:
                got[0] += n
                got[1].merge(h)

    def timeline(self) -> list:
        w = self.width / 1e9
        out = []
        for b, (n, h) in sorted(self.buckets.items()):
            p99 = h.percentile(99)
            out.append({"t": round(b * w, 3), "requests_per_s": round(n / w, 3),
                        "p99_ms": round(p99, 3) if p99 is not None else None})
        return out

    def curve(self) -> list:
        h = self.hist.flush()
        if not h.get_total_count():
            return []
        return [[p, round(h.get_value_at_percentile(p) / 1000, 3)] for p in CURVE]


class _Recent:
    """The last answer to each of the ``REPEAT_MEMORY`` request identities seen last (ints),
    its bytes in one ring of ``REPEAT_BYTES``: memory fixed whatever the run, where answers kept
    one by one would pin pieces of the allocator's pages all over the heap. An answer that the
    ring has overwritten since is forgotten."""

    def __init__(self, size: int = REPEAT_BYTES, keys: int = REPEAT_MEMORY):
        self.ring = bytearray(size)
        self.size = size
        self.keys = keys
        self.written = 0              # bytes ever written: an answer starting before
        self.index: OrderedDict = OrderedDict()  # written - size is gone

    def get(self, ident: int):
        got = self.index.get(ident)
        if got is None:
            return None
        start, n, head = got
        if start < self.written - self.size:
            del self.index[ident]
            return None
        off = start % self.size
        ring = self.ring
        data = bytes(ring[off:off + n]) if off + n <= self.size else \
            bytes(ring[off:]) + bytes(ring[:off + n - self.size])
        return D.Raw(data, head)

    def put(self, ident: int, data: bytes, head_length: int) -> None:
        n = len(data)
        index = self.index
        if n > self.size // 64:
            index.pop(ident, None)     # too large to keep: not compared
            return
        off = self.written % self.size
        end = off + n
        if end <= self.size:
            self.ring[off:end] = data
        else:
            cut = self.size - off
            self.ring[off:] = data[:cut]
            self.ring[:n - cut] = data[cut:]
        index[ident] = (self.written, n, head_length)
        index.move_to_end(ident)
        self.written += n
        if len(index) > self.keys:
            index.popitem(last=False)


class _Endpoint:
    __slots__ = ("name", "count", "matrix", "compared", "trans_cb", "trans_bn", "bn_compared",
                 "err_cb", "err_bn",
                 "lat", "held", "f_cb", "f_bn", "cb_compared", "bn_field_compared", "volatile",
                 "repeats", "random", "random_checked", "examples", "settled", "seg_repeats",
                 "seg_checked", "seg_puts")

    def __init__(self, name):
        self.name = name
        self.count = 0
        self.matrix = Counter()
        self.compared = 0         # exchanges whose baseline answered with a status
        self.trans_cb = Counter() # (baseline status, candidate status) where they differ
        self.trans_bn = Counter() # (baseline status, noise status) where they differ
        self.bn_compared = 0      # of ``compared``, those with a noise counterpart
        self.err_cb = Counter()   # candidate error kind where the baseline answered
        self.err_bn = Counter()
        self.lat = {(v, r): Hist() for v in ("service", "intended")
                    for r in ("baseline", "candidate", "noise")}
        self.held = 0
        self.f_cb = Counter()
        self.f_bn = Counter()
        self.cb_compared = 0
        self.bn_field_compared = 0
        self.volatile = Counter()
        self.repeats = 0
        self.random = Counter()         # field -> checked pairs of values that looked random
        self.random_checked = Counter()
        self.examples: dict = {}
        self.settled: set = set()       # fields sampled and exemplified enough: only counted
        self.seg_repeats = 0            # this segment's repeats, answers remembered and
        self.seg_puts = 0               # random checks
        self.seg_checked = Counter()


def _merge_endpoint(ep: "_Endpoint", other: "_Endpoint") -> None:
    """Another process's counts of the same endpoint (a worker's) added to ``ep``."""
    for name in ("count", "compared", "bn_compared", "held", "cb_compared", "bn_field_compared",
                 "repeats"):
        setattr(ep, name, getattr(ep, name) + getattr(other, name))
    for name in ("matrix", "trans_cb", "trans_bn", "err_cb", "err_bn", "f_cb", "f_bn", "volatile",
                 "random", "random_checked"):
        getattr(ep, name).update(getattr(other, name))
    for k, h in other.lat.items():
        ep.lat[k].merge(h)
    for k, got in other.examples.items():
        mine = ep.examples.setdefault(k, [])
        mine.extend(got[:EXAMPLES - len(mine)])


class Analysis:
    def __init__(self, candidate: str, baseline: str | None = None, noise: str | None = None,
                 endpoint_rules=(), ignore=(), unordered: bool = False,
                 thresholds: Thresholds | None = None,
                 ignored_headers=D.DEFAULT_IGNORED_HEADERS, targets: dict | None = None):
        tg = targets or {}
        self.cand = RunLog(candidate, tg.get("candidate"), "--target")
        self.base = RunLog(baseline, tg.get("baseline"), "--baseline-target") if baseline else None
        self.noise = RunLog(noise, tg.get("noise"), "--noise-target") if noise else None
        self.endpoints = Endpoints(endpoint_rules)
        self.ignore = D.Ignore(ignore)
        self.unordered = unordered
        self.th = thresholds or Thresholds()
        self.cmp = D.Comparer(frozenset(ignored_headers) | self.ignore.headers, unordered)
        self.eps: dict = {}
        self._eplist: list = []         # the endpoints by the ids of the pass
        self._epindex: dict = {}
        self._uri_ids: dict = {}        # (method, uri) -> endpoint id, for repeated URIs
        # each run's timeline starts at its own first request (a log's time span also covers
        # the recording inside it)
        self.runs = {"candidate": _Run("candidate")}
        self.runs["baseline" if self.base else "recorded"] = _Run("baseline")
        if self.noise:
            self.runs["noise"] = _Run("noise")
        self.totals = Counter()
        self._repeat = _Recent()                     # request identity -> baseline answer
        self.repeats = 0                             # repeated requests seen in the baseline
        self.volatile_headers = Counter()            # header -> times it changed on a repeat
        self._known: set = set()                     # fields seen, and of them those ignored
        self._dropped: set = set()

    # -- the pass --------------------------------------------------------------------------------
    def run(self, workers: int | None = 1) -> dict:
        """The whole pass, then the report. ``workers``: processes sharing the candidate's
        segments (None: one per CPU, at most ``MAX_WORKERS``; never more than the segments)."""
        sections: dict = {}
        kids: list = []
        try:
            sections["candidate"], sections["recorded"] = self.cand.sections()
            if self.base:
                sections["baseline"] = self.base.section(replayed=True)
            if self.noise:
                sections["noise"] = self.noise.section(replayed=True)
            keys = sections["candidate"].keys_in_order()   # an array, or read from a file
            n = len(keys)
            segs = [(i, min(i + SEGMENT, n)) for i in range(0, n, SEGMENT)] or [(0, 0)]
            if workers is None:
                workers = min(os.cpu_count() or 1, MAX_WORKERS)
            groups = np.array_split(np.arange(len(segs)), max(1, min(workers, len(segs))))
            # the first chunk before any worker starts: every run's timeline starts there
            a, z = segs[0]
            self._pass(keys, [(a, min(a + CHUNK, z))], sections)
            kids = [self._fork(keys, [segs[j] for j in g], sections) for g in groups[1:]]
            self._pass(keys, [(min(a + CHUNK, z), z)] + [segs[j] for j in groups[0][1:]], sections,
                       fresh=False)
            del keys
            while kids:
                self._absorb(_result(kids.pop(0)), sections)
            n = self.totals["exchanges"]
            self.unmatched = {"recorded": n - sections["recorded"].found}
            for k in ("baseline", "noise"):
                if k in sections:
                    self.unmatched[k] = n - sections[k].found
        finally:
            for pid, fd in kids:
                _end(pid, fd)
            for k, sec in sections.items():
                {"candidate": self.cand, "recorded": self.cand, "baseline": self.base,
                 "noise": self.noise}[k].done(sec)
            for run in (self.cand, self.base, self.noise):
                if run is not None:
                    run.close()
        return self.report()

    def _pass(self, keys, segments: list, sections, fresh: bool = True) -> None:
        """Segments ``(start, end)`` of the candidate's ``keys``, chunk by chunk. Each segment
        starts afresh what is sampled (the repeated requests remembered, the values checked for
        a random look), so that the report does not depend on how the segments are shared among
        workers."""
        for k, (a, z) in enumerate(segments):
            if fresh or k:
                self._repeat = _Recent()
                for ep in self.eps.values():
                    ep.seg_repeats = ep.seg_puts = 0
                    ep.seg_checked.clear()
                    ep.settled.clear()
            for i in range(a, z, CHUNK):
                self._chunk(keys[i:min(i + CHUNK, z)], sections)

    # -- workers ---------------------------------------------------------------------------------
    def _fork(self, keys, segments: list, sections) -> tuple:
        """A worker process for ``segments``: it shares the indexes (copy-on-write), counts
        from zero, and sends its counts back pickled through a pipe."""
        r, w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(w)
            return pid, r
        try:                                    # the worker
            os.close(r)
            _die_with_parent()
            try:
                self._restart(sections)
                self._pass(keys, segments, sections)
                state = self._state(sections)
            except ReplayError as e:
                state = {"error": str(e)}
            except BaseException as e:          # noqa: BLE001 - said by the parent, in one line
                state = {"error": f"a report worker failed: {type(e).__name__}: {e}"}
            with os.fdopen(w, "wb") as f:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            os._exit(0)

    def _restart(self, sections) -> None:
        """In a worker: counts from zero (the parent keeps what it counted before the fork),
        the timelines on the parent's start and width."""
        self.totals = Counter()
        self.eps, self._eplist, self._epindex, self._uri_ids = {}, [], {}, {}
        for k, r in self.runs.items():
            fresh = self.runs[k] = _Run(r.label)
            fresh.t0, fresh.width = r.t0, r.width
        self.repeats = 0
        self.volatile_headers = Counter()
        self.endpoints.others = 0
        for sec in sections.values():
            sec.found = 0
            sec.reader.warnings.clear()

    def _state(self, sections) -> dict:
        return {"totals": self.totals, "eps": self.eps, "runs": self.runs, "repeats": self.repeats,
                "volatile_headers": self.volatile_headers, "others": self.endpoints.others,
                "found": {k: s.found for k, s in sections.items()},
                "warnings": {k: list(s.reader.warnings) for k, s in sections.items()}}

    def _absorb(self, state: dict, sections) -> None:
        """A worker's counts added to this process's."""
        if "error" in state:
            raise InputError(state["error"])
        self.totals.update(state["totals"])
        cap = self.endpoints.max_endpoints
        for name, ep in state["eps"].items():
            mine = self.eps.get(name)
            if mine is None and len(self.eps) >= cap and not name.endswith(OTHER):
                # past the cap in the union of the workers' endpoints: grouped as (other)
                name = f"{name.split(' ', 1)[0]} {OTHER}"
                self.endpoints.others += ep.count
                mine = self.eps.get(name)
                if mine is None:
                    mine = self.eps[name] = _Endpoint(name)
            if mine is None:
                self.eps[name] = ep
            else:
                _merge_endpoint(mine, ep)
        for k, r in state["runs"].items():
            self.runs[k].merge(r)
        self.repeats += state["repeats"]
        self.volatile_headers.update(state["volatile_headers"])
        self.endpoints.others += state["others"]
        for k, n in state["found"].items():
            sections[k].found += n
        for k, ws in state["warnings"].items():
            for w in ws:
                if w not in sections[k].reader.warnings:
                    sections[k].reader.warnings.append(w)

    def _chunk(self, keys, sections):
        """One chunk of the candidate's exchanges (keys in written order) with their
        counterparts: counts and histograms by columns, bodies compared one by one."""
        cand, base, noise = self.cand, self.base, self.noise
        stride = cand.stride or (1 << 62)
        full = (keys >> np.uint64(32)).astype(np.int64) - cand.base
        index = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
        conn, passno = full % stride, full // stride
        bare = base is None and noise is None
        C = sections["candidate"].take(keys)
        rkeys = key_of(conn, index)
        # with a baseline run, the recording only names the endpoint of a request the candidate
        # lacks: which exist is read from the index, their requests when needed
        R = sections["recorded"].take(rkeys, req_data=bare, light=base is not None)

        def other(log, name, req_data):
            ks = key_of(conn + passno * (log.stride or 0) + log.base, index)
            if not log.stride:
                # a run without --loop has only a first pass: later passes have no counterpart
                ks[passno != 0] = np.uint64(0xFFFFFFFFFFFFFFFF)
            return sections[name].take(ks, req_data=req_data)

        B = other(base, "baseline", noise is None) if base is not None else R
        N = other(noise, "noise", False) if noise is not None else None
        n = len(keys)
        t = self.totals
        t["exchanges"] += n
        lack = ~C.has_req & R.has_req
        ids = self._endpoint_ids(C, R if base is None or not lack.any() else
                                 _fill(R, lack, sections["recorded"].take(rkeys[lack], data=False,
                                                                         count=False)))
        keep = ids >= 0
        t["no_request"] += n - int(keep.sum())
        eps = self._eplist
        for e, cnt in _bincount(ids, keep):
            eps[e].count += cnt
        runs = self.runs
        runs["candidate"].add_batch(C, keep)
        cs, bs = C.status, B.status
        t["candidate_errors"] += int((keep & (cs <= -2)).sum())
        t["candidate_5xx"] += int((keep & (cs >= 500)).sum())
        t["candidate_4xx"] += int((keep & (cs >= 400) & (cs < 500)).sum())
        self._latency(ids, keep, C, "candidate")
        held = keep & C.has_req & (C.req_last - C.req_first > HELD_NS)
        for e, cnt in _bincount(ids, held):
            eps[e].held += cnt
        nob = keep & ~B.found
        t["no_baseline"] += int(nob.sum())
        for (e, c), cnt in _tuples(nob, ids, cs):
            eps[e].matrix[("none", _st(status_of(c)))] += cnt
        hb = keep & B.found
        runs["baseline" if base else "recorded"].add_batch(B, hb)
        for (e, b, c), cnt in _tuples(hb, ids, bs, cs):
            eps[e].matrix[(_st(status_of(b)), _st(status_of(c)))] += cnt
        self._latency(ids, hb, B, "baseline")
        # statuses and errors are judged where the baseline answered
        judged = hb & (bs >= 0)
        for e, cnt in _bincount(ids, judged):
            eps[e].compared += cnt
        sec_b = sections["baseline" if base else "recorded"]

        def exchanges(i):
            key = (int(conn[i]), int(index[i]), int(passno[i]))
            # a recorded exchange has a key of two: its service time starts at the first byte
            return (sections["candidate"].exchange(C, i, key),
                    sec_b.exchange(B, i, key if base else key[:2]))

        for i in np.flatnonzero(judged & ((cs <= -2) | ((cs >= 0) & (cs != bs)))).tolist():
            ep = eps[ids[i]]
            c, b = int(cs[i]), int(bs[i])
            if c <= -2:
                kind, field = "error", status_of(c)
                ep.err_cb[field] += 1
            else:
                kind, field = "status", f"{b} -> {c}"
                ep.trans_cb[(b, c)] += 1
            if len(ep.examples.get((kind, field), ())) < EXAMPLES:
                self._example(ep, kind, field, *exchanges(i), None)
        if N is not None:
            nn = hb & N.found
            runs["noise"].add_batch(N, nn)
            self._latency(ids, nn, N, "noise")
            ns = N.status
            bn = nn & (bs >= 0)
            for e, cnt in _bincount(ids, bn):
                eps[e].bn_compared += cnt
            for (e, z), cnt in _tuples(bn & (ns <= -2), ids, ns):
                eps[e].err_bn[status_of(z)] += cnt
            for (e, b, z), cnt in _tuples(bn & (ns >= 0) & (ns != bs), ids, bs, ns):
                eps[e].trans_bn[(b, z)] += cnt
        # fields: only between answers with the same status
        same = hb & C.has_resp & B.has_resp & (cs == bs)
        for e, cnt in _bincount(ids, same):
            eps[e].cb_compared += cnt
        cmp = self.cmp
        kept = self._kept
        repeat = self._repeat
        cd, bd, ch, bh = C.resp_data, B.resp_data, C.resp_head.tolist(), B.resp_head.tolist()
        if N is not None:
            nd, nh = N.resp_data, N.resp_head.tolist()
            nsame = (N.has_resp & (N.status == bs)).tolist()
        idl = ids.tolist()
        vol = (B.has_req & same).tolist() if N is None else None
        diff = cmp.diff_data
        for i in np.flatnonzero(same).tolist():
            ep = eps[idl[i]]
            b, c = bd[i], cd[i]
            sides: dict = {}
            if c != b:
                fields = kept(diff(b, bh[i], c, ch[i], sides))
                if fields <= ep.settled:
                    f_cb = ep.f_cb              # the usual case: counted, nothing more to do
                    for f in fields:
                        f_cb[f] += 1
                else:
                    for f in fields:
                        ep.f_cb[f] += 1
                        if f in ep.settled:
                            continue
                        if f[0] == "$" and ep.seg_checked[f] < RANDOM_SAMPLE:
                            ep.seg_checked[f] += 1
                            ep.random_checked[f] += 1
                            vb, vc = _values(cmp.side_data(b, bh[i], sides),
                                             cmp.side_data(c, ch[i], sides), f)
                            if _random_looking(vb) and _random_looking(vc):
                                ep.random[f] += 1
                        k = _kind(f)
                        if len(ep.examples.get((k, f), ())) < EXAMPLES:
                            self._example(ep, k, f, *exchanges(i), {})
                        if len(ep.examples[(k, f)]) >= EXAMPLES and \
                                (f[0] != "$" or ep.seg_checked[f] >= RANDOM_SAMPLE):
                            ep.settled.add(f)
            if N is not None:
                if nsame[i]:
                    ep.bn_field_compared += 1
                    if nd[i] != b:
                        ep.f_bn.update(kept(diff(b, bh[i], nd[i], nh[i], sides)))
            elif vol[i] and ep.seg_repeats < REPEAT_SAMPLE:
                # the baseline answered the same request before: which fields changed since
                body = B.req_data[i]
                ident = hash((B.method[i], B.uri[i],
                              hashlib.blake2b(body, digest_size=8).digest() if body else b""))
                prev = repeat.get(ident)
                if prev is not None:
                    self._volatility(ep, prev, b, bh[i], sides)
                if ep.seg_puts < REPEAT_TRACK:
                    ep.seg_puts += 1
                    repeat.put(ident, b, bh[i])

    def _kept(self, fields: set) -> set:
        """``fields`` without those ``--ignore`` names (each field's fate decided once)."""
        new = fields - self._known
        if new:
            self._known |= new
            self._dropped |= {f for f in new if self.ignore.ignored(f)}
        return fields - self._dropped if self._dropped else fields

    def _endpoint_ids(self, C, R) -> np.ndarray:
        """The endpoint of each exchange (-1: no request on either side), by its request as
        replayed or else as recorded."""
        name = self.endpoints.name
        index, eps, known = self._epindex, self._eplist, self._uri_ids
        out = []
        add = out.append
        cm, cu, rm, ru = C.method, C.uri, R.method, R.uri
        for i, (ch, rh) in enumerate(zip(C.has_req.tolist(), R.has_req.tolist())):
            if ch:
                key = (cm[i], cu[i])
            elif rh:
                key = (rm[i], ru[i])
            else:
                add(-1)
                continue
            e = known.get(key)
            if e is None:
                nm = name(*key)
                e = index.get(nm)
                if e is None:
                    e = index[nm] = len(eps)
                    eps.append(_Endpoint(nm))     # eps and the index start empty together
                    self.eps[nm] = eps[-1]
                if not nm.endswith(OTHER):      # (other) is counted by Endpoints each time
                    if len(known) >= URI_MEMORY:
                        known.clear()
                    known[key] = e
            add(e)
        return np.array(out, dtype=np.int64)

    def _latency(self, ids, mask, bt, run):
        for view, (v, ok) in (("service", bt.service()), ("intended", bt.intended())):
            for e, pos in _groups(ids, mask & ok):
                self._eplist[e].lat[(view, run)].extend(v[pos])

    def _volatility(self, ep, prev, b, bh, sides):
        ep.repeats += 1
        ep.seg_repeats += 1
        self.repeats += 1
        if prev.data != b:
            for f in self._kept(self.cmp.diff_data(prev.data, prev.head_length, b, bh, sides)):
                ep.volatile[f] += 1
                if f.startswith("header:"):
                    self.volatile_headers[f] += 1

    def _example(self, ep, kind, field, c, b, sides):
        k = (kind, field)
        got = ep.examples.get(k)
        if got is None:
            got = ep.examples[k] = []
        if len(got) >= EXAMPLES or c is None or b is None:
            return
        got.append(example(c, b, field if kind in ("body", "header") else None, sides, self.cmp,
                           self.cand.target))

    # -- the verdicts ----------------------------------------------------------------------------
    def report(self) -> dict:
        th = self.th
        endpoints = []
        suspects = []
        base_label = "baseline" if self.base else "recorded"
        for ep in self.eps.values():
            regs = []
            improvements = []
            # the noise run's counts, scaled to as many comparisons as the candidate's
            scale = ep.cb_compared / ep.bn_field_compared if ep.bn_field_compared else 0
            st_scale = ep.compared / ep.bn_compared if ep.bn_compared else 0
            # statuses: each change of status judged on its own
            for (bs, cs), cnt in sorted(ep.trans_cb.items(), key=lambda kv: -kv[1]):
                field = f"{bs} -> {cs}"
                row = {"kind": "status", "field": field, "count": cnt,
                       "rate": round(cnt / ep.compared, 6), "noise_count": ep.trans_bn[(bs, cs)],
                       "examples": ep.examples.get(("status", field), [])}
                if bs >= 400 and cs < 400:
                    improvements.append(row)            # a failure that now succeeds
                elif rate_regressed(cnt, ep.trans_bn[(bs, cs)] * st_scale, ep.compared, th):
                    regs.append(row)
            # replay errors, where the baseline answered
            for kind, cnt in ep.err_cb.items():
                if rate_regressed(cnt, ep.err_bn[kind] * st_scale, ep.compared, th):
                    regs.append({"kind": "error", "field": kind, "count": cnt,
                                 "rate": round(cnt / ep.compared, 6),
                                 "noise_count": ep.err_bn[kind],
                                 "examples": ep.examples.get(("error", kind), [])})
            # latency
            lat = {}
            for view in ("service", "intended"):
                lat[view] = {r: _pcts(ep.lat[(view, r)]) for r in ("baseline", "candidate", "noise")}
            noise_h = ep.lat[("service", "noise")].flush() if self.noise else None
            for p, b_us, c_us, z in latency_regressed(ep.lat[("service", "baseline")].flush(),
                                                      ep.lat[("service", "candidate")].flush(),
                                                      noise_h, th, tests=len(self.eps) * len(PERCENTILES)):
                regs.append({"kind": "latency", "field": f"p{p}", "baseline_ms": round(b_us / 1000, 3),
                             "candidate_ms": round(c_us / 1000, 3),
                             "change": round((c_us - b_us) / b_us * 100, 1), "z": z})
            lat["held_back"] = ep.held
            # fields
            fields = []
            for f, cnt in ep.f_cb.most_common():
                noise_f = ep.f_bn[f] * scale
                share = cnt / ep.cb_compared * 100 if ep.cb_compared else 0
                verdict = "below_threshold"
                if rate_regressed(cnt, noise_f, ep.cb_compared, th):
                    verdict = "regression"
                    if not self.noise:
                        vol = ep.volatile[f] / ep.repeats if ep.repeats else 0
                        if f.startswith("header:") and self.repeats:
                            # headers are the same on every endpoint: changes anywhere count
                            vol = max(vol, self.volatile_headers[f] / self.repeats)
                        rnd = ep.random[f] / max(1, ep.random_checked[f])
                        # the repeated requests of the baseline stand in for a noise run: a
                        # field that changes between them about as often as it differs from
                        # the candidate is noise by the same rule
                        if vol > 0 and not rate_regressed(cnt, vol * ep.cb_compared, ep.cb_compared, th):
                            verdict = "suspected_noise"
                        elif share >= th.noise_share and rnd >= 0.9:
                            verdict = "suspected_noise"
                elif self.noise and ep.f_bn[f]:
                    verdict = "noise"
                row = {"field": f, "differences": cnt, "compared": ep.cb_compared,
                       "share": round(share, 3), "noise_differences": ep.f_bn[f],
                       "noise_compared": ep.bn_field_compared, "verdict": verdict}
                fields.append(row)
                if verdict == "regression":
                    regs.append({"kind": _kind(f), "field": f, "count": cnt,
                                 "rate": round(cnt / ep.cb_compared, 6),
                                 "noise_count": ep.f_bn[f],
                                 "examples": ep.examples.get((_kind(f), f), [])})
                elif verdict == "suspected_noise":
                    suspects.append({"endpoint": ep.name, "field": f, "share": round(share, 3)})
            order = {k: i for i, k in enumerate(("error", "status", "latency", "body", "header"))}
            regs.sort(key=lambda r: (order[r["kind"]], -r.get("count", 0)))
            endpoints.append({
                "endpoint": ep.name, "count": ep.count,
                "status": {"changed": sum(ep.trans_cb.values()), "compared": ep.compared,
                           "rate": round(sum(ep.trans_cb.values()) / ep.compared, 6) if ep.compared else 0,
                           "noise_changed": sum(ep.trans_bn.values()), "noise_compared": ep.bn_compared,
                           "improvements": improvements,
                           "matrix": [{base_label: k[0], "baseline": k[0], "candidate": k[1], "count": v}
                                      for k, v in sorted(ep.matrix.items(), key=lambda kv: -kv[1])]},
                "errors": {"candidate": dict(ep.err_cb), "noise": dict(ep.err_bn)},
                "latency": lat,
                "fields": fields[:200],
                "regressions": regs,
            })
        endpoints.sort(key=lambda e: (-len(e["regressions"]), -e["count"], e["endpoint"]))
        t = self.totals
        runs = {"candidate": self._describe(self.cand)}
        if self.base:
            runs["baseline"] = self._describe(self.base)
        else:
            runs["baseline"] = {"path": self.cand.path, "what": "the recording inside the candidate's log"}
        if self.noise:
            runs["noise"] = self._describe(self.noise)
        return {
            "report": "replay report",
            "runs": runs,
            "thresholds": vars(th).copy(),
            "totals": {
                "exchanges": t["exchanges"],
                "without_baseline": t["no_baseline"],
                "unmatched": dict(self.unmatched),
                "endpoints": len(endpoints),
                "endpoints_grouped_as_other": self.endpoints.others,
                "candidate": {"errors": t["candidate_errors"], "5xx": t["candidate_5xx"],
                              "4xx": t["candidate_4xx"]},
            },
            "endpoints": endpoints,
            "regressions_total": sum(len(e["regressions"]) for e in endpoints),
            "suspected_noise": suspects,
            "statuses": {k: dict(r.statuses) for k, r in self.runs.items()},
            "percentiles": {k: r.curve() for k, r in self.runs.items()},
            "timeline": {k: r.timeline() for k, r in self.runs.items()},
            "warnings": list(dict.fromkeys(
                [f"{self.cand.path}: {w}" for w in self.cand.warnings] +
                ([f"{self.base.path}: {w}" for w in self.base.warnings] if self.base else []) +
                ([f"{self.noise.path}: {w}" for w in self.noise.warnings] if self.noise else []))),
        }

    @staticmethod
    def _describe(run: RunLog) -> dict:
        m = run.meta
        rep = m.get("report") or {}
        return {"path": run.path, "target": run.target, "speed": m.get("speed"),
                "source": m.get("source"), "sent": rep.get("sent"), "answered": rep.get("answered")}


def _die_with_parent() -> None:
    """A worker is killed when its parent dies (Linux; elsewhere it ends with its pass)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _result(kid: tuple) -> dict:
    """A worker's pickled counts, once it has ended."""
    pid, fd = kid
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        if code == 0 and data:
            return pickle.loads(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError):
        pass
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    raise InputError(f"a report worker ended without its counts ({how})")


def _end(pid: int, fd: int) -> None:
    """A worker no longer wanted (the pass failed): stopped and reaped."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    os.close(fd)


def _fill(bt, mask, part):
    """``bt`` (a light batch) with the requests of ``part`` (the full batch of ``mask``'s keys)."""
    for i, j in enumerate(np.flatnonzero(mask).tolist()):
        bt.method[j], bt.uri[j] = part.method[i], part.uri[i]
        bt.has_req[j] = part.has_req[i]         # False when its block turned out damaged
    return bt


def _bincount(ids, mask):
    """(id, count) of the ids where ``mask`` is true."""
    c = np.bincount(ids[mask])
    nz = np.flatnonzero(c)
    return zip(nz.tolist(), c[nz].tolist())


def _tuples(mask, *cols):
    """((a, b, ...), count) of the rows of ``cols`` where ``mask`` is true."""
    if not mask.any():
        return ()
    u, cnt = np.unique(np.stack([c[mask] for c in cols], axis=1), axis=0, return_counts=True)
    return zip(map(tuple, u.tolist()), cnt.tolist())


def _groups(ids, mask):
    """(id, positions) of each id where ``mask`` is true."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return
    order = np.argsort(ids[idx], kind="stable")
    idx = idx[order]
    g = ids[idx]
    edges = np.flatnonzero(np.diff(g)) + 1
    for a, z in zip([0, *edges.tolist()], [*edges.tolist(), len(idx)]):
        yield int(g[a]), idx[a:z]


def _st(s) -> str:
    return "none" if s is None else str(s)


def _kind(field: str) -> str:
    return "header" if field.startswith("header:") else "body"


def _values(bside, cside, field) -> tuple:
    """The baseline's and the candidate's values of a field, where they differ."""
    if bside is None or cside is None or not (bside.is_json and cside.is_json):
        return None, None
    return D.differing_values(bside.json, cside.json, field)


def _cut(data: bytes) -> str:
    text = data[:EXAMPLE_BYTES].decode("utf-8", "replace")
    return text + ("\n[... %d more bytes]" % (len(data) - EXAMPLE_BYTES) if len(data) > EXAMPLE_BYTES else "")


def _body_text(m) -> str:
    if m is None:
        return ""
    return _cut(m.data[:m.head_length] + D.payload(m.data, m.head_length))


def example(c, b, field, sides, cmp, target) -> dict:
    req = c.request
    out = {"conn": c.key[0], "index": c.key[1], "pass": c.key[2] if len(c.key) > 2 else 0,
           "method": req.method if req is not None else None,
           "uri": req.uri if req is not None else None,
           "baseline_status": _st(b.status), "candidate_status": _st(c.status),
           "baseline_ms": round(b.service_ns / 1e6, 3) if b.service_ns is not None else None,
           "candidate_ms": round(c.service_ns / 1e6, 3) if c.service_ns is not None else None,
           "baseline": _body_text(b.response), "candidate": _body_text(c.response),
           "curl": curl(req, target) if req is not None else None}
    if field and b.response is not None and c.response is not None:
        if field.startswith("header:"):
            out["baseline_value"] = cmp.headers(b.response).get(field[7:])
            out["candidate_value"] = cmp.headers(c.response).get(field[7:])
        elif field.startswith("$"):
            vb, vc = _values(cmp.side(b.response, sides), cmp.side(c.response, sides), field)
            out["baseline_value"], out["candidate_value"] = _short(vb), _short(vc)
    return out


def _short(v):
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + "..."
    return v


CURL_BODY_MAX = 64 << 10


def sh_quote(value) -> str:
    """One shell word for ``value`` (str or bytes): plain quoting for printable ASCII, ``$'...'``
    with escapes otherwise, so that no byte of a capture reaches a terminal or a shell raw."""
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    if all(0x20 <= c < 0x7F for c in raw):
        return shlex.quote(raw.decode("ascii"))
    out = []
    for c in raw:
        if c == 0x5C:
            out.append("\\\\")
        elif c == 0x27:
            out.append("\\'")
        elif 0x20 <= c < 0x7F:
            out.append(chr(c))
        else:
            out.append("\\x%02x" % c)
    return "$'" + "".join(out) + "'"


def curl(req, target: str) -> str:
    """A curl command that sends ``req`` (a replayed request, Host already the target's) again:
    its method, headers and body bytes (chunked framing removed; a body over 64 KiB is left out,
    and the command says so)."""
    from replay.httpmsg import decode_chunked, is_chunked

    base = target.split(" ", 1)[0].rstrip("/")
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    uri = req.uri or "/"
    url = uri if uri.startswith(("http://", "https://")) else base + (uri if uri.startswith("/") else "/" + uri)
    parts = ["curl", "-sS", "-i", "-X", sh_quote(req.method or "GET")]
    skip = {"content-length", "host", "connection", "transfer-encoding"}
    for name, value in D.header_fields(req.data, req.head_length):
        if name.decode("latin-1").lower() in skip:
            continue
        parts += ["-H", sh_quote(name + b": " + value)]
    body = req.data[req.head_length:] if req.head_length else b""
    if body and is_chunked(req.data, req.head_length):
        body = decode_chunked(body)[0]
    head, tail = "", ""
    if len(body) > CURL_BODY_MAX:
        tail = f"  # the request body ({len(body):,} bytes) is left out"
    elif b"\0" in body:
        # a shell word cannot hold a NUL byte: printf writes the body to curl's stdin
        esc = "".join(chr(c) if 0x20 <= c < 0x7F and c not in (0x27, 0x5C, 0x25) else "\\0%03o" % c
                      for c in body)
        head = f"printf %b '{esc}' | "
        parts += ["--data-binary", "@-"]
    elif body:
        parts += ["--data-binary", sh_quote(body)]
    parts.append(sh_quote(url))
    return head + " ".join(parts) + tail
