"""Filters: which exchanges of a capture or a log stay.

Theory of operation
-------------------
Filters keep or drop whole *exchanges*: the messages of one connection that share an ``index``
(``conn``, ``index`` >= 0): a request, its interim and final responses. Dropping a request drops
its responses, and the other way round. What the filters see of an exchange:

- ``method``, ``uri``, ``time`` (``ts_first``), ``conn`` and the request's headers come from its
  *request*: the first request of the exchange, or, when none was captured (a request in an
  earlier file of a rotated capture), its first message;
- ``status`` is that of its first *final* (non-1xx) response; 0 when there is none.

Every filter must pass (AND). Within one option, repeated values of --method, --path-include,
--host and --status are alternatives (any); repeated --header rules must all match, as in
GoReplay's --http-allow-header; any matching --path-exclude, --header-exclude or --status-exclude
drops. An exchange without a response fails --status and passes --status-exclude.

A response whose request was never seen (``index`` -1, flag ``unpaired``) belongs to no exchange.
It is judged alone by the filters that need no request (--sample on its connection, --since and
--until on its own time) and dropped as soon as any *request-level* filter (method, path, host,
header, status, limit) is active: nothing can tell whether its request would have matched.

--limit N keeps the first N exchanges that pass every other filter, counted in the order their
first message appears in the input. --since/--until with +OFFSET count from the ``ts_first`` of the
input's first message (the zero of ``replay ls``'s time column).

Two evaluation paths give the same result (tests hold them to it):

- *index* (``FilterSet.select_rows``): for a .rlog, the table of fixed columns
  (``LogReader.table()``) is grouped into exchanges with numpy; method, status, time, connection
  and the request-target (whose distinct strings the table holds once) are evaluated as masks
  without decompressing a payload; only --host and --header need the requests' heads, and read
  them block by block for the exchanges still in;
- *streaming* (``FilterSet.stream()``): for captures and live traffic, messages in, kept messages
  out, in input order. An exchange is decided as soon as what the active filters need is there:
  at once for most; after its request when the first message seen is a response (an interim 100
  Continue completes before its request body) and a request field is filtered on; after its
  final response when --status or --status-exclude is active. Messages wait in input order behind
  an undecided one, at most ``wait`` seconds of capture time and ``max_pending`` messages or
  ``max_pending_bytes``; past those bounds the exchange is decided on what has arrived (a request
  whose response is later than the bounds fails --status). Only then can the two paths differ.
  So can an exchange whose messages lie further apart than the bounds, which streaming sees as two.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict, deque
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Protocol, runtime_checkable

import numpy as np

from replay.errors import UsageError
from replay.events import F_INTERIM, KIND_REQUEST
from replay.httpmsg import header_value, header_values
from replay.units import NS, parse_duration_ns

TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")   # RFC 9110 §5.6.2 token (field names, methods)

WAIT_S = 120.0               # streaming: capture seconds an exchange may wait (the core's idle timeout)
MAX_PENDING = 100_000        # streaming: messages that may wait behind an undecided exchange
MAX_PENDING_BYTES = 256 << 20
DONE_MEMORY = 100_000        # streaming: fates of finished exchanges kept for late messages


# ----------------------------------------------------------------------------------------------
# what a filter sees


class ExchangeView:
    """One exchange as the streaming path (and the payload pass of the index path) shows it."""

    __slots__ = ("conn", "time", "method", "uri", "status", "request", "_host")

    def __init__(self, conn, time, method, uri, status, request):
        self.conn = conn
        self.time = time
        self.method = method
        self.uri = uri
        self.status = status
        self.request = request
        self._host = False

    @property
    def host(self):
        """The request's Host header (or the authority of an absolute-form target), or None."""
        if self._host is False:
            self._host = request_host(self.request)
        return self._host


class _Head:
    """What the head filters read of a request on the index path: its head (or, when the head
    is not whole, its bytes), the head's length and its target."""

    __slots__ = ("data", "head_length", "uri")

    def __init__(self, data, head_length, uri):
        self.data = data
        self.head_length = head_length
        self.uri = uri


def request_host(req):
    if req is None:
        return None
    h = header_value(req.data, req.head_length, b"host")
    if h is None and req.uri and "://" in req.uri:
        h = req.uri.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    return h


