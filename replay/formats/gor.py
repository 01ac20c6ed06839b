"""GoReplay's ``.gor`` files, plain or gzip: read as messages, and written from messages.

The format (GoReplay's ``protocol.go``, ``input_file.go``, ``output_file.go``)
------------------------------------------------------------------------------
One record per message::

    TYPE SP ID SP TIMESTAMP [SP LATENCY] LF  PAYLOAD  LF "🐵🙈🙉" LF

- TYPE ``1`` request, ``2`` recorded response, ``3`` replayed response;
- ID, hex, shared by a request and its responses. 0.x: 40 random digits per request, and the
  header has 3 fields. 1.x: 24 digits, 4 fields; the first 16 digits are the flow (client port
  << 48 | server port << 32 | the low 32 bits of the client IP), the last 8 the request's TCP ack;
- TIMESTAMP, Unix ns; LATENCY, ns (1.x capture: how long the message itself took to arrive;
  0.x: a response's time since its request, whose TIMESTAMP it carries);
- PAYLOAD, the raw HTTP message. GoReplay writes a record when its message completes, so records
  are in completion order, not start order; its reader sorts them in a heap of 100.

Reading: the rules
------------------
- gzip is known by its magic (1f 8b), not by the name. The file is read in chunks: memory holds
  the sorting window and the record at hand, never the whole file;
- a record ends at a separator, but GoReplay does not escape it, so a payload may contain one.
  When the payload before the first separator is shorter than its HTTP framing says
  (Content-Length, or chunked) and a separator stands exactly where the framing ends, the record
  ends there (counted in ``warnings``). When none does, the first separator wins and the message
  is flagged ``incomplete`` (GoReplay cuts messages longer than its copy buffer). A message whose
  framing cannot say (a response without Content-Length or chunked coding) ends at the first
  separator. Framing is followed over at most ``MAX_RECORD`` bytes;
- records are sorted by TIMESTAMP (then file order) in a window of ``WINDOW_RECORDS`` records
  spanning at most ``WINDOW_NS`` and holding at most ``WINDOW_BYTES``; ``warnings`` says how
  many were out of order, and how many came later than the window allowed (those are yielded
  late, as they come);
- connections: GoReplay records none. A 24-digit id names its flow in its first 16 digits, so
  the requests of one flow share a ``conn`` (a client port reused later joins the same one) and
  take ``index`` 0, 1, ... in time order; any other id (0.x) is its request's own connection.
  A response takes the conn and index of the request with its id; without one (not in the file,
  or not seen yet) it is ``unpaired`` with index -1. The ``.gor`` files replay writes put ``conn``
  in those 16 digits, so they read back with their connections;
- addresses: a 1.x flow gives the client (IPv4 text of the 32 bits, port) and the server port;
  otherwise the client is ``("0.0.0.0", 0)`` and the server ``("0.0.0.0", PORT)``, PORT from the
  request's Host header (80 without one). The server's IP is never in the file: ``0.0.0.0``;
- times: ``ts_first`` = TIMESTAMP; ``ts_last`` = TIMESTAMP + LATENCY when LATENCY >= 0, else
  TIMESTAMP. Both generations then put ``ts_last`` at the message's end (a 0.x response's
  ``ts_first`` is its request's start: that is all the file knows);
- TYPE 3 gives a response flagged ``replayed``; method, URI, status, head and body lengths come
  from the payload (``replay.httpmsg``); a payload that is not HTTP keeps them empty;
- damage (a header line that does not parse, a record cut before its separator) stops reading
  with one ``InputError`` naming the record's number (from 1) and its byte offset (in the
  decompressed data for a ``.gz``), after everything before it was yielded.

Writing: the rules
------------------
4-field headers as GoReplay 1.x writes them: ID ``replay.rules.middleware.message_id`` (conn in
16 digits, index in 8; an unpaired response ``ffffffff``), TIMESTAMP ``ts_first``, LATENCY
``ts_last - ts_first`` (the message's own duration, as 1.x capture writes it), TYPE
``replay.rules.middleware.message_type``; then the payload and the separator. gzip when the path
ends ``.gz``. A ``failed`` message of ``replay play`` holds no HTTP and is skipped
(``skipped_failed``); a payload holding the separator is written as is (GoReplay's own reader
will split it; ours will not), counted in ``separators_in_payload``.
"""

