"""The core, in pure Python: link/IP/TCP decoding, TCP reassembly and HTTP/1.x framing.

This module is the reference twin of the compiled ``replay._fastparse``: the two have the same API,
create the same ``replay.events.Message`` objects and the same counters, and differential tests
hold them to identical output. It is sans-IO: it imports no socket, pcap library or clock; the
caller hands it packets with their capture timestamps.

Theory of operation
-------------------
``Engine.feed_batch(buf, meta)`` takes packets in pcapy-ng's ``next_batch`` layout (packet bytes
concatenated, plus 16-byte records ``sec, usec, offset, caplen`` as native uint32) and returns the
HTTP messages that completed. Per packet:

1. *Decode* the link layer (Ethernet with any number of 802.1Q/802.1ad tags, MPLS, PPPoE; Linux
   cooked v1/v2; BSD NULL/LOOP; raw IP), IPv4 (options skipped) or IPv6 (extension headers walked).
   IP fragments are counted, not reassembled. A TCP segment whose IP length promises more bytes
   than were captured is *truncated* (snaplen): the captured part is used, the rest becomes a gap.
   An IP total length of 0 (TSO/GRO super-frames) means "the rest of the frame".
2. *Reassemble* each direction of each connection. Positions are 64-bit absolute offsets
   (``replay.seqnum.unwrap``), so wrap-around needs no special case. Overlap policy: bytes once
   delivered to the framer are final (later copies are retransmissions, counted); among segments
   waiting beyond a hole, the one starting earliest wins, ties to the first captured. A hole is
   declared lost, and the framer told how many bytes are missing, when the peer acknowledges data
   beyond it (the endpoint got bytes the capture never saw), when the stream's waiting bytes pass
   ``max_stream_buffer``, when all streams together pass ``max_total_buffer``, or when the
   connection ends (FIN, RST, idle for ``idle_timeout`` seconds of capture time, end of input).
   A connection seen without its SYN starts at its first data byte and is flagged midstream.
3. *Frame* HTTP/1.x (RFC 9112) on each direction: requests on the client's, responses on the
   server's. The client is the sender of the SYN; without one, the first direction whose bytes
   parse as a request line or status line decides. Body length follows RFC 9112 §6.3 (HEAD, 1xx,
   204, 304 have none; CONNECT 2xx and 101 end framing on that connection; chunked with
   extensions and trailers; Content-Length; close-delimited responses). After a hole, or when a
   connection was already open, the framer resynchronises at the next line that starts a request
   or a status line. A direction whose first 64 KiB never look like HTTP is counted as non-HTTP.
4. *Pair* responses with requests by order on their connection. A response whose first segment
   acknowledges less client data than the start of the oldest unanswered request answers a
   request that was not captured (unpaired). A response is held until the client bytes it
   acknowledges have been framed, so a response captured before its request still pairs.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import math
import operator
import re
import struct
from collections import OrderedDict, deque

from replay.errors import InputError
from replay.events import (
    CUT,
    F_CHUNKED,
    F_CLOSE_DELIMITED,
    F_GAP,
    F_INCOMPLETE,
    F_INTERIM,
    F_MIDSTREAM,
    F_REPLAYED,
    F_RESYNC,
    F_TRUNCATED,
    F_UNPAIRED,
    F_UPGRADE,
    KIND_REQUEST,
    KIND_RESPONSE,
    Message,
    PlannedRequest,
)
from replay.layout import ROW_FIELDS, ROW_STRUCT, TABLE_COLUMNS, WIDTHS, bad_address, unfit
from replay.limits import (ADDR_TEXT_KEEP, ANSWER_WAIT_NS, CONN_IDLE_NS, EXPIRE_EVERY_NS,
                           IDLE_TIMEOUT, MAX_EARLY, MAX_HEAD, MAX_LATE, MAX_MESSAGE, MAX_PENDING,
                           MAX_STREAM_BUFFER, MAX_TOTAL_BUFFER, REORDER_NS, ROWS_DIRECT_FROM,
                           ROWS_DIRECT_SPARE, ROWS_HAND_OVER)
from replay.seqnum import unwrap

# Link types (https://www.tcpdump.org/linktypes.html)
DLT_NULL = 0
DLT_EN10MB = 1
DLT_RAW_OLD_12 = 12  # OpenBSD's value for DLT_RAW
DLT_RAW_OLD_14 = 14
DLT_RAW = 101
DLT_LOOP = 108
DLT_LINUX_SLL = 113
DLT_IPV4 = 228
DLT_IPV6 = 229
DLT_LINUX_SLL2 = 276
SUPPORTED_LINKTYPES = frozenset(
    (DLT_NULL, DLT_EN10MB, DLT_RAW_OLD_12, DLT_RAW_OLD_14, DLT_RAW, DLT_LOOP, DLT_LINUX_SLL,
     DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2))

# EtherTypes
ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN_TAGS = (0x8100, 0x88A8, 0x9100, 0x9200)  # 802.1Q, 802.1ad (QinQ) and pre-standard QinQ
ETH_MPLS = (0x8847, 0x8848)
ETH_PPPOE_SESSION = 0x8864

# TCP flags (RFC 9293 §3.1)
TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_ACK = 0x10

# IPv6 extension headers walked to reach TCP (RFC 8200 §4)
IP6_HOPOPTS, IP6_ROUTING, IP6_FRAGMENT, IP6_DSTOPTS, IP6_AH, IP6_NONE = 0, 43, 44, 60, 51, 59
IP6_EXT_GENERIC = (IP6_HOPOPTS, IP6_ROUTING, IP6_DSTOPTS, 135, 139, 140)

# decode() results
D_TCP = 0
D_NOT_IP = 1
D_NOT_TCP = 2
D_FRAGMENT = 3
D_MALFORMED = 4

# Framer states
S_START = 0       # expecting a start line
S_HEAD = 1        # start line seen, collecting header lines
S_BODY_LEN = 2    # Content-Length body
S_CHUNK_SIZE = 3  # chunk-size line
S_CHUNK_DATA = 4
S_CHUNK_CRLF = 5  # CRLF after chunk data
S_TRAILERS = 6
S_BODY_CLOSE = 7  # close-delimited response body
S_WAIT = 8        # client side after CONNECT/Upgrade request: hold bytes until the response decides
S_TUNNEL = 9      # no more HTTP on this direction (101, CONNECT 2xx)
S_RESYNC = 10     # lost: looking for the next start line
S_NOT_HTTP = 11   # this direction never looked like HTTP

ROLE_UNKNOWN = 0
ROLE_CLIENT = 1   # this direction carries requests
ROLE_SERVER = 2   # this direction carries responses

NOT_HTTP_SCAN_LIMIT = 64 * 1024
RESYNC_KEEP = 8192          # bytes after the last line end kept while resynchronising

# A request line (RFC 9112 §3) or status line (§4) starting a message; used to decide roles and
# to resynchronise. Methods are tokens (RFC 9110 §9.1); we accept the usual upper-case form.
_REQ_LINE = rb"[A-Z][A-Z0-9_\-]{0,31} [\x21-\x7e\x80-\xff]+ HTTP/[0-9]\.[0-9]\r?\n"
_STATUS_LINE = rb"HTTP/[0-9]\.[0-9] [0-9]{3}(?:[ \t][^\r\n]*)?\r?\n"
REQ_START_RE = re.compile(_REQ_LINE)
STATUS_START_RE = re.compile(_STATUS_LINE)
# When resynchronising, a start line is looked for at the start of a line, at the start of a
# segment, or right after the bytes of a lost message's body (which need not end with a newline):
# there, only the registered methods (RFC 9110 §9, RFC 4918) and "HTTP/" after a non-token byte.
_KNOWN_METHOD = (rb"(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE|PROPFIND|PROPPATCH"
                 rb"|MKCOL|COPY|MOVE|LOCK|UNLOCK|REPORT|SEARCH|PURGE)")
_REQ_ANY = (rb"(?m:^" + _REQ_LINE + rb")|(?<![A-Za-z0-9_\-])" + _KNOWN_METHOD +
            rb" [\x21-\x7e\x80-\xff]+ HTTP/[0-9]\.[0-9]\r?\n")
_STATUS_ANY = rb"(?<![A-Za-z0-9_\-])" + _STATUS_LINE
REQ_SEARCH_RE = re.compile(_REQ_ANY)
STATUS_SEARCH_RE = re.compile(_STATUS_ANY)
ANY_SEARCH_RE = re.compile(rb"(" + _REQ_ANY + rb")|(" + _STATUS_ANY + rb")")

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_META = struct.Struct("=IIII")

STAT_NAMES = (
    "packets", "bytes", "not_ip", "not_tcp", "ip_fragments", "malformed", "truncated_packets",
    "tcp_segments", "filtered", "connections", "midstream_connections", "retransmitted_segments",
    "retransmitted_bytes", "out_of_order_segments", "gaps", "gap_bytes", "buffer_cap_hits",
    "expired_connections", "requests", "responses", "interim_responses", "unpaired_responses",
    "incomplete_messages", "resyncs", "skipped_bytes", "non_http_streams", "upgraded_connections",
    "dropped_head_bytes", "oversize_messages", "oversize_heads",
)


def _mark_end(mark):
    return mark[0]


_ADDR_TEXT: dict = {}


def _addr(b: bytes) -> str:
    """The text of a 4- or 16-byte address (RFC 5952 for IPv6). A capture holds a few
    addresses many times over, so their texts are remembered (up to ``ADDR_TEXT_KEEP``)."""
    s = _ADDR_TEXT.get(b)
    if s is None:
        if len(_ADDR_TEXT) >= ADDR_TEXT_KEEP:
            _ADDR_TEXT.clear()
        s = "%d.%d.%d.%d" % tuple(b) if len(b) == 4 else str(ipaddress.IPv6Address(b))
        _ADDR_TEXT[b] = s
    return s


def decode(linktype: int, frame, off: int = 0, end: int = -1):
    """Decode one frame down to TCP.

    Returns ``(D_TCP, src, dst, sport, dport, seq, ack, flags, pay_off, pay_end, missing)`` where
    ``frame[pay_off:pay_end]`` is the captured payload and ``missing`` the payload bytes the IP
    header promises beyond the capture; or ``(code,)`` for anything else.
    """
    if end < 0:
        end = len(frame)
    p = off
    if linktype == DLT_EN10MB:
        if end - p < 14:
            return (D_MALFORMED,)
        etype = (frame[p + 12] << 8) | frame[p + 13]
        p += 14
        while etype in ETH_VLAN_TAGS:
            if end - p < 4:
                return (D_MALFORMED,)
            etype = (frame[p + 2] << 8) | frame[p + 3]
            p += 4
        if etype in ETH_MPLS:
            while True:
                if end - p < 4:
                    return (D_MALFORMED,)
                bottom = frame[p + 2] & 1
                p += 4
                if bottom:
                    break
            if p >= end:
                return (D_MALFORMED,)
            v = frame[p] >> 4
            etype = ETH_IPV4 if v == 4 else ETH_IPV6 if v == 6 else 0
        elif etype == ETH_PPPOE_SESSION:
            if end - p < 8:
                return (D_MALFORMED,)
            proto = (frame[p + 6] << 8) | frame[p + 7]
            p += 8
            etype = ETH_IPV4 if proto == 0x0021 else ETH_IPV6 if proto == 0x0057 else 0
    elif linktype == DLT_LINUX_SLL:
        if end - p < 16:
            return (D_MALFORMED,)
        etype = (frame[p + 14] << 8) | frame[p + 15]
        p += 16
    elif linktype == DLT_LINUX_SLL2:
        if end - p < 20:
            return (D_MALFORMED,)
        etype = (frame[p] << 8) | frame[p + 1]
        p += 20
    elif linktype == DLT_NULL or linktype == DLT_LOOP:
        if end - p < 4:
            return (D_MALFORMED,)
        if linktype == DLT_LOOP:
            fam = (frame[p] << 24) | (frame[p + 1] << 16) | (frame[p + 2] << 8) | frame[p + 3]
        else:
            # host byte order of the capturing machine: a small number in either order
            fam = frame[p] | (frame[p + 1] << 8) | (frame[p + 2] << 16) | (frame[p + 3] << 24)
            if fam > 0xFFFF:
                fam = (frame[p] << 24) | (frame[p + 1] << 16) | (frame[p + 2] << 8) | frame[p + 3]
        p += 4
        etype = ETH_IPV4 if fam == 2 else ETH_IPV6 if fam in (10, 24, 28, 30) else 0
    else:  # raw IP
        if p >= end:
            return (D_MALFORMED,)
        v = frame[p] >> 4
        etype = ETH_IPV4 if v == 4 else ETH_IPV6 if v == 6 else 0

    if etype == ETH_IPV4:
        if end - p < 20:
            return (D_MALFORMED,)
        vihl = frame[p]
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or end - p < ihl:
            return (D_MALFORMED,)
        total = (frame[p + 2] << 8) | frame[p + 3]
        if total == 0:  # TSO/GRO super-frame: length not filled in
            ip_end = end
        else:
            if total < ihl:
                return (D_MALFORMED,)
            ip_end = p + total
        frag = ((frame[p + 6] << 8) | frame[p + 7]) & 0x3FFF  # MF flag and fragment offset
        if frag:
            return (D_FRAGMENT,)
        if frame[p + 9] != 6:
            return (D_NOT_TCP,)
        src = bytes(frame[p + 12:p + 16])
        dst = bytes(frame[p + 16:p + 20])
        p += ihl
    elif etype == ETH_IPV6:
        if end - p < 40:
            return (D_MALFORMED,)
        if frame[p] >> 4 != 6:
            return (D_MALFORMED,)
        plen = (frame[p + 4] << 8) | frame[p + 5]
        ip_end = end if plen == 0 else p + 40 + plen  # 0: jumbogram or GRO super-frame
        nh = frame[p + 6]
        src = bytes(frame[p + 8:p + 24])
        dst = bytes(frame[p + 24:p + 40])
        p += 40
        while nh != 6:
            if nh in IP6_EXT_GENERIC:
                if end - p < 8:
                    return (D_MALFORMED,)
                nh, p = frame[p], p + (frame[p + 1] + 1) * 8
            elif nh == IP6_FRAGMENT:
                if end - p < 8:
                    return (D_MALFORMED,)
                if ((frame[p + 2] << 8) | frame[p + 3]) & 0xFFF9:  # offset or M flag: a real fragment
                    return (D_FRAGMENT,)
                nh, p = frame[p], p + 8
            elif nh == IP6_AH:
                if end - p < 8:
                    return (D_MALFORMED,)
                nh, p = frame[p], p + (frame[p + 1] + 2) * 4
            else:
                return (D_NOT_TCP,)
    else:
        return (D_NOT_IP,)

    if ip_end - p < 20 or end - p < 20:
        return (D_MALFORMED,)
    doff = (frame[p + 12] >> 4) * 4
    if doff < 20 or ip_end - p < doff:
        return (D_MALFORMED,)
    sport = (frame[p] << 8) | frame[p + 1]
    dport = (frame[p + 2] << 8) | frame[p + 3]
    seq = (frame[p + 4] << 24) | (frame[p + 5] << 16) | (frame[p + 6] << 8) | frame[p + 7]
    ack = (frame[p + 8] << 24) | (frame[p + 9] << 16) | (frame[p + 10] << 8) | frame[p + 11]
    flags = frame[p + 13]
    pay_off = p + doff
    if ip_end > end:  # cut by the snaplen
        missing = ip_end - max(end, pay_off)
        pay_end = max(end, pay_off)
    else:
        missing = 0
        pay_end = ip_end  # anything after ip_end is link padding
    return (D_TCP, src, dst, sport, dport, seq, ack, flags, pay_off, pay_end, missing)


def parse_head(head: bytes):
    """Parse a message head (start line and header fields, RFC 9112 §2-5).

    Returns ``(is_request, method, uri, status, fields)`` with ``fields`` a dict of lower-case
    name -> list of values, or None when the start line is not HTTP/1.x.
    """
    lines = head.split(b"\n")
    start = lines[0].rstrip(b"\r")
    if start.startswith(b"HTTP/"):
        parts = start.split(b" ", 2)
        if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit():
            return None
        is_req, method, uri, status = False, None, None, int(parts[1])
    else:
        parts = start.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/") or not parts[0]:
            return None
        is_req, method, uri, status = True, parts[0].decode("latin-1"), parts[1].decode("latin-1"), 0
    fields: dict = {}
    last = None
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        if line[0] in (32, 9) and last is not None:  # obs-fold (RFC 9112 §5.2)
            fields[last][-1] += b" " + line.strip()
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        last = name.strip().lower()
        fields.setdefault(last, []).append(value.strip())
    return is_req, method, uri, status, fields


MAX_CHUNK = 10**18      # a chunk size above this is not a length (as a Content-Length's 18 digits)


def _content_length(fields):
    """RFC 9112 §6.3 rule 5: the value, -1 when absent, -2 when invalid."""
    vals = fields.get(b"content-length")
    if not vals:
        return -1
    seen = set()
    for v in vals:
        for item in v.split(b","):
            item = item.strip()
            if not item.isdigit() or len(item) > 18:   # beyond 10**18 bytes: no real length
                return -2
            seen.add(int(item))
    return seen.pop() if len(seen) == 1 else -2


def _is_chunked(fields):
    vals = fields.get(b"transfer-encoding")
    if not vals:
        return 0
    last = b",".join(vals).split(b",")[-1].strip().lower()
    return 1 if last == b"chunked" else 2  # 2: encoded, but not chunked last


class _Pending:
    """A request awaiting its response."""

    __slots__ = ("index", "method", "uri", "start", "end", "upgrade")

    def __init__(self, index, method, uri, start, upgrade):
        self.index = index
        self.method = method
        self.uri = uri
        self.start = start
        self.end = -1
        self.upgrade = upgrade


class Framer:
    """HTTP/1.x framing of one direction of one connection."""

    def __init__(self, conn, side):
        self.conn = conn
        self.side = side          # 0 or 1: which stream of the connection
        self.role = ROLE_UNKNOWN
        self.state = S_START
        self.buf = bytearray()    # bytes of the current message (and any bytes after it)
        self.base = 0             # stream offset of buf[0]
        self.pos = 0              # parse position in buf
        self.marks = []           # [end offset in buf, ts, ack] per delivery since buf[0]
        self.flags = 0            # flags of the current message
        self.remaining = 0
        self.head_len = 0
        self.body_len = 0
        self.method = None
        self.uri = None
        self.status = 0
        self.pending = None       # _Pending of the request being framed (client side)
        self.answer = None        # _Pending a response being framed answers (server side)
        self.produced = 0         # messages framed on this direction
        self.scanned = 0          # bytes searched for a first start line
        self.resync_flag = 0      # set after loss: flags the next message
        self.gap_since_pair = False
        self.held = False
        self.truncated_pending = False  # a snaplen-cut packet carried bytes of the current message
        self.lost_upto = -1       # stream offset just past the last hole that cost framing
        self.sniff_from = 0       # stream offset from which a first start line is still searched

    # -- input from the stream ------------------------------------------------------------------
    def feed(self, data, ts, ack):
        if self.state >= S_TUNNEL and self.state != S_RESYNC:
            self.conn.engine.st_skipped_bytes += len(data)
            return
        self.buf += data
        self.marks.append([len(self.buf), ts, ack])
        self.run()

    def gap(self, n, ts, truncated):
        """``n`` stream bytes were lost at the current end of ``buf``."""
        if n <= 0:
            return
        eng = self.conn.engine
        lost_flag = F_GAP | F_INCOMPLETE | (F_TRUNCATED if truncated else 0)
        st = self.state
        if st == S_TUNNEL or st == S_NOT_HTTP:
            return
        self.run()  # frame what is complete before the hole
        st = self.state
        if st == S_BODY_LEN and len(self.buf) - self.pos == 0 and n <= self.remaining:
            # the hole is inside a Content-Length body: framing stays in step
            self.flags |= lost_flag
            self.remaining -= n
            self.base += n  # keep stream offsets true: buf no longer maps 1:1 to the stream
            if self.remaining == 0:
                self._emit(len(self.buf))
            return
        if st == S_CHUNK_DATA and len(self.buf) - self.pos == 0 and n <= self.remaining:
            # the hole is inside one chunk's data: framing stays in step too
            self.flags |= lost_flag
            self.remaining -= n
            self.base += n
            if self.remaining == 0:
                self.state = S_CHUNK_CRLF
            return
        if st == S_BODY_CLOSE:
            self.flags |= lost_flag
            self.base += n
            return
        if st in (S_BODY_LEN, S_CHUNK_SIZE, S_CHUNK_DATA, S_CHUNK_CRLF, S_TRAILERS):
            self.flags |= lost_flag
            self._emit(len(self.buf))
        elif st == S_HEAD or (st == S_START and self.buf):
            eng.st_dropped_head_bytes += len(self.buf)
            if self.role == ROLE_CLIENT and self.pending is not None:
                self.pending = None
        elif st == S_WAIT:
            eng.st_skipped_bytes += len(self.buf)
        self._reset_buf(n)
        self.lost_upto = self.base
        if self.role != ROLE_UNKNOWN or self.produced:
            eng.st_resyncs += 1
        self.state = S_RESYNC
        self.resync_flag = F_RESYNC
        self.gap_since_pair = True

    def eof(self, ts, clean):
        """The direction ended: FIN (clean) or RST / expiry / end of input (not clean)."""
        self.run(final=True)
        st = self.state
        eng = self.conn.engine
        if st == S_BODY_CLOSE:
            if not clean:
                self.flags |= F_INCOMPLETE
            self.flags |= F_CLOSE_DELIMITED
            self._emit(len(self.buf), ts)
        elif st in (S_BODY_LEN, S_CHUNK_SIZE, S_CHUNK_DATA, S_CHUNK_CRLF, S_TRAILERS):
            self.flags |= F_INCOMPLETE
            self._emit(len(self.buf), ts)
        elif st == S_HEAD or (st == S_START and self.buf.strip(b"\r\n")):
            eng.st_dropped_head_bytes += len(self.buf)
        elif st == S_RESYNC:
            eng.st_skipped_bytes += len(self.buf)
            if self.produced == 0 and self.scanned + len(self.buf) > 0:
                eng.st_non_http_streams += 1
        self.buf = bytearray()
        self.marks = []
        self.pos = 0
        if st not in (S_TUNNEL, S_NOT_HTTP):
            self.state = S_TUNNEL if st == S_WAIT else S_START

    # -- framing --------------------------------------------------------------------------------
    def _reset_buf(self, lost):
        self.base += len(self.buf) + lost
        self.buf = bytearray()
        self.marks = []
        self.pos = 0
        self.flags = 0

    def _mark_at(self, off):
        """(ts, ack) of the delivery that carried buf[off]."""
        for m in self.marks:
            if off < m[0]:
                return m[1], m[2]
        m = self.marks[-1]
        return m[1], m[2]

    def run(self, final=False):
        conn = self.conn
        eng = conn.engine
        while True:
            st = self.state
            buf = self.buf
            if st == S_START:
                if not buf:
                    return
                # RFC 9112 §2.2: ignore empty lines before a start line
                i = 0
                n = len(buf)
                while i < n and buf[i] in (13, 10):
                    i += 1
                if i:
                    self._drop_front(i)
                    continue
                if self.role == ROLE_UNKNOWN:
                    if not self._sniff(final):
                        return
                    continue
                if self.role == ROLE_SERVER and self._must_hold(final):
                    self.held = True
                    return
                self.held = False
                if not self._start_ok(final):
                    return
                self.state = S_HEAD
                self.pos = 0
            elif st == S_HEAD:
                end = self._find_head_end()
                if end < 0 or end > eng.max_head:
                    # a head longer than max_head is cut however it was segmented: whole in
                    # one delivery (GRO, loopback) as when it trickles in
                    if len(buf) > eng.max_head:
                        self._cut_head()
                        continue
                    return
                if not self._on_head(end):
                    continue
            elif st == S_BODY_LEN:
                avail = len(buf) - self.pos
                if avail <= 0:
                    return
                take = avail if avail < self.remaining else self.remaining
                self.pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._emit(self.pos)
                elif self._oversize():
                    return
                else:
                    return
            elif st == S_CHUNK_SIZE:
                nl = buf.find(b"\n", self.pos)
                if nl < 0:
                    if len(buf) - self.pos > 4096:
                        self._bad_chunk()
                        continue
                    return
                line = bytes(buf[self.pos:nl]).split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    self._bad_chunk()
                    continue
                if size < 0 or size > MAX_CHUNK:       # beyond 10**18 bytes: no real chunk
                    self._bad_chunk()
                    continue
                self.pos = nl + 1
                if size == 0:
                    self.state = S_TRAILERS
                else:
                    self.remaining = size
                    self.body_len += size
                    self.state = S_CHUNK_DATA
            elif st == S_CHUNK_DATA:
                avail = len(buf) - self.pos
                if avail <= 0:
                    return
                take = avail if avail < self.remaining else self.remaining
                self.pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = S_CHUNK_CRLF
                elif self._oversize():
                    return
                else:
                    return
            elif st == S_CHUNK_CRLF:
                n = len(buf)
                if self.pos < n and buf[self.pos] == 13:
                    if self.pos + 1 >= n:
                        return
                    if buf[self.pos + 1] != 10:
                        self._bad_chunk()
                        continue
                    self.pos += 2
                elif self.pos < n and buf[self.pos] == 10:
                    self.pos += 1
                elif self.pos < n:
                    self._bad_chunk()
                    continue
                else:
                    return
                self.state = S_CHUNK_SIZE
            elif st == S_TRAILERS:
                nl = buf.find(b"\n", self.pos)
                if nl < 0:
                    if len(buf) - self.pos > eng.max_head:
                        self._bad_chunk()
                        continue
                    return
                line = buf[self.pos:nl]
                self.pos = nl + 1
                if line == b"" or line == b"\r":
                    self._emit(self.pos)
            elif st == S_BODY_CLOSE:
                self.pos = len(buf)
                self._oversize()
                return
            elif st == S_RESYNC:
                if not self._resync(final):
                    return
            else:  # S_WAIT, S_TUNNEL, S_NOT_HTTP
                return

    def _drop_front(self, n):
        del self.buf[:n]
        self.base += n
        for m in self.marks:
            m[0] -= n
        while self.marks and self.marks[0][0] <= 0:
            self.marks.pop(0)
        self.pos = max(0, self.pos - n)

    def _find_head_end(self):
        buf = self.buf
        i = buf.find(b"\n\r\n", max(self.pos, 1) - 1)
        j = buf.find(b"\n\n", max(self.pos, 1) - 1)
        if i < 0 and j < 0:
            self.pos = max(0, len(buf) - 2)
            return -1
        if i < 0 or (0 <= j < i):
            return j + 2
        return i + 3

    def _sniff(self, final):
        """Decide this direction's role from its first bytes."""
        eng = self.conn.engine
        buf = self.buf
        if REQ_START_RE.match(buf):
            self.conn.set_role(self.side, ROLE_CLIENT)
            return True
        if STATUS_START_RE.match(buf):
            self.conn.set_role(self.side, ROLE_SERVER)
            return True
        nl = buf.find(b"\n")
        if nl < 0 and len(buf) < 4096 and not final:
            return False  # too early to tell
        # a start line ends with a newline and holds none before it: what lay before the line
        # still open at the last search was searched then, and cannot match now
        p0 = self.sniff_from - self.base
        if p0 < 0:
            p0 = 0
        m = ANY_SEARCH_RE.search(buf, p0)
        start = m.start() if m is not None else len(buf)
        role = ROLE_UNKNOWN
        if m is not None:
            role = ROLE_CLIENT if m.group(1) is not None else ROLE_SERVER
        marks = self.marks
        for k in range(bisect.bisect_left(marks, p0, key=_mark_end), len(marks)):
            p = marks[k][0]
            if p >= start:
                break
            if REQ_START_RE.match(buf, p):
                start, role = p, ROLE_CLIENT
                break
            if STATUS_START_RE.match(buf, p):
                start, role = p, ROLE_SERVER
                break
        if role == ROLE_UNKNOWN:
            if len(buf) > NOT_HTTP_SCAN_LIMIT or final:
                self._not_http()
            else:
                self.sniff_from = self.base + buf.rfind(b"\n") + 1
            return False
        eng.st_skipped_bytes += start
        self._drop_front(start)
        self.resync_flag = F_RESYNC
        self.conn.set_role(self.side, role)
        return True

    def _not_http(self):
        eng = self.conn.engine
        eng.st_non_http_streams += 1
        eng.st_skipped_bytes += len(self.buf)
        self.buf = bytearray()
        self.marks = []
        self.pos = 0
        self.state = S_NOT_HTTP

    def _start_ok(self, final):
        """In a synchronised stream, is buf at a start line? Otherwise lose sync."""
        buf = self.buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self.conn.engine.max_head:
                self._lose_sync(0)
                return False
            return False  # at the end of input, eof() counts these bytes as a dropped head
        rx = REQ_START_RE if self.role == ROLE_CLIENT else STATUS_START_RE
        if rx.match(buf):
            return True
        self._lose_sync(0)
        return False

    def _lose_sync(self, skip):
        eng = self.conn.engine
        eng.st_resyncs += 1
        self.state = S_RESYNC
        self.resync_flag = F_RESYNC
        self.flags = 0
        self.gap_since_pair = True
        return False

    def _resync(self, final):
        eng = self.conn.engine
        buf = self.buf
        if self.role == ROLE_UNKNOWN:
            self.state = S_START
            return True
        if not final and len(buf) <= RESYNC_KEEP and buf.find(b"\n") < 0:
            return False    # no line has ended: nothing can match yet (and a search costs)
        rx_match = REQ_START_RE if self.role == ROLE_CLIENT else STATUS_START_RE
        if rx_match.match(buf):
            self.state = S_START
            return True
        rx = REQ_SEARCH_RE if self.role == ROLE_CLIENT else STATUS_SEARCH_RE
        m = rx.search(buf, 1)
        # a start line also counts where a segment began, even if no line ended just before it
        limit = m.start() if m is not None else len(buf)
        for mark in self.marks:
            p = mark[0]
            if p >= limit:
                break
            if p > 0 and rx_match.match(buf, p):
                eng.st_skipped_bytes += p
                self._drop_front(p)
                self.state = S_START
                return True
        if m is None:
            # keep the tail that might begin a start line
            nl = buf.rfind(b"\n")
            keep = len(buf) - (nl + 1) if nl >= 0 else len(buf)
            if keep > RESYNC_KEEP or final:
                keep = 0
            drop = len(buf) - keep
            if drop:
                eng.st_skipped_bytes += drop
                self._drop_front(drop)
            if self.produced == 0:
                # a direction that never carried a start line in its first 64 KiB is not HTTP
                self.scanned += drop
                if self.scanned > NOT_HTTP_SCAN_LIMIT:
                    self._not_http()
            return False
        eng.st_skipped_bytes += m.start()
        self._drop_front(m.start())
        self.state = S_START
        return True

    def _must_hold(self, final):
        """A response start: wait until the request it answers has been framed."""
        conn = self.conn
        if final:
            return False
        client = conn.streams[1 - self.side]
        if client.nxt is None or client.finished:
            return False
        ack = self.marks[0][2] if self.marks else -1
        if ack < 0:
            return False
        ack_abs = unwrap(ack, client.nxt)
        return ack_abs > client.nxt

    def _on_head(self, end):
        """A complete head is buf[:end]. Returns False when it was not HTTP (state changed)."""
        conn = self.conn
        parsed = parse_head(bytes(self.buf[:end]))
        if parsed is None or parsed[0] != (self.role == ROLE_CLIENT):
            self._lose_sync(0)
            self._drop_front(1)  # move past this false start
            return False
        is_req, method, uri, status, fields = parsed
        self.head_len = end
        self.body_len = 0
        self.pos = end
        self.flags |= self.resync_flag | conn.midstream
        self.resync_flag = 0
        if is_req:
            self.method, self.uri, self.status = method, uri, 0
            upgrade = method == "CONNECT" or b"upgrade" in fields
            p = _Pending(conn.next_index, method, uri, self.base, upgrade)
            conn.next_index += 1
            self.pending = p
            conn.pending.append(p)
            te = _is_chunked(fields)
            cl = _content_length(fields)
            if te == 1:
                self.flags |= F_CHUNKED
                self.state = S_CHUNK_SIZE
            elif te == 0 and cl > 0:
                self.remaining = cl
                self.body_len = cl
                self.state = S_BODY_LEN
            else:
                self._emit(end)
            conn.poke_server()
            return True
        # response
        self.status = status
        answer = self._pair(status)
        self.answer = answer
        self.method = answer.method if answer is not None else None
        self.uri = answer.uri if answer is not None else None
        te = _is_chunked(fields)
        cl = _content_length(fields)
        if 100 <= status < 200:
            self.flags |= F_INTERIM
            if status == 101:
                self.flags |= F_UPGRADE
            self._emit(end)
            if status == 101:
                conn.start_tunnel()
            return True
        if self.method == "HEAD" or status == 204 or status == 304:
            self._emit(end)
        elif self.method == "CONNECT" and 200 <= status < 300:
            self.flags |= F_UPGRADE
            self._emit(end)
            conn.start_tunnel()
        elif te == 1:
            self.flags |= F_CHUNKED
            self.state = S_CHUNK_SIZE
        elif te == 2 or cl < 0:
            # RFC 9112 §6.3 rules 4 and 8: neither chunked last nor a valid Content-Length
            self.state = S_BODY_CLOSE
        elif cl == 0:
            self._emit(end)
        else:
            if answer is None and self._looks_bodyless(end):
                self._emit(end)
            else:
                self.remaining = cl
                self.body_len = cl
                self.state = S_BODY_LEN
        if answer is not None and answer.upgrade and self.method != "CONNECT" and status != 101:
            conn.resume_client()
        elif answer is not None and self.method == "CONNECT" and not (200 <= status < 300):
            conn.resume_client()
        return True

    def _cut_head(self):
        """The head is longer than ``max_head`` (however it arrived): its first ``max_head`` bytes
        become a message flagged incomplete and truncated (a request still takes its index, so
        that the server's answer, typically 431 or 400, pairs with it), then framing looks for
        the next start line. Servers refuse such heads too (nginx 32 KiB, Envoy 60 KiB)."""
        conn = self.conn
        eng = conn.engine
        eng.st_oversize_heads += 1
        cut = eng.max_head
        buf = self.buf
        nl = buf.find(b"\n")  # S_HEAD is entered on a complete start line
        parsed = parse_head(bytes(buf[:nl + 1]))
        if parsed is None or parsed[0] != (self.role == ROLE_CLIENT):
            eng.st_skipped_bytes += cut
            self._drop_front(cut)
            self._lose_sync(0)
            return
        is_req, method, uri, status, _ = parsed
        self.head_len = cut
        self.body_len = 0
        self.flags |= self.resync_flag | conn.midstream | F_INCOMPLETE | F_TRUNCATED
        self.resync_flag = 0
        self.status = status
        if is_req:
            self.method, self.uri = method, uri
            p = _Pending(conn.next_index, method, uri, self.base, False)
            conn.next_index += 1
            self.pending = p
            conn.pending.append(p)
            self._emit(cut)
            conn.poke_server()
        else:
            if 100 <= status < 200:
                self.flags |= F_INTERIM      # a cut 1xx is still interim: the final answer follows
            answer = self._pair(status)
            self.answer = answer
            self.method = answer.method if answer is not None else None
            self.uri = answer.uri if answer is not None else None
            self._emit(cut)
            if answer is not None and answer.upgrade:
                conn.resume_client()
        self._lose_sync(0)

    def _looks_bodyless(self, end):
        """An unpaired response with Content-Length followed at once by another status line is
        the answer to a HEAD we did not see."""
        nxt = self.buf[end:end + 5]
        return len(nxt) == 5 and nxt == b"HTTP/"

    def _pair(self, status):
        conn = self.conn
        pend = conn.pending
        ack = self.marks[0][2] if self.marks else -1
        client = conn.streams[1 - self.side]
        ack_abs = unwrap(ack, client.nxt) if (ack >= 0 and client.nxt is not None) else None
        if ack_abs is not None and pend:
            # answers a request that was never captured
            if ack_abs <= pend[0].start:
                conn.engine.st_unpaired_responses += 1
                self.flags |= F_UNPAIRED
                return None
            if self.gap_since_pair and not (100 <= status < 200):
                # after a loss on this side, skip requests whose responses fell into the hole
                while len(pend) > 1 and pend[1].end >= 0 and pend[1].end <= ack_abs:
                    pend.pop(0)
                if 0 <= pend[0].end < client.framer.lost_upto <= ack_abs:
                    # it answers a request the capture lost after pend[0], whose own response
                    # fell into this side's hole
                    pend.pop(0)
                    conn.engine.st_unpaired_responses += 1
                    self.flags |= F_UNPAIRED
                    return None
        if not pend:
            conn.engine.st_unpaired_responses += 1
            self.flags |= F_UNPAIRED
            return None
        if 100 <= status < 200 and status != 101:
            return pend[0]
        self.gap_since_pair = False
        return pend.pop(0)

    def _bad_chunk(self):
        self.flags |= F_INCOMPLETE
        self._emit(self.pos)
        self._lose_sync(0)

    def _oversize(self):
        eng = self.conn.engine
        if self.pos > eng.max_message:
            eng.st_oversize_messages += 1
            self.flags |= F_INCOMPLETE | F_TRUNCATED
            self._emit(self.pos)
            self._lose_sync(0)
            return True
        return False

    def _emit(self, end, ts_end=None):
        conn = self.conn
        eng = conn.engine
        data = bytes(self.buf[:end])
        if self.state == S_BODY_CLOSE:
            self.body_len = end - self.head_len
        ts_first, _ = self._mark_at(0)
        ts_last = self._mark_at(end - 1)[0] if end > 0 else ts_first
        if ts_end is not None and not self.marks:
            ts_last = ts_end
        flags = self.flags
        if self.role == ROLE_CLIENT:
            p = self.pending
            index = p.index if p is not None else -1
            if p is not None:
                p.end = self.base + end
            self.pending = None
            kind = KIND_REQUEST
            eng.st_requests += 1
        else:
            a = self.answer
            index = a.index if a is not None else -1
            self.answer = None
            kind = KIND_RESPONSE
            eng.st_responses += 1
            if flags & F_INTERIM:
                eng.st_interim_responses += 1
        if flags & F_INCOMPLETE:
            eng.st_incomplete_messages += 1
        if self.truncated_pending:
            flags |= F_TRUNCATED
        msg = Message(kind, conn.id, index, ts_first, ts_last, conn.client, conn.server,
                      flags, data, self.method, self.uri, self.status, self.body_len,
                      self.head_len if self.head_len <= end else end)
        if eng.rows is None:
            eng.out.append(msg)
        else:
            eng.rows.add(msg)
        self.produced += 1
        # cut buf at end
        del self.buf[:end]
        self.base += end
        marks = self.marks
        k = 0
        while k < len(marks) and marks[k][0] <= end:
            k += 1
        if k == len(marks):
            self.marks = [[0, marks[-1][1], marks[-1][2]]] if marks and self.buf else []
            if self.buf and not marks:
                self.marks = []
        else:
            self.marks = marks[k:]
        for m in self.marks:
            m[0] -= end
        self.pos = 0
        self.flags = 0
        self.head_len = 0
        self.body_len = 0
        self.method = None
        self.uri = None
        self.status = 0
        self.truncated_pending = False
        if self.state != S_TUNNEL and self.state != S_WAIT:
            self.state = S_START
        if kind == KIND_REQUEST and conn.pending and conn.pending[-1].upgrade and index == conn.pending[-1].index:
            self.state = S_WAIT


