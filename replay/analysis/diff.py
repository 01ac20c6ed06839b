"""What differs between two responses to the same request: fields of the body, and headers.

Rules:
- the body compared is the payload: chunked framing removed, gzip and deflate decoded (at most
  ``MAX_BODY`` bytes decoded; beyond that the rest is compared as raw bytes);
- JSON bodies (a ``json`` media type, or a body that starts like JSON and parses) are compared
  field by field. A field is a path from the root: ``$.user.name``, ``$.items[*].price``, one
  name per array element position (the index is part of the comparison, not of the name). A
  member present on one side only differs, at its own path; numbers compare by value
  (1 == 1.0), other values by type and value (inside a subtree that is otherwise equal, Python's
  ``True == 1`` lets a boolean turned number pass). A string holding JSON is compared as the
  JSON it holds (``$.payload.id``).
  With ``unordered``, arrays are compared as multisets: sorted by their canonical text first;
- other bodies are compared as text with line endings and trailing spaces normalised when
  they decode as UTF-8, as bytes otherwise; the field is ``body``;
- headers compare by lower-case name (``header:content-type``); repeated fields are joined;
  the names in ``DEFAULT_IGNORED_HEADERS`` are not compared, and of ``Set-Cookie`` only the
  cookie names are (their values are sessions and expiry dates);
- ``--ignore`` patterns: ``json:$.ts``, ``json:$..updated_at`` (at any depth), ``json:$.items[*].*``,
  ``header:X-Trace``, ``body`` (the whole non-JSON body). A pattern also covers the fields
  below the one it names.
"""

from __future__ import annotations

import json
import re
import zlib

from replay.core import COMPILED, json_diff
from replay.errors import UsageError
from replay.httpmsg import decode_chunked, header_fields, header_value

MAX_BODY = 4 << 20

# Values that differ on every response by design: dates, caches, tracing, connection handling;
# Content-Length and Transfer-Encoding follow the body, which is compared on its own.
DEFAULT_IGNORED_HEADERS = frozenset((
    "date", "age", "etag", "last-modified", "expires", "x-request-id", "x-correlation-id",
    "request-id", "x-trace-id", "traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid",
    "x-b3-parentspanid", "x-b3-sampled", "x-amzn-trace-id", "x-amzn-requestid", "cf-ray",
    "x-runtime", "x-response-time", "server-timing", "x-served-by", "x-cache", "x-cache-hits",
    "x-timer", "via", "keep-alive", "connection", "content-length", "transfer-encoding",
    "report-to", "nel", "x-envoy-upstream-service-time",
))


# -- bodies -----------------------------------------------------------------------------------

def _bounded_decode(raw: bytes, wbits: int) -> bytes | None:
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(raw, MAX_BODY)
        return out
    except zlib.error:
        return None


def payload(data: bytes, head_length: int) -> bytes:
    """The body of a message without transfer and content codings (bounded)."""
    body = data[head_length:]
    low = data[:head_length].lower()
    te = header_value(data, head_length, b"transfer-encoding") if b"\ntransfer-encoding:" in low else None
    if te and te.split(",")[-1].strip().lower() == "chunked":
        body = decode_chunked(body)[0]
    ce = header_value(data, head_length, b"content-encoding") if b"\ncontent-encoding:" in low else None
    if ce:
        ce = ce.strip().lower()
        if ce in ("gzip", "x-gzip"):
            got = _bounded_decode(body, 16 + 15)
        elif ce == "deflate":
            got = _bounded_decode(body, 15)
            if got is None:
                got = _bounded_decode(body, -15)
        else:
            got = None
        if got is not None:       # b"" is a body too: an empty payload, compressed
            body = got
    return body


def media_type(data: bytes, head_length: int) -> str:
    ct = header_value(data, head_length, b"content-type") or ""
    return ct.split(";", 1)[0].strip().lower()


def parse_json(body: bytes, mtype: str):
    """The JSON value of a body, or ``NOT_JSON``."""
    if not body:
        return NOT_JSON
    looks = mtype.endswith("json") or mtype.endswith("+json")
    if not looks:
        c = body.lstrip()[:1]
        if c not in (b"{", b"["):
            return NOT_JSON
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return NOT_JSON


class _NotJson:
    def __repr__(self):
        return "NOT_JSON"


NOT_JSON = _NotJson()