from __future__ import annotations

import gzip
import heapq
import ipaddress
import os
import re
import zlib
from collections import OrderedDict

from replay.errors import InputError, OutputError
from replay.events import (F_CHUNKED, F_FAILED, F_INCOMPLETE, F_REPLAYED, F_UNPAIRED,
                           KIND_REQUEST, KIND_RESPONSE, Message)
from replay.httpmsg import body_length, head_end, header_value, is_chunked
from replay.outputs import reason
from replay.rules.middleware import message_id, message_type

SEPARATOR = "\n🐵🙈🙉\n".encode()   # protocol.go: payloadSeparator
GZIP_MAGIC = b"\x1f\x8b"
HEADER = re.compile(rb"([123]) ([0-9A-Za-z]+) (\d{1,20})(?: (-?\d{1,20}))?\r?\Z")
MAX_HEADER = 1024                  # bytes of a header line before it counts as damage
CHUNK = 1 << 16                    # bytes read at a time
MAX_RECORD = 256 << 20             # framing is followed this far past a record's start
WINDOW_RECORDS = 10_000            # records held for sorting (GoReplay's reader: 100)
WINDOW_NS = 60_000_000_000         # and the time they may span
WINDOW_BYTES = 256 << 20           # and the payload bytes they may hold
MAX_TRACKED = 100_000              # request ids and flows remembered for pairing
SNIFF_BYTES = 4096
UNKNOWN_IP = "0.0.0.0"


def _open(path):
    """The file at ``path`` as a binary stream, decompressed when it starts with gzip's magic."""
    f = open(path, "rb")
    if f.read(2) == GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb"), True
    f.seek(0)
    return f, False


def sniff(path) -> bool:
    """True when the (decompressed) file starts with a GoReplay record header line."""
    try:
        f, _ = _open(path)
        with f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error):
        return False
    nl = head.find(b"\n")
    return nl > 0 and HEADER.match(head[:nl]) is not None


def open_reader(path) -> "GorReader":
    return GorReader(path)