class Stream:
    """One direction of a TCP connection: reassembly into an in-order byte stream."""

    __slots__ = ("conn", "side", "nxt", "ooo", "ooo_bytes", "fin", "finished", "peer_ack", "framer",
                 "syn_seen", "isn")

    def __init__(self, conn, side):
        self.conn = conn
        self.side = side
        self.nxt = None       # absolute offset of the next byte expected; None until synchronised
        self.ooo = []         # [start, end, data, ts, ack, missing] beyond a hole, sorted by start
        self.ooo_bytes = 0
        self.fin = None       # absolute offset where the FIN sits
        self.finished = False
        self.peer_ack = None  # highest absolute offset the peer acknowledged
        self.framer = Framer(conn, side)
        self.syn_seen = False
        self.isn = -1

    def segment(self, seq, data, ts, ack, missing, fin):
        eng = self.conn.engine
        n = len(data)
        if self.nxt is None:
            if n == 0 and missing == 0 and not fin:
                return
            self.nxt = seq  # first byte seen: a midstream start
            self.framer.base = seq
            self.conn.mark_midstream()
        start = unwrap(seq, self.nxt)
        end = start + n + missing
        if fin:
            self.fin = end
        if self.finished:
            if n:
                eng.st_retransmitted_segments += 1
                eng.st_retransmitted_bytes += n
            return
        if end <= self.nxt and (n or missing):
            eng.st_retransmitted_segments += 1
            eng.st_retransmitted_bytes += n
        elif start <= self.nxt:
            if start < self.nxt:
                eng.st_retransmitted_bytes += min(self.nxt, start + n) - start
            self._deliver(start, data, ts, ack, missing)
            self._drain()
        elif n or missing:
            eng.st_out_of_order_segments += 1
            self._insert(start, end, data, ts, ack, missing)
            self._check_hole()
        self._check_fin(ts)

    def _deliver(self, start, data, ts, ack, missing):
        skip = self.nxt - start
        fr = self.framer
        n = len(data)
        if skip < n:
            fr.feed(data[skip:] if skip else data, ts, ack)
            self.nxt = start + n
        if missing:
            gap_start = start + n
            lost = gap_start + missing - max(self.nxt, gap_start)
            if lost > 0:
                fr.truncated_pending = True
                self.conn.engine.st_gaps += 1
                self.conn.engine.st_gap_bytes += lost
                fr.gap(lost, ts, True)
                self.nxt = start + n + missing

    def _insert(self, start, end, data, ts, ack, missing):
        ooo = self.ooo
        i = len(ooo)
        while i > 0 and ooo[i - 1][0] > start:
            i -= 1
        data = bytes(data)          # its own bytes: not a view that pins (or outlives) the batch
        ooo.insert(i, [start, end, data, ts, ack, missing])
        self.ooo_bytes += len(data)
        eng = self.conn.engine
        eng.total_ooo += len(data)
        if self.ooo_bytes > eng.max_stream_buffer:
            eng.st_buffer_cap_hits += 1
            self.skip_hole()
        elif eng.total_ooo > eng.max_total_buffer:
            eng.st_buffer_cap_hits += 1
            eng.relieve()

    def _drain(self):
        ooo = self.ooo
        eng = self.conn.engine
        while ooo and ooo[0][0] <= self.nxt:
            start, end, data, ts, ack, missing = ooo.pop(0)
            self.ooo_bytes -= len(data)
            eng.total_ooo -= len(data)
            if end > self.nxt:
                self._deliver(start, data, ts, ack, missing)
            else:
                eng.st_retransmitted_segments += 1
                eng.st_retransmitted_bytes += len(data)

    def skip_hole(self):
        """Declare the hole before the first waiting segment lost, and go on after it."""
        if not self.ooo:
            return
        lost = self.ooo[0][0] - self.nxt
        eng = self.conn.engine
        eng.st_gaps += 1
        eng.st_gap_bytes += lost
        self.framer.gap(lost, self.ooo[0][3], False)
        self.nxt = self.ooo[0][0]
        self._drain()

    def _check_hole(self):
        pa = self.peer_ack
        while self.ooo and pa is not None and pa >= self.ooo[0][0] and pa > self.nxt:
            self.skip_hole()

    def on_peer_ack(self, ack):
        if self.nxt is None:
            return
        a = unwrap(ack, self.nxt)
        if self.peer_ack is None or a > self.peer_ack:
            self.peer_ack = a
            if self.ooo:
                self._check_hole()
                self._check_fin(None)

    def _check_fin(self, ts):
        if self.fin is not None and not self.finished and self.nxt is not None and self.nxt >= self.fin - 0:
            if not self.ooo or self.ooo[0][0] >= self.fin:
                self.finished = True
                self.framer.eof(ts if ts is not None else self.conn.last_ts, True)
                self.conn.stream_done()

    def flush(self, clean):
        """Connection over: deliver whatever waits, marking holes, then end the framer."""
        while self.ooo:
            self.skip_hole()
        if not self.finished:
            self.finished = True
            self.framer.eof(self.conn.last_ts, clean)


