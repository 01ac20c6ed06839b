"""HAR 1.2 (HTTP Archive: browser devtools, mitmproxy, Charles) in and out (docs/formats-har.md).

Theory of operation. A HAR file is one JSON document, ``{"log": {..., "entries": [...]}}``, one
entry per exchange: a request and its response, as parsed fields rather than bytes. Writing turns
a request ``Message`` and the final response with the same ``conn`` and ``index`` into one entry;
reading turns each entry back into a request ``Message`` and (when the entry has one) a response.

Rules the writer keeps:

- memory is bounded: a request waits for its response in a window of at most ``window`` requests
  and ``window_bytes`` message bytes; entries leave the window in request order (an answered
  request waits behind older unanswered ones) and are written at once, so the file grows entry by
  entry: the ``log`` head first, each entry, and the end of the array and of the log at
  ``close()``. A request pushed out of a full window, or still waiting at ``close()``, is written
  with ``status`` 0 (HAR's "no response"); a response that comes after it, or whose request was
  never seen, is not written and is counted (``log._replay.written.unpaired_responses``, and
  ``log.comment``); the writer's ``meta`` (``update_meta`` merges into it) is ``log._replay.meta``;
- a response that ends before its request (a 100 Continue comes before the request's body) waits
  for it in a window of the same bounds;
- interim responses (1xx before the final one) are not entries of their own: their statuses go to
  ``_replay.interim``;
- bodies: HAR's ``content.text`` and ``postData.text`` hold the payload after chunked framing is
  taken off (``content.size`` is that length; ``bodySize`` the bytes on the wire). Text that is
  not UTF-8 is written in base64 (``content.encoding``; ``postData`` has no such field in HAR
  1.2, so ``postData._encoding``). A ``Content-Encoding`` (gzip, br...) is left as sent: the
  bytes are exactly those that crossed the wire (and base64, being binary), marked with
  ``content._contentEncoding`` / ``postData._contentEncoding``. Browsers decode them; we do not,
  so nothing is ever inflated (no decompression bomb) and a replay sends the very bytes;
- header names and values are the bytes read as latin-1 (RFC 9110 §5.5: octets, historically
  ISO-8859-1), so every header survives a round trip;
- what HAR has no place for goes to ``_replay`` (HAR 1.2 allows fields starting with ``_``).

Rules the reader keeps:

- a HAR file is one JSON document: it is read whole with ``json.load``, refused above
  ``MAX_HAR_BYTES`` (a parsed document takes several times its size in memory);
- entries become messages sorted by time (``startedDateTime``, then the timings); each request
  is rebuilt as HTTP/1.1 bytes: request line with the path and query of ``url``, the headers as
  listed without HTTP/2 pseudo-headers (``:authority`` gives ``Host`` when there is none), the
  body from ``postData`` with a true ``Content-Length`` (or as one chunk when the headers say
  ``Transfer-Encoding: chunked``);
- a response body the exporter left out (no ``content.text`` while ``content.size`` > 0) is
  marked ``F_INCOMPLETE | F_TRUNCATED`` and counted in ``warnings``; a ``Content-Encoding``
  header is dropped when the text was decoded by the exporter (no ``_contentEncoding``);
- ``connection`` values become connection ids in order of first appearance; an entry without
  one gets a connection of its own; ``index`` counts the entries of a connection in time order;
- damage (not JSON, a required field missing or of the wrong type) raises one ``InputError``
  naming the JSON path (``log.entries[12].request.url``) after the messages of the entries before
  it were yielded.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections import OrderedDict
from datetime import datetime, timezone
from http import HTTPStatus
from urllib.parse import parse_qsl

from replay.errors import InputError, OutputError
from replay.events import (F_CHUNKED, F_INCOMPLETE, F_INTERIM, F_TRUNCATED, FLAG_NAMES,
                           KIND_REQUEST, KIND_RESPONSE, Message, flag_names)
from replay.httpmsg import (decode_chunked, encode_chunked, format_addr, header_fields,
                            header_value, head_end, is_chunked, remove_header, set_header,
                            split_head)
from replay.outputs import reason

HAR_VERSION = "1.2"
# A parsed JSON document takes 5-10 times its size in memory (CPython objects per string and
# number); 1 GiB of HAR is far more than any browser exports (Chrome stops near 500 MB).
MAX_HAR_BYTES = 1 << 30
SNIFF_BYTES = 4096
WINDOW = 4096                # requests waiting for their response
WINDOW_BYTES = 64 << 20      # bytes of the requests waiting for their response
NS_PER_MS = 1_000_000
NO_ADDR = ("0.0.0.0", 0)     # an address HAR does not give (the client's, always)

_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_FLAG_BITS = {name: bit for bit, name in FLAG_NAMES}
_SNIFF_RE = re.compile(rb'\A\s*\{.*?"log"\s*:\s*\{', re.S)
_BOM = b"\xef\xbb\xbf"


# -- sniffing ---------------------------------------------------------------------------------------


def sniff(path) -> bool:
    """True when ``path`` starts like a HAR document: a JSON object with a ``"log"`` object among
    the keys of its first few KB (a UTF-8 byte order mark and whitespace skipped)."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return False
    if head.startswith(_BOM):
        head = head[len(_BOM):]
    return _SNIFF_RE.match(head) is not None