class ExchangeColumns:
    """The same fields for many exchanges at once, as numpy arrays (the index path): ``conn``
    (u64), ``time`` (i64 ns), ``method`` and ``uri`` (u32 ids into ``strings``, 0: None),
    ``status`` (u16, 0: no final response). Each is gathered from the table on first use."""

    def __init__(self, table, rep, strings, status=None):
        self._t = table
        self._rep = rep              # row of each exchange's request (or first message)
        self._status = status        # a callable making the status column, or the column
        self.strings = strings

    def _col(self, name):
        v = self.__dict__.get(name)
        if v is None:
            v = self.__dict__[name] = self._t[name][self._rep]
        return v

    conn = property(lambda self: self._col("conn"))
    time = property(lambda self: self._col("ts_first"))
    method = property(lambda self: self._col("method"))
    uri = property(lambda self: self._col("uri"))

    @property
    def status(self):
        if callable(self._status):
            self._status = self._status()
        return self._status


@runtime_checkable
class Filter(Protocol):
    """A filter: ``keep`` judges one exchange; column filters also have ``mask`` (index path)."""

    key: str
    needs_request: bool      # streaming waits for the request before judging
    needs_status: bool       # streaming waits for the final response
    request_level: bool      # unpaired responses are dropped while it is active
    cost: int                # index path order: 0 columns, 1 strings, 2 request heads

    def keep(self, ex: ExchangeView) -> bool: ...


def _string_mask(ids: np.ndarray, strings: list, pred) -> np.ndarray:
    """``pred`` over the distinct strings that ``ids`` use, looked up for every id."""
    if not len(ids):
        return np.zeros(0, dtype=bool)
    present = np.flatnonzero(np.bincount(ids, minlength=len(strings)))
    lut = np.zeros(len(strings), dtype=bool)
    lut[present] = [bool(pred(strings[i])) for i in present.tolist()]
    return lut[ids]


def _compile(pattern: str, s, flags=0):
    try:
        return re.compile(pattern, flags)
    except re.error as e:
        raise UsageError(f"{s.where()}: invalid regex: {e}") from None


# ----------------------------------------------------------------------------------------------
# the filters


class MethodFilter:
    key = "method"
    needs_request, needs_status, request_level, cost = True, False, True, 1

    def __init__(self, methods):
        self.methods = frozenset(methods)

    @classmethod
    def from_settings(cls, settings):
        methods = set()
        for s in settings.get("method", ()):
            for part in str(s.value).split(","):
                part = part.strip().upper()
                if not TOKEN.match(part):
                    raise UsageError(f"{s.where()}: not an HTTP method")
                methods.add(part)
        return [cls(methods)] if methods else []

    def _ok(self, method):
        return method is not None and method.upper() in self.methods

    def keep(self, ex):
        return self._ok(ex.method)

    def mask(self, cols, alive):
        return _string_mask(cols.method[alive], cols.strings, self._ok)


class PathFilter:
    """--path-include (any matches) or --path-exclude (none matches), on the request-target."""

    needs_request, needs_status, request_level, cost = True, False, True, 1

    def __init__(self, patterns, exclude: bool):
        self.patterns = list(patterns)
        self.exclude = exclude
        self.key = "path-exclude" if exclude else "path-include"

    @classmethod
    def from_settings(cls, settings):
        out = []
        for key, exclude in (("path-include", False), ("path-exclude", True)):
            pats = [_compile(str(s.value), s) for s in settings.get(key, ())]
            if pats:
                out.append(cls(pats, exclude))
        return out

    def _ok(self, uri):
        hit = uri is not None and any(p.search(uri) for p in self.patterns)
        return hit != self.exclude

    def keep(self, ex):
        return self._ok(ex.uri)

    def mask(self, cols, alive):
        return _string_mask(cols.uri[alive], cols.strings, self._ok)