class Connection:
    __slots__ = ("engine", "id", "key", "addr", "ports", "streams", "client_side", "client", "server",
                 "pending", "next_index", "midstream", "last_ts", "closed", "tunnel")

    def __init__(self, engine, cid, key, src, sport, dst, dport):
        self.engine = engine
        self.id = cid
        self.key = key
        self.addr = (src, dst)       # side 0 sends from addr[0]
        self.ports = (sport, dport)
        self.streams = (Stream(self, 0), Stream(self, 1))
        self.client_side = -1
        self.client = None
        self.server = None
        self.pending = []            # requests awaiting responses, in order
        self.next_index = 0
        self.midstream = 0
        self.last_ts = 0
        self.closed = False
        self.tunnel = False

    def set_client(self, side):
        if self.client_side >= 0:
            return
        self.client_side = side
        c, s = side, 1 - side
        self.client = (_addr(self.addr[c]), self.ports[c])
        self.server = (_addr(self.addr[s]), self.ports[s])
        self.streams[c].framer.role = ROLE_CLIENT
        self.streams[s].framer.role = ROLE_SERVER

    def set_role(self, side, role):
        self.set_client(side if role == ROLE_CLIENT else 1 - side)

    def mark_midstream(self):
        if not self.midstream and not (self.streams[0].syn_seen or self.streams[1].syn_seen):
            self.midstream = F_MIDSTREAM
            self.engine.st_midstream_connections += 1

    def poke_server(self):
        if self.client_side < 0:
            return
        fr = self.streams[1 - self.client_side].framer
        if fr.held:
            fr.run()

    def start_tunnel(self):
        self.tunnel = True
        self.engine.st_upgraded_connections += 1
        for st in self.streams:
            fr = st.framer
            if fr.buf:
                self.engine.st_skipped_bytes += len(fr.buf)
            fr.buf = bytearray()
            fr.marks = []
            fr.pos = 0
            fr.state = S_TUNNEL

    def resume_client(self):
        if self.client_side < 0:
            return
        fr = self.streams[self.client_side].framer
        if fr.state == S_WAIT:
            fr.state = S_START
            fr.run()

    def stream_done(self):
        if self.streams[0].finished and self.streams[1].finished:
            self.engine.close(self)

    def finish(self, clean):
        # the client's bytes first, so that held responses find their requests
        order = (self.client_side, 1 - self.client_side) if self.client_side >= 0 else (0, 1)
        for side in order:
            self.streams[side].flush(clean)
        for side in order:
            fr = self.streams[side].framer
            if fr.held:
                fr.run(final=True)
                fr.eof(self.last_ts, clean)