# -- JSON fields ------------------------------------------------------------------------------

_SIMPLE_KEY = re.compile(r"[A-Za-z_$][A-Za-z0-9_$\-]*")
MAX_DEPTH = 64          # below this, subtrees compare as canonical text


def _key(k: str) -> str:
    return "." + k if _SIMPLE_KEY.fullmatch(k) else "[" + json.dumps(k) + "]"


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)


_INDEX = re.compile(r"\[\d+\]")


def generic(path: str) -> str:
    """``$.items[3].price`` -> ``$.items[*].price``."""
    return _INDEX.sub("[*]", path) if "[" in path else path


def _same(a, b) -> bool:
    if a is b:
        return True
    ta, tb = type(a), type(b)
    if ta is tb:
        return a == b
    num = (int, float)
    return ta in num and tb in num and ta is not bool and tb is not bool and a == b


def value_diff(a, b, path: str = "$", out: set | None = None, unordered: bool = False,
               depth: int = 0) -> set:
    """Generic paths of what differs between two JSON values, walking only where they differ
    (equal subtrees are skipped by one C-level comparison). A member present on one side only
    is reported at its own path; strings holding JSON are compared as that JSON."""
    if out is None:
        out = set()
    if depth > MAX_DEPTH:
        if _canon(a) != _canon(b):
            out.add(path)
        return out
    ta, tb = type(a), type(b)
    if ta is dict and tb is dict:
        if a == b:
            return out
        for k, va in a.items():
            p = path + _key(str(k))
            if k in b:
                vb = b[k]
                if va is vb or (type(va) is type(vb) and type(va) in (str, int, float, bool) and va == vb):
                    continue
                value_diff(va, vb, p, out, unordered, depth + 1)
            else:
                out.add(p)
        for k in b.keys() - a.keys():
            out.add(path + _key(str(k)))
        return out
    if ta is list and tb is list:
        if a == b:
            return out
        if unordered:
            a, b = sorted(a, key=_canon), sorted(b, key=_canon)
        p = path + "[*]"
        for va, vb in zip(a, b):
            value_diff(va, vb, p, out, unordered, depth + 1)
        if len(a) != len(b):
            out.add(p)
        return out
    if ta is str and tb is str:
        if a == b:
            return out
        if len(a) > 1 and len(b) > 1 and a[0] in "{[" and b[0] in "{[":
            try:
                ia, ib = json.loads(a), json.loads(b)
            except (ValueError, RecursionError):
                pass
            else:
                return value_diff(ia, ib, path, out, unordered, depth + 1)
        out.add(path)
        return out
    if not _same(a, b):
        out.add(path)
    return out


def values_at(value, generic_path: str, limit: int = 1000) -> list:
    """Every value at a generic path (``$.items[*].price``: one per element), in order."""
    cur = [value]
    for tok in _TOKENS.findall(generic_path[1:]):
        nxt = []
        for v in cur:
            if isinstance(v, str) and v[:1] in "{[":
                try:
                    v = json.loads(v)
                except (ValueError, RecursionError):
                    continue
            if tok == "[*]":
                if isinstance(v, list):
                    nxt.extend(v[:limit])
            elif isinstance(v, dict):
                name = json.loads(tok[1:-1]) if tok.startswith("[") else tok[1:]
                if name in v:
                    nxt.append(v[name])
        cur = nxt[:limit]
        if not cur:
            break
    return cur


def differing_values(a, b, generic_path: str) -> tuple:
    """The first pair of values at a generic path that differ (None where one side has none)."""
    va, vb = values_at(a, generic_path), values_at(b, generic_path)
    for i in range(max(len(va), len(vb))):
        x = va[i] if i < len(va) else None
        y = vb[i] if i < len(vb) else None
        if i >= len(va) or i >= len(vb) or value_diff(x, y):
            return x, y
    return (va[0] if va else None), (vb[0] if vb else None)


_TOKENS = re.compile(r'\[\*\]|\["(?:[^"\\]|\\.)*"\]|\.[^.\[]+')


# -- headers ----------------------------------------------------------------------------------