# -- writing ----------------------------------------------------------------------------------------


def open_writer(path, fd: int, meta: dict, format: str = "har", window: int = WINDOW,
                window_bytes: int = WINDOW_BYTES, **options):
    """A ``HarWriter`` on ``fd`` (which it owns from now on); ``options`` it has no use for
    (``level``...) are ignored."""
    return HarWriter(path, fd, meta, window=window, window_bytes=window_bytes)


class _Pending:
    __slots__ = ("req", "resp", "interim", "size")

    def __init__(self, req):
        self.req = req
        self.resp = None
        self.interim = []
        self.size = len(req.data)


class HarWriter:
    def __init__(self, path, fd: int, meta: dict | None = None, window: int = WINDOW,
                 window_bytes: int = WINDOW_BYTES):
        from replay import __version__

        self.path = os.fspath(path)
        self.window = max(1, window)
        self.window_bytes = max(1, window_bytes)
        self.records_written = 0
        self.entries_written = 0
        self._meta = dict(meta or {})
        self._pending: OrderedDict = OrderedDict()   # (conn, index) -> _Pending, request order
        self._pending_bytes = 0
        self._early: OrderedDict = OrderedDict()     # (conn, index) -> responses before their request
        self._early_bytes = 0
        self._counts = {"unpaired_responses": 0, "no_response": 0, "interim": 0}
        self._closed = False
        self._f = io.open(fd, "wb", buffering=1 << 20, closefd=True)
        creator = {"name": "replay", "version": __version__}
        head = ('{"log": {"version": "1.2", "creator": ' + json.dumps(creator)
                + ', "pages": [], "entries": [')
        self._out(head.encode())
        self._first = True

    # -- LogWriter protocol --

    def write(self, msg) -> None:
        if self._closed:
            raise ValueError("write to a closed HarWriter")
        self.records_written += 1
        key = (msg.conn, msg.index)
        if msg.kind == KIND_REQUEST:
            old = self._pending.pop(key, None)
            if old is not None:        # the same (conn, index) twice: the first is done
                self._pending_bytes -= old.size
                self._emit(old)
            p = _Pending(msg)
            self._pending[key] = p
            self._pending_bytes += p.size
            for r in self._early.pop(key, ()):
                self._early_bytes -= len(r.data)
                self._answer(p, r)
            while len(self._pending) > self.window or (
                    self._pending_bytes > self.window_bytes and len(self._pending) > 1):
                self._pop_oldest()
            self._flush_answered()
            return
        if msg.index < 0:
            self._counts["unpaired_responses"] += 1
            return
        p = self._pending.get(key)
        if p is None:
            # a response can end before its request: a 100 Continue comes before the body
            self._early.setdefault(key, []).append(msg)
            self._early_bytes += len(msg.data)
            while len(self._early) > self.window or self._early_bytes > self.window_bytes:
                _, lost = self._early.popitem(last=False)
                self._early_bytes -= sum(len(r.data) for r in lost)
                self._counts["unpaired_responses"] += len(lost)
            return
        self._answer(p, msg)
        self._flush_answered()

    def _answer(self, p: _Pending, msg) -> None:
        if p.resp is not None:
            self._counts["unpaired_responses"] += 1
            return
        if msg.flags & F_INTERIM:
            p.interim.append(msg.status)
            self._counts["interim"] += 1
            return
        p.resp = msg
        self._pending_bytes += len(msg.data)
        p.size += len(msg.data)

    def _flush_answered(self) -> None:
        while self._pending and next(iter(self._pending.values())).resp is not None:
            self._pop_oldest()

    def update_meta(self, meta: dict) -> None:
        if self._closed:
            raise ValueError("update_meta of a closed HarWriter")
        self._meta.update(meta)

    def close(self, fsync: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            while self._pending:
                self._pop_oldest()
            self._counts["unpaired_responses"] += sum(len(v) for v in self._early.values())
            self._early.clear()
            tail = {"comment": self._summary(), "_replay": self._log_replay()}
            text = json.dumps(tail, ensure_ascii=False, default=str)
            self._out(b"\n]" + (", " + text[1:-1]).encode() + b"}}\n")
            try:
                self._f.flush()
                if fsync:
                    os.fsync(self._f.fileno())
            except OSError as e:
                raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None
        finally:
            try:
                self._f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inside --

    def _out(self, b: bytes) -> None:
        try:
            self._f.write(b)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None

    def _pop_oldest(self) -> None:
        _, p = self._pending.popitem(last=False)
        self._pending_bytes -= p.size
        self._emit(p)

    def _emit(self, p: _Pending) -> None:
        if p.resp is None:
            self._counts["no_response"] += 1
        entry = har_entry(p.req, p.resp, p.interim)
        text = json.dumps(entry, ensure_ascii=False)
        self._out((("\n" if self._first else ",\n") + text).encode())
        self._first = False
        self.entries_written += 1

    def _summary(self) -> str:
        c = self._counts
        parts = [f"{self.entries_written} entries written by replay"]
        if c["no_response"]:
            parts.append(f"{c['no_response']} without a response (status 0)")
        if c["unpaired_responses"]:
            parts.append(f"{c['unpaired_responses']} responses without a request left out")
        return "; ".join(parts)

    def _log_replay(self) -> dict:
        return {"meta": self._meta, "written": dict(self._counts, entries=self.entries_written)}


def _iso_ms(ns: int) -> str:
    """ISO 8601 with milliseconds (truncated) and zone, as HAR's ``startedDateTime`` wants."""
    ms = ns // NS_PER_MS
    dt = datetime.fromtimestamp(ms // 1000, timezone.utc).replace(microsecond=(ms % 1000) * 1000)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(ns: int) -> float:
    """A duration in ms, at least 0, to the microsecond."""
    return round(max(0, ns) / NS_PER_MS, 3)


def _latin1(b: bytes) -> str:
    return b.decode("latin-1")


def _start_line(data: bytes) -> list:
    nl = data.find(b"\n")
    line = data[:nl if nl >= 0 else len(data)].rstrip(b"\r")
    return line.split(b" ")


def _headers(fields) -> list:
    return [{"name": _latin1(k), "value": _latin1(v)} for k, v in fields]


def _payload(msg, head_len: int):
    """(payload after chunked framing, bytes of body on the wire)."""
    _, body = split_head(msg.data, head_len)
    if is_chunked(msg.data, head_len):
        payload, _, _ = decode_chunked(body)
        return payload, len(body)
    return body, len(body)


def _text(payload: bytes):
    """(text, base64?) for a body."""
    try:
        return payload.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), True


def _request_cookies(fields) -> list:
    out = []
    for k, v in fields:
        if k.lower() != b"cookie":
            continue
        for part in _latin1(v).split(";"):
            name, eq, value = part.strip().partition("=")
            if name:
                out.append({"name": name, "value": value})
    return out


def _response_cookies(fields) -> list:
    out = []
    for k, v in fields:
        if k.lower() != b"set-cookie":
            continue
        parts = _latin1(v).split(";")
        name, _, value = parts[0].strip().partition("=")
        if not name:
            continue
        c = {"name": name, "value": value}
        for attr in parts[1:]:
            an, _, av = attr.strip().partition("=")
            low = an.lower()
            if low in ("path", "domain"):
                c[low] = av
            elif low == "expires":     # HAR wants ISO 8601; an unreadable date is left out
                iso = _cookie_date(av)
                if iso:
                    c["expires"] = iso
            elif low == "httponly":
                c["httpOnly"] = True
            elif low == "secure":
                c["secure"] = True
        out.append(c)
    return out


def _cookie_date(text: str) -> str | None:
    from email.utils import parsedate_to_datetime

    try:
        dt = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _host(fields, server) -> str:
    for k, v in fields:
        if k.lower() == b"host":
            return _latin1(v)
    if not server or server == NO_ADDR:
        return "unknown"
    return format_addr(server) if server[1] != 80 else (
        f"[{server[0]}]" if ":" in server[0] else server[0])


def har_entry(req, resp=None, interim=()) -> dict:
    """The HAR entry of a request ``Message`` and its final response (or None)."""
    rhl = req.head_length or max(0, head_end(req.data)) or len(req.data)
    rfields = header_fields(req.data, rhl)
    parts = _start_line(req.data)
    method = req.method or _latin1(parts[0])
    target = req.uri if req.uri is not None else (_latin1(parts[1]) if len(parts) > 2 else "/")
    version = _latin1(parts[-1]) if len(parts) >= 3 else "HTTP/1.1"
    own = {"conn": req.conn, "index": req.index, "client": format_addr(req.client),
           "server": format_addr(req.server), "request": {"flags": flag_names(req.flags)}}
    if "://" in target[:12]:
        url = target
        own["target"] = target
    else:
        url = "http://" + _host(rfields, req.server) + (target if target.startswith("/") else "/")
        if not target.startswith("/"):
            own["target"] = target      # asterisk-form (OPTIONS *), authority-form (CONNECT)
    query = url.partition("?")[2].partition("#")[0]
    payload, wire = _payload(req, rhl)
    request = {
        "method": method,
        "url": url,
        "httpVersion": version,
        "cookies": _request_cookies(rfields),
        "headers": _headers(rfields),
        "queryString": [{"name": n, "value": v}
                        for n, v in parse_qsl(query, keep_blank_values=True, errors="replace")],
        "headersSize": rhl,
        "bodySize": wire,
    }
    if payload:
        text, b64 = _text(payload)
        post = {"mimeType": header_value(req.data, rhl, b"content-type") or "", "text": text}
        if b64:
            post["_encoding"] = "base64"
        ce = header_value(req.data, rhl, b"content-encoding")
        if ce:
            post["_contentEncoding"] = ce
        request["postData"] = post
    send = _ms(req.ts_last - req.ts_first)
    if resp is None:
        response = {"status": 0, "statusText": "", "httpVersion": "", "cookies": [], "headers": [],
                    "content": {"size": 0, "mimeType": ""}, "redirectURL": "",
                    "headersSize": -1, "bodySize": -1, "_error": "no response"}
        wait = receive = 0.0
    else:
        shl = resp.head_length or max(0, head_end(resp.data)) or len(resp.data)
        sfields = header_fields(resp.data, shl)
        sparts = _start_line(resp.data)
        rpayload, rwire = _payload(resp, shl)
        content = {"size": len(rpayload),
                   "mimeType": header_value(resp.data, shl, b"content-type") or ""}
        if rpayload:
            text, b64 = _text(rpayload)
            content["text"] = text
            if b64:
                content["encoding"] = "base64"
            ce = header_value(resp.data, shl, b"content-encoding")
            if ce:
                content["_contentEncoding"] = ce
        response = {
            "status": resp.status,
            "statusText": _latin1(b" ".join(sparts[2:])),
            "httpVersion": _latin1(sparts[0]) if sparts else "",
            "cookies": _response_cookies(sfields),
            "headers": _headers(sfields),
            "content": content,
            "redirectURL": header_value(resp.data, shl, b"location") or "",
            "headersSize": shl,
            "bodySize": rwire,
        }
        wait = _ms(resp.ts_first - req.ts_last)
        receive = _ms(resp.ts_last - resp.ts_first)
        own["response"] = {"flags": flag_names(resp.flags)}
    if interim:
        own["interim"] = list(interim)
    entry = {
        "startedDateTime": _iso_ms(req.ts_first),
        "time": round(send + wait + receive, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1,
                    "send": send, "wait": wait, "receive": receive},
        "connection": str(req.conn),
        "_replay": own,
    }
    if req.server and req.server != NO_ADDR:
        entry["serverIPAddress"] = req.server[0]
    return entry


# -- reading ----------------------------------------------------------------------------------------


class _Damage(Exception):
    def __init__(self, where: str, what: str):
        self.where = where
        self.what = what


def open_reader(path):
    return HarReader(path)


class HarReader:
    """The messages of a HAR file, in time order, with ``warnings`` and ``meta``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.warnings: list[str] = []
        self.meta: dict = {}
        try:
            size = os.path.getsize(self.path)
            if size > MAX_HAR_BYTES:
                raise InputError(f"{self.path}: HAR file of {size} bytes: larger than the "
                                 f"{MAX_HAR_BYTES >> 20} MiB a HAR file is read whole up to")
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory") from None
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {reason(e)}") from None
        if raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            self._doc = json.loads(raw)
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: not a HAR file: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{self.path}: not a HAR file: bad JSON at line {e.lineno} "
                             f"column {e.colno}: {e.msg}") from None
        del raw
        log = self._doc.get("log") if isinstance(self._doc, dict) else None
        if not isinstance(log, dict):
            raise InputError(f"{self.path}: log: missing or not an object")
        creator = log.get("creator")
        browser = log.get("browser")
        pages = log.get("pages")
        self.meta = {"format": "har", "version": log.get("version")}
        if isinstance(creator, dict):
            self.meta["creator"] = {k: creator.get(k) for k in ("name", "version") if k in creator}
        if isinstance(browser, dict):
            self.meta["browser"] = {k: browser.get(k) for k in ("name", "version") if k in browser}
        self.meta["pages"] = len(pages) if isinstance(pages, list) else 0
        self.meta["entries"] = len(log["entries"]) if isinstance(log.get("entries"), list) else 0

    def __iter__(self):
        doc, self._doc = self._doc, None
        if doc is None:
            return
        log = doc["log"]
        entries = log.get("entries")
        if not isinstance(entries, list):
            raise InputError(f"{self.path}: log.entries: missing or not an array")
        done = []
        damage = None
        for i, e in enumerate(entries):
            try:
                done.append(_parse_entry(e, f"log.entries[{i}]", i))
            except _Damage as d:
                damage = d
                break
        del doc, entries
        yield from self._messages(done)
        if damage is not None:
            raise InputError(f"{self.path}: {damage.where}: {damage.what}")

    def _messages(self, parsed: list):
        parsed.sort(key=lambda p: (p["t_req"], p["pos"]))
        conn_ids: dict = {}
        next_index: dict = {}
        out = []
        missing_body = no_response = 0
        for p in parsed:
            key = p["connection"]
            if key is None:
                key = ("entry", p["pos"])
            conn = conn_ids.setdefault(key, len(conn_ids))
            index = next_index.get(conn, 0)
            next_index[conn] = index + 1
            req = p["request"]
            req.conn = conn
            req.index = index
            out.append(req)
            resp = p["response"]
            if resp is None:
                no_response += 1
                continue
            resp.conn = conn
            resp.index = index
            if p["body_missing"]:
                missing_body += 1
            out.append(resp)
        out.sort(key=lambda m: (m.ts_first, m.kind, m.conn, m.index))
        if missing_body:
            self.warnings.append(f"{missing_body} responses without the body the exporter left "
                                 "out (marked incomplete)")
        if no_response:
            self.warnings.append(f"{no_response} requests without a response (status 0)")
        return out


def _get(obj: dict, key: str, where: str, types, required: bool = True, default=None):
    if key not in obj or obj[key] is None:
        if required:
            raise _Damage(f"{where}.{key}", "missing")
        return default
    v = obj[key]
    if types is float:
        types = (int, float)
    if not isinstance(v, types) or isinstance(v, bool) and types is not bool:
        raise _Damage(f"{where}.{key}", f"wrong type ({type(v).__name__})")
    return v


def _parse_time(s: str, where: str) -> int:
    """ns since the epoch of an ISO 8601 ``startedDateTime``."""
    t = s.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(.*)$", t)
    if m is None:
        raise _Damage(where, f"not an ISO 8601 date-time: {s!r}")
    frac = (m.group(2) or "")[:9].ljust(9, "0")
    try:
        dt = datetime.fromisoformat(m.group(1) + m.group(3))
    except ValueError:
        raise _Damage(where, f"not an ISO 8601 date-time: {s!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + int(frac)


MAX_DURATION_MS = 10 * 365 * 86400 * 1000.0   # a timing beyond ten years is taken as 0


def _dur(timings: dict, key: str) -> float:
    """A duration of ``timings`` in ms; missing, negative (-1: "not known"), NaN or absurd: 0."""
    v = timings.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return 0.0
    v = float(v)
    return v if 0 < v < MAX_DURATION_MS else 0.0


def _addr(text) -> tuple:
    if not isinstance(text, str) or ":" not in text:
        return NO_ADDR
    host, _, port = text.rpartition(":")
    try:
        return (host.strip("[]"), int(port))
    except ValueError:
        return NO_ADDR


def _bytes(text, encoding, where: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=False)
        except ValueError:
            raise _Damage(where, "bad base64") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate from a \ud8xx escape
        return text.encode("utf-8", "surrogatepass")


def _enc(s: str) -> bytes:
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:    # beyond latin-1; a lone surrogate (a \ud8xx escape) kept as is
        return s.encode("utf-8", "surrogatepass")


def _header_list(obj: dict, where: str) -> list:
    out = []
    for j, h in enumerate(_get(obj, "headers", where, list)):
        hw = f"{where}.headers[{j}]"
        if not isinstance(h, dict):
            raise _Damage(hw, "not an object")
        name = _get(h, "name", hw, str)
        value = _get(h, "value", hw, (str, int, float))
        out.append((name, str(value)))
    return out


def _flags(own: dict, which: str) -> int:
    part = own.get(which) if isinstance(own, dict) else None
    names = part.get("flags") if isinstance(part, dict) else None
    if not isinstance(names, list):
        return 0
    return sum(_FLAG_BITS.get(n, 0) for n in set(names) if isinstance(n, str)) & ~F_CHUNKED


def _http1(version: str) -> str:
    return version if re.fullmatch(r"HTTP/1\.[01]", version or "") else "HTTP/1.1"


def _build(start: bytes, headers: list, body: bytes, fix_length: bool):
    """(data, head length, body length, chunked) of a message from its parts."""
    head = start + b"\r\n" + b"".join(_enc(n) + b": " + _enc(v) + b"\r\n" for n, v in headers) + b"\r\n"
    hl = len(head)
    data = head + body
    if is_chunked(data, hl):
        data = remove_header(head, hl, b"content-length")
        data = data + encode_chunked(body)
        hl = head_end(data)
        return data, hl, len(body), True
    if fix_length:
        data = set_header(data, hl, b"Content-Length", str(len(body)).encode())
        hl = head_end(data)
    return data, hl, len(body), False


def _parse_entry(e, where: str, pos: int) -> dict:
    if not isinstance(e, dict):
        raise _Damage(where, "not an object")
    t0 = _parse_time(_get(e, "startedDateTime", where, str), f"{where}.startedDateTime")
    rq = _get(e, "request", where, dict)
    rs = _get(e, "response", where, dict)
    timings = e.get("timings") if isinstance(e.get("timings"), dict) else {}
    own = e.get("_replay") if isinstance(e.get("_replay"), dict) else {}
    rw = f"{where}.request"
    method = _get(rq, "method", rw, str)
    url = _get(rq, "url", rw, str)
    headers = _header_list(rq, rw)
    version = _http1(_get(rq, "httpVersion", rw, str, required=False, default=""))
    # the request-target: ours when we wrote it, else the path and query of the url
    scheme, sep, rest = url.partition("://")
    if not sep:
        rest = url
    slash = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority = rest[:slash] if sep else ""
    target = rest[slash:].partition("#")[0] or "/"
    if target.startswith("?"):
        target = "/" + target
    if isinstance(own.get("target"), str):
        target = own["target"]
    # HTTP/2 pseudo-headers go; :authority (or the url) gives Host when none is listed
    pseudo = {n.lower(): v for n, v in headers if n.startswith(":")}
    headers = [(n, v) for n, v in headers if not n.startswith(":")]
    if not any(n.lower() == "host" for n, _ in headers):
        host = pseudo.get(":authority") or authority
        if host:
            headers.insert(0, ("Host", host))
    body = b""
    post = rq.get("postData")
    if isinstance(post, dict):
        pw = f"{rw}.postData"
        text = post.get("text")
        if isinstance(text, str):
            body = _bytes(text, post.get("_encoding") or post.get("encoding"), f"{pw}.text")
        elif isinstance(post.get("params"), list):
            from urllib.parse import urlencode

            body = urlencode([(p.get("name", ""), p.get("value", "")) for p in post["params"]
                              if isinstance(p, dict)]).encode()
    if body and not (isinstance(post, dict) and post.get("_contentEncoding")):
        headers = [(n, v) for n, v in headers if n.lower() != "content-encoding"]
    has_cl = any(n.lower() == "content-length" for n, _ in headers)
    start = _enc(method) + b" " + _enc(target) + b" " + version.encode()
    data, hl, blen, chunked = _build(start, headers, body, bool(body) or has_cl)
    send = _dur(timings, "send")
    t_send = t0 + round((_dur(timings, "blocked") + _dur(timings, "dns")
                         + _dur(timings, "connect")) * NS_PER_MS)
    t_sent = t_send + round(send * NS_PER_MS)
    client = _addr(own.get("client"))
    server = _addr(own.get("server"))
    if server == NO_ADDR:
        ip = e.get("serverIPAddress")
        port = 443 if scheme.lower() == "https" else 80
        hp = authority.rpartition("@")[2]
        m = re.search(r":(\d+)$", hp)
        if m:
            port = int(m.group(1))
        server = (ip.strip("[]"), port) if isinstance(ip, str) and ip else ("0.0.0.0", port)
    rflags = _flags(own, "request") | (F_CHUNKED if chunked else 0)
    req = Message(KIND_REQUEST, 0, 0, t_send, t_sent, client, server, rflags, data,
                  method=method, uri=target, body_length=blen, head_length=hl)
    sw = f"{where}.response"
    status = _get(rs, "status", sw, int)
    if not 0 <= status <= 999:      # RFC 9110 §15: three digits
        raise _Damage(f"{sw}.status", f"out of range ({status})")
    resp = None
    missing = False
    if status > 0:
        sheaders = [(n, v) for n, v in _header_list(rs, sw) if not n.startswith(":")]
        content = _get(rs, "content", sw, dict)
        cw = f"{sw}.content"
        text = content.get("text")
        size = content.get("size")
        sbody = b""
        flags = _flags(own, "response")
        if isinstance(text, str):
            sbody = _bytes(text, content.get("encoding"), f"{cw}.text")
        elif isinstance(size, int) and size > 0:
            missing = True
            flags |= F_INCOMPLETE | F_TRUNCATED
        if not content.get("_contentEncoding") and not missing:
            sheaders = [(n, v) for n, v in sheaders if n.lower() != "content-encoding"]
        reason = rs.get("statusText") if isinstance(rs.get("statusText"), str) else ""
        sversion = _http1(rs.get("httpVersion") if isinstance(rs.get("httpVersion"), str) else "")
        if not reason and not own:    # HTTP/2 has no reason phrase: give the usual one
            reason = _PHRASES.get(status, "")
        sstart = f"{sversion} {status} ".encode() + _enc(reason)   # RFC 9112 §4: the SP stays
        bodiless = method == "HEAD" or status in (204, 304) or status < 200
        fix = not missing and (bool(sbody) or (not bodiless and any(
            n.lower() == "content-length" for n, _ in sheaders)))
        sdata, shl, sblen, schunked = _build(sstart, sheaders, sbody, fix)
        if missing and schunked:        # no last chunk: the body is cut
            sdata = sdata[:shl]
        if schunked:
            flags |= F_CHUNKED
        if 100 <= status < 200 and status != 101:   # 101 Switching Protocols is final
            flags |= F_INTERIM
        r0 = t_sent + round(_dur(timings, "wait") * NS_PER_MS)
        if "send" not in timings and "wait" not in timings:
            t_end = t0 + round(_dur(e, "time") * NS_PER_MS)
            r0 = max(t_sent, t_end)
        r1 = r0 + round(_dur(timings, "receive") * NS_PER_MS)
        resp = Message(KIND_RESPONSE, 0, 0, r0, r1, client, server, flags, sdata,
                       method=method, uri=target, status=status, body_length=sblen,
                       head_length=shl)
    conn = e.get("connection")
    if isinstance(conn, (int, float)) and not isinstance(conn, bool):
        conn = str(conn)
    if not isinstance(conn, str) or not conn:
        conn = None
    else:   # Firefox gives the server's port here: a connection is one to one server
        ip = e.get("serverIPAddress")
        conn = (conn, ip if isinstance(ip, str) else authority)
    return {"t_req": t_send, "pos": pos, "connection": conn, "request": req, "response": resp,
            "body_missing": missing}