class RowBuffer:
    """Finished messages held for the log writer (``Engine(rows=True)``), in order, to be taken
    a block at a time. Here they are ``Message`` objects; the compiled core keeps table rows and
    one buffer of bytes instead, with the same API and the same blocks."""

    def __init__(self):
        self.held: list = []
        # the compiled buffer hands its memory itself to a block of at least this many bytes
        # taken from its start (``ROWS_HAND_OVER``); nothing here, where a block's messages are
        # only referred to
        self.hand_over = ROWS_HAND_OVER
        # the compiled core frames a Content-Length message of at least this many bytes into
        # memory its row takes (``ROWS_DIRECT_FROM``), of a room bounded by
        # ``ROWS_DIRECT_SPARE``; here every message is framed alike
        self.direct_from = ROWS_DIRECT_FROM
        self.direct_spare = ROWS_DIRECT_SPARE
        self.spare = 0

    def __len__(self):
        return len(self.held)

    def add(self, msg) -> None:
        """A message the core finished."""
        self.held.append(msg)

    @property
    def nbytes(self) -> int:
        """Bytes of the messages held."""
        return sum(len(m.data) for m in self.held)

    def block_end(self, records: int, max_bytes: int) -> int:
        """How many of the rows held make the next block: the first ``records`` of them, or
        fewer when their bytes reach ``max_bytes`` (the log writer's rule); 0 when the rows
        held do not fill a block yet."""
        total = 0
        for i, m in enumerate(self.held[:max(records, 1)]):
            total += len(m.data)
            if i + 1 >= records or total >= max_bytes:
                return i + 1
        return 0

    def take(self, count: int) -> "RowBlock":
        """The first ``count`` rows (1 to all) as a ``RowBlock``; the rest stay."""
        if not 0 < count <= len(self.held):
            raise ValueError(f"take {count} of {len(self.held)} rows")
        block = RowBlock(self.held[:count])
        del self.held[:count]
        return block


class RowBlock:
    """Rows taken from a ``RowBuffer``, one log block's worth. Here it is encoded when taken, in
    the taker's thread: in Python, encoding in the log writer's worker would only contend for
    the GIL."""

    def __init__(self, msgs: list):
        self._msgs = msgs
        self.nbytes = sum(len(m.data) for m in msgs)
        self._encoded = encode_block(msgs)

    def __len__(self):
        return len(self._msgs)

    def encode(self) -> tuple:
        """``encode_block(self.messages())``."""
        return self._encoded

    def messages(self) -> list:
        """The rows as ``Message`` objects, as ``Engine(rows=False)`` returns them."""
        return list(self._msgs)


class Engine:
    """Packets in, HTTP messages out. One Engine per capture.

    With ``track_closed=True`` the engine also reports which connections ended (both FINs, an
    RST, idle for ``idle_timeout``, a SYN reusing the 4-tuple, ``finish()``): ``take_closed()``
    returns their ids (``Message.conn``) in closing order. A close flushes what its connection
    still held into the output of the same ``feed``/``feed_batch``/``finish`` call, so a caller
    that handles a call's messages first and ``take_closed()`` after sees each connection's last
    message before its close. Off (the default), nothing is kept.

    With ``rows=True`` finished messages are not returned: they go to ``rows``, a ``RowBuffer``,
    from which the log writer takes them a block at a time (``LogWriter.write_rows``). The
    compiled core then makes no ``Message`` for them, only table rows and one buffer of bytes.
    """

    # a batch's buffer must stay as it is while the engine runs (parts of a packet are kept as
    # views of it); the compiled engine copies them, and a reader may reuse its buffer there
    copies_input = False

    def __init__(self, linktype, ports=(), max_stream_buffer=MAX_STREAM_BUFFER,
                 max_total_buffer=MAX_TOTAL_BUFFER, idle_timeout=IDLE_TIMEOUT,
                 max_message=MAX_MESSAGE, max_head=MAX_HEAD, track_closed=False, rows=False):
        if linktype not in SUPPORTED_LINKTYPES:
            raise InputError(f"unsupported link type {linktype}")
        self.linktype = linktype
        self.ports = frozenset(ports)
        self.max_stream_buffer = max_stream_buffer
        self.max_total_buffer = max_total_buffer
        self.idle_timeout_ns = int(idle_timeout * 1e9)
        self.max_message = max_message
        self.max_head = max_head
        self.conns = {}
        self.next_id = 0
        self.out = []
        self.track_closed = bool(track_closed)
        self.rows = RowBuffer() if rows else None
        self.closed_ids = []
        self.dead = []          # closed connections whose cycles _take breaks
        self.total_ooo = 0
        self.now = 0
        self.next_sweep = 0
        for name in STAT_NAMES:
            setattr(self, "st_" + name, 0)

    # -- input ----------------------------------------------------------------------------------
    def feed_batch(self, buf, meta):
        """Packets in pcapy-ng ``next_batch`` layout. Returns the messages completed."""
        mv = memoryview(buf)
        for sec, usec, off, caplen in _META.iter_unpack(meta):
            self._packet(sec * 1_000_000_000 + usec * 1000, mv, off, off + caplen)
        return self._take()

    def feed(self, ts_ns, frame):
        """One packet. Returns the messages completed."""
        self._packet(ts_ns, frame, 0, len(frame))
        return self._take()

    def finish(self):
        """End of input: flush every connection (unfinished messages come out incomplete)."""
        for conn in list(self.conns.values()):
            self._close_conn(conn, False)
        return self._take()

    def take_closed(self):
        """The ids of the connections closed since the last call, in closing order.

        Each id comes once, in the first list taken after the call that closed the connection;
        that call's output holds what the close flushed, and no message of the connection comes
        later. Always ``[]`` unless the engine was made with ``track_closed=True``.
        """
        ids = self.closed_ids
        self.closed_ids = []
        return ids

    def stats(self):
        d = {name: getattr(self, "st_" + name) for name in STAT_NAMES}
        d["open_connections"] = len(self.conns)
        d["buffered_bytes"] = self.total_ooo
        return d

    def _take(self):
        # A closed connection and its streams refer to each other. Once none of their code runs
        # (here, as a call returns) the cycle is broken, so that they go at once: left to the
        # garbage collector, tens of thousands of them made its passes the largest cost of a
        # capture of short connections after parsing itself.
        for conn in self.dead:
            conn.streams = ()
        self.dead = []
        out = self.out
        self.out = []
        return out

    # -- per packet -----------------------------------------------------------------------------
    def _packet(self, ts, frame, off, end):
        self.st_packets += 1
        self.st_bytes += end - off
        if ts > self.now:
            self.now = ts
        if self.now >= self.next_sweep:
            self._sweep()
        r = decode(self.linktype, frame, off, end)
        code = r[0]
        if code != D_TCP:
            if code == D_NOT_IP:
                self.st_not_ip += 1
            elif code == D_NOT_TCP:
                self.st_not_tcp += 1
            elif code == D_FRAGMENT:
                self.st_ip_fragments += 1
            else:
                self.st_malformed += 1
            return
        _, src, dst, sport, dport, seq, ack, flags, pay_off, pay_end, missing = r
        ports = self.ports
        if ports and sport not in ports and dport not in ports:
            self.st_filtered += 1
            return
        self.st_tcp_segments += 1
        if missing:
            self.st_truncated_packets += 1
        a = (src, sport)
        b = (dst, dport)
        key = (a, b) if a <= b else (b, a)
        conn = self.conns.get(key)
        has_data = pay_end > pay_off or missing
        if conn is not None and flags & TH_SYN and not flags & TH_ACK:
            # a SYN on a known 4-tuple: a retransmitted SYN, or the port was reused
            side = 0 if conn.addr[0] == src and conn.ports[0] == sport else 1
            st = conn.streams[side]
            if not (st.syn_seen and st.isn == seq):
                self._close_conn(conn, False)
                conn = None
        if conn is None:
            if not (flags & TH_SYN or has_data):
                return
            conn = Connection(self, self.next_id, key, src, sport, dst, dport)
            self.next_id += 1
            self.conns[key] = conn
            self.st_connections += 1
            side = 0
        else:
            side = 0 if conn.addr[0] == src and conn.ports[0] == sport else 1
        conn.last_ts = ts
        st = conn.streams[side]
        if flags & TH_SYN:
            if st.nxt is None or not st.syn_seen:
                st.syn_seen = True
                st.isn = seq
                st.nxt = (seq + 1) & 0xFFFFFFFF
                st.framer.base = st.nxt
                conn.set_client(side if not flags & TH_ACK else 1 - side)
            seq = (seq + 1) & 0xFFFFFFFF
        if flags & TH_ACK:
            conn.streams[1 - side].on_peer_ack(ack)
        if has_data or flags & TH_FIN:
            st.segment(seq, frame[pay_off:pay_end], ts, ack if flags & TH_ACK else -1, missing,
                       flags & TH_FIN)
        if flags & TH_RST and not conn.closed:
            self._close_conn(conn, False)

    # -- connection life ------------------------------------------------------------------------
    def close(self, conn):
        self._close_conn(conn, True)

    def _close_conn(self, conn, clean):
        if conn.closed:
            return
        conn.closed = True
        conn.finish(clean)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        for st in conn.streams:
            self.total_ooo -= st.ooo_bytes
            st.ooo_bytes = 0
        if self.track_closed:
            self.closed_ids.append(conn.id)
        self.dead.append(conn)

    def _sweep(self):
        self.next_sweep = self.now + 1_000_000_000
        limit = self.now - self.idle_timeout_ns
        for conn in [c for c in self.conns.values() if c.last_ts < limit]:
            self.st_expired_connections += 1
            self._close_conn(conn, False)

    def relieve(self):
        """All streams together hold too much beyond holes: give up the largest hole."""
        while self.total_ooo > self.max_total_buffer:
            worst = None
            for conn in self.conns.values():
                for st in conn.streams:
                    if st.ooo and (worst is None or st.ooo_bytes > worst.ooo_bytes):
                        worst = st
            if worst is None:
                return
            worst.skip_hole()