def headers(data: bytes, head_length: int, ignored=DEFAULT_IGNORED_HEADERS) -> dict:
    """{lower-case name: comparable value} of a message's headers."""
    out: dict = {}
    for name, value in header_fields(data, head_length):
        n = name.decode("latin-1").lower()
        if n in ignored:
            continue
        v = value.decode("latin-1")
        if n == "set-cookie":
            v = v.split("=", 1)[0].strip()
        if n in out:
            out[n] = out[n] + ", " + v
        else:
            out[n] = v
    if "set-cookie" in out:
        out["set-cookie"] = ", ".join(sorted(out["set-cookie"].split(", ")))
    return out


# -- ignore patterns --------------------------------------------------------------------------

def _path_regex(pattern: str) -> str:
    """A JSONPath-like pattern as a regex over generic paths."""
    if not pattern.startswith("$"):
        raise ValueError("a JSON path starts with $")
    out = ["\\$"]
    i = 1
    seg = r"(?:\.[^.\[\]]+|\[[^\]]*\])"
    while i < len(pattern):
        if pattern.startswith("..", i):
            out.append(seg + "*")
            i += 1                       # the second dot starts the next name
        elif pattern.startswith("[*]", i):
            out.append(r"\[\*\]")
            i += 3
        elif pattern[i] == ".":
            j = i + 1
            while j < len(pattern) and pattern[j] not in ".[":
                j += 1
            name = pattern[i + 1:j]
            if not name:
                raise ValueError("an empty name")
            out.append(r"(?:\.[^.\[\]]+|\[\"[^\]]*\"\])" if name == "*" else
                       "(?:" + re.escape("." + name) + "|" + re.escape(_key(name)) + ")")
            i = j
        elif pattern[i] == "[":
            j = pattern.find("]", i)
            if j < 0:
                raise ValueError("an unclosed [")
            inner = pattern[i + 1:j]
            if inner.isdigit():
                out.append(r"\[\*\]")    # generic paths have no indexes
            else:
                name = inner.strip("'\"")
                out.append("(?:" + re.escape("." + name) + "|" + re.escape(_key(name)) + ")")
            i = j + 1
        else:
            raise ValueError(f"unexpected {pattern[i]!r}")
    return "".join(out) + r"(?=$|[.\[])"


class Ignore:
    """Compiled ``--ignore`` patterns: ``ignored(field)`` for ``$...``, ``header:...``, ``body``."""

    def __init__(self, patterns=()):
        self.headers: set = set()
        self.body = False
        rx = []
        for p in patterns:
            kind, sep, rest = p.partition(":")
            kind = kind.strip().lower()
            if not sep and kind == "body":
                self.body = True
            elif kind == "header" and rest.strip():
                self.headers.add(rest.strip().lower())
            elif kind == "json" and rest.strip():
                try:
                    rx.append(_path_regex(rest.strip()))
                except ValueError as e:
                    raise UsageError(f"--ignore {p!r}: {e} (e.g. json:$.items[*].updated_at)") from None
            else:
                raise UsageError(f"--ignore {p!r}: expected json:$.PATH, header:NAME or body")
        self._rx = re.compile("|".join(f"(?:{r})" for r in rx)) if rx else None
        self._cache: dict = {}

    def ignored(self, field: str) -> bool:
        if field.startswith("header:"):
            return field[7:] in self.headers
        if field == "body":
            return self.body
        if self._rx is None:
            return False
        got = self._cache.get(field)
        if got is None:
            got = self._cache[field] = bool(self._rx.match(field))
        return got


# -- one comparison ----------------------------------------------------------------------------

class Side:
    """The body of a response as compared: its JSON value, or normalised text, or bytes."""

    __slots__ = ("json", "text")

    def __init__(self, data: bytes, head_length: int, unordered=False):
        body = payload(data, head_length)
        value = parse_json(body, media_type(data, head_length))
        if value is NOT_JSON:
            self.json = NOT_JSON
            try:
                self.text = "\n".join(line.rstrip() for line in body.decode("utf-8").splitlines()).strip()
            except UnicodeDecodeError:
                self.text = body
        else:
            self.json = value
            self.text = None

    @property
    def is_json(self) -> bool:
        return self.json is not NOT_JSON


_CODED = re.compile(rb"\n(?:transfer|content)-encoding[ \t]*:", re.I).search


def _plain_json(data: bytes, head_length: int, body: bytes) -> bool:
    """The body is its own payload (no transfer or content coding) and starts like JSON."""
    return body[:1] in (b"{", b"[") and _CODED(data, 0, head_length) is None