class GorReader:
    """The messages of one ``.gor``/``.gor.gz`` file in time order; see the module's rules."""

    def __init__(self, path, window_records: int = WINDOW_RECORDS, window_ns: int = WINDOW_NS,
                 window_bytes: int = WINDOW_BYTES):
        self.path = os.fspath(path)
        self.window_records = max(1, window_records)
        self.window_ns = window_ns
        self.window_bytes = window_bytes
        self.warnings: list[str] = []
        self.stats = dict(records=0, requests=0, responses=0, out_of_order=0, late=0,
                          separator_in_payload=0, cut=0, unpaired=0)
        try:
            f, self.compressed = _open(self.path)
            f.close()
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory") from None
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {reason(e)}") from None
        self.meta: dict = {"format": "GoReplay .gor", "compressed": "gzip" if self.compressed else None}
        if sniff(self.path):
            f, _ = _open(self.path)
            with f:
                line = f.read(SNIFF_BYTES).split(b"\n", 1)[0]
            m = HEADER.match(line)
            self.meta["header_fields"] = 4 if m.group(4) is not None else 3
            self.meta["id_digits"] = len(m.group(2))

    # -- records -------------------------------------------------------------------------------

    def _records(self):
        """(number, offset, type, id, timestamp, latency, payload, flags) in file order."""
        try:
            f, _ = _open(self.path)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {reason(e)}") from None
        with f:
            buf = bytearray()
            base = 0          # offset of buf[0] in the (decompressed) data
            eof = False
            number = 0

            def more() -> bool:
                nonlocal eof
                if eof:
                    return False
                try:
                    data = f.read(CHUNK)
                except (OSError, EOFError, zlib.error) as e:
                    raise InputError(f"{self.path}: record {number} at byte offset {base}: "
                                     f"the gzip data is damaged ({e})") from None
                if not data:
                    eof = True
                    return False
                buf.extend(data)
                return True

            pos = 0
            while True:
                if pos > CHUNK:        # drop what was consumed, keep the buffer small
                    del buf[:pos]
                    base += pos
                    pos = 0
                while pos >= len(buf) and more():
                    pass
                if pos >= len(buf):
                    return
                number += 1
                start = base + pos
                # the header line
                nl = buf.find(b"\n", pos, pos + MAX_HEADER)
                while nl < 0 and len(buf) - pos < MAX_HEADER and more():
                    nl = buf.find(b"\n", pos, pos + MAX_HEADER)
                if nl < 0:
                    if len(buf) - pos < MAX_HEADER:
                        if not buf[pos:].strip():   # blank bytes after the last record
                            return
                        raise self._damage(number, start, "the record is cut in its header line")
                    raise self._damage(number, start, "no record header line "
                                       f"({_preview(buf[pos:pos + 40])}...)")
                line = bytes(buf[pos:nl])
                if not line.strip():                 # a blank line between records
                    number -= 1
                    pos = nl + 1
                    continue
                m = HEADER.match(line)
                if m is None:
                    raise self._damage(number, start, f"the header line {_preview(line)} does not "
                                       "parse (expected 'TYPE ID TIMESTAMP [LATENCY]', TYPE 1, 2 or 3)")
                typ = m.group(1)[0] - 0x30
                rid = m.group(2).decode("ascii")
                ts = int(m.group(3))
                latency = int(m.group(4)) if m.group(4) is not None else -1
                body_at = nl + 1
                # the first separator (the header's own LF may begin it: an empty payload)
                sep = buf.find(SEPARATOR, nl)
                while sep < 0:
                    searched = max(nl, len(buf) - len(SEPARATOR) + 1)
                    if not more():
                        raise self._damage(number, start, "the record is cut before its separator")
                    sep = buf.find(SEPARATOR, searched)
                end, flags, ambiguous = self._framed_end(buf, body_at, sep, typ, more)
                payload = bytes(buf[body_at:max(end, body_at)])
                if ambiguous:
                    self.stats["separator_in_payload"] += 1
                if flags & F_INCOMPLETE:
                    self.stats["cut"] += 1
                yield number, start, typ, rid, ts, latency, payload, flags
                pos = end + len(SEPARATOR)

    def _framed_end(self, buf, body_at, sep, typ, more):
        """(end of payload, flags, ambiguous) for a record whose first separator is at ``sep``."""
        first = bytes(buf[body_at:max(sep, body_at)])
        hl = head_end(first)
        if hl < 0 or (typ != 1 and len(first) == hl):
            return sep, 0, False        # not HTTP, or a response without body bytes (HEAD, 304)
        limit = body_at + MAX_RECORD
        if is_chunked(first, hl):
            if _chunked_end(first, hl) is not None:
                return sep, 0, False
            while True:                 # where does the chunked body end, past this separator?
                end = _chunked_end(buf, body_at + hl, limit)
                if end is None and len(buf) < limit + len(SEPARATOR) and more():
                    continue
                break
            if end is None or end < 0:
                return sep, F_INCOMPLETE, False
        else:
            cl = header_value(first, hl, b"content-length")
            try:
                n = int(cl) if cl is not None else None
            except ValueError:
                n = None
            if n is None or n < 0 or hl + n <= len(first):
                return sep, 0, False
            end = body_at + hl + n
            if end > limit:
                return sep, F_INCOMPLETE, False
        # the payload is shorter than its framing: does a separator stand where the framing ends?
        while len(buf) < end + len(SEPARATOR) and more():
            pass
        if buf[end:end + len(SEPARATOR)] == SEPARATOR:
            return end, 0, True
        return sep, F_INCOMPLETE, False

    def _damage(self, number: int, offset: int, what: str) -> InputError:
        where = " of the decompressed data" if self.compressed else ""
        return InputError(f"{self.path}: record {number} at byte offset {offset}{where}: {what}")

    # -- messages --------------------------------------------------------------------------------

    def __iter__(self):
        self.warnings.clear()           # each pass counts afresh
        self.stats.update(dict.fromkeys(self.stats, 0))
        heap: list = []
        held = 0              # payload bytes in the heap
        newest = None
        emitted = None
        pair = _Pairing()
        st = self.stats
        records = self._records()
        try:
            for rec in records:
                number, _, typ, rid, ts, latency, payload, flags = rec
                st["records"] += 1
                if newest is not None and ts < newest:
                    st["out_of_order"] += 1
                newest = ts if newest is None else max(newest, ts)
                heapq.heappush(heap, (ts, number, rec))
                held += len(rec[6])
                while heap and (len(heap) > self.window_records or held > self.window_bytes
                                or newest - heap[0][0] > self.window_ns):
                    _, _, r = heapq.heappop(heap)
                    held -= len(r[6])
                    if emitted is not None and r[4] < emitted:
                        st["late"] += 1
                    emitted = r[4] if emitted is None else max(emitted, r[4])
                    yield pair.message(r)
        except InputError:
            while heap:
                yield pair.message(heapq.heappop(heap)[2])
            self._finish(pair)
            raise
        while heap:
            r = heapq.heappop(heap)[2]
            if emitted is not None and r[4] < emitted:
                st["late"] += 1
            yield pair.message(r)
        self._finish(pair)

    def _finish(self, pair) -> None:
        st = self.stats
        st.update(requests=pair.requests, responses=pair.responses, unpaired=pair.unpaired)
        w = self.warnings
        if st["out_of_order"]:
            w.append(f"{st['out_of_order']} of {st['records']} records were out of time order in "
                     f"the file (GoReplay writes them as they complete); sorted within "
                     f"{self.window_records} records / {self.window_ns / 1e9:g} s")
        if st["late"]:
            w.append(f"{st['late']} records came later than that window and were yielded out of "
                     "time order")
        if st["separator_in_payload"]:
            w.append(f"{st['separator_in_payload']} records held the record separator inside "
                     "their payload; their HTTP framing decided where they end")
        if st["cut"]:
            w.append(f"{st['cut']} messages are shorter than their HTTP framing says (cut by "
                     "GoReplay, or a separator in a body we could not place): flagged incomplete")