class ResponseFramer:
    """The responses a server sends on one connection, framed by the same rules as a capture.

    Sans-IO, for ``replay play``: call ``expect(method)`` for each request sent on the
    connection, in order (a HEAD's response has no body, a CONNECT 2xx ends HTTP), ``feed(data,
    ts_ns)`` with the bytes read from the socket, and ``eof(ts_ns)`` when the server closed it.
    Each returns the responses completed, as ``Message`` objects whose ``index`` is the position
    of the request answered (interim 1xx responses share it). Bytes that are not HTTP are
    counted in ``stats()["skipped_bytes"]`` and ``stats()["resyncs"]``.
    """

    def __init__(self, client=("", 0), server=("", 0), max_message=MAX_MESSAGE, max_head=MAX_HEAD):
        eng = Engine(DLT_RAW, max_message=max_message, max_head=max_head)
        conn = Connection(eng, 0, None, b"", client[1], b"", server[1])
        conn.client_side = 0
        conn.client = tuple(client)
        conn.server = tuple(server)
        conn.streams[0].framer.role = ROLE_CLIENT
        conn.streams[1].framer.role = ROLE_SERVER
        conn.streams[1].framer.base = 0
        self._eng = eng
        self._conn = conn
        self._framer = conn.streams[1].framer
        self.closed = False

    def expect(self, method):
        """A request with this method was sent: the next response not yet framed answers it."""
        conn = self._conn
        conn.pending.append(_Pending(conn.next_index, method, None, 0, method == "CONNECT"))
        conn.next_index += 1

    @property
    def outstanding(self):
        """Requests sent whose final response has not been framed."""
        return len(self._conn.pending) + (self._framer.answer is not None)

    @property
    def tunnel(self):
        """A 101 or a CONNECT 2xx ended HTTP on this connection."""
        return self._conn.tunnel

    def feed(self, data, ts_ns):
        if data:
            self._framer.feed(data, ts_ns, -1)
        return self._eng._take()

    def eof(self, ts_ns):
        """The server closed the connection: a close-delimited body ends here, others are cut."""
        if not self.closed:
            self.closed = True
            self._conn.last_ts = ts_ns
            self._framer.eof(ts_ns, True)
        return self._eng._take()

    def stats(self):
        return self._eng.stats()


# -- classic pcap records -------------------------------------------------------------------------

_PCAP_LE = struct.Struct("<IIII")
_PCAP_BE = struct.Struct(">IIII")