class HostFilter:
    key = "host"
    needs_request, needs_status, request_level, cost = True, False, True, 2

    def __init__(self, patterns):
        self.patterns = list(patterns)     # (lower-case glob, has port)
        self._seen: dict = {}              # Host value -> verdict

    @classmethod
    def from_settings(cls, settings):
        pats = []
        for s in settings.get("host", ()):
            v = str(s.value).strip().lower()
            if not v or any(c in v for c in " \t\r\n/"):
                raise UsageError(f"{s.where()}: not a host (examples: api.example.com, "
                                 "*.example.com, localhost:8080)")
            pats.append((v, _split_port(v)[1] is not None))
        return [cls(pats)] if pats else []

    def keep(self, ex):
        host = ex.host
        if host is None:
            return False
        hit = self._seen.get(host)
        if hit is None:
            low = host.strip().lower()
            bare = _split_port(low)[0]
            hit = any(fnmatch.fnmatchcase(low if with_port else bare, p) for p, with_port in self.patterns)
            if len(self._seen) < 65536:
                self._seen[host] = hit
        return hit


def _split_port(host: str):
    """(name, port or None) of a Host value: ``a:80``, ``[::1]:80``, ``[::1]``, ``a``."""
    if host.startswith("["):
        end = host.find("]")
        if end >= 0:
            rest = host[end + 1:]
            return host[:end + 1], (rest[1:] if rest.startswith(":") else None)
        return host, None
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, port
    return host, None


class HeaderFilter:
    """--header 'Name: regex' (every rule matches some value of its header) or --header-exclude."""

    needs_request, needs_status, request_level, cost = True, False, True, 2

    def __init__(self, rules, exclude: bool):
        self.rules = list(rules)       # (lower-case name bytes, compiled regex)
        self.exclude = exclude
        self.key = "header-exclude" if exclude else "header"

    @classmethod
    def from_settings(cls, settings):
        out = []
        for key, exclude in (("header", False), ("header-exclude", True)):
            rules = [parse_header_rule(s, regex=True) for s in settings.get(key, ())]
            if rules:
                out.append(cls([(n.lower(), v) for n, v in rules], exclude))
        return out

    def keep(self, ex):
        req = ex.request
        if req is None:
            return self.exclude
        if self.exclude:
            return not any(self._match(req, n, rx) for n, rx in self.rules)
        return all(self._match(req, n, rx) for n, rx in self.rules)

    @staticmethod
    def _match(req, name, rx):
        return any(rx.search(v) for v in header_values(req.data, req.head_length, name))


def parse_header_rule(s, regex: bool):
    """``Name: value`` of a --header / --set-header setting: (name bytes, compiled regex or value
    bytes). The value is stripped of the spaces around it."""
    text = str(s.value)
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not TOKEN.match(name):
        raise UsageError(f"{s.where()}: expected 'Name: {'regex' if regex else 'value'}' "
                         "with a header name made of letters, digits and -")
    value = value.strip()
    if regex:
        return name.encode("latin-1"), _compile(value, s)
    if "\r" in value or "\n" in value:
        raise UsageError(f"{s.where()}: a header value cannot hold a line break")
    try:
        return name.encode("latin-1"), value.encode("latin-1")
    except UnicodeEncodeError:
        return name.encode("latin-1"), value.encode("utf-8")


class StatusFilter:
    needs_request, needs_status, request_level, cost = False, True, True, 0

    def __init__(self, lut: np.ndarray, exclude: bool):
        self.lut = lut                 # bool[65536]: status codes named
        self.exclude = exclude
        self.key = "status-exclude" if exclude else "status"

    @classmethod
    def from_settings(cls, settings):
        out = []
        for key, exclude in (("status", False), ("status-exclude", True)):
            items = settings.get(key, ())
            if not items:
                continue
            lut = np.zeros(1 << 16, dtype=bool)
            for s in items:
                for part in str(s.value).split(","):
                    lo, hi = _status_range(part.strip().lower(), s)
                    lut[lo:hi + 1] = True
            out.append(cls(lut, exclude))
        return out

    def keep(self, ex):
        return bool(self.lut[ex.status]) != self.exclude

    def mask(self, cols, alive):
        hit = self.lut[cols.status[alive]]
        return ~hit if self.exclude else hit


def _status_range(part: str, s):
    m = re.fullmatch(r"([1-9])xx", part)
    if m:
        d = int(m.group(1)) * 100
        return d, d + 99
    m = re.fullmatch(r"(\d{3})(?:-(\d{3}))?", part)
    if m:
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if 100 <= lo <= hi <= 999:
            return lo, hi
    raise UsageError(f"{s.where()}: not a status (examples: 200, 5xx, 200-299, 301,302)")