class _Pairing:
    """Conn and index of each record (the module's rules), with bounded memory."""

    def __init__(self):
        self.flows: OrderedDict = OrderedDict()  # conn key -> [conn, next index, client, server]
        self.reqs: OrderedDict = OrderedDict()   # request id -> (conn, index, method, uri)
        self.next_conn = 0
        self.requests = self.responses = self.unpaired = 0

    def _flow(self, rid: str, payload: bytes | None):
        key = rid[:16] if len(rid) == 24 else rid
        f = self.flows.get(key)
        if f is None:
            client, server = _addresses(rid, payload)
            f = self.flows[key] = [self.next_conn, 0, client, server]
            self.next_conn += 1
            if len(self.flows) > MAX_TRACKED:
                self.flows.popitem(last=False)
        else:
            self.flows.move_to_end(key)
        return f

    def message(self, rec) -> Message:
        _, _, typ, rid, ts, latency, payload, flags = rec
        ts_last = ts + latency if latency >= 0 else ts
        if typ == 1:
            self.requests += 1
            f = self._flow(rid, payload)
            index = f[1]
            f[1] += 1
            hl, blen, flags, method, uri, _ = _parse(payload, flags, True)
            m = Message(KIND_REQUEST, f[0], index, ts, ts_last, f[2], f[3], flags, payload,
                        method, uri, 0, blen, hl)
            self.reqs[rid] = (f[0], index, method, uri)
            self.reqs.move_to_end(rid)
            if len(self.reqs) > MAX_TRACKED:
                self.reqs.popitem(last=False)
            return m
        self.responses += 1
        if typ == 3:
            flags |= F_REPLAYED
        req = self.reqs.get(rid)
        f = self._flow(rid, None)
        if req is None:
            self.unpaired += 1
            conn, index, method, uri = f[0], -1, None, None
            flags |= F_UNPAIRED
        else:
            conn, index, method, uri = req
        hl, blen, flags, _, _, status = _parse(payload, flags, False)
        return Message(KIND_RESPONSE, conn, index, ts, ts_last, f[2], f[3], flags, payload,
                       method, uri, status, blen, hl)


def _parse(data: bytes, flags: int, is_request: bool):
    """(head length, body length, flags, method, uri, status) of one payload, as
    ``httpmsg.with_data`` reads them; a payload that is not HTTP leaves them empty."""
    hl = head_end(data)
    if hl < 0:
        hl = len(data)
    nl = data.find(b"\n")
    parts = (data[:nl] if nl >= 0 else data).rstrip(b"\r").split(b" ")
    method = uri = None
    status = 0
    if is_request:
        if len(parts) >= 3:
            method = parts[0].decode("latin-1")
            uri = b" ".join(parts[1:-1]).decode("latin-1")
    elif len(parts) >= 2 and parts[1].isdigit() and len(parts[1]) == 3:
        status = int(parts[1])
    blen, chunked = body_length(data, hl)
    return hl, blen, (flags | F_CHUNKED) if chunked else flags, method, uri, status