def pcap_records(buf, start: int, end: int, swapped: bool, nano: bool, snapshot: int,
                 max_packets: int) -> tuple:
    """The packets of a classic pcap file (``replay.sources.pcapfile``) whole in
    ``buf[start:end]`` (``start`` at a record's header), at most ``max_packets``, in pcapy-ng's
    ``next_batch`` layout: ``(meta, pos, odd, nbytes)``. ``meta`` holds a 16-byte record ``sec,
    usec, offset, caplen`` (native uint32) a packet, ``offset`` counted from ``start``; a
    nanosecond file's fraction is cut to microseconds (as libpcap does); ``swapped``: the file's
    byte order is big-endian. ``pos`` is where the next record starts (``end``, or a record not
    whole there); ``odd`` is true when it stopped at a record whose ``caplen`` is over
    ``snapshot``, or whose nanoseconds are a second or more (libpcap's rules decide what becomes
    of it); ``nbytes`` sums the caplens. Bounds outside the buffer raise ``ValueError``."""
    if start < 0 or end > len(memoryview(buf)) or start > end or max_packets < 0 \
            or end - start > 0xFFFFFFFF:
        raise ValueError("pcap_records: bounds outside the buffer")
    rec = _PCAP_BE if swapped else _PCAP_LE
    out = []
    pos = start
    nbytes = 0
    odd = False
    while len(out) < max_packets and end - pos >= 16:
        sec, frac, caplen, _wire = rec.unpack_from(buf, pos)
        if caplen > snapshot or (nano and frac >= 1_000_000_000):
            odd = True
            break
        if end - pos - 16 < caplen:
            break
        out.append(_META.pack(sec, frac // 1000 if nano else frac, pos + 16 - start, caplen))
        nbytes += caplen
        pos += 16 + caplen
    return b"".join(out), pos, odd, nbytes


# -- JSON bodies compared in lockstep ----------------------------------------------------------
#
# ``json_diff(a, b, out)`` walks two JSON texts at once, token by token, and adds to ``out`` the
# generic paths that ``replay.analysis.diff.value_diff(json.loads(a), json.loads(b), "$")``
# reports, without building the values. Equal raw tokens are equal values. Whenever the answer
# would need the values themselves, it returns False and leaves ``out`` as it was: the caller
# parses both texts instead. That is when
# - a text is not JSON as ``json.loads`` reads it (both are read to their end, the parts after a
#   difference too), is empty, holds a byte >= 0x80, NaN or Infinity, or a number token longer
#   than JSON_DIFF_MAX_NUMBER;
# - two objects' keys differ in sequence (another order, a member on one side only), a key is
#   repeated in an object, or a key has a backslash or a byte outside 0x20..0x7e;
# - two differing strings: either has an escape, or either has more than one character and
#   starts with { or [ (value_diff compares the JSON they hold);
# - two differing numbers, unless both are integers (no fraction, no exponent) and neither is -0;
# - true or false against a number (True == 1 inside an otherwise equal container);
# - a container nested JSON_DIFF_MAX_DEPTH deep (value_diff compares below that as text).
# Otherwise values of different types (object, array, string, number, literal) differ at their
# path, and arrays of different lengths add ``...[*]`` after their common prefix.
#
# Cursors point at the first byte of a value (whitespace skipped). Depth counts containers: the
# root value is at depth 0, its members and elements at 1; a container at depth
# ``JSON_DIFF_MAX_DEPTH`` or deeper gives up (value_diff compares below its MAX_DEPTH as text).

JSON_DIFF_MAX_DEPTH = 64
JSON_DIFF_MAX_NUMBER = 640      # longer number tokens give up (int() refuses long digit strings)

_JD_WS = re.compile(rb"[ \t\n\r]*")
_JD_WS_BYTES = (b" ", b"\n", b"\r", b"\t")
_JD_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f\x80-\xff]|\\["\\/bfnrt]|\\u[0-9A-Fa-f]{4})*"')
_JD_PLAIN_KEY = re.compile(rb'"[ !#-\[\]-~]*"')      # printable ASCII, neither " nor \
_JD_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_JD_SIMPLE_KEY = re.compile(rb"[A-Za-z_$][A-Za-z0-9_$\-]*")

# Kinds of scalar tokens
JK_STR = 0          # a string without a backslash: its bytes are its value
JK_STR_ESC = 1      # a string with an escape
JK_INT = 2          # a number without fraction or exponent
JK_NUM = 3          # any other number
JK_TRUE = 4
JK_FALSE = 5
JK_NULL = 6

_JD_OPEN = (b"{", b"[")
_JD_STRINGS = (JK_STR, JK_STR_ESC)
_JD_NUMBERS = (JK_INT, JK_NUM)
_JD_BOOLS = (JK_TRUE, JK_FALSE)


class _GiveUp(Exception):
    """The lockstep walk cannot decide cheaply (or a text is not JSON)."""


def _jd_ws(s: bytes, i: int) -> int:
    if s[i:i + 1] not in _JD_WS_BYTES:       # the usual case: no whitespace at all
        return i
    return _JD_WS.match(s, i).end()


def _jd_scalar(s: bytes, i: int):
    """(end, kind) of the scalar token at ``i``."""
    c = s[i:i + 1]
    if c == b'"':
        m = _JD_STRING.match(s, i)
        if m is None:
            raise _GiveUp
        e = m.end()
        return e, (JK_STR_ESC if s.find(b"\\", i, e) >= 0 else JK_STR)
    if c and c in b"-0123456789":
        m = _JD_NUMBER.match(s, i)
        if m is None or m.end() - i > JSON_DIFF_MAX_NUMBER:
            raise _GiveUp
        return m.end(), (JK_INT if m.lastindex is None else JK_NUM)
    if s.startswith(b"true", i):
        return i + 4, JK_TRUE
    if s.startswith(b"false", i):
        return i + 5, JK_FALSE
    if s.startswith(b"null", i):
        return i + 4, JK_NULL
    raise _GiveUp       # not JSON, or NaN/Infinity (json.loads accepts those; value_diff: nan != nan)


def _jd_skip(s: bytes, i: int, depth: int) -> int:
    """The end of the value at ``i`` in one text, read and checked but not compared."""
    c = s[i:i + 1]
    if c == b"{":
        if depth >= JSON_DIFF_MAX_DEPTH:
            raise _GiveUp
        i = _jd_ws(s, i + 1)
        if s[i:i + 1] == b"}":
            return i + 1
        while True:
            m = _JD_STRING.match(s, i)
            if m is None:
                raise _GiveUp
            i = _jd_ws(s, m.end())
            if s[i:i + 1] != b":":
                raise _GiveUp
            i = _jd_ws(s, _jd_skip(s, _jd_ws(s, i + 1), depth + 1))
            c = s[i:i + 1]
            if c == b"}":
                return i + 1
            if c != b",":
                raise _GiveUp
            i = _jd_ws(s, i + 1)
    if c == b"[":
        if depth >= JSON_DIFF_MAX_DEPTH:
            raise _GiveUp
        i = _jd_ws(s, i + 1)
        if s[i:i + 1] == b"]":
            return i + 1
        return _jd_skip_elements(s, i, depth)
    return _jd_scalar(s, i)[0]


def _jd_skip_elements(s: bytes, i: int, depth: int) -> int:
    """The end of the array at ``depth`` whose next element starts at ``i``."""
    while True:
        i = _jd_ws(s, _jd_skip(s, i, depth + 1))
        c = s[i:i + 1]
        if c == b"]":
            return i + 1
        if c != b",":
            raise _GiveUp
        i = _jd_ws(s, i + 1)


class _Lockstep:
    """One walk: the two texts, the path to the current value (``seg[d]`` names the value at depth
    d: a key, or None for an array element) and the paths found so far."""

    __slots__ = ("a", "b", "seg", "found")

    def __init__(self, a: bytes, b: bytes):
        self.a = a
        self.b = b
        self.seg = [None] * (JSON_DIFF_MAX_DEPTH + 1)
        self.found = []

    def add(self, depth: int):
        parts = ["$"]
        for k in self.seg[1:depth + 1]:
            if k is None:
                parts.append("[*]")
            elif _JD_SIMPLE_KEY.fullmatch(k):
                parts.append("." + k.decode("ascii"))
            else:
                parts.append('["' + k.decode("ascii") + '"]')
        self.found.append("".join(parts))

    def pair(self, i: int, j: int, depth: int):
        """Compare the values at ``i`` in a and ``j`` in b; their ends."""
        a, b = self.a, self.b
        ca, cb = a[i:i + 1], b[j:j + 1]
        if ca == cb == b"{":
            return self.objects(i, j, depth)
        if ca == cb == b"[":
            return self.arrays(i, j, depth)
        if ca in _JD_OPEN or cb in _JD_OPEN:         # a container against another type
            i, j = _jd_skip(a, i, depth), _jd_skip(b, j, depth)
            self.add(depth)
            return i, j
        ea, ka = _jd_scalar(a, i)
        eb, kb = _jd_scalar(b, j)
        if ea - i == eb - j and a[i:ea] == b[j:eb]:
            return ea, eb
        if ka in _JD_STRINGS and kb in _JD_STRINGS:
            if ka == JK_STR_ESC or kb == JK_STR_ESC:
                raise _GiveUp                           # "\u0041" == "A"
            if (ea - i > 3 and a[i + 1] in b"{[") or (eb - j > 3 and b[j + 1] in b"{["):
                raise _GiveUp                           # value_diff compares the JSON they hold
        elif ka in _JD_NUMBERS and kb in _JD_NUMBERS:
            if ka != JK_INT or kb != JK_INT or a[i:ea] == b"-0" or b[j:eb] == b"-0":
                raise _GiveUp                           # 1 == 1.0 == 1e0, 0 == -0
        elif (ka in _JD_BOOLS and kb in _JD_NUMBERS) or (kb in _JD_BOOLS and ka in _JD_NUMBERS):
            raise _GiveUp                               # True == 1 inside an equal container
        self.add(depth)
        return ea, eb

    def objects(self, i: int, j: int, depth: int):
        if depth >= JSON_DIFF_MAX_DEPTH:
            raise _GiveUp
        a, b = self.a, self.b
        i, j = _jd_ws(a, i + 1), _jd_ws(b, j + 1)
        if a[i:i + 1] == b"}" and b[j:j + 1] == b"}":
            return i + 1, j + 1
        seen = set()
        while True:
            m = _JD_PLAIN_KEY.match(a, i)
            if m is None:
                raise _GiveUp           # no key where one is due, or a key with an escape
            ea = m.end()
            key = a[i + 1:ea - 1]
            eb = j + (ea - i)
            if b[j:eb] != a[i:ea]:
                raise _GiveUp           # keys out of step: a member on one side, another order
            if key in seen:
                raise _GiveUp           # json.loads keeps the last of repeated keys
            seen.add(key)
            i, j = _jd_ws(a, ea), _jd_ws(b, eb)
            if a[i:i + 1] != b":" or b[j:j + 1] != b":":
                raise _GiveUp
            self.seg[depth + 1] = key
            i, j = self.pair(_jd_ws(a, i + 1), _jd_ws(b, j + 1), depth + 1)
            i, j = _jd_ws(a, i), _jd_ws(b, j)
            ca, cb = a[i:i + 1], b[j:j + 1]
            if ca == cb == b"}":
                return i + 1, j + 1
            if ca != b"," or cb != b",":
                raise _GiveUp           # one object ends before the other, or not JSON
            i, j = _jd_ws(a, i + 1), _jd_ws(b, j + 1)

    def arrays(self, i: int, j: int, depth: int):
        if depth >= JSON_DIFF_MAX_DEPTH:
            raise _GiveUp
        a, b = self.a, self.b
        i, j = _jd_ws(a, i + 1), _jd_ws(b, j + 1)
        self.seg[depth + 1] = None
        ca, cb = a[i:i + 1], b[j:j + 1]
        if ca != b"]" and cb != b"]":
            while True:                 # both have an element here
                i, j = self.pair(i, j, depth + 1)
                i, j = _jd_ws(a, i), _jd_ws(b, j)
                ca, cb = a[i:i + 1], b[j:j + 1]
                if ca == cb == b",":
                    i, j = _jd_ws(a, i + 1), _jd_ws(b, j + 1)
                elif ca == cb == b"]":
                    return i + 1, j + 1
                elif ca == b"," and cb == b"]":     # a is longer
                    self.add(depth + 1)
                    return _jd_skip_elements(a, _jd_ws(a, i + 1), depth), j + 1
                elif ca == b"]" and cb == b",":     # b is longer
                    self.add(depth + 1)
                    return i + 1, _jd_skip_elements(b, _jd_ws(b, j + 1), depth)
                else:
                    raise _GiveUp
        if ca == cb == b"]":
            return i + 1, j + 1
        self.add(depth + 1)             # one is empty, the other is not
        if ca == b"]":
            return i + 1, _jd_skip_elements(b, j, depth)
        return _jd_skip_elements(a, i, depth), j + 1


def json_diff(a: bytes, b: bytes, out: set) -> bool:
    """Add to ``out`` the generic paths that differ between the JSON texts ``a`` and ``b``, as
    ``value_diff(json.loads(a), json.loads(b), "$", out)`` would, and return True; or return
    False, ``out`` untouched, when that cannot be decided without parsing (see above)."""
    w = _Lockstep(a, b)
    try:
        i, j = _jd_ws(a, 0), _jd_ws(b, 0)
        if i == len(a) or j == len(b):
            return False
        i, j = w.pair(i, j, 0)
        if _jd_ws(a, i) != len(a) or _jd_ws(b, j) != len(b):
            return False
    except _GiveUp:
        return False
    out.update(w.found)
    return True


# ---------------------------------------------------------------------------------------------
# the strings of a log block's table

_U32 = struct.Struct("<I")


def split_strings(buf: bytes, off: int, count: int) -> tuple:
    """The ``count`` strings at ``off`` of ``buf``, each a u32 little-endian length and its
    UTF-8 bytes (lone surrogates allowed), as ``[None, s1, s2, ...]`` and the offset after
    them. ValueError when one runs past the end of ``buf``, UnicodeDecodeError when one does
    not decode."""
    if off < 0 or count < 0:
        raise ValueError("negative offset or count")
    out: list = [None]
    add, unpack, end = out.append, _U32.unpack_from, len(buf)
    for _ in range(count):
        if off + 4 > end:
            raise ValueError("string runs past its end")
        ln = unpack(buf, off)[0]
        off += 4
        if ln > end - off:
            raise ValueError("string runs past its end")
        add(buf[off:off + ln].decode("utf-8", "surrogatepass"))
        off += ln
    return out, off


# ---------------------------------------------------------------------------------------------
# a log block's messages as rows, and its payload put back in row order (docs/log-format.md)

_ROW = struct.Struct(ROW_STRUCT)
_LIMITS = {"B": (0, 0xFF), "H": (0, 0xFFFF), "I": (0, 0xFFFFFFFF), "Q": (0, (1 << 64) - 1),
           "q": (-(1 << 63), (1 << 63) - 1)}
# the fields a message hands over as they are, with their ranges
_AS_IS = tuple((name, *_LIMITS[code]) for name, code in ROW_FIELDS
               if name in ("kind", "flags", "conn", "index", "ts_first", "ts_last", "status",
                           "body_length", "head_length"))


def _text(s: str) -> bytes:
    return str.encode(s, "utf-8", "surrogatepass")     # str's own, for a subclass too


def _int(name: str, v, lo: int, hi: int) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        raise unfit(name, v) from None
    if not lo <= i <= hi:
        raise unfit(name, v)
    return i


def _address(name: str, a, addrs: dict, table: bytearray) -> int:
    try:
        k = addrs.get(a)
    except TypeError:               # unhashable
        raise unfit(name, a) from None
    if k is not None:
        return k
    if not isinstance(a, tuple) or len(a) != 2 or not isinstance(a[0], str) \
            or not isinstance(a[1], int):
        raise unfit(name, a)
    ip = _text(a[0])
    if len(ip) > 255 or not 0 <= a[1] <= 0xFFFF:
        raise bad_address(a)
    table += struct.pack("<B", len(ip)) + ip + struct.pack("<H", a[1])
    k = addrs[a] = len(addrs)
    return k


def _string(name: str, s, ids: dict, texts: list) -> int:
    """The 1-based id of ``s`` in ``ids`` (added when new), 0 for None. Strings are the same
    when their UTF-8 is (``ids`` is keyed by it: a str subclass's own ``__eq__`` plays no
    part, as in the compiled core's tables of bytes)."""
    if s is None:
        return 0
    if not isinstance(s, str):
        raise unfit(name, s)
    t = _text(s)
    k = ids.get(t)
    if k is None:
        k = ids[t] = len(ids) + 1
        texts.append(t)
    return k


def gather_rows(msgs) -> tuple:
    """``(rows, tail, payload)`` of a log block holding ``msgs``:

    - rows: one ``replay.layout.ROW_STRUCT`` record per message, in order;
    - tail: the block's address table then its string table, as the table section ends
      (u32 count, then u8 length, ip, u16 port each; u32 count, then u32 length, UTF-8 each);
    - payload: the requests' bytes in row order, each with its target left out when it starts
      with its method, a space and its uri (``elided``), then the other messages' bytes.

    ValueError (``replay.layout.unfit``) for a field a column cannot hold."""
    rows = bytearray()
    addrs: dict = {}
    addr_table = bytearray()
    uris: dict = {}
    uri_texts: list = []
    methods: dict = {}
    method_texts: list = []
    requests: list = []
    others: list = []
    fields = []
    for m in msgs:
        vals = [_int(name, getattr(m, name), lo, hi) for name, lo, hi in _AS_IS]
        data = m.data
        if data.__class__ is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise unfit("data", data)
            data = bytes(memoryview(data))          # its bytes, whatever a subclass says
        size = len(data)
        kind, head, body = vals[0], vals[8], vals[7]
        client = _address("client", m.client, addrs, addr_table)
        server = _address("server", m.server, addrs, addr_table)
        uri = _string("uri", m.uri, uris, uri_texts)
        method = _string("method", m.method, methods, method_texts)
        elided = 0
        if kind != KIND_REQUEST:
            others.append(data)
        else:
            mt = method_texts[method - 1] if method else b""
            ut = uri_texts[uri - 1] if uri else b""
            if mt and ut:
                p = len(mt) + 1
                if data.startswith(mt) and data[p - 1:p] == b" " and data.startswith(ut, p):
                    elided = 1
                    data = data[:p] + data[p + len(ut):]
            requests.append(data)
        fields.append((*vals, (size - head - body) & ((1 << 64) - 1), client, server, method, uri,
                       elided))
    # string ids: the uris first, then the methods that are no uri
    final = [0]
    extra = []
    for t in method_texts:
        k = uris.get(t)
        if k is None:
            extra.append(t)
            k = len(uris) + len(extra)
        final.append(k)
    for *vals, ex, client, server, method, uri, elided in fields:
        rows += _ROW.pack(*vals, ex, client, server, final[method], uri, elided)
    strings = uri_texts + extra
    tail = bytearray(struct.pack("<I", len(addrs)))
    tail += addr_table
    tail += struct.pack("<I", len(strings))
    for t in strings:
        tail += struct.pack("<I", len(t)) + t
    return bytes(rows), bytes(tail), b"".join(requests + others)


def restore_payload(stored: bytes, kind, data_length, elided, method, uri, strings) -> bytes:
    """A log block's messages' bytes in row order, from its stored payload (``gather_rows``'s
    layout) and its table's columns (kind, data_length, elided, and the method and uri string
    ids: here any sequences of ints; the compiled core takes contiguous numpy arrays of the
    dtypes a ``Table`` decodes them to, u1, u8, u1, u4, u4) and strings (``split_strings``'s
    list). ValueError saying what does not match."""
    kind, lens, elided, method, uri = (
        c.tolist() if hasattr(c, "tolist") else list(c)      # numpy columns: as Python ints
        for c in (kind, data_length, elided, method, uri))
    if not len(kind) == len(lens) == len(elided) == len(method) == len(uri):
        raise ValueError("columns of different lengths")
    n = len(kind)
    cut = [0] * n
    starts = [0] * n
    try:
        for i in range(n):
            if elided[i]:
                cut[i] = len(_text(strings[uri[i]]))
                starts[i] = len(_text(strings[method[i]])) + 1
    except (IndexError, TypeError, AttributeError):     # no such string, or None
        raise ValueError("bad table section: an elided target without its strings") from None
    if any(e and k != KIND_REQUEST for e, k in zip(elided, kind)):
        raise ValueError("bad table section: a target left out of a message that is no request")
    sizes = [ln - c for ln, c in zip(lens, cut)]
    if any(s < 0 for s in sizes) or sum(sizes) != len(stored):
        raise ValueError("payload length does not match the table")
    at = [0] * n
    pos = 0
    for second in (False, True):         # the requests first, then the others
        for i in range(n):
            if (kind[i] != KIND_REQUEST) == second:
                at[i] = pos
                pos += sizes[i]
    pieces = []
    for i in range(n):
        a, size = at[i], sizes[i]
        if elided[i]:
            p = starts[i]
            if p > size:
                raise ValueError("payload length does not match the table")
            pieces += (stored[a:a + p], _text(strings[uri[i]]), stored[a + p:a + size])
        else:
            pieces.append(stored[a:a + size])
    return b"".join(pieces)


_M64 = (1 << 64) - 1


def _s64(x: int) -> int:
    """``x`` mod 2**64, as a signed 64-bit value."""
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def _zz(x: int) -> int:
    """Zigzag of ``x`` mod 2**64 taken as signed: small magnitudes to small numbers."""
    q = _s64(x)
    return ((q << 1) ^ (q >> 63)) & _M64


def _planes(values, code: str) -> bytes:
    """The values (their low bytes, as ``code`` holds them) byte plane by byte plane: byte 0 of
    every value, then byte 1, ..."""
    w = WIDTHS[code]
    mask = (1 << (8 * w)) - 1
    raw = struct.pack(f"<{len(values)}{code}", *[v & mask for v in values])
    return b"".join(raw[b::w] for b in range(w))


def encode_block(msgs) -> tuple:
    """``(table, payload, t_min, t_max, summary)`` of a version 2 data block holding ``msgs``
    (at least one). The table section is laid out as ``replay.layout.TABLE_COLUMNS`` says, each
    column stored as ``replay.log.format.COLUMNS`` describes (against the previous row of the
    same connection); the payload is ``gather_rows``'s. ValueError as ``gather_rows``.

    ``summary`` is what a replay needs to know of the block before reading it, its recorded
    messages only (not ``F_REPLAYED``): ``(requests, first, last, max_conn, conns, lasts)``, the
    number of requests, the least and greatest ``ts_first`` of a request (0, 0 without one), the
    greatest conn of any message (-1: none), and the connections that sent a request here (in
    the order of the connection table) with the greatest index of a request of each."""
    msgs = list(msgs)
    if not msgs:
        raise ValueError("a data block holds at least one message")
    rows, tail, payload = gather_rows(msgs)
    (kind, flags, conn, index, tf, tl, status, body, head, extra, client, server, method, uri,
     elided) = zip(*_ROW.iter_unpack(rows))
    n = len(kind)
    t_min, t_max = min(min(tf), min(tl)), max(max(tf), max(tl))
    d1 = [_s64(tf[i] - (tf[i - 1] if i else t_min)) for i in range(n)]   # wrapping: exact
    d2 = [_s64(tl[i] - tf[i]) for i in range(n)]                          # after the reader's sum
    unit = math.gcd(*d1, *d2)
    if not 0 < unit < (1 << 62):
        unit = 1
    ranks: dict = {}        # conn -> its rank in the connection table (order of first row)
    last: dict = {}         # rank -> the row that named it last
    prev = []               # row -> the previous row of its connection, or -1
    for i, c in enumerate(conn):
        k = ranks.setdefault(c, len(ranks))
        prev.append(last.get(k, -1))
        last[k] = i
    uri_code, seen = [], 0
    for i in range(n):
        p = prev[i]
        if p >= 0 and uri[i] == uri[p]:
            uri_code.append(0)          # as the previous row of the connection
        elif uri[i] == seen + 1:
            uri_code.append(1)          # the next string never named before
        else:
            uri_code.append(uri[i] + 2)
        seen = max(seen, uri[i])
    columns = {
        "kind": kind, "flags": flags,
        "conn": [ranks[conn[i]] + 1 if prev[i] >= 0 else 0 for i in range(n)],
        "index": [_zz(index[i] - index[p] - (kind[i] == KIND_REQUEST)) if p >= 0
                  else _zz(index[i]) for i, p in enumerate(prev)],
        "ts_first": [_zz(d // unit) for d in d1],
        "ts_last": [_zz(d // unit) for d in d2],
        "status": status, "body_length": body, "head_length": head,
        "extra": [_zz(e) for e in extra],
        "client": [0 if p >= 0 and client[i] == client[p] else client[i] + 1
                   for i, p in enumerate(prev)],
        "server": server, "method": method, "uri": uri_code, "elided": elided,
    }
    out = bytearray(struct.pack("<QI", unit, len(ranks)))
    for name, code in TABLE_COLUMNS:
        out += _planes(columns[name], code)
    conns = list(ranks)
    out += _planes([_zz(c - (conns[k - 1] if k else 0)) for k, c in enumerate(conns)], "Q")
    out += tail
    requests, first, lastt, max_conn, req_last = 0, 0, 0, -1, {}
    for i in range(n):
        if flags[i] & F_REPLAYED:
            continue
        max_conn = max(max_conn, conn[i])
        if kind[i] == KIND_REQUEST:
            t = tf[i]
            first, lastt = (t, t) if not requests else (min(first, t), max(lastt, t))
            requests += 1
            c = conn[i]
            if c not in req_last or index[i] > req_last[c]:
                req_last[c] = index[i]
    have = [c for c in ranks if c in req_last]
    summary = (requests, first, lastt, max_conn, have, [req_last[c] for c in have])
    return bytes(out), payload, t_min, t_max, summary


def make_messages(kind, conn, index, ts_first, ts_last, client, server, flags, offset, length,
                  method, uri, status, body_length, head_length, payload: bytes, addrs: list,
                  strings: list) -> list:
    """The Message objects of a log block's rows: the columns (one value a row; client and
    server ids into ``addrs``, method and uri ids into ``strings``; offset and length find the
    message's bytes in ``payload``). Here any sequences of ints; the compiled core takes
    contiguous numpy arrays of the dtypes a ``Table`` decodes them to. IndexError when an id or
    the bytes are out of range, ValueError when the columns differ in length."""
    cols = [c.tolist() if hasattr(c, "tolist") else list(c)
            for c in (kind, conn, index, ts_first, ts_last, client, server, flags, offset,
                      length, method, uri, status, body_length, head_length)]
    if any(len(c) != len(cols[0]) for c in cols):
        raise ValueError("columns of different lengths")
    out = []
    for k, c, ix, tf, tl, cl, sv, fl, o, ln, me, ur, st, bl, hl in zip(*cols):
        if cl >= len(addrs) or sv >= len(addrs) or me >= len(strings) or ur >= len(strings):
            raise IndexError("id out of range")
        if o > len(payload) or ln > len(payload) - o:
            raise IndexError("message bytes out of range")
        out.append(Message(k, c, ix, tf, tl, addrs[cl], addrs[sv], fl, payload[o:o + ln],
                           strings[me], strings[ur], st, bl, hl))
    return out


# ---------------------------------------------------------------------------------------------
# the first header field of a name, found fast (replay.httpmsg.replace_header: play's Host)


def first_field(head: bytes, name: bytes):
    """(colon, stop) of the first header ``name`` (lower-case) of ``head``, as
    ``replay.httpmsg.field_spans`` finds it; None when the head has none; False when the head has
    what only ``field_spans`` reads right (white space or a bare CR around a name, control bytes
    that ``strip`` removes, an obs-fold after it, an empty line before the head's end). A few
    searches of the head instead of splitting it into lines: ``play`` sets the Host of every
    request it sends this way."""
    low = head.lower()
    if b"\x0b" in low or b"\x0c" in low or low.count(b"\r") != low.count(b"\r\n"):
        return False
    n = len(low) - 1
    if low.find(b"\n\n", 0, n) >= 0 or low.find(b"\n\r\n", 0, n) >= 0:
        return False        # an empty line before the head's end: field_spans reads past it
    key = b"\n" + name
    if key + b" " in low or key + b"\t" in low:
        return False
    i = low.find(key + b":")
    if i < 0:
        return None
    colon = i + len(key)
    end = head.find(b"\n", colon)
    if end < 0:
        end = len(head)
    elif head[end + 1:end + 2] in (b" ", b"\t"):
        return False
    return colon, end - 1 if head[end - 1:end] == b"\r" else end


# ---------------------------------------------------------------------------------------------
# the answer path of a replay connection (replay.play.sender.ReplayProtocol)


class Attempt:
    """One planned request on its way: its deadline, when it was sent, on which pass."""

    __slots__ = ("req", "iteration", "deadline", "sent_ns", "conn_id", "unknown")

    def __init__(self, req, iteration, deadline, conn_id):
        self.req = req
        self.unknown = req.recorded_status is None     # as counted when it was tried
        self.iteration = iteration
        self.deadline = deadline
        self.sent_ns = 0
        self.conn_id = conn_id


def deadline(sched, t, seq, iteration=0):
    """``sched.deadline(t, seq, iteration)``: when a request of a timed run is due (a
    ``replay.play.scheduler.Schedule``'s, or any object's with that method). The compiled core
    computes a ``Schedule``'s itself, to the same value."""
    return sched.deadline(t, seq, iteration)


def connection_closes(data: bytes, head_length: int) -> bool:
    """Whether a response's head ends its connection: ``Connection: close``, or HTTP/1.0
    without ``Connection: keep-alive`` (the value of the first ``Connection`` field, as
    ``replay.httpmsg.header_value`` reads it)."""
    head = data[:head_length] if head_length else data[:65536]
    low = head.lower()
    i = low.find(b"\nconnection:")
    value = None
    if i >= 0:
        start = i + len(b"\nconnection:")
        end = low.find(b"\n", start)
        value = low[start:end if end >= 0 else len(low)].strip()
    if value and b"close" in value:
        return True
    return data.startswith(b"HTTP/1.0") and not (value and b"keep-alive" in value)


class Tally:
    """What the core counted for a ``Report`` (``report.tally``) in the place of its
    ``on_attempt``, ``on_sent`` and ``on_answer``, until ``fold(report)`` adds it in. This twin
    counts nothing itself: its ``PumpCore`` calls the player's and the report's methods, which
    are the reference; the compiled ``PumpCore`` counts here (``Player.core_counts``)."""

    def __init__(self, report=None):
        self.report = report       # (the compiled twin folds into it every 65,536 answers or
        #                             timed sends)
        self._reset()

    def _reset(self) -> None:
        self.attempted = self.sent = self.bytes_sent = self.bytes_received = self.answered = 0
        self.same = self.different = self.first_send_ns = self.last_answer_ns = 0

    def fold(self, report) -> None:
        """Add what was counted into ``report`` and start again from nothing."""
        report.attempted += self.attempted
        report.sent += self.sent
        report.bytes_sent += self.bytes_sent
        report.bytes_received += self.bytes_received
        report.answered += self.answered
        report.same += self.same
        report.different += self.different
        if self.first_send_ns and (not report.first_send_ns
                                   or self.first_send_ns < report.first_send_ns):
            report.first_send_ns = self.first_send_ns
        if self.last_answer_ns > report.last_answer_ns:
            report.last_answer_ns = self.last_answer_ns
        self._reset()


class PumpCore:
    """The hot part of a replay connection (the base of ``replay.play.sender.ReplayProtocol``,
    which holds the rest: connecting, losing the connection, waiting, sending again): the
    responses framed as bytes arrive, each answering the oldest request outstanding, and the
    requests its answers let go (``pump_next``: at once at ``--speed max``, timed each at its
    deadline). The compiled core does the
    same in C, counting into the report without a Python call per request.

    It reads and sets: ``player`` (``clock``, ``report``, ``on_exchange``, ``late_answers``,
    ``budget``, ``stopping``, ``fed``/``room``, ``answered``, ``_took``, ``_tried``, ``_pump``,
    and timed ``schedule`` and ``end_ns``; the compiled twin also ``core_counts``, ``room_at``,
    ``_crashed`` and the report's ``tally``), ``loop``, ``transport``, ``framer`` (a
    ``ResponseFramer``), ``pending`` (a deque of ``Attempt``), ``pump`` ((feed, pass, conn id,
    dues) or None: ``dues``, timed, what sends a request at its deadline, its ``add(deadline,
    core, request)`` calling ``send_due(request, deadline)`` then), ``due``, ``retry``, ``waiter``,
    ``soon`` (how a read runs what its answers let go: the loop's ``call_soon``, or a
    transport's own), and its counters."""

    def init_core(self, player) -> None:
        self.player = player
        self.loop = player.loop
        self.now = player.clock.now
        self.transport = None
        self.framer = None
        self.pending = deque()
        self.closed = False
        self.reusable = True
        self.waiter = None
        self.pump = None
        self.due = None             # timed: the request the pump holds for its deadline
        self.soon = self.loop.call_soon   # how a read runs what its answers let go
        self.answers = 0            # final answers read here: > 0 means the connection was reused
        self.rx = 0                 # bytes received
        self.rx_answered = 0        # bytes of the final answers among them
        self.retry = []             # sent, lost before any byte of their answer: to send again

    def data_received(self, data):
        now = self.now()
        self.rx += len(data)
        self.player.report.bytes_received += len(data)
        msgs = self.framer.feed(data, now)
        if msgs:
            self._answered(msgs, now)
        if self.framer.tunnel:
            # a 101 or CONNECT 2xx: HTTP ends here, and we have nothing to send through the tunnel
            self.reusable = False
            self.transport.close()

    def _answered(self, msgs, now):
        player = self.player
        for m in msgs:
            if m.flags & F_INTERIM:
                continue
            if not self.pending:
                player.report.unsolicited += 1
                continue
            att = self.pending.popleft()
            self.answers += 1
            self.rx_answered += len(m.data)
            if m.head_length and connection_closes(m.data, m.head_length):
                self.reusable = False
            player.answered(att, m, now, self)
        if not self.pending:
            if self.pump is None:
                self._wake(True)
            else:
                # after the callbacks of this read: with uvloop (--speed max's loop) a FIN
                # read with the answer is seen first, and the request goes on a new connection;
                # a SendLoop's transport runs it at the end of its reads (``soon``)
                self.soon(self._pump_or_wake)

    def _pump_or_wake(self) -> None:
        if self.pending or self.pump is None or not self.player._pump(self):
            self._wake(True)

    def _wake(self, value):
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(value)

    def send(self, att) -> int:
        self.framer.expect(att.req.method)
        self.pending.append(att)
        t = self.now()
        att.sent_ns = t
        self.transport.write(att.req.data)
        return t

    def pump_next(self) -> bool:
        """Every answer is in, or a pipelined request came: send the next request of the feed, and
        those pipelined after it, as the connection's task would; False when the task must
        decide (the feed is empty, the run stops, the connection cannot be reused). At ``--speed
        max`` (``dues`` None) it goes now; timed, at its deadline (``_pump_timed``)."""
        feed, it, conn_id, dues = self.pump
        items = feed.items
        player = self.player
        if not items or not self._may_send(player):
            return False
        if dues is not None:
            # held by the answer that let it go (a pipelined request waits for none)
            return self.due is not None or self._pump_timed(
                items, it, conn_id, dues, not self.pending and not items[0].pipelined, None)
        report = player.report
        while True:
            req = items.popleft()
            player._took()
            player._tried(req)
            t = self.send(Attempt(req, it, None, conn_id))
            report.on_sent(len(req.data), None, False, t)
            if not items or not items[0].pipelined or player.budget == 0 or player.stopping:
                return True

    def _may_send(self, player) -> bool:
        """The run goes on and this connection may carry another request."""
        return not (player.stopping or player.budget == 0 or self.closed or not self.reusable
                    or self.retry or self.framer.tunnel)

    def _pump_timed(self, items, it, conn_id, dues, held, d) -> bool:
        """Timed: the head of the feed goes at its deadline: now if that is past (``held``: the
        answer that let it go came after it), else from ``dues`` when it comes (``send_due``;
        ``due`` holds it meanwhile); then those pipelined after it, each at its own deadline.
        False when the task must decide: a deadline at or past ``--duration``'s end. ``d``: the
        head's deadline, when known."""
        player = self.player
        report = player.report
        while True:
            req = items[0]
            if d is None:
                d = deadline(player.schedule, req.t, req.seq, it)
            if player.end_ns is not None and d >= player.end_ns:
                return False
            if d > self.now():
                self.due = req
                dues.add(d, self, req)
                return True
            items.popleft()
            t = self.send(Attempt(req, it, d, conn_id))      # (counted after: on time first)
            player._took()
            player._tried(req)
            report.on_sent(len(req.data), t - d, held, t)
            if not items or not items[0].pipelined or player.budget == 0 or player.stopping:
                return True
            held = False
            d = None

    def send_due(self, req, deadline) -> None:
        """``dues``: the deadline of ``req`` has come. Sent if the connection still holds it
        for its deadline (its task did not take over meanwhile) and may still send; else its
        task decides."""
        if self.due is not req or self.pump is None:
            return
        feed, it, conn_id, dues = self.pump
        items = feed.items
        player = self.player
        if not items or items[0] is not req or (self.pending and not req.pipelined):
            self.due = None          # (not the head of the feed, or not idle: never so)
            return
        if not self._may_send(player):
            self._wake(True)         # ``due`` kept: its task sees what it waited for
            return
        self.due = None
        if not self._pump_timed(items, it, conn_id, dues, False, deadline):
            self._wake(True)


# -- the stream feeder's common step --------------------------------------------------------------


def feed_ready(queued, feeds, player, sched, due, on_recorded, slice_end, ahead) -> int:
    """The planned requests at the head of ``queued`` (a streamed plan's ``(pass, item)``, in
    recorded time order) that ``replay.play.sender.Player._launch_stream`` takes each without
    waiting or deciding anything, handed over as it would: those with their recorded status,
    due (``deadline``, by ``sched``) before ``player.end_ns`` and within ``ahead`` of the clock
    (``player.clock.now``), while the clock is before ``slice_end``, for a connection already fed
    (``feeds``: an OrderedDict of ``_Feed`` by (recorded connection, pass)), and not a pipelined
    request to a connection whose answers send (``_Feed.put`` sends it itself). Each goes to the
    end of its feed's ``items`` (its waiter woken), the feed to the end of ``feeds``, its
    deadline to the end of ``due`` (a ``StreamLookahead``'s list, or None), and, of the first
    pass, its recorded request and final response to ``on_recorded`` (or None);
    ``player.fed`` counts them. The first that is not so stays in ``queued``, for the feeder's
    own steps. Returns how many were handed over."""
    n = 0
    now = player.clock.now
    end_ns = player.end_ns
    try:
        while queued:
            t = now()
            if t >= slice_end:
                break
            it, item = queued[0]
            req = item[0]
            if req.__class__ is not PlannedRequest or req.recorded_status is None:
                break
            d = deadline(sched, req.t, req.seq, it)
            if d is None or (end_ns is not None and d >= end_ns) or d - ahead > t:
                break
            key = (req.conn, it)
            f = feeds.get(key)
            if f is None or (f.pumping is not None and req.pipelined):
                break
            queued.popleft()
            feeds.move_to_end(key)
            f.items.append(req)
            n += 1
            w = f.waiter
            if w is not None and not w.done():
                w.set_result(None)
            if due is not None:
                due.append(d)
            if on_recorded is not None and it == 0:
                on_recorded(item[1], item[2])
    finally:
        if n:
            player.fed += n
    return n


# -- the streamed replay's planner ----------------------------------------------------------------


class _Waiting:
    """A request in the planner's window: its message, and its final response once read."""

    __slots__ = ("msg", "final", "seq", "key")

    def __init__(self, msg, seq, key):
        self.msg = msg
        self.final = None
        self.seq = seq
        self.key = key


class _ConnState:
    __slots__ = ("resp_end", "last_t", "last")

    def __init__(self, last):
        self.resp_end = None     # ts_last of the previous planned request's final response
        self.last_t = 0
        self.last = last         # index of its last recorded request (None: unknown)


def _head_length(new: bytes, old_head: int, old_len: int) -> int:
    # the head grew or shrank by the size difference; the body did not change
    return old_head + (len(new) - old_len) if old_head else 0


class StreamPlanner:
    """Recorded messages in (log order), planned requests out (recorded time order): the rules
    are those of ``replay.play.stream``'s opening; the window's bounds are in ``replay.limits``.

    ``push(msg)`` and ``finish()`` return a list of ``(PlannedRequest, request, final response or
    None)``, and ``(None, None, final)`` for a final response read after its request was
    planned; ``ended`` lists the recorded connections that are over since the last call (the
    caller takes and clears it). ``header`` (a ``StreamHeader``, or None) gives the last request
    of each connection (``last_of``)."""

    def __init__(self, host, keep_host=False, header=None, max_pending=MAX_PENDING):
        from replay import httpmsg       # (it imports the core: not at the core's own import)

        self._edit = httpmsg
        self.host = host
        self.keep_host = keep_host
        self.header = header
        self.max_pending = max_pending
        self.heap = []
        self.waiting = {}                  # (conn, index) -> _Waiting
        self.early = OrderedDict()         # (conn, index) -> final response read first
        self.conns = OrderedDict()         # conn -> _ConnState, least recently planned first
        self.late = OrderedDict()          # (conn, index) -> PlannedRequest planned unanswered
        self.ended = []
        self.now = None                    # the log's progress: the latest ts_last read
        self.n = 0
        self.seq = 0
        self.planned = 0
        self.pipelined = 0
        self.reordered = 0
        self.unknown_status = 0
        self.skipped = {}
        self._last_t = None
        self._expired = -(1 << 63)         # the log's time at the last _expire

    def push(self, m) -> list:
        if m.flags & F_REPLAYED:
            return []
        if self.now is None or m.ts_last > self.now:
            self.now = m.ts_last
        key = (m.conn, m.index)
        if m.kind == KIND_REQUEST:
            if key not in self.waiting:
                p = _Waiting(m, self.n, key)
                self.n += 1
                p.final = self.early.pop(key, None)
                self.waiting[key] = p
                heapq.heappush(self.heap, (m.ts_first, m.conn, m.index, p.seq, p))
        elif m.index >= 0 and not m.flags & F_INTERIM:
            p = self.waiting.get(key)
            if p is not None:
                p.final = m
            else:
                req = self.late.pop(key, None)
                if req is not None:
                    # planned before its answer ended: its recorded status, now (the sender
                    # reads it when the request is tried, ahead of which this usually is)
                    req.recorded_status = m.status
                    self.unknown_status -= 1
                    out = self._release(False)
                    out.append((None, None, m))
                    return out
                self.early[key] = m
                if len(self.early) > MAX_EARLY:
                    self.early.popitem(last=False)
        return self._release(False)

    def advance(self, now: int) -> list:
        """The log's clock moves on to ``now`` without a message (a live source that is quiet):
        what waited for later traffic goes out."""
        if self.now is None or now <= self.now:
            return []
        self.now = now
        return self._release(False)

    def finish(self) -> list:
        out = self._release(True)
        self.ended.extend(self.conns.keys())
        self.conns.clear()
        self.early.clear()
        return out

    def _release(self, everything: bool) -> list:
        out = []
        heap, now = self.heap, self.now
        while heap:
            t, _, _, _, p = heap[0]
            if not everything and len(heap) <= self.max_pending:
                age = now - t
                if age < REORDER_NS or (p.final is None and age < ANSWER_WAIT_NS):
                    break
            heapq.heappop(heap)
            del self.waiting[p.key]
            got = self._plan(p)
            if got is not None:
                out.append(got)
        if now is not None and (everything or now - self._expired >= EXPIRE_EVERY_NS):
            self._expired = now
            self._expire(now)
        return out

    def _plan(self, p: _Waiting):
        m, final = p.msg, p.final
        st = self.conns.get(m.conn)
        if st is None:
            st = self.conns[m.conn] = _ConnState(
                self.header.last_of(m.conn) if self.header is not None else None)
        else:
            self.conns.move_to_end(m.conn)
        prev_end, st.resp_end = st.resp_end, (final.ts_last if final is not None else None)
        st.last_t = m.ts_first
        last = st.last
        if last is not None and m.index >= last:
            del self.conns[m.conn]
            self.ended.append(m.conn)
        if self._last_t is not None and m.ts_first < self._last_t:
            self.reordered += 1
        else:
            self._last_t = m.ts_first
        edit = self._edit
        data = m.data
        if m.flags & CUT:
            if m.flags & F_CHUNKED:
                self.skipped["cut_chunked_body"] = self.skipped.get("cut_chunked_body", 0) + 1
                return None
            data = edit.set_content_length(data, m.head_length)
        if not self.keep_host and self.host is not None:
            data = edit.set_host(data, _head_length(data, m.head_length, len(m.data)), self.host)
        pipe = prev_end is not None and m.ts_first < prev_end
        hl = _head_length(data, m.head_length, len(m.data))
        blen, chunked = edit.body_length(data, hl)
        req = PlannedRequest(m.conn, m.index, m.ts_first, data, m.method or "GET", m.uri or "", hl,
                             final.status if final is not None else None, pipe, seq=self.seq,
                             body_length=blen, flags=F_CHUNKED if chunked else 0)
        self.seq += 1
        self.planned += 1
        self.pipelined += pipe
        if final is None:
            self.unknown_status += 1
            self.late[(m.conn, m.index)] = req
            if len(self.late) > MAX_LATE:
                self.late.popitem(last=False)
        return req, m, final

    def _expire(self, now: int) -> None:
        conns = self.conns
        limit = now - CONN_IDLE_NS
        late = self.late
        while late:
            key, req = next(iter(late.items()))
            if req.t >= limit:
                break
            del late[key]
        while conns:
            conn, st = next(iter(conns.items()))
            if st.last_t >= limit:
                break
            del conns[conn]
            self.ended.append(conn)


# -- planned requests across the reader's pipe ----------------------------------------------------

# one record a request: it, conn, index, t, head_length, recorded_status (0 when None), seq,
# body_length, flags, the lengths of data, method and uri (UTF-8), bits (1 pipelined, 2 a
# recorded status); then the data, the method and the uri. Native byte order: both ends are the
# same machine.
_PACKED = struct.Struct("=qQqqqqqqqIIIB")
_PACKED_FIELDS = ("conn", "index", "t", "head_length", "recorded_status", "seq", "body_length",
                  "flags")


def _packable(entry) -> bool:
    if type(entry) is not tuple or len(entry) != 2 or type(entry[0]) is not int:
        return False
    item = entry[1]
    if type(item) is not tuple or len(item) != 3 or item[1] is not None or item[2] is not None:
        return False
    r = item[0]
    if type(r) is not PlannedRequest:
        return False
    return (all(type(getattr(r, f)) is int for f in _PACKED_FIELDS if f != "recorded_status")
            and (r.recorded_status is None or type(r.recorded_status) is int)
            and type(r.pipelined) is bool and type(r.data) is bytes
            and type(r.method) is str and type(r.uri) is str)


def pack_planned(batch: list) -> tuple:
    """``(blob, others)`` for a batch of the streamed plan's reader: each ``(it, (PlannedRequest,
    None, None))`` packed into ``blob`` (a record of fixed fields, then its bytes), every other
    entry (and a request whose fields do not fit the record) in ``others`` as ``(position,
    entry)``: pickled as they are. ``unpack_planned`` gives the batch back. Packing skips
    pickle's work a request (a third of the reader's time, and the sender's unpickling)."""
    out = bytearray()
    others = []
    for i, entry in enumerate(batch):
        if not _packable(entry):
            others.append((i, entry))
            continue
        r = entry[1][0]
        try:
            m = r.method.encode("utf-8")
            u = r.uri.encode("utf-8")
            status = r.recorded_status
            if max(len(r.data), len(m), len(u)) > 0xFFFFFFFF:
                raise OverflowError
            head = _PACKED.pack(entry[0], r.conn, r.index, r.t, r.head_length,
                                0 if status is None else status, r.seq, r.body_length, r.flags,
                                len(r.data), len(m), len(u),
                                (1 if r.pipelined else 0) | (0 if status is None else 2))
        except (OverflowError, UnicodeError, struct.error):
            others.append((i, entry))
            continue
        out += head
        out += r.data
        out += m
        out += u
    return bytes(out), others


def unpack_planned(blob: bytes, others: list) -> list:
    """The batch ``pack_planned`` packed (ValueError when ``blob`` is cut short or ``others``
    is not of its making)."""
    if any(type(o) is not tuple or len(o) != 2 for o in others):
        raise ValueError("a packed batch of planned requests lists what is not (position, entry)")
    out = []
    pos = 0
    k = 0
    while pos < len(blob) or k < len(others):
        if k < len(others) and others[k][0] == len(out):
            out.append(others[k][1])
            k += 1
            continue
        if len(blob) - pos < _PACKED.size:
            raise ValueError("a packed batch of planned requests is cut short")
        (it, conn, index, t, hl, status, seq, blen, flags, dn, mn, un,
         bits) = _PACKED.unpack_from(blob, pos)
        pos += _PACKED.size
        if len(blob) - pos < dn + mn + un:
            raise ValueError("a packed batch of planned requests is cut short")
        data = blob[pos:pos + dn]
        method = blob[pos + dn:pos + dn + mn].decode("utf-8")
        uri = blob[pos + dn + mn:pos + dn + mn + un].decode("utf-8")
        pos += dn + mn + un
        out.append((it, (PlannedRequest(conn, index, t, data, method, uri, hl,
                                        status if bits & 2 else None, bool(bits & 1), seq, blen,
                                        flags), None, None)))
    return out