class TimeFilter:
    key = "since/until"
    needs_request, needs_status, request_level, cost = True, False, False, 0

    def __init__(self, since, until):
        self.since = since     # (relative?, ns) or None
        self.until = until
        self.lo = self.hi = None

    @classmethod
    def from_settings(cls, settings):
        since = until = None
        for s in settings.get("since", ()):
            since = parse_time(s)
        for s in settings.get("until", ()):
            until = parse_time(s)
        return [cls(since, until)] if since or until else []

    def bind(self, start_ns: int) -> None:
        """Resolve +OFFSET times against the input's first message."""
        self.lo = None if self.since is None else self.since[1] + (start_ns if self.since[0] else 0)
        self.hi = None if self.until is None else self.until[1] + (start_ns if self.until[0] else 0)

    def keep(self, ex):
        return (self.lo is None or ex.time >= self.lo) and (self.hi is None or ex.time < self.hi)

    def mask(self, cols, alive):
        t = cols.time[alive]
        m = np.ones(len(t), dtype=bool)
        if self.lo is not None:
            m &= t >= self.lo
        if self.hi is not None:
            m &= t < self.hi
        return m


MAX_TIME_NS = 1 << 62        # 2116: a time beyond is a typing error


def absolute_time_ns(text: str) -> int:
    """Unix ns of ``@SECONDS`` or of an ISO 8601 time (local time when it has no zone, as
    strftime in capture's -o); ValueError when it is neither, or before 1970 or after 2116."""
    try:
        if text.startswith("@"):
            ns = int(Decimal(text[1:]) * NS)
        else:
            dt = datetime.fromisoformat(text)
            if dt.tzinfo is None:
                dt = dt.astimezone()
            delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
            ns = (delta.days * 86400 + delta.seconds) * 10 ** 9 + delta.microseconds * 1000
    except (InvalidOperation, OverflowError, ValueError) as e:
        raise ValueError(f"not a time: {e}") from None
    if not 0 <= ns < MAX_TIME_NS:
        raise ValueError("out of range")
    return ns


def parse_time(s):
    """(relative, ns) of a --since/--until value."""
    text = str(s.value).strip()
    try:
        if text.startswith("+"):
            return True, parse_duration_ns(text[1:], s.where(), minimum=0, maximum=10 ** 10)
        return False, absolute_time_ns(text)
    except (ValueError, UsageError):
        pass
    raise UsageError(f"{s.where()}: not a time (examples: 2024-05-01T12:00:00Z, @1714564800, "
                     "+10s, +1.5m, +250ms)")


class SampleFilter:
    key = "sample"
    needs_request, needs_status, request_level, cost = False, False, False, 0

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.threshold = int(round(fraction * (1 << 53)))

    @classmethod
    def from_settings(cls, settings):
        items = settings.get("sample", ())
        if not items:
            return []
        s = items[-1]
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*", str(s.value))
        pct = float(m.group(1)) if m else -1.0
        if not 0 < pct <= 100:
            raise UsageError(f"{s.where()}: not a percentage above 0 and at most 100 (examples: "
                             "10%, 0.5%)")
        return [cls(pct / 100)]

    def keep(self, ex):
        return (splitmix64(ex.conn) >> 11) < self.threshold

    def mask(self, cols, alive):
        return (splitmix64_array(cols.conn[alive]) >> np.uint64(11)) < np.uint64(self.threshold)


_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014): a stable, well-spread hash of a u64."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class Limit:
    key = "limit"

    def __init__(self, n: int):
        self.n = n

    @classmethod
    def from_settings(cls, settings):
        items = settings.get("limit", ())
        if not items:
            return []
        s = items[-1]
        try:
            n = int(s.value)
        except (TypeError, ValueError):
            n = -1
        if isinstance(s.value, bool) or n < 1:
            raise UsageError(f"{s.where()}: not a count of 1 or more")
        return [cls(n)]


# ----------------------------------------------------------------------------------------------
# the composition: every filter, then the limit