class Raw:
    """A response's bytes as ``Comparer`` takes them (a Message will do as well)."""

    __slots__ = ("data", "head_length")

    def __init__(self, data: bytes, head_length: int):
        self.data = data
        self.head_length = head_length


class Comparer:
    """The fields that differ between two responses (before ``--ignore``), cheaply when little
    differs: heads are compared line by line first and parsed only where a line that is not an
    ignored header differs; bodies are parsed only when their bytes differ and the compiled
    core cannot walk them side by side. ``sides`` caches each response's parsed body for the
    exchange (keyed by the ``id`` of its bytes). The ``*_data`` methods take a response's bytes
    and head length; the others a Message (or a ``Raw``)."""

    def __init__(self, ignored_headers=DEFAULT_IGNORED_HEADERS, unordered: bool = False):
        self.ignored = frozenset(ignored_headers)
        self.unordered = unordered
        self._names: dict = {}          # a header name as written -> whether it is ignored

    def side(self, m, sides: dict) -> Side:
        return self.side_data(m.data, m.head_length, sides)

    def side_data(self, data: bytes, head_length: int, sides: dict) -> Side:
        got = sides.get(id(data))
        if got is None:
            got = sides[id(data)] = Side(data, head_length, self.unordered)
        return got

    def headers(self, m) -> dict:
        return headers(m.data, m.head_length, self.ignored)

    def diff(self, a, b, sides: dict) -> set:
        return self.diff_data(a.data, a.head_length, b.data, b.head_length, sides)

    def diff_data(self, a: bytes, ah: int, b: bytes, bh: int, sides: dict) -> set:
        out = self.header_diff_data(a, ah, b, bh)
        ba, bb = a[ah:], b[bh:]
        if ba != bb:
            if COMPILED and not self.unordered and _plain_json(a, ah, ba) and _plain_json(b, bh, bb):
                # two JSON texts walked side by side, no value built for what is equal (0.6 µs
                # for two small objects against 13 µs to parse and walk them); False when they
                # are not alike enough to be sure: then parsed, below. The pure twin's walk is
                # slower than parsing: it is the reference, not used here
                got: set = set()
                if json_diff(ba, bb, got):
                    out |= got
                    return out
            sa, sb = self.side_data(a, ah, sides), self.side_data(b, bh, sides)
            if sa.is_json and sb.is_json:
                value_diff(sa.json, sb.json, "$", out, self.unordered)
            elif sa.is_json or sb.is_json or sa.text != sb.text:
                out.add("body")
        return out

    def header_diff(self, a, b) -> set:
        return self.header_diff_data(a.data, a.head_length, b.data, b.head_length)

    def header_diff_data(self, a: bytes, ah: int, b: bytes, bh: int) -> set:
        ha, hb = a[:ah], b[:bh]
        if ha == hb:
            return set()
        la, lb = ha.split(b"\n"), hb.split(b"\n")
        if len(la) == len(lb):
            # the usual case: the same fields in the same order, only ignored ones (Date) have
            # other values; then nothing differs. Otherwise the lines are compared as sets
            known = self._names
            for x, y in zip(la[1:], lb[1:]):
                if x != y:
                    nx, sx, _ = x.partition(b":")
                    ny, sy, _ = y.partition(b":")
                    if not (sx and sy) or nx != ny and nx.lower() != ny.lower():
                        break
                    ig = known.get(nx)
                    if ig is None:
                        ig = nx[:1] not in b" \t" and nx.strip().lower().decode("latin-1") in self.ignored
                        if len(known) < 1024:
                            known[nx] = ig
                    if not ig:
                        break
            else:
                return set()
        names: set | None = set()
        for line in set(la[1:]).symmetric_difference(lb[1:]):
            k, sep, _ = line.partition(b":")
            if not sep:
                if line.strip():
                    names = None          # an odd line (obs-fold): compare every header
                    break
                continue
            if k[:1] in b" \t":
                names = None
                break
            n = k.strip().lower().decode("latin-1")
            if n not in self.ignored:
                names.add(n)
        if names is not None and not names:
            return set()
        xa, xb = headers(a, ah, self.ignored), headers(b, bh, self.ignored)
        keys = (xa.keys() | xb.keys()) if names is None else names
        return {"header:" + n for n in keys if xa.get(n) != xb.get(n)}