def _addresses(rid: str, payload: bytes | None):
    """(client, server) of a new connection: from a 1.x flow id, else synthetic."""
    if len(rid) == 24:
        try:
            flow = int(rid[:16], 16)
        except ValueError:
            flow = 0
        cport, sport = flow >> 48, (flow >> 32) & 0xFFFF
        if cport and sport:
            return (str(ipaddress.IPv4Address(flow & 0xFFFFFFFF)), cport), (UNKNOWN_IP, sport)
    port = 80
    if payload:
        hl = head_end(payload)
        host = header_value(payload, hl if hl > 0 else 0, b"host")
        if host and not host.endswith("]") and ":" in host:
            try:
                port = int(host.rsplit(":", 1)[1])
            except ValueError:
                pass
        elif host and "]:" in host:
            try:
                port = int(host.rsplit("]:", 1)[1])
            except ValueError:
                pass
        if not 0 < port < 65536:
            port = 80
    return (UNKNOWN_IP, 0), (UNKNOWN_IP, port)


def _chunked_end(data, pos: int, limit: int | None = None):
    """Offset just past the chunked body that starts at ``data[pos]`` (RFC 9112 §7.1); None when
    ``data`` ends first (or ``limit`` is reached), -1 when it is not chunked coding."""
    n = len(data)
    if limit is None or limit > n:
        limit = n
    while True:
        nl = data.find(b"\n", pos, limit)
        if nl < 0:
            return None if limit - pos < 4096 else -1
        try:
            size = int(bytes(data[pos:nl]).split(b";", 1)[0].strip(), 16)
        except ValueError:
            return -1
        if size < 0:
            return -1
        pos = nl + 1
        if size == 0:
            while True:        # trailer fields, then the empty line
                nl = data.find(b"\n", pos, limit)
                if nl < 0:
                    return None
                if not bytes(data[pos:nl]).strip(b"\r"):
                    return nl + 1
                pos = nl + 1
        pos += size
        if pos + 2 > limit:
            return None
        if data[pos:pos + 2] == b"\r\n":
            pos += 2
        elif data[pos:pos + 1] == b"\n":
            pos += 1
        else:
            return -1


def _preview(b, n: int = 60) -> str:
    s = bytes(b).rstrip(b"\r\n")
    return repr(s[:n].decode("utf-8", "replace") + ("..." if len(s) > n else ""))


# -- writing ----------------------------------------------------------------------------------------


def open_writer(path, fd: int, meta: dict, format: str = "gor", **options) -> "GorWriter":
    return GorWriter(path, fd, meta)


class GorWriter:
    """Messages out as ``.gor`` records (the module's rules); owns ``fd``."""

    def __init__(self, path, fd: int, meta: dict | None = None):
        self.path = os.fspath(path)
        self.meta = dict(meta or {})
        self.records_written = 0
        self.skipped_failed = 0
        self.separators_in_payload = 0
        self._closed = False
        self._raw = os.fdopen(fd, "wb")
        if self.path.lower().endswith(".gz"):
            self._out = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", mtime=0)
        else:
            self._out = self._raw

    def write(self, msg) -> None:
        if self._closed:
            raise ValueError("write to a closed GorWriter")
        if msg.flags & F_FAILED:
            self.skipped_failed += 1
            return
        latency = max(0, msg.ts_last - msg.ts_first)
        head = b"%s %s %d %d\n" % (message_type(msg), message_id(msg.conn, msg.index),
                                   msg.ts_first, latency)
        if SEPARATOR in msg.data:
            self.separators_in_payload += 1
        try:
            self._out.write(head)
            self._out.write(msg.data)
            self._out.write(SEPARATOR)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None
        self.records_written += 1

    def update_meta(self, meta: dict) -> None:
        """A .gor file holds no metadata: kept here only."""
        self.meta.update(meta)

    def close(self, fsync: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._out is not self._raw:
                self._out.close()          # writes gzip's trailer; the file stays open
            self._raw.flush()
            if fsync:
                os.fsync(self._raw.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None
        finally:
            try:
                self._raw.close()
            except OSError:
                pass