class FilterSet:
    def __init__(self, filters=(), limit: int | None = None):
        self.filters = list(filters)
        self.limit = limit

    @property
    def active(self) -> bool:
        return bool(self.filters) or self.limit is not None

    @property
    def request_level(self) -> bool:
        return self.limit is not None or any(f.request_level for f in self.filters)

    def _bind(self, start_ns: int) -> None:
        for f in self.filters:
            if isinstance(f, TimeFilter):
                f.bind(start_ns)

    # -- index path ------------------------------------------------------------------------------

    def select_rows(self, reader, among: np.ndarray | None = None) -> np.ndarray:
        """Rows (ascending, as numbered by ``reader.table()``) of the messages that stay; with
        ``among`` (a bool per row), only of those rows, as if the log held no others (a --limit
        counts their exchanges; +OFFSET times still count from the log's first message)."""
        t = reader.table()
        n = len(t)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        self._bind(int(t["ts_first"][0]))
        keep = np.zeros(n, dtype=bool)
        index = t["index"]
        unpaired = index < 0
        paired = np.flatnonzero(~unpaired if among is None else ~unpaired & among)
        if among is not None:
            unpaired = unpaired & among
        if len(paired):
            srt, gid, starts = _group(t["conn"][paired], index[paired], paired)
            keep[srt] = self._judge_groups(reader, t, srt, gid, starts)[gid]
        if not self.request_level and unpaired.any():
            rows = np.flatnonzero(unpaired)
            cols = ExchangeColumns(t, rows, reader.strings, np.zeros(len(rows), dtype=np.uint16))
            alive = self._columns_pass(cols, np.arange(len(rows)))
            keep[rows[alive]] = True
        return np.flatnonzero(keep)

    def _judge_groups(self, reader, t, srt, gid, starts) -> np.ndarray:
        """bool per exchange (group)."""
        ngroups = len(starts)
        first_row = srt[starts]
        kind_s = t["kind"][srt]
        req_row = _first_per_group(gid, kind_s == KIND_REQUEST, srt, ngroups)
        rep = np.where(req_row >= 0, req_row, first_row)

        def status():
            final = (kind_s != KIND_REQUEST) & ((t["flags"][srt] & F_INTERIM) == 0)
            fin_row = _first_per_group(gid, final, srt, ngroups)
            return np.where(fin_row >= 0, t["status"][np.maximum(fin_row, 0)], 0).astype(np.uint16)

        cols = ExchangeColumns(t, rep, reader.strings, status)
        alive = self._columns_pass(cols, np.arange(ngroups))
        heavy = [f for f in self.filters if not hasattr(f, "mask")]
        if heavy and len(alive):
            alive = alive[self._payload_pass(reader, t, heavy, cols, alive, req_row)]
        if self.limit is not None and len(alive) > self.limit:
            alive = alive[np.argsort(first_row[alive], kind="stable")[:self.limit]]
        out = np.zeros(ngroups, dtype=bool)
        out[alive] = True
        return out

    def _columns_pass(self, cols, alive):
        for f in sorted((f for f in self.filters if hasattr(f, "mask")), key=lambda f: f.cost):
            if not len(alive):
                break
            alive = alive[f.mask(cols, alive)]
        return alive

    @staticmethod
    def _payload_pass(reader, t, heavy, cols, alive, req_row) -> np.ndarray:
        """bool per entry of ``alive``: the filters that read request heads, in one pass over the
        requests still in, block by block (only their heads are sliced out of the payloads, no
        message is built); exchanges without a captured request are judged without one."""
        strings = cols.strings
        ok = np.zeros(len(alive), dtype=bool)
        rows = req_row[alive]
        have = np.flatnonzero(rows >= 0)
        order = have[np.argsort(rows[have], kind="stable")]
        r = rows[order]
        blocks = t["block"][r]
        offs = t["data_offset"][r].tolist()
        hls = t["head_length"][r].tolist()
        lens = t["data_length"][r].tolist()
        g = alive[order]
        conn, time, method, uri, status = (cols.conn[g].tolist(), cols.time[g].tolist(),
                                          cols.method[g].tolist(), cols.uri[g].tolist(),
                                          cols.status[g].tolist())
        edges = np.flatnonzero(np.diff(blocks)) + 1 if len(r) else np.zeros(0, dtype=np.int64)
        for a, z in zip([0, *edges.tolist()], [*edges.tolist(), len(r)] if len(r) else []):
            payload = reader.block_payload(int(blocks[a]))
            if payload is None:
                continue
            for j in range(a, z):
                o, hl = offs[j], hls[j]
                target = strings[uri[j]]        # the request's own: ``rep`` is its row
                head = _Head(payload[o:o + (hl or lens[j])], hl, target)
                v = ExchangeView(conn[j], time[j], strings[method[j]], target, status[j], head)
                ok[order[j]] = all(f.keep(v) for f in heavy)
        for i in np.flatnonzero(rows < 0).tolist():
            gi = alive[i]
            v = ExchangeView(int(cols.conn[gi]), int(cols.time[gi]), strings[cols.method[gi]],
                             strings[cols.uri[gi]], int(cols.status[gi]), None)
            ok[i] = all(f.keep(v) for f in heavy)
        return ok

    # -- streaming path --------------------------------------------------------------------------

    def stream(self, wait: float = WAIT_S, max_pending: int = MAX_PENDING,
               max_pending_bytes: int = MAX_PENDING_BYTES) -> "Stream":
        return Stream(self, wait, max_pending, max_pending_bytes)

    def judge(self, ex: ExchangeView) -> bool:
        return all(f.keep(ex) for f in self.filters)


def _group(conn: np.ndarray, index: np.ndarray, rows: np.ndarray):
    """Group ``rows`` by (conn, index): (rows sorted by key then row, group id of each, start of
    each group in that order)."""
    c = conn.astype(np.uint64)
    i = index.astype(np.int64)
    if len(c) and int(c.max()) < (1 << 31) and int(i.max()) < (1 << 32):
        order = np.argsort((c.astype(np.int64) << 32) | i, kind="stable")
    else:
        order = np.lexsort((i, c))
    srt = rows[order]
    cs, is_ = c[order], i[order]
    new = np.ones(len(srt), dtype=bool)
    new[1:] = (cs[1:] != cs[:-1]) | (is_[1:] != is_[:-1])
    gid = np.cumsum(new) - 1
    return srt, gid, np.flatnonzero(new)


def _first_per_group(gid, sel, srt, ngroups):
    """Row of the first selected message of each group (rows ascend within a group), or -1."""
    out = np.full(ngroups, -1, dtype=np.int64)
    pos = np.flatnonzero(sel)
    if len(pos):
        g = gid[pos]
        first = np.ones(len(pos), dtype=bool)
        first[1:] = g[1:] != g[:-1]
        out[g[first]] = srt[pos[first]]
    return out


class _Ex:
    __slots__ = ("first", "req", "status", "fate", "counted", "queued", "final", "last")

    def __init__(self, first, fate=None, counted=False):
        self.first = first
        self.req = None
        self.status = None
        self.fate = fate
        self.counted = counted
        self.queued = 0
        self.final = False
        self.last = first.ts_last


class Stream:
    """Streaming filter: ``push(msg)`` and ``advance(now_ns)`` return the messages now known to
    stay, in input order; ``finish()`` decides everything still waiting."""

    def __init__(self, fs: FilterSet, wait: float, max_pending: int, max_pending_bytes: int):
        self.fs = fs
        self.filters = fs.filters
        self.limit = fs.limit
        self.request_level = fs.request_level
        self.needs_request = any(f.needs_request for f in fs.filters)
        self.needs_status = any(f.needs_status for f in fs.filters)
        self.wait_ns = int(wait * 1e9)
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.pending: deque = deque()
        self.pending_bytes = 0
        self.open: OrderedDict = OrderedDict()     # (conn, index) -> _Ex, least recently seen first
        self.done: OrderedDict = OrderedDict()     # (conn, index) -> fate, of finished exchanges
        self.now = None
        self.started = False
        self.kept_exchanges = 0
        self.forced = 0            # exchanges decided on partial information (bounds reached)
        self.peak_pending = 0
        self._pushes = 0

    @property
    def exhausted(self) -> bool:
        """--limit reached and nothing waiting: nothing more can stay."""
        return self.limit is not None and self.kept_exchanges >= self.limit and not self.pending

    @property
    def settled(self) -> bool:
        """``exhausted``, and every kept exchange has ended (its request and final response
        seen, or quiet for longer than the wait): no later message of a log can stay.
        (A log holds a request before its final response: the core frames them in that order.)"""
        if not self.exhausted:
            return False
        horizon = self.now - self.wait_ns
        return not any(ex.fate and ex.last >= horizon and not (ex.final and ex.req is not None)
                       for ex in self.open.values())

    def start_at(self, ts_first: int) -> None:
        """+OFFSET times count from ``ts_first`` (else: from the first message pushed)."""
        if not self.started:
            self.started = True
            self.fs._bind(ts_first)

    def push(self, m) -> list:
        if not self.started:
            self.start_at(m.ts_first)
        if self.now is None or m.ts_last > self.now:
            self.now = m.ts_last
        if m.index < 0:
            ex = _Ex(m, fate=self._judge_alone(m), counted=True)
        else:
            key = (m.conn, m.index)
            ex = self.open.get(key)
            if ex is None:
                fate = self.done.get(key)
                if fate is not None:
                    ex = _Ex(m, fate=fate, counted=True)
                else:
                    ex = self.open[key] = _Ex(m)
            else:
                self.open.move_to_end(key)
                ex.last = m.ts_last
            if m.kind == KIND_REQUEST:
                if ex.req is None:
                    ex.req = m
            elif not m.flags & F_INTERIM:
                ex.final = True
                if ex.status is None:
                    ex.status = m.status
            if ex.fate is None and (ex.req is not None or not self.needs_request) and \
                    (ex.status is not None or not self.needs_status):
                ex.fate = self._judge(ex)
        ex.queued += 1
        self.pending.append((m, ex))
        self.pending_bytes += len(m.data)
        if len(self.pending) > self.peak_pending:
            self.peak_pending = len(self.pending)
        self._pushes += 1
        if not self._pushes & 4095:
            self._sweep()
        return self._drain(False)

    def advance(self, now_ns: int) -> list:
        """Capture time has reached ``now_ns`` (a quiet live capture): release what waited too long."""
        if self.now is None or now_ns > self.now:
            self.now = now_ns
        return self._drain(False)

    def finish(self) -> list:
        return self._drain(True)

    def _judge(self, ex) -> bool:
        rep = ex.req if ex.req is not None else ex.first
        v = ExchangeView(rep.conn, rep.ts_first, rep.method, rep.uri, ex.status or 0, ex.req)
        return all(f.keep(v) for f in self.filters)

    def _judge_alone(self, m) -> bool:
        if self.request_level:
            return False
        v = ExchangeView(m.conn, m.ts_first, m.method, m.uri, 0, None)
        return all(f.keep(v) for f in self.filters)

    def _drain(self, force: bool) -> list:
        out = []
        pending = self.pending
        while pending:
            m, ex = pending[0]
            if ex.fate is None:
                if not (force or self.now - m.ts_last > self.wait_ns or len(pending) > self.max_pending
                        or self.pending_bytes > self.max_pending_bytes):
                    break
                ex.fate = self._judge(ex)
                self.forced += not force
            pending.popleft()
            self.pending_bytes -= len(m.data)
            ex.queued -= 1
            if not ex.counted:
                ex.counted = True
                if ex.fate and self.limit is not None:
                    if self.kept_exchanges >= self.limit:
                        ex.fate = False
                    else:
                        self.kept_exchanges += 1
            if ex.fate:
                out.append(m)
            if ex.final and ex.req is not None and not ex.queued:
                self._retire((m.conn, m.index), ex)
        return out

    def _retire(self, key, ex) -> None:
        if self.open.get(key) is ex:
            del self.open[key]
            self.done[key] = ex.fate
            if len(self.done) > DONE_MEMORY:
                self.done.popitem(last=False)

    def _sweep(self) -> None:
        """Retire exchanges not seen for longer than the wait (requests never answered)."""
        horizon = self.now - self.wait_ns
        open_ = self.open
        while open_:
            key, ex = next(iter(open_.items()))
            if ex.last >= horizon or ex.queued or ex.fate is None:
                break
            self._retire(key, ex)
