# cython: language_level=3, boundscheck=True, wraparound=True, cdivision=True
"""The core, compiled: link/IP/TCP decoding, TCP reassembly and HTTP/1.x framing.

This is the Cython twin of ``replay._fastparse_py``, which is the reference: the same API, the same
``replay.events.Message`` objects, the same counters; differential tests hold the two to identical
output, and the theory of operation in that module's docstring holds here word for word. What
differs is only how: packets are decoded from the ``next_batch`` buffer through a C pointer into a
C struct, without a Python object per packet; sequence arithmetic, offsets and counters are C
integers; connection, stream and framer state live in extension types; payload bytes are copied
once, from the batch buffer into the framer's buffer (segments waiting beyond a hole are copied
into a ``bytes`` of their own).
"""

from __future__ import annotations

import ipaddress
import re

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint8_t, uint32_t
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memchr, memcmp, memcpy, memmove, memset
from cpython.ref cimport Py_INCREF, Py_XDECREF

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void*)

from replay.errors import InputError
from replay.limits import (ADDR_TEXT_KEEP, IDLE_TIMEOUT, MAX_HEAD, MAX_MESSAGE,
                           MAX_STREAM_BUFFER, MAX_TOTAL_BUFFER, ROWS_DIRECT_FROM,
                           ROWS_DIRECT_SPARE, ROWS_HAND_OVER)
from replay.events import (
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
)

# ---------------------------------------------------------------------------------------------
# Message objects made and read through their slots. ``Message`` is a slotted dataclass: each
# field is a member descriptor at a fixed offset in the object. Making one by filling those
# slots skips the dataclass's __init__ (a Python frame a message); reading them skips getattr
# (gather_rows: 0.88 -> 0.54 us a message). Only for objects of exactly that class, and only
# when every field is such a slot and no __post_init__ is defined; otherwise the usual ways.
from cpython.object cimport PyObject, PyTypeObject

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    int T_OBJECT_EX
    PyTypeObject PyMemberDescr_Type

cdef enum:
    M_KIND, M_CONN, M_INDEX, M_TS_FIRST, M_TS_LAST, M_CLIENT, M_SERVER, M_FLAGS, M_DATA,
    M_METHOD, M_URI, M_STATUS, M_BODY_LENGTH, M_HEAD_LENGTH, M_FIELDS

_SLOT_NAMES = ("kind", "conn", "index", "ts_first", "ts_last", "client", "server", "flags",
               "data", "method", "uri", "status", "body_length", "head_length")
cdef Py_ssize_t _slot[M_FIELDS]
cdef bint _slots_known
_new_object = object.__new__


cdef bint _find_offsets(object cls, tuple names, Py_ssize_t* out) except? False:
    """The offsets of the slots ``names`` of ``cls`` (a slotted dataclass with exactly those
    fields, in that order, and no __post_init__) into ``out``; False when they cannot be known."""
    if hasattr(cls, "__post_init__") or tuple(cls.__dataclass_fields__) != names:
        return False
    for k, name in enumerate(names):
        d = cls.__dict__.get(name)
        if d is None or type(d) is not <object>&PyMemberDescr_Type \
                or (<PyMemberDescrObject*>d).d_member.type != T_OBJECT_EX:
            return False
        out[k] = (<PyMemberDescrObject*>d).d_member.offset
    return True


_slots_known = _find_offsets(Message, _SLOT_NAMES, _slot)


cdef inline object _at(object o, bint known, Py_ssize_t offset, str name):
    """The slot at ``offset`` of ``o`` when its class's layout is ``known`` and the slot is
    set, else the attribute ``name``."""
    cdef PyObject* v
    if known:
        v = (<PyObject**>((<char*><PyObject*>o) + offset))[0]
        if v != NULL:
            return <object>v
    return getattr(o, name)


cdef inline object _field(object m, bint fast, int k, str name):
    return _at(m, fast, _slot[k], name)


cdef inline void _put(object m, int k, object v):
    """Fill slot ``k`` of ``m``, a Message just made by ``_new_object`` (its slots empty)."""
    Py_INCREF(v)
    (<PyObject**>((<char*><PyObject*>m) + _slot[k]))[0] = <PyObject*>v


cdef object _message(object kind, object conn, object index, object ts_first, object ts_last,
                     object client, object server, object flags, object data, object method,
                     object uri, object status, object body_length, object head_length):
    """``Message(...)`` with these fields, left out of the cyclic garbage collector's lists: a
    message holds ints, bytes, str and (str, int) tuples, which make no cycle, and a stream holds
    too many of them at once for the collector to walk each time. (A cycle made by storing a
    container into a message that the container refers to would not be collected.)"""
    if not _slots_known:
        return Message(kind, conn, index, ts_first, ts_last, client, server, flags, data,
                       method, uri, status, body_length, head_length)
    m = _new_object(Message)
    _put(m, M_KIND, kind)
    _put(m, M_CONN, conn)
    _put(m, M_INDEX, index)
    _put(m, M_TS_FIRST, ts_first)
    _put(m, M_TS_LAST, ts_last)
    _put(m, M_CLIENT, client)
    _put(m, M_SERVER, server)
    _put(m, M_FLAGS, flags)
    _put(m, M_DATA, data)
    _put(m, M_METHOD, method)
    _put(m, M_URI, uri)
    _put(m, M_STATUS, status)
    _put(m, M_BODY_LENGTH, body_length)
    _put(m, M_HEAD_LENGTH, head_length)
    PyObject_GC_UnTrack(<void*>m)
    return m


# Link types (https://www.tcpdump.org/linktypes.html)
cdef enum:
    DLT_NULL = 0
    DLT_EN10MB = 1
    DLT_RAW_OLD_12 = 12
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
cdef enum:
    ETH_IPV4 = 0x0800
    ETH_IPV6 = 0x86DD
    ETH_PPPOE_SESSION = 0x8864

# TCP flags (RFC 9293 §3.1)
cdef enum:
    TH_FIN = 0x01
    TH_SYN = 0x02
    TH_RST = 0x04
    TH_ACK = 0x10

# decode() results
cdef enum:
    D_TCP = 0
    D_NOT_IP = 1
    D_NOT_TCP = 2
    D_FRAGMENT = 3
    D_MALFORMED = 4

# Framer states (see the twin)
cdef enum:
    S_START = 0
    S_HEAD = 1
    S_BODY_LEN = 2
    S_CHUNK_SIZE = 3
    S_CHUNK_DATA = 4
    S_CHUNK_CRLF = 5
    S_TRAILERS = 6
    S_BODY_CLOSE = 7
    S_WAIT = 8
    S_TUNNEL = 9
    S_RESYNC = 10
    S_NOT_HTTP = 11

cdef enum:
    ROLE_UNKNOWN = 0
    ROLE_CLIENT = 1
    ROLE_SERVER = 2

cdef enum:
    NOT_HTTP_SCAN_LIMIT = 64 * 1024
    RESYNC_KEEP = 8192      # bytes after the last line end kept while resynchronising

cdef int64_t MAX_CHUNK = 10**18  # a chunk size above this is not a length (the twin's MAX_CHUNK)
cdef int CF_INCOMPLETE = F_INCOMPLETE
cdef int CF_TRUNCATED = F_TRUNCATED
cdef int CF_GAP = F_GAP
cdef int CF_MIDSTREAM = F_MIDSTREAM
cdef int CF_INTERIM = F_INTERIM
cdef int CF_REPLAYED = F_REPLAYED
cdef int CKIND_REQUEST = KIND_REQUEST
# connections remembered by a hash of their key in each Engine (a power of two): with tens of
# connections interleaved, most packets find theirs there, without a key object or a dict lookup
cdef enum:
    CONN_CACHE = 256
cdef enum:
    KEEP_BUFFER = 2048      # bytes a framer's emptied buffer keeps allocated, at most
cdef enum:
    ADDR_SEEN = 1024        # addresses a block's string tables remember by object (a power of 2)
cdef int64_t SEQ_MASK = 0xFFFFFFFF    # (a C constant: the literal would be a Python int)
cdef int CF_UPGRADE = F_UPGRADE
cdef int CF_CLOSE_DELIMITED = F_CLOSE_DELIMITED
cdef int CF_CHUNKED = F_CHUNKED
cdef int CF_UNPAIRED = F_UNPAIRED
cdef int CF_RESYNC = F_RESYNC

# Start lines, as in the twin (RFC 9112 §3, §4; RFC 9110 §9.1)
_REQ_LINE = rb"[A-Z][A-Z0-9_\-]{0,31} [\x21-\x7e\x80-\xff]+ HTTP/[0-9]\.[0-9]\r?\n"
_STATUS_LINE = rb"HTTP/[0-9]\.[0-9] [0-9]{3}(?:[ \t][^\r\n]*)?\r?\n"
REQ_START_RE = re.compile(_REQ_LINE)
STATUS_START_RE = re.compile(_STATUS_LINE)
_KNOWN_METHOD = (rb"(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE|PROPFIND|PROPPATCH"
                 rb"|MKCOL|COPY|MOVE|LOCK|UNLOCK|REPORT|SEARCH|PURGE)")
_REQ_ANY = (rb"(?m:^" + _REQ_LINE + rb")|(?<![A-Za-z0-9_\-])" + _KNOWN_METHOD +
            rb" [\x21-\x7e\x80-\xff]+ HTTP/[0-9]\.[0-9]\r?\n")
_STATUS_ANY = rb"(?<![A-Za-z0-9_\-])" + _STATUS_LINE
REQ_SEARCH_RE = re.compile(_REQ_ANY)
STATUS_SEARCH_RE = re.compile(_STATUS_ANY)
ANY_SEARCH_RE = re.compile(rb"(" + _REQ_ANY + rb")|(" + _STATUS_ANY + rb")")

cdef object _REQ_MATCH = REQ_START_RE.match
cdef object _STATUS_MATCH = STATUS_START_RE.match

STAT_NAMES = (
    "packets", "bytes", "not_ip", "not_tcp", "ip_fragments", "malformed", "truncated_packets",
    "tcp_segments", "filtered", "connections", "midstream_connections", "retransmitted_segments",
    "retransmitted_bytes", "out_of_order_segments", "gaps", "gap_bytes", "buffer_cap_hits",
    "expired_connections", "requests", "responses", "interim_responses", "unpaired_responses",
    "incomplete_messages", "resyncs", "skipped_bytes", "non_http_streams", "upgraded_connections",
    "dropped_head_bytes", "oversize_messages", "oversize_heads",
)


cdef dict _ADDR_TEXT = {}


cdef str _addr(bytes b):
    """The twin's ``_addr``: the text of a 4- or 16-byte address, remembered."""
    cdef const uint8_t* p
    s = _ADDR_TEXT.get(b)
    if s is None:
        if len(_ADDR_TEXT) >= ADDR_TEXT_KEEP:
            _ADDR_TEXT.clear()
        if PyBytes_GET_SIZE(b) == 4:
            p = <const uint8_t*>PyBytes_AS_STRING(b)
            s = f"{p[0]}.{p[1]}.{p[2]}.{p[3]}"
        else:
            s = str(ipaddress.IPv6Address(b))
        _ADDR_TEXT[b] = s
    return s


# -- sequence numbers (RFC 1982; replay.seqnum) --------------------------------------------------
cdef inline int64_t seq_diff(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t half = 0x80000000, mask = 0xFFFFFFFF
    return ((a - b + half) & mask) - half


cdef inline int64_t unwrap(int64_t seq, int64_t near) noexcept nogil:
    cdef int64_t mask = 0xFFFFFFFF
    return near + seq_diff(seq, near & mask)


# -- decoding -------------------------------------------------------------------------------------
cdef struct Pkt:
    int alen              # 4 or 16
    uint8_t src[16]
    uint8_t dst[16]
    int sport
    int dport
    int64_t seq
    int64_t ack
    int flags
    Py_ssize_t pay_off
    Py_ssize_t pay_end
    Py_ssize_t missing


cdef inline bint _is_vlan(int etype) noexcept nogil:
    return etype == 0x8100 or etype == 0x88A8 or etype == 0x9100 or etype == 0x9200


cdef inline bint _is_ip6_ext(int nh) noexcept nogil:
    return nh == 0 or nh == 43 or nh == 60 or nh == 135 or nh == 139 or nh == 140


@cython.boundscheck(False)
@cython.wraparound(False)
cdef int c_decode(int linktype, const uint8_t* f, Py_ssize_t p, Py_ssize_t end, Pkt* r) noexcept nogil:
    """Decode one frame down to TCP: D_TCP with ``r`` filled, or another D_* code."""
    cdef int etype = 0, v, fam, nh, ihl, vihl, doff, plen, total, frag
    cdef Py_ssize_t ip_end
    if linktype == DLT_EN10MB:
        if end - p < 14:
            return D_MALFORMED
        etype = (f[p + 12] << 8) | f[p + 13]
        p += 14
        while _is_vlan(etype):
            if end - p < 4:
                return D_MALFORMED
            etype = (f[p + 2] << 8) | f[p + 3]
            p += 4
        if etype == 0x8847 or etype == 0x8848:
            while True:
                if end - p < 4:
                    return D_MALFORMED
                v = f[p + 2] & 1
                p += 4
                if v:
                    break
            if p >= end:
                return D_MALFORMED
            v = f[p] >> 4
            etype = ETH_IPV4 if v == 4 else (ETH_IPV6 if v == 6 else 0)
        elif etype == ETH_PPPOE_SESSION:
            if end - p < 8:
                return D_MALFORMED
            v = (f[p + 6] << 8) | f[p + 7]
            p += 8
            etype = ETH_IPV4 if v == 0x0021 else (ETH_IPV6 if v == 0x0057 else 0)
    elif linktype == DLT_LINUX_SLL:
        if end - p < 16:
            return D_MALFORMED
        etype = (f[p + 14] << 8) | f[p + 15]
        p += 16
    elif linktype == DLT_LINUX_SLL2:
        if end - p < 20:
            return D_MALFORMED
        etype = (f[p] << 8) | f[p + 1]
        p += 20
    elif linktype == DLT_NULL or linktype == DLT_LOOP:
        if end - p < 4:
            return D_MALFORMED
        if linktype == DLT_LOOP:
            fam = (f[p] << 24) | (f[p + 1] << 16) | (f[p + 2] << 8) | f[p + 3]
        else:
            # host byte order of the capturing machine: a small number in either order
            fam = f[p] | (f[p + 1] << 8) | (f[p + 2] << 16) | (<uint32_t>f[p + 3] << 24)
            if <uint32_t>fam > 0xFFFF:
                fam = (f[p] << 24) | (f[p + 1] << 16) | (f[p + 2] << 8) | f[p + 3]
        p += 4
        etype = ETH_IPV4 if fam == 2 else (ETH_IPV6 if (fam == 10 or fam == 24 or fam == 28 or fam == 30) else 0)
    else:  # raw IP
        if p >= end:
            return D_MALFORMED
        v = f[p] >> 4
        etype = ETH_IPV4 if v == 4 else (ETH_IPV6 if v == 6 else 0)

    if etype == ETH_IPV4:
        if end - p < 20:
            return D_MALFORMED
        vihl = f[p]
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20 or end - p < ihl:
            return D_MALFORMED
        total = (f[p + 2] << 8) | f[p + 3]
        if total == 0:  # TSO/GRO super-frame: length not filled in
            ip_end = end
        else:
            if total < ihl:
                return D_MALFORMED
            ip_end = p + total
        frag = ((f[p + 6] << 8) | f[p + 7]) & 0x3FFF
        if frag:
            return D_FRAGMENT
        if f[p + 9] != 6:
            return D_NOT_TCP
        r.alen = 4
        memcpy(r.src, f + p + 12, 4)
        memcpy(r.dst, f + p + 16, 4)
        p += ihl
    elif etype == ETH_IPV6:
        if end - p < 40:
            return D_MALFORMED
        if f[p] >> 4 != 6:
            return D_MALFORMED
        plen = (f[p + 4] << 8) | f[p + 5]
        ip_end = end if plen == 0 else p + 40 + plen
        nh = f[p + 6]
        r.alen = 16
        memcpy(r.src, f + p + 8, 16)
        memcpy(r.dst, f + p + 24, 16)
        p += 40
        while nh != 6:
            if _is_ip6_ext(nh):
                if end - p < 8:
                    return D_MALFORMED
                nh, p = f[p], p + (f[p + 1] + 1) * 8
            elif nh == 44:
                if end - p < 8:
                    return D_MALFORMED
                if ((f[p + 2] << 8) | f[p + 3]) & 0xFFF9:
                    return D_FRAGMENT
                nh, p = f[p], p + 8
            elif nh == 51:
                if end - p < 8:
                    return D_MALFORMED
                nh, p = f[p], p + (f[p + 1] + 2) * 4
            else:
                return D_NOT_TCP
    else:
        return D_NOT_IP

    if ip_end - p < 20 or end - p < 20:
        return D_MALFORMED
    doff = (f[p + 12] >> 4) * 4
    if doff < 20 or ip_end - p < doff:
        return D_MALFORMED
    r.sport = (f[p] << 8) | f[p + 1]
    r.dport = (f[p + 2] << 8) | f[p + 3]
    r.seq = (<int64_t>f[p + 4] << 24) | (f[p + 5] << 16) | (f[p + 6] << 8) | f[p + 7]
    r.ack = (<int64_t>f[p + 8] << 24) | (f[p + 9] << 16) | (f[p + 10] << 8) | f[p + 11]
    r.flags = f[p + 13]
    r.pay_off = p + doff
    if ip_end > end:  # cut by the snaplen
        r.pay_end = end if end > r.pay_off else r.pay_off
        r.missing = ip_end - r.pay_end
    else:
        r.missing = 0
        r.pay_end = ip_end  # anything after ip_end is link padding
    return D_TCP


def decode(int linktype, frame, Py_ssize_t off=0, Py_ssize_t end=-1):
    """Decode one frame down to TCP; the same result as the twin's ``decode``."""
    cdef Pkt r
    cdef const uint8_t[::1] view = frame
    if end < 0:
        end = view.shape[0]
    if end > view.shape[0] or off < 0 or off > end:
        return (D_MALFORMED,)
    if end == 0:
        code = c_decode(linktype, <const uint8_t*><const char*>b"", 0, 0, &r)
    else:
        code = c_decode(linktype, &view[0], off, end, &r)
    if code != D_TCP:
        return (code,)
    return (D_TCP, PyBytes_FromStringAndSize(<char*>r.src, r.alen),
            PyBytes_FromStringAndSize(<char*>r.dst, r.alen), r.sport, r.dport, r.seq, r.ack,
            r.flags, r.pay_off, r.pay_end, r.missing)


cdef parse_head(bytes head):
    """Parse a message head (RFC 9112 §2-5): ``(is_request, method, uri, status, fields)`` or None."""
    cdef list lines = head.split(b"\n")
    cdef bytes start = lines[0].rstrip(b"\r")
    cdef list parts
    cdef dict fields
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
    fields = {}
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


# -- the head, read in C -------------------------------------------------------------------------
# What ``parse_head`` + ``_content_length`` + ``_is_chunked`` decide, read straight from the buffer
# for the heads that need nothing unusual; anything else (an obs-fold line, a start line that is
# not HTTP/1.x) returns 0 and the Python-object path above decides, so both paths agree with the
# twin byte for byte (test_differential).

cdef struct HeadInfo:
    int is_req
    Py_ssize_t m_end          # method: p[0:m_end]
    Py_ssize_t u_start        # uri: p[u_start:u_end]
    Py_ssize_t u_end
    int status
    int te                    # as _is_chunked: 0 none, 1 chunked last, 2 other
    int64_t cl                # as _content_length: -1 absent, -2 invalid
    int upgrade               # a field named Upgrade

cdef inline bint _ws(char c) noexcept nogil:
    # bytes.strip()'s whitespace
    return c == 32 or c == 9 or c == 10 or c == 13 or c == 11 or c == 12

cdef inline bint _digit(char c) noexcept nogil:
    return 48 <= c <= 57

cdef inline char _lower(char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c

cdef bint _name_is(const char* p, Py_ssize_t a, Py_ssize_t b, const char* name, Py_ssize_t k) noexcept nogil:
    """p[a:b].strip().lower() == name (k bytes, lower case)."""
    cdef Py_ssize_t i
    while a < b and _ws(p[a]):
        a += 1
    while b > a and _ws(p[b - 1]):
        b -= 1
    if b - a != k:
        return False
    for i in range(k):
        if _lower(p[a + i]) != name[i]:
            return False
    return True

cdef int _cl_items(const char* p, Py_ssize_t a, Py_ssize_t b, int64_t* seen, int* nseen) noexcept nogil:
    """The comma-separated Content-Length items of p[a:b] into seen (as _content_length):
    1 fine, -2 invalid."""
    cdef Py_ssize_t s, e, i
    cdef int64_t v
    while True:
        s = a
        while a < b and p[a] != 44:
            a += 1
        e = a
        while s < e and _ws(p[s]):
            s += 1
        while e > s and _ws(p[e - 1]):
            e -= 1
        if e == s:
            return -2
        if e - s > 18:
            return -2
        v = 0
        for i in range(s, e):
            if not _digit(p[i]):
                return -2
            v = v * 10 + (p[i] - 48)
        if nseen[0] == 0:
            seen[0] = v
            nseen[0] = 1
        elif seen[0] != v:
            nseen[0] = 2
        if a >= b:
            return 1
        a += 1          # past the comma

cdef inline Py_ssize_t _line_end(const char* p, Py_ssize_t a, Py_ssize_t n) noexcept nogil:
    """Where the first LF at or after ``a`` is in p[:n], or n."""
    cdef const void* q = memchr(p + a, 10, n - a) if a < n else NULL
    return <const char*>q - p if q != NULL else n


cdef int _read_head(const char* p, Py_ssize_t n, HeadInfo* h) noexcept nogil:
    """The head p[0:n] (it ends with its empty line): 1 read into h, 0 the Python path decides."""
    cdef Py_ssize_t nl, e, i, k, a, s, colon, te_a = -1, te_b = -1
    cdef const void* q
    cdef int64_t seen = 0
    cdef int nseen = 0
    cdef bint cl_bad = False, cl_any = False
    # start line (RFC 9112 §3, §4), as parse_head: rstrip(b"\r"), then split on single spaces
    nl = _line_end(p, 0, n)
    e = nl
    while e > 0 and p[e - 1] == 13:
        e -= 1
    h.upgrade = 0
    h.status = 0
    if e >= 5 and memcmp(p, b"HTTP/", 5) == 0:
        i = 0
        while i < e and p[i] != 32:
            i += 1
        if i + 4 > e or not (_digit(p[i + 1]) and _digit(p[i + 2]) and _digit(p[i + 3])):
            return 0
        if i + 4 < e and p[i + 4] != 32:
            return 0
        h.is_req = 0
        h.status = (p[i + 1] - 48) * 100 + (p[i + 2] - 48) * 10 + (p[i + 3] - 48)
    else:
        i = 0
        while i < e and p[i] != 32:
            i += 1
        if i == 0 or i >= e:
            return 0
        h.m_end = i
        h.u_start = i + 1
        q = memchr(p + i + 1, 32, e - (i + 1)) if i + 1 < e else NULL
        if q == NULL:
            return 0
        k = <const char*>q - p
        h.u_end = k
        # the version: exactly one more part, starting with HTTP/
        for a in range(k + 1, e):
            if p[a] == 32:
                return 0
        if e - (k + 1) < 5 or memcmp(p + k + 1, b"HTTP/", 5) != 0:
            return 0
        h.is_req = 1
    # fields
    a = nl + 1
    while a < n:
        nl = _line_end(p, a, n)
        e = nl
        while e > a and p[e - 1] == 13:
            e -= 1
        if e > a:
            if p[a] == 32 or p[a] == 9:
                return 0        # obs-fold (or a first field that starts with white space)
            q = memchr(p + a, 58, e - a)
            if q != NULL:
                colon = <const char*>q - p
                # the name, stripped as _name_is strips it; then one comparison, by its length
                s = a
                k = colon
                while s < k and _ws(p[s]):
                    s += 1
                while k > s and _ws(p[k - 1]):
                    k -= 1
                k -= s
                if k == 14 and _name_is(p, s, s + 14, b"content-length", 14):
                    cl_any = True
                    if not cl_bad:
                        if _cl_items(p, colon + 1, e, &seen, &nseen) < 0:
                            cl_bad = True
                elif k == 17 and _name_is(p, s, s + 17, b"transfer-encoding", 17):
                    te_a, te_b = colon + 1, e        # the last coding of the last field decides
                elif k == 7 and _name_is(p, s, s + 7, b"upgrade", 7):
                    h.upgrade = 1
        a = nl + 1
    if not cl_any:
        h.cl = -1
    elif cl_bad or nseen != 1:
        h.cl = -2
    else:
        h.cl = seen
    h.te = 0
    if te_a >= 0:
        # b",".join(vals).split(b",")[-1].strip().lower() == b"chunked"
        k = te_b
        while k > te_a and p[k - 1] != 44:
            k -= 1
        h.te = 1 if _name_is(p, k, te_b, b"chunked", 7) else 2
    return 1


cdef inline bint _status_line(const char* p, Py_ssize_t n) noexcept nogil:
    """STATUS_START_RE.match: HTTP/d.d ddd, then [ \t] and any text, then \r?\n."""
    cdef Py_ssize_t i
    if n < 13 or memcmp(p, b"HTTP/", 5) != 0 or not _digit(p[5]) or p[6] != 46 or \
            not _digit(p[7]) or p[8] != 32 or not (_digit(p[9]) and _digit(p[10]) and _digit(p[11])):
        return False
    i = 12
    if p[i] == 32 or p[i] == 9:
        i += 1
        while i < n and p[i] != 13 and p[i] != 10:
            i += 1
    if i < n and p[i] == 13:
        i += 1
    return i < n and p[i] == 10


cdef inline bint _request_line(const char* p, Py_ssize_t n) noexcept nogil:
    """REQ_START_RE.match: a method of [A-Z][A-Z0-9_-]{0,31}, a target, HTTP/d.d, \r?\n."""
    cdef Py_ssize_t i = 1
    cdef unsigned char c
    if n < 1 or not (65 <= p[0] <= 90):
        return False
    while i < n and i <= 32:
        c = p[i]
        if not (65 <= c <= 90 or _digit(c) or c == 95 or c == 45):
            break
        i += 1
    if i >= n or p[i] != 32 or i > 32:
        return False
    i += 1
    if i >= n:
        return False
    c = p[i]
    if not (0x21 <= c <= 0x7e or c >= 0x80):
        return False
    while i < n:
        c = p[i]
        if not (0x21 <= c <= 0x7e or c >= 0x80):
            break
        i += 1
    if i + 9 > n or memcmp(p + i, b" HTTP/", 6) != 0 or not _digit(p[i + 6]) or p[i + 7] != 46 \
            or not _digit(p[i + 8]):
        return False
    i += 9
    if i < n and p[i] == 13:
        i += 1
    return i < n and p[i] == 10


cdef int64_t _content_length(dict fields):
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


cdef int _is_chunked(dict fields):
    vals = fields.get(b"transfer-encoding")
    if not vals:
        return 0
    last = b",".join(vals).split(b",")[-1].strip().lower()
    return 1 if last == b"chunked" else 2  # 2: encoded, but not chunked last


@cython.no_gc      # (its objects are a method and a uri: str or None, never a cycle; a method
                   # given to ResponseFramer.expect is the caller's str)
cdef class _Pending:
    """A request awaiting its response."""

    cdef public int64_t index
    cdef public object method
    cdef public object uri
    cdef public int64_t start
    cdef public int64_t end
    cdef public bint upgrade
    # (made by _new_pending, the twin's constructor)


cdef object _method_text(const char* cp, Py_ssize_t n):
    """A request's method as text: one str for each common method, not a new one a request."""
    if n == 3:
        if memcmp(cp, b"GET", 3) == 0:
            return "GET"
        if memcmp(cp, b"PUT", 3) == 0:
            return "PUT"
    elif n == 4:
        if memcmp(cp, b"POST", 4) == 0:
            return "POST"
        if memcmp(cp, b"HEAD", 4) == 0:
            return "HEAD"
    elif n == 5 and memcmp(cp, b"PATCH", 5) == 0:
        return "PATCH"
    elif n == 6 and memcmp(cp, b"DELETE", 6) == 0:
        return "DELETE"
    elif n == 7 and memcmp(cp, b"OPTIONS", 7) == 0:
        return "OPTIONS"
    return PyUnicode_DecodeLatin1(cp, n, NULL)


cdef extern from "Python.h":
    bint PyUnicode_CheckExact(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)


cdef inline bint _method_is(object m, str name) except -1:
    """``m == name`` for a request's method (a str or None), without a full comparison of two
    strings a message: the common methods are the same objects (``_method_text``), and others
    mostly differ in length. (Cython compares two strs with PyUnicode_Compare: 400,000 calls on
    100,000 exchanges.)"""
    if m is name:
        return True
    if m is None:
        return False
    if PyUnicode_CheckExact(m) and PyUnicode_GET_LENGTH(m) != PyUnicode_GET_LENGTH(name):
        return False
    return m == name


cdef inline _Pending _new_pending(int64_t index, method, uri, int64_t start, bint upgrade):
    """The twin's ``_Pending(...)``, without a call through the type (ints made and read
    back)."""
    cdef _Pending p = _Pending.__new__(_Pending)
    p.index = index
    p.method = method
    p.uri = uri
    p.start = start
    p.end = -1
    p.upgrade = upgrade
    return p


cdef Py_ssize_t MARKS_KEEP = 64   # deliveries a framer's array keeps room for, idle


cdef struct Mark:
    # One delivery into a framer's buffer: where it ends in buf, its capture time, its ack (the
    # twin's 3-item lists; here an array of the framer's own: no object a packet, and no list
    # a framer for the collector to walk)
    Py_ssize_t end
    int64_t ts
    int64_t ack


cdef Py_ssize_t DIRECT_FIRST = 64 << 10   # a message framed into its own memory: at first


@cython.no_gc_clear   # (``rows`` is there for ``__dealloc__``, whatever order a cycle goes in)
cdef class Framer:
    """HTTP/1.x framing of one direction of one connection."""

    cdef Connection conn
    cdef Engine eng
    cdef RowBuffer rows           # the engine's (None: it keeps no rows)
    cdef int side
    cdef public int role
    cdef public int state
    cdef bytearray buf
    cdef int64_t base
    cdef Py_ssize_t pos
    cdef Mark* marks              # the deliveries into buf, in order: nmarks of them
    cdef Py_ssize_t nmarks, marks_cap
    cdef int flags
    cdef int64_t remaining
    cdef int64_t head_len
    cdef int64_t body_len
    cdef object method
    cdef object uri
    cdef int status
    cdef _Pending pending
    cdef _Pending answer
    cdef int64_t produced
    cdef int64_t scanned
    cdef int resync_flag
    cdef bint gap_since_pair
    cdef bint held
    cdef bint truncated_pending
    cdef int64_t lost_upto
    cdef int64_t sniff_from
    # a Content-Length message framed straight into memory of its own (``_go_direct``), which
    # its row takes: head and body so far, and the times of its first and last bytes
    cdef char* dbuf               # NULL: buf holds the message, as always
    cdef Py_ssize_t dlen, dcap
    cdef int64_t d_ts_first, d_ts_last

    def __dealloc__(self):
        if self.dbuf != NULL and self.rows is not None:
            self.rows.spare -= self.dcap - self.dlen
        free(self.dbuf)
        free(self.marks)

    cdef int _mark(self, Py_ssize_t end, int64_t ts, int64_t ack) except -1:
        """A delivery ending at buf[end] (appended)."""
        cdef Py_ssize_t cap
        cdef void* q
        if self.nmarks == self.marks_cap:
            cap = max(8, 2 * self.marks_cap)
            q = realloc(self.marks, cap * sizeof(Mark))
            if q == NULL:
                raise MemoryError()
            self.marks = <Mark*>q
            self.marks_cap = cap
        self.marks[self.nmarks].end = end
        self.marks[self.nmarks].ts = ts
        self.marks[self.nmarks].ack = ack
        self.nmarks += 1
        return 0

    cdef void _marks_clear(self) noexcept:
        """No delivery held (the memory of many given back)."""
        self.nmarks = 0
        if self.marks_cap > MARKS_KEEP:
            free(self.marks)
            self.marks = NULL
            self.marks_cap = 0

    cdef void _marks_drop(self, Py_ssize_t k) noexcept:
        """The first ``k`` deliveries gone; the array's room follows what is left (a message cut
        into thousands of segments does not keep its room on an idle connection)."""
        cdef Py_ssize_t cap
        cdef void* q
        if k >= self.nmarks:
            self._marks_clear()
            return
        memmove(self.marks, self.marks + k, (self.nmarks - k) * sizeof(Mark))
        self.nmarks -= k
        if self.marks_cap > MARKS_KEEP and self.nmarks < self.marks_cap // 4:
            cap = max(MARKS_KEEP, 2 * self.nmarks)
            q = realloc(self.marks, cap * sizeof(Mark))
            if q != NULL:
                self.marks = <Mark*>q
                self.marks_cap = cap

    def __init__(self, Connection conn, int side):
        self._init(conn, side)

    cdef _init(self, Connection conn, int side):
        # (``Stream._init`` calls it, past the type's call and its arguments' parsing: a
        # connection makes two framers, two streams and itself, short ones thousands a second)
        self.conn = conn
        self.eng = conn.engine
        self.rows = self.eng.rows
        self.side = side
        self.role = ROLE_UNKNOWN
        self.state = S_START
        self.buf = bytearray()
        self.base = 0
        self.pos = 0
        self.nmarks = 0
        self.flags = 0
        self.remaining = 0
        self.head_len = 0
        self.body_len = 0
        self.method = None
        self.uri = None
        self.status = 0
        self.pending = None
        self.answer = None
        self.produced = 0
        self.scanned = 0
        self.resync_flag = 0
        self.gap_since_pair = False
        self.held = False
        self.truncated_pending = False
        self.lost_upto = -1
        self.sniff_from = 0

    # -- input from the stream ------------------------------------------------------------------
    cdef feed_ptr(self, const uint8_t* data, Py_ssize_t n, int64_t ts, int64_t ack):
        cdef Py_ssize_t old, take
        if self.state >= S_TUNNEL and self.state != S_RESYNC:
            self.eng.st_skipped_bytes += n
            return
        if self.dbuf != NULL:
            # the body goes straight into the message's memory; what follows its end, as always
            take = n if n < self.remaining else <Py_ssize_t>self.remaining
            if take:
                self._direct_room(take)
                memcpy(self.dbuf + self.dlen, data, take)
                self.dlen += take
                self.rows.spare -= take
                self.remaining -= take
                self.d_ts_last = ts
            if self.remaining == 0:
                self._emit(0, None)
            if take == n:
                return
            data += take
            n -= take
        old = PyByteArray_GET_SIZE(self.buf)
        PyByteArray_Resize(self.buf, old + n)
        if n:
            memcpy(PyByteArray_AS_STRING(self.buf) + old, data, n)
        self._mark(old + n, ts, ack)
        self.run(False)

    cdef gap(self, int64_t n, int64_t ts, bint truncated):
        """``n`` stream bytes were lost at the current end of ``buf``."""
        if n <= 0:
            return
        cdef Engine eng = self.eng
        cdef int lost_flag = CF_GAP | CF_INCOMPLETE | (CF_TRUNCATED if truncated else 0)
        cdef int st = self.state
        if st == S_TUNNEL or st == S_NOT_HTTP:
            return
        self.run(False)  # frame what is complete before the hole
        st = self.state
        cdef Py_ssize_t blen = PyByteArray_GET_SIZE(self.buf)
        if st == S_BODY_LEN and blen - self.pos == 0 and n <= self.remaining:
            # the hole is inside a Content-Length body: framing stays in step
            self.flags |= lost_flag
            self.remaining -= n
            self.base += n
            if self.remaining == 0:
                self._emit(blen, None)
            return
        if st == S_CHUNK_DATA and blen - self.pos == 0 and n <= self.remaining:
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
        if st == S_BODY_LEN or st == S_CHUNK_SIZE or st == S_CHUNK_DATA or st == S_CHUNK_CRLF or st == S_TRAILERS:
            self.flags |= lost_flag
            self._emit(blen, None)
        elif st == S_HEAD or (st == S_START and blen):
            eng.st_dropped_head_bytes += blen
            if self.role == ROLE_CLIENT and self.pending is not None:
                self.pending = None
        elif st == S_WAIT:
            eng.st_skipped_bytes += blen
        self._reset_buf(n)
        self.lost_upto = self.base
        if self.role != ROLE_UNKNOWN or self.produced:
            eng.st_resyncs += 1
        self.state = S_RESYNC
        self.resync_flag = CF_RESYNC
        self.gap_since_pair = True

    cdef eof(self, int64_t ts, bint clean):
        """The direction ended: FIN (clean) or RST / expiry / end of input (not clean)."""
        self.run(True)
        cdef int st = self.state
        cdef Engine eng = self.eng
        cdef Py_ssize_t blen = PyByteArray_GET_SIZE(self.buf)
        if st == S_BODY_CLOSE:
            if not clean:
                self.flags |= CF_INCOMPLETE
            self.flags |= CF_CLOSE_DELIMITED
            self._emit(blen, ts)
        elif st == S_BODY_LEN or st == S_CHUNK_SIZE or st == S_CHUNK_DATA or st == S_CHUNK_CRLF or st == S_TRAILERS:
            self.flags |= CF_INCOMPLETE
            self._emit(blen, ts)
        elif st == S_HEAD or (st == S_START and self.buf.strip(b"\r\n")):
            eng.st_dropped_head_bytes += blen
        elif st == S_RESYNC:
            eng.st_skipped_bytes += blen
            if self.produced == 0 and self.scanned + blen > 0:
                eng.st_non_http_streams += 1
        self.buf = bytearray()
        self._marks_clear()
        self.pos = 0
        if st != S_TUNNEL and st != S_NOT_HTTP:
            self.state = S_TUNNEL if st == S_WAIT else S_START

    # -- framing --------------------------------------------------------------------------------
    cdef _reset_buf(self, int64_t lost):
        self.base += PyByteArray_GET_SIZE(self.buf) + lost
        self.buf = bytearray()
        self._marks_clear()
        self.pos = 0
        self.flags = 0

    cdef int64_t _ts_at(self, Py_ssize_t off) except? -1:
        """The capture time of the delivery that carried buf[off] (the twin's ``_mark_at``'s
        first item; no tuple, no int objects: this runs twice a message)."""
        cdef Py_ssize_t i
        for i in range(self.nmarks):
            if off < self.marks[i].end:
                return self.marks[i].ts
        if self.nmarks == 0:
            raise IndexError("no delivery")
        return self.marks[self.nmarks - 1].ts

    cdef run(self, bint final):
        cdef Engine eng = self.eng
        cdef int st
        cdef bytearray buf
        cdef Py_ssize_t i, n, avail, take, nl
        cdef const char* cbuf
        while True:
            st = self.state
            buf = self.buf
            n = PyByteArray_GET_SIZE(buf)
            if st == S_BODY_LEN:
                avail = n - self.pos
                if avail <= 0:
                    if not final:
                        self._go_direct()
                    return
                take = avail if avail < self.remaining else self.remaining
                self.pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self._emit(self.pos, None)
                else:
                    if not self._oversize():
                        self._go_direct()
                    return
            elif st == S_START:
                if n == 0:
                    return
                # RFC 9112 §2.2: ignore empty lines before a start line
                cbuf = PyByteArray_AS_STRING(buf)
                i = 0
                while i < n and (cbuf[i] == 13 or cbuf[i] == 10):
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
                    if n > eng.max_head:
                        self._cut_head()
                        continue
                    return
                if not self._on_head(end):
                    continue
            elif st == S_CHUNK_SIZE:
                nl = buf.find(b"\n", self.pos)
                if nl < 0:
                    if n - self.pos > 4096:
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
                avail = n - self.pos
                if avail <= 0:
                    return
                take = avail if avail < self.remaining else self.remaining
                self.pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = S_CHUNK_CRLF
                else:
                    self._oversize()
                    return
            elif st == S_CHUNK_CRLF:
                cbuf = PyByteArray_AS_STRING(buf)
                if self.pos < n and cbuf[self.pos] == 13:
                    if self.pos + 1 >= n:
                        return
                    if cbuf[self.pos + 1] != 10:
                        self._bad_chunk()
                        continue
                    self.pos += 2
                elif self.pos < n and cbuf[self.pos] == 10:
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
                    if n - self.pos > eng.max_head:
                        self._bad_chunk()
                        continue
                    return
                line = buf[self.pos:nl]
                self.pos = nl + 1
                if line == b"" or line == b"\r":
                    self._emit(self.pos, None)
            elif st == S_BODY_CLOSE:
                self.pos = n
                self._oversize()
                return
            elif st == S_RESYNC:
                if not self._resync(final):
                    return
            else:  # S_WAIT, S_TUNNEL, S_NOT_HTTP
                return

    cdef _drop_front(self, Py_ssize_t n):
        del self.buf[:n]
        self.base += n
        cdef Py_ssize_t i, k = 0
        for i in range(self.nmarks):
            self.marks[i].end -= n
        while k < self.nmarks and self.marks[k].end <= 0:
            k += 1
        if k:
            self._marks_drop(k)
        self.pos = self.pos - n if self.pos > n else 0

    cdef Py_ssize_t _find_head_end(self):
        # the first b"\n\r\n" or b"\n\n" from pos - 1 (the twin's two finds, whichever is first)
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(self.buf)
        cdef const char* p = PyByteArray_AS_STRING(self.buf)
        cdef Py_ssize_t k = (self.pos if self.pos > 1 else 1) - 1
        cdef const char* q
        while k < n:
            q = <const char*>memchr(p + k, 10, n - k)
            if q == NULL:
                break
            k = q - p
            if k + 1 < n and p[k + 1] == 10:
                return k + 2
            if k + 2 < n and p[k + 1] == 13 and p[k + 2] == 10:
                return k + 3
            k += 1
        self.pos = n - 2 if n > 2 else 0
        return -1

    cdef bint _sniff(self, bint final) except -1:
        """Decide this direction's role from its first bytes."""
        cdef Engine eng = self.eng
        buf = self.buf
        if _REQ_MATCH(buf):
            self.conn.set_role(self.side, ROLE_CLIENT)
            return True
        if _STATUS_MATCH(buf):
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
        for i in range(self.nmarks):
            p = self.marks[i].end
            if p < p0:
                continue
            if p >= start:
                break
            if _REQ_MATCH(buf, p):
                start, role = p, ROLE_CLIENT
                break
            if _STATUS_MATCH(buf, p):
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
        self.resync_flag = CF_RESYNC
        self.conn.set_role(self.side, role)
        return True

    cdef _not_http(self):
        cdef Engine eng = self.eng
        eng.st_non_http_streams += 1
        eng.st_skipped_bytes += PyByteArray_GET_SIZE(self.buf)
        self.buf = bytearray()
        self._marks_clear()
        self.pos = 0
        self.state = S_NOT_HTTP

    cdef bint _start_ok(self, bint final) except -1:
        """In a synchronised stream, is buf at a start line? Otherwise lose sync."""
        buf = self.buf
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(buf)
        cdef const char* p = PyByteArray_AS_STRING(buf)
        if memchr(p, 10, n) == NULL:
            if n > self.eng.max_head:
                self._lose_sync(0)
                return False
            return False  # at the end of input, eof() counts these bytes as a dropped head
        if _request_line(p, n) if self.role == ROLE_CLIENT else _status_line(p, n):
            return True
        self._lose_sync(0)
        return False

    cdef _lose_sync(self, Py_ssize_t skip):
        self.eng.st_resyncs += 1
        self.state = S_RESYNC
        self.resync_flag = CF_RESYNC
        self.flags = 0
        self.gap_since_pair = True

    cdef bint _resync(self, bint final) except -1:
        cdef Engine eng = self.eng
        buf = self.buf
        if self.role == ROLE_UNKNOWN:
            self.state = S_START
            return True
        if not final and len(buf) <= RESYNC_KEEP and buf.find(b"\n") < 0:
            return False    # no line has ended: nothing can match yet (and a search costs)
        rx_match = _REQ_MATCH if self.role == ROLE_CLIENT else _STATUS_MATCH
        if rx_match(buf):
            self.state = S_START
            return True
        rx = REQ_SEARCH_RE if self.role == ROLE_CLIENT else STATUS_SEARCH_RE
        m = rx.search(buf, 1)
        # a start line also counts where a segment began, even if no line ended just before it
        limit = m.start() if m is not None else len(buf)
        for i in range(self.nmarks):
            p = self.marks[i].end
            if p >= limit:
                break
            if p > 0 and rx_match(buf, p):
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

    cdef bint _must_hold(self, bint final) except -1:
        """A response start: wait until the request it answers has been framed."""
        if final:
            return False
        cdef Stream client = self.conn.streams[1 - self.side]
        if not client.synced or client.finished:
            return False
        cdef int64_t ack = self.marks[0].ack if self.nmarks else -1
        if ack < 0:
            return False
        return unwrap(ack, client.nxt) > client.nxt

    cdef bint _on_head(self, Py_ssize_t end) except -1:
        """A complete head is buf[:end]. Returns False when it was not HTTP (state changed)."""
        cdef Connection conn = self.conn
        cdef _Pending p, answer
        cdef int status
        cdef int te
        cdef int64_t cl
        cdef HeadInfo h
        cdef const char* cp = PyByteArray_AS_STRING(self.buf)
        cdef bint is_req
        parsed = None
        if _read_head(cp, end, &h):
            parsed = True
            is_req = h.is_req
            status = h.status
            te = h.te
            cl = h.cl
            if is_req:
                method = _method_text(cp, h.m_end)
                uri = PyUnicode_DecodeLatin1(cp + h.u_start, h.u_end - h.u_start, NULL)
                upgrade = h.upgrade or _method_is(method, "CONNECT")
        else:
            parsed = parse_head(bytes(self.buf[:end]))
            if parsed is None:
                is_req = not (self.role == ROLE_CLIENT)     # a false start, as below
            else:
                is_req, method, uri, status, fields = parsed
                te = _is_chunked(fields)
                cl = _content_length(fields)
                if is_req:
                    upgrade = _method_is(method, "CONNECT") or b"upgrade" in fields
        if parsed is None or is_req != (self.role == ROLE_CLIENT):
            self._lose_sync(0)
            self._drop_front(1)  # move past this false start
            return False
        self.head_len = end
        self.body_len = 0
        self.pos = end
        self.flags |= self.resync_flag | conn.midstream
        self.resync_flag = 0
        if is_req:
            self.method, self.uri, self.status = method, uri, 0
            p = _new_pending(conn.next_index, method, uri, self.base, upgrade)
            conn.next_index += 1
            self.pending = p
            conn.pending.append(p)
            if te == 1:
                self.flags |= CF_CHUNKED
                self.state = S_CHUNK_SIZE
            elif te == 0 and cl > 0:
                self.remaining = cl
                self.body_len = cl
                self.state = S_BODY_LEN
            else:
                self._emit(end, None)
            conn.poke_server()
            return True
        # response
        self.status = status
        answer = self._pair(status)
        self.answer = answer
        self.method = answer.method if answer is not None else None
        self.uri = answer.uri if answer is not None else None
        if 100 <= status < 200:
            self.flags |= CF_INTERIM
            if status == 101:
                self.flags |= CF_UPGRADE
            self._emit(end, None)
            if status == 101:
                conn.start_tunnel()
            return True
        if _method_is(self.method, "HEAD") or status == 204 or status == 304:
            self._emit(end, None)
        elif _method_is(self.method, "CONNECT") and 200 <= status < 300:
            self.flags |= CF_UPGRADE
            self._emit(end, None)
            conn.start_tunnel()
        elif te == 1:
            self.flags |= CF_CHUNKED
            self.state = S_CHUNK_SIZE
        elif te == 2 or cl < 0:
            # RFC 9112 §6.3 rules 4 and 8: neither chunked last nor a valid Content-Length
            self.state = S_BODY_CLOSE
        elif cl == 0:
            self._emit(end, None)
        else:
            if answer is None and self._looks_bodyless(end):
                self._emit(end, None)
            else:
                self.remaining = cl
                self.body_len = cl
                self.state = S_BODY_LEN
        if answer is not None and answer.upgrade and not _method_is(self.method, "CONNECT") \
                and status != 101:
            conn.resume_client()
        elif answer is not None and _method_is(self.method, "CONNECT") \
                and not (200 <= status < 300):
            conn.resume_client()
        return True

    cdef _cut_head(self):
        """The head is longer than ``max_head`` (however it arrived): its first ``max_head`` bytes
        become a message flagged incomplete and truncated, then framing looks for the next start
        line."""
        cdef Connection conn = self.conn
        cdef Engine eng = self.eng
        cdef _Pending p, answer
        cdef Py_ssize_t cut = eng.max_head
        eng.st_oversize_heads += 1
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
        self.flags |= self.resync_flag | conn.midstream | CF_INCOMPLETE | CF_TRUNCATED
        self.resync_flag = 0
        self.status = status
        if is_req:
            self.method, self.uri = method, uri
            p = _new_pending(conn.next_index, method, uri, self.base, False)
            conn.next_index += 1
            self.pending = p
            conn.pending.append(p)
            self._emit(cut, None)
            conn.poke_server()
        else:
            if 100 <= status < 200:
                self.flags |= CF_INTERIM      # a cut 1xx is still interim: the final answer follows
            answer = self._pair(status)
            self.answer = answer
            self.method = answer.method if answer is not None else None
            self.uri = answer.uri if answer is not None else None
            self._emit(cut, None)
            if answer is not None and answer.upgrade:
                conn.resume_client()
        self._lose_sync(0)

    cdef bint _looks_bodyless(self, Py_ssize_t end) except -1:
        """An unpaired response with Content-Length followed at once by another status line is
        the answer to a HEAD we did not see."""
        nxt = self.buf[end:end + 5]
        return len(nxt) == 5 and nxt == b"HTTP/"

    cdef _Pending _pair(self, int status):
        cdef Connection conn = self.conn
        cdef list pend = conn.pending
        cdef int64_t ack = self.marks[0].ack if self.nmarks else -1
        cdef Stream client = conn.streams[1 - self.side]
        cdef bint has_abs = ack >= 0 and client.synced
        cdef int64_t ack_abs = unwrap(ack, client.nxt) if has_abs else 0
        cdef _Pending p0
        if has_abs and pend:
            p0 = pend[0]
            # answers a request that was never captured
            if ack_abs <= p0.start:
                self.eng.st_unpaired_responses += 1
                self.flags |= CF_UNPAIRED
                return None
            if self.gap_since_pair and not (100 <= status < 200):
                # after a loss on this side, skip requests whose responses fell into the hole
                while len(pend) > 1 and (<_Pending>pend[1]).end >= 0 and (<_Pending>pend[1]).end <= ack_abs:
                    pend.pop(0)
                p0 = pend[0]
                if 0 <= p0.end < client.framer.lost_upto <= ack_abs:
                    # it answers a request the capture lost after pend[0], whose own response
                    # fell into this side's hole
                    pend.pop(0)
                    self.eng.st_unpaired_responses += 1
                    self.flags |= CF_UNPAIRED
                    return None
        if not pend:
            self.eng.st_unpaired_responses += 1
            self.flags |= CF_UNPAIRED
            return None
        if 100 <= status < 200 and status != 101:
            return pend[0]
        self.gap_since_pair = False
        p0 = pend[0]
        PyList_SetSlice(pend, 0, 1, NULL)      # (pop(0) without an index object)
        return p0

    cdef _bad_chunk(self):
        self.flags |= CF_INCOMPLETE
        self._emit(self.pos, None)
        self._lose_sync(0)

    cdef int _go_direct(self) except -1:
        """In a Content-Length body, with all of buf this message's: when the rows will keep it
        (``Engine(rows=True)``) and it is of ``direct_from`` bytes or more and no more than
        ``max_message``, the message so far moves to memory of its own, where the rest of its
        body will go as it comes (``feed_ptr``), and which its row takes as it is (``_emit``).
        Framed the same: ``base`` stays where it is, at the message's first byte (as if
        ``buf`` held it, ``dlen`` long: what is set from outside, a SYN's, holds as the twin's),
        ``pos`` is 0, ``buf`` and ``marks`` are empty until the message is out."""
        if self.rows is None or self.dbuf != NULL or self.remaining <= 0:
            return 0
        cdef Py_ssize_t n = PyByteArray_GET_SIZE(self.buf)
        cdef int64_t total = n + self.remaining
        if (total < self.rows.direct_from or total > self.eng.max_message
                or self.pos != n or n == 0 or not self.nmarks):
            return 0
        cdef Py_ssize_t cap = self._direct_cap(n, 0, total)
        cdef char* d = <char*>malloc(cap)
        if d == NULL:
            return 0                # (framed in buf, as always)
        self.dbuf = d
        memcpy(self.dbuf, PyByteArray_AS_STRING(self.buf), n)
        self.dlen = n
        self.dcap = cap
        self.rows.spare += cap - n
        self.d_ts_first = self._ts_at(0)
        self.d_ts_last = self._ts_at(n - 1)
        if not _empty_bytearray(self.buf):
            self.buf = bytearray()
        self._marks_clear()
        self.pos = 0
        return 0

    cdef Py_ssize_t _direct_cap(self, Py_ssize_t need, Py_ssize_t cap, int64_t total):
        """The size of a message's memory (``cap`` now, 0: none yet) that must hold ``need``
        bytes of its ``total``: the whole message while the room the framers' memory has, not
        filled, stays within the rows' ``direct_spare``, so that it is never copied as it grows
        (as many large bodies at once as a busy server sends); beyond it, what it must hold and
        at least 64 KiB at first, then twice its size as it fills: a length a head claims is not
        memory to take."""
        cdef RowBuffer rows = self.rows
        if rows.spare + (total - need) - (cap - self.dlen) <= rows.direct_spare:
            return <Py_ssize_t>total
        cdef Py_ssize_t want = max(2 * cap, need, DIRECT_FIRST)
        return <Py_ssize_t>total if want > total else want

    cdef int _direct_room(self, Py_ssize_t more) except -1:
        """Room in ``dbuf`` for ``more`` bytes (``_direct_cap``)."""
        if self.dlen + more <= self.dcap:
            return 0
        cdef Py_ssize_t cap = self._direct_cap(self.dlen + more, self.dcap,
                                               self.dlen + self.remaining)
        cdef void* p = realloc(self.dbuf, cap)
        if p == NULL:
            raise MemoryError()
        self.rows.spare += cap - self.dcap
        self.dbuf = <char*>p
        self.dcap = cap
        return 0

    cdef Py_ssize_t _drop_direct(self):
        """Let go of a message framed into memory of its own, unfinished: its size (0: none)."""
        cdef Py_ssize_t n = self.dlen if self.dbuf != NULL else 0
        if self.dbuf != NULL:
            self.rows.spare -= self.dcap - self.dlen
        free(self.dbuf)
        self.dbuf = NULL
        self.dlen = self.dcap = 0
        return n

    cdef bint _oversize(self) except -1:
        cdef Engine eng = self.eng
        if self.pos > eng.max_message:
            eng.st_oversize_messages += 1
            self.flags |= CF_INCOMPLETE | CF_TRUNCATED
            self._emit(self.pos, None)
            self._lose_sync(0)
            return True
        return False

    cdef _emit(self, Py_ssize_t end, object ts_end):
        cdef Connection conn = self.conn
        cdef Engine eng = self.eng
        cdef _Pending p, a
        cdef int64_t index
        cdef int kind
        cdef Py_ssize_t k, nm
        cdef bint direct = self.dbuf != NULL     # (the message is dbuf[:dlen]; buf is empty)
        cdef int64_t ts_first, ts_last
        cdef char* dbuf
        cdef void* q
        if direct:
            end = self.dlen
            ts_first = self.d_ts_first
            ts_last = self.d_ts_last
        else:
            if self.state == S_BODY_CLOSE:
                self.body_len = end - self.head_len
            ts_first = self._ts_at(0)
            ts_last = self._ts_at(end - 1) if end > 0 else ts_first
            if ts_end is not None and not self.nmarks:
                ts_last = ts_end
        cdef int flags = self.flags
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
            if flags & CF_INTERIM:
                eng.st_interim_responses += 1
        if flags & CF_INCOMPLETE:
            eng.st_incomplete_messages += 1
        if self.truncated_pending:
            flags |= CF_TRUNCATED
        cdef Py_ssize_t head_len = self.head_len if self.head_len <= end else end
        if direct:
            dbuf = self.dbuf
            self.rows.spare -= self.dcap - end
            if self.dcap > end:         # (the room not used, given back)
                q = realloc(dbuf, max(end, 1))
                if q != NULL:
                    dbuf = <char*>q
            self.dbuf = NULL        # the row takes it
            self.dlen = self.dcap = 0
            (<RowBuffer>eng.rows).add(kind, conn.id, index, ts_first, ts_last, conn.client,
                                      conn.server, flags, dbuf, end, self.method, self.uri,
                                      self.status, self.body_len, head_len, True)
        elif eng.rows is not None:
            (<RowBuffer>eng.rows).add(kind, conn.id, index, ts_first, ts_last, conn.client,
                                      conn.server, flags, PyByteArray_AS_STRING(self.buf), end,
                                      self.method, self.uri, self.status, self.body_len, head_len)
        else:
            data = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self.buf), end)
            eng.out.append(_message(kind, conn.id, index, ts_first, ts_last, conn.client,
                                    conn.server, flags, data, self.method, self.uri, self.status,
                                    self.body_len, head_len))
        self.produced += 1
        self.base += end
        if not direct:              # (direct: buf and marks are empty)
            # cut buf at end
            # (all of it: emptied keeping its memory, for the next message, where it can be)
            if not (end == PyByteArray_GET_SIZE(self.buf) and _empty_bytearray(self.buf)):
                del self.buf[:end]
            nm = self.nmarks
            k = 0
            while k < nm and self.marks[k].end <= end:
                k += 1
            if k == nm:
                if nm and PyByteArray_GET_SIZE(self.buf):
                    self.marks[0] = self.marks[nm - 1]      # (the last one's time, from 0)
                    self.marks[0].end = 0
                    self._marks_drop(nm - 1)                # (one left: its room given back)
                else:
                    self._marks_clear()
            elif k:
                self._marks_drop(k)
            for k in range(self.nmarks):
                self.marks[k].end -= end
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
        if kind == CKIND_REQUEST and conn.pending and (<_Pending>conn.pending[-1]).upgrade and index == (<_Pending>conn.pending[-1]).index:
            self.state = S_WAIT


cdef class Stream:
    """One direction of a TCP connection: reassembly into an in-order byte stream."""

    cdef Connection conn
    cdef Engine eng
    cdef int side
    cdef bint synced          # the twin's ``nxt is not None``
    cdef int64_t nxt          # absolute offset of the next byte expected
    cdef list ooo             # [start, end, data, ts, ack, missing] beyond a hole, sorted by start
                              # (None until the first)
    cdef int64_t ooo_bytes
    cdef bint has_fin
    cdef int64_t fin          # absolute offset where the FIN sits
    cdef bint finished
    cdef bint has_peer_ack
    cdef int64_t peer_ack     # highest absolute offset the peer acknowledged
    cdef Framer framer
    cdef bint syn_seen
    cdef int64_t isn

    def __init__(self, Connection conn, int side):
        self._init(conn, side)

    cdef _init(self, Connection conn, int side):
        self.conn = conn
        self.eng = conn.engine
        self.side = side
        self.synced = False
        self.nxt = 0
        self.ooo = None           # (made at the first segment beyond a hole: most streams have none)
        self.ooo_bytes = 0
        self.has_fin = False
        self.fin = 0
        self.finished = False
        self.has_peer_ack = False
        self.peer_ack = 0
        self.framer = Framer.__new__(Framer)
        self.framer._init(conn, side)
        self.syn_seen = False
        self.isn = -1

    cdef segment(self, int64_t seq, const uint8_t* data, Py_ssize_t n, int64_t ts, int64_t ack,
                 Py_ssize_t missing, bint fin):
        cdef Engine eng = self.eng
        cdef int64_t start, end
        if not self.synced:
            if n == 0 and missing == 0 and not fin:
                return
            self.synced = True
            self.nxt = seq  # first byte seen: a midstream start
            self.framer.base = seq
            self.conn.mark_midstream()
        start = unwrap(seq, self.nxt)
        end = start + n + missing
        if fin:
            self.has_fin = True
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
                eng.st_retransmitted_bytes += (self.nxt if self.nxt < start + n else start + n) - start
            self._deliver(start, data, n, ts, ack, missing)
            if self.ooo:
                self._drain()
        elif n or missing:
            eng.st_out_of_order_segments += 1
            self._insert(start, end, PyBytes_FromStringAndSize(<const char*>data, n), ts, ack, missing)
            self._check_hole()
        self._check_fin(ts, True)

    cdef _deliver(self, int64_t start, const uint8_t* data, Py_ssize_t n, int64_t ts, int64_t ack,
                  Py_ssize_t missing):
        cdef int64_t skip = self.nxt - start
        cdef Framer fr = self.framer
        cdef int64_t gap_start, lost
        if skip < n:
            fr.feed_ptr(data + skip, n - skip, ts, ack)
            self.nxt = start + n
        if missing:
            gap_start = start + n
            lost = gap_start + missing - (self.nxt if self.nxt > gap_start else gap_start)
            if lost > 0:
                fr.truncated_pending = True
                self.eng.st_gaps += 1
                self.eng.st_gap_bytes += lost
                fr.gap(lost, ts, True)
                self.nxt = start + n + missing

    cdef _insert(self, int64_t start, int64_t end, bytes data, int64_t ts, int64_t ack, Py_ssize_t missing):
        if self.ooo is None:
            self.ooo = []
        cdef list ooo = self.ooo
        cdef Py_ssize_t i = len(ooo)
        while i > 0 and <int64_t>ooo[i - 1][0] > start:
            i -= 1
        ooo.insert(i, [start, end, data, ts, ack, missing])
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        self.ooo_bytes += n
        cdef Engine eng = self.eng
        eng.total_ooo += n
        if self.ooo_bytes > eng.max_stream_buffer:
            eng.st_buffer_cap_hits += 1
            self.skip_hole()
        elif eng.total_ooo > eng.max_total_buffer:
            eng.st_buffer_cap_hits += 1
            eng.relieve()

    cdef _drain(self):
        cdef list ooo = self.ooo
        cdef Engine eng = self.eng
        cdef bytes data
        cdef Py_ssize_t n
        while ooo and <int64_t>ooo[0][0] <= self.nxt:
            start, end, data, ts, ack, missing = ooo.pop(0)
            n = PyBytes_GET_SIZE(data)
            self.ooo_bytes -= n
            eng.total_ooo -= n
            if end > self.nxt:
                self._deliver(start, <const uint8_t*>PyBytes_AS_STRING(data), n, ts, ack, missing)
            else:
                eng.st_retransmitted_segments += 1
                eng.st_retransmitted_bytes += n

    cdef skip_hole(self):
        """Declare the hole before the first waiting segment lost, and go on after it."""
        if not self.ooo:
            return
        cdef list first = self.ooo[0]
        cdef int64_t lost = <int64_t>first[0] - self.nxt
        cdef Engine eng = self.eng
        eng.st_gaps += 1
        eng.st_gap_bytes += lost
        self.framer.gap(lost, first[3], False)
        self.nxt = first[0]
        self._drain()

    cdef _check_hole(self):
        while self.ooo and self.has_peer_ack and self.peer_ack >= <int64_t>self.ooo[0][0] and self.peer_ack > self.nxt:
            self.skip_hole()

    cdef on_peer_ack(self, int64_t ack):
        if not self.synced:
            return
        cdef int64_t a = unwrap(ack, self.nxt)
        if not self.has_peer_ack or a > self.peer_ack:
            self.has_peer_ack = True
            self.peer_ack = a
            if self.ooo:
                self._check_hole()
                self._check_fin(0, False)

    cdef _check_fin(self, int64_t ts, bint has_ts):
        if self.has_fin and not self.finished and self.synced and self.nxt >= self.fin:
            if not self.ooo or <int64_t>self.ooo[0][0] >= self.fin:
                self.finished = True
                self.framer.eof(ts if has_ts else self.conn.last_ts, True)
                self.conn.stream_done()

    cdef flush(self, bint clean):
        """Connection over: deliver whatever waits, marking holes, then end the framer."""
        while self.ooo:
            self.skip_hole()
        if not self.finished:
            self.finished = True
            self.framer.eof(self.conn.last_ts, clean)


cdef class Connection:
    cdef Engine engine
    cdef int64_t id
    cdef object key
    cdef object src, dst          # the first packet's addresses (bytes) and ports
    cdef int sport, dport
    cdef tuple streams
    cdef bint side0_first         # side 0 is the first endpoint of the key
    cdef int client_side
    cdef object client
    cdef object server
    cdef list pending             # requests awaiting responses, in order
    cdef int64_t next_index
    cdef int midstream
    cdef int64_t last_ts
    cdef bint closed
    cdef bint tunnel

    def __init__(self, Engine engine, int64_t cid, key, src, int sport, dst, int dport):
        self._init(engine, cid, key, src, sport, dst, dport)

    cdef _init(self, Engine engine, int64_t cid, key, src, int sport, dst, int dport):
        self.engine = engine
        self.id = cid
        self.key = key
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        cdef Stream s0 = Stream.__new__(Stream), s1 = Stream.__new__(Stream)
        s0._init(self, 0)
        s1._init(self, 1)
        self.streams = (s0, s1)
        self.side0_first = True
        self.client_side = -1
        self.client = None
        self.server = None
        self.pending = []
        self.next_index = 0
        self.midstream = 0
        self.last_ts = 0
        self.closed = False
        self.tunnel = False

    cdef set_client(self, int side):
        if self.client_side >= 0:
            return
        self.client_side = side
        cdef int c = side, s = 1 - side
        self.client = (_addr(self.src), self.sport) if c == 0 else (_addr(self.dst), self.dport)
        self.server = (_addr(self.dst), self.dport) if c == 0 else (_addr(self.src), self.sport)
        (<Stream>self.streams[c]).framer.role = ROLE_CLIENT
        (<Stream>self.streams[s]).framer.role = ROLE_SERVER

    cdef set_role(self, int side, int role):
        self.set_client(side if role == ROLE_CLIENT else 1 - side)

    cdef mark_midstream(self):
        if not self.midstream and not ((<Stream>self.streams[0]).syn_seen or (<Stream>self.streams[1]).syn_seen):
            self.midstream = CF_MIDSTREAM
            self.engine.st_midstream_connections += 1

    cdef poke_server(self):
        if self.client_side < 0:
            return
        cdef Framer fr = (<Stream>self.streams[1 - self.client_side]).framer
        if fr.held:
            fr.run(False)

    cdef start_tunnel(self):
        cdef Framer fr
        self.tunnel = True
        self.engine.st_upgraded_connections += 1
        for st in self.streams:
            fr = (<Stream>st).framer
            self.engine.st_skipped_bytes += fr._drop_direct()
            if PyByteArray_GET_SIZE(fr.buf):
                self.engine.st_skipped_bytes += PyByteArray_GET_SIZE(fr.buf)
            fr.buf = bytearray()
            fr._marks_clear()
            fr.pos = 0
            fr.state = S_TUNNEL

    cdef resume_client(self):
        if self.client_side < 0:
            return
        cdef Framer fr = (<Stream>self.streams[self.client_side]).framer
        if fr.state == S_WAIT:
            fr.state = S_START
            fr.run(False)

    cdef stream_done(self):
        if (<Stream>self.streams[0]).finished and (<Stream>self.streams[1]).finished:
            self.engine._close_conn(self, True)

    cdef finish(self, bint clean):
        # the client's bytes first, so that held responses find their requests
        cdef Framer fr
        cdef tuple order = (0, 1)
        if self.client_side >= 0:
            order = (self.client_side, 1 - self.client_side)
        for side in order:
            (<Stream>self.streams[side]).flush(clean)
        for side in order:
            fr = (<Stream>self.streams[side]).framer
            if fr.held:
                fr.run(True)
                fr.eof(self.last_ts, clean)


@cython.auto_pickle(False)
cdef class Engine:
    """Packets in, HTTP messages out. One Engine per capture.

    With ``track_closed=True`` the engine also reports which connections ended (both FINs, an
    RST, idle for ``idle_timeout``, a SYN reusing the 4-tuple, ``finish()``): ``take_closed()``
    returns their ids (``Message.conn``) in closing order. A close flushes what its connection
    still held into the output of the same ``feed``/``feed_batch``/``finish`` call, so a caller
    that handles a call's messages first and ``take_closed()`` after sees each connection's last
    message before its close. Off (the default), nothing is kept.
    """

    copies_input = True     # a batch's buffer may be reused once feed_batch returns

    cdef readonly int linktype
    cdef readonly frozenset ports
    cdef uint8_t* port_map        # 65,536 flags, when ``ports`` are given (NULL: any port)
    cdef bint any_port
    cdef public int64_t max_stream_buffer
    cdef public int64_t max_total_buffer
    cdef public int64_t idle_timeout_ns
    cdef public int64_t max_message
    cdef public int64_t max_head
    cdef dict conns
    cdef list recent              # CONN_CACHE connections by a hash of their key (see _packet)
    cdef int64_t next_id
    cdef list out
    cdef readonly bint track_closed
    cdef readonly object rows     # a RowBuffer (rows=True): finished messages go there
    cdef list closed_ids
    cdef list dead                # closed connections, their cycles to break (_take)
    cdef int64_t total_ooo
    cdef int64_t now
    cdef int64_t next_sweep
    cdef public int64_t st_packets, st_bytes, st_not_ip, st_not_tcp, st_ip_fragments, st_malformed
    cdef public int64_t st_truncated_packets, st_tcp_segments, st_filtered, st_connections
    cdef public int64_t st_midstream_connections, st_retransmitted_segments, st_retransmitted_bytes
    cdef public int64_t st_out_of_order_segments, st_gaps, st_gap_bytes, st_buffer_cap_hits
    cdef public int64_t st_expired_connections, st_requests, st_responses, st_interim_responses
    cdef public int64_t st_unpaired_responses, st_incomplete_messages, st_resyncs, st_skipped_bytes
    cdef public int64_t st_non_http_streams, st_upgraded_connections, st_dropped_head_bytes
    cdef public int64_t st_oversize_messages, st_oversize_heads

    def __init__(self, linktype, ports=(), max_stream_buffer=MAX_STREAM_BUFFER,
                 max_total_buffer=MAX_TOTAL_BUFFER, idle_timeout=IDLE_TIMEOUT,
                 max_message=MAX_MESSAGE, max_head=MAX_HEAD, track_closed=False, rows=False):
        if linktype not in SUPPORTED_LINKTYPES:
            raise InputError(f"unsupported link type {linktype}")
        self.linktype = linktype
        self.ports = frozenset(ports)
        self.any_port = not self.ports
        if not self.any_port and self.port_map == NULL:
            # (on the heap, and only then: a response framer's engine, one per connection of
            # a replay, would zero 64 KiB of fresh memory as the connection opens)
            self.port_map = <uint8_t*>calloc(65536, 1)
            if self.port_map == NULL:
                raise MemoryError()
        if self.port_map != NULL:
            memset(self.port_map, 0, 65536)
            for p in self.ports:
                if 0 <= p < 65536:
                    self.port_map[p] = 1
        self.max_stream_buffer = max_stream_buffer
        self.max_total_buffer = max_total_buffer
        self.idle_timeout_ns = int(idle_timeout * 1e9)
        self.max_message = max_message
        self.max_head = max_head
        self.conns = {}
        self.recent = [None] * CONN_CACHE
        self.next_id = 0
        self.out = []
        self.track_closed = bool(track_closed)
        self.rows = RowBuffer() if rows else None
        self.closed_ids = []
        self.dead = []
        self.total_ooo = 0
        self.now = 0
        self.next_sweep = 0
        for name in STAT_NAMES:
            setattr(self, "st_" + name, 0)

    def __cinit__(self, *args, **kwargs):
        self.any_port = True          # (until __init__ says otherwise: port_map is NULL)

    def __dealloc__(self):
        free(self.port_map)

    # -- input ----------------------------------------------------------------------------------
    def feed_batch(self, buf, meta):
        """Packets in pcapy-ng ``next_batch`` layout. Returns the messages completed."""
        cdef Py_buffer bb, mb
        cdef const uint32_t* rec
        cdef Py_ssize_t i, count, off, caplen
        PyObject_GetBuffer(buf, &bb, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(meta, &mb, PyBUF_SIMPLE)
            try:
                rec = <const uint32_t*>mb.buf
                count = mb.len // 16
                for i in range(count):
                    off = rec[4 * i + 2]
                    caplen = rec[4 * i + 3]
                    if off + caplen > bb.len:
                        raise InputError("packet batch: record points past the buffer")
                    self._packet(<int64_t>rec[4 * i] * 1_000_000_000 + <int64_t>rec[4 * i + 1] * 1000,
                                 <const uint8_t*>bb.buf + off, caplen)
            finally:
                PyBuffer_Release(&mb)
        finally:
            PyBuffer_Release(&bb)
        return self._take()

    def feed(self, int64_t ts_ns, frame):
        """One packet. Returns the messages completed."""
        cdef const uint8_t[::1] view = frame
        cdef Py_ssize_t n = view.shape[0]
        if n == 0:
            self._packet(ts_ns, <const uint8_t*><const char*>b"", 0)
        else:
            self._packet(ts_ns, &view[0], n)
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

    cdef list _take(self):
        cdef Connection conn
        if self.dead:       # break each closed connection's cycle: none of its code runs now
            for conn in self.dead:
                conn.streams = ()
            self.dead = []
        out = self.out
        self.out = []
        return out

    def _take_py(self):
        return self._take()

    # -- per packet -----------------------------------------------------------------------------
    cdef _packet(self, int64_t ts, const uint8_t* frame, Py_ssize_t caplen):
        cdef Pkt r
        cdef int code, side, c
        cdef bint first, has_data
        cdef uint8_t keybuf[36]
        cdef int klen
        cdef Py_ssize_t slot
        cdef Connection conn
        cdef Stream st
        cdef int64_t seq
        self.st_packets += 1
        self.st_bytes += caplen
        if ts > self.now:
            self.now = ts
        if self.now >= self.next_sweep:
            self._sweep()
        code = c_decode(self.linktype, frame, 0, caplen, &r)
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
        if not self.any_port and not self.port_map[r.sport] and not self.port_map[r.dport]:
            self.st_filtered += 1
            return
        self.st_tcp_segments += 1
        if r.missing:
            self.st_truncated_packets += 1
        # the key names the two endpoints in a fixed order: (address, port) of the smaller first
        c = memcmp(r.src, r.dst, r.alen)
        first = c < 0 or (c == 0 and r.sport <= r.dport)
        if first:
            memcpy(keybuf, r.src, r.alen)
            memcpy(keybuf + r.alen, r.dst, r.alen)
            _put_ports(keybuf + 2 * r.alen, r.sport, r.dport)
        else:
            memcpy(keybuf, r.dst, r.alen)
            memcpy(keybuf + r.alen, r.src, r.alen)
            _put_ports(keybuf + 2 * r.alen, r.dport, r.sport)
        # the connection: first where this key's hash last put one (most packets: no key object
        # made, no dict lookup), then in ``conns``; a connection closed is never taken from there
        klen = 2 * r.alen + 4
        slot = _key_slot(keybuf, klen)
        cobj = self.recent[slot]
        if cobj is not None and not (<Connection>cobj).closed \
                and PyBytes_GET_SIZE((<Connection>cobj).key) == klen \
                and memcmp(PyBytes_AS_STRING((<Connection>cobj).key), keybuf, klen) == 0:
            key = (<Connection>cobj).key
        else:
            key = PyBytes_FromStringAndSize(<char*>keybuf, klen)
            cobj = self.conns.get(key)
            if cobj is not None:
                self.recent[slot] = cobj
        has_data = r.pay_end > r.pay_off or r.missing
        if cobj is not None:
            conn = <Connection>cobj
            side = 0 if first == conn.side0_first else 1
            if r.flags & TH_SYN and not r.flags & TH_ACK:
                # a SYN on a known 4-tuple: a retransmitted SYN, or the port was reused
                st = conn.streams[side]
                if not (st.syn_seen and st.isn == r.seq):
                    self._close_conn(conn, False)
                    cobj = None
        if cobj is None:
            if not (r.flags & TH_SYN or has_data):
                return
            conn = Connection.__new__(Connection)
            conn._init(self, self.next_id, key,
                       PyBytes_FromStringAndSize(<char*>r.src, r.alen), r.sport,
                       PyBytes_FromStringAndSize(<char*>r.dst, r.alen), r.dport)
            conn.side0_first = first
            self.next_id += 1
            self.conns[key] = conn
            self.recent[slot] = conn
            self.st_connections += 1
            side = 0
        conn.last_ts = ts
        st = conn.streams[side]
        seq = r.seq
        if r.flags & TH_SYN:
            if not st.synced or not st.syn_seen:
                st.syn_seen = True
                st.isn = seq
                st.synced = True
                st.nxt = (seq + 1) & SEQ_MASK
                st.framer.base = st.nxt
                conn.set_client(side if not r.flags & TH_ACK else 1 - side)
            seq = (seq + 1) & SEQ_MASK
        if r.flags & TH_ACK:
            (<Stream>conn.streams[1 - side]).on_peer_ack(r.ack)
        if has_data or r.flags & TH_FIN:
            st.segment(seq, frame + r.pay_off, r.pay_end - r.pay_off, ts,
                       r.ack if r.flags & TH_ACK else -1, r.missing, r.flags & TH_FIN)
        if r.flags & TH_RST and not conn.closed:
            self._close_conn(conn, False)

    # -- connection life ------------------------------------------------------------------------
    def close(self, conn):
        self._close_conn(conn, True)

    cdef _close_conn(self, Connection conn, bint clean):
        if conn.closed:
            return
        conn.closed = True
        conn.finish(clean)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        slot = _key_slot(<const uint8_t*>PyBytes_AS_STRING(conn.key), PyBytes_GET_SIZE(conn.key))
        if self.recent[slot] is conn:        # (it would keep the connection's memory)
            self.recent[slot] = None
        for st in conn.streams:
            self.total_ooo -= (<Stream>st).ooo_bytes
            (<Stream>st).ooo_bytes = 0
        if self.track_closed:
            self.closed_ids.append(conn.id)
        self.dead.append(conn)

    cdef _sweep(self):
        self.next_sweep = self.now + 1_000_000_000
        cdef int64_t limit = self.now - self.idle_timeout_ns
        for conn in [c for c in self.conns.values() if (<Connection>c).last_ts < limit]:
            self.st_expired_connections += 1
            self._close_conn(conn, False)

    def relieve(self):
        """All streams together hold too much beyond holes: give up the largest hole."""
        cdef Stream worst, s
        while self.total_ooo > self.max_total_buffer:
            worst = None
            for conn in self.conns.values():
                for st in (<Connection>conn).streams:
                    s = st
                    if s.ooo and (worst is None or s.ooo_bytes > worst.ooo_bytes):
                        worst = s
            if worst is None:
                return
            worst.skip_hole()


cdef extern from "Python.h":
    ctypedef struct PyByteArrayObject:
        Py_ssize_t ob_alloc
        char* ob_bytes
        char* ob_start
        Py_ssize_t ob_exports
    void Py_SET_SIZE(object o, Py_ssize_t size)
    int PY_VERSION_HEX
    # (a cut of a list without slice objects; NULL: delete)
    int PyList_SetSlice(object lst, Py_ssize_t low, Py_ssize_t high, PyObject* itemlist) except -1


cdef inline bint _empty_bytearray(bytearray b) noexcept:
    """Empty ``b`` keeping its allocation (``del b[:]`` gives it back, and the next message,
    if at least half as long, takes it again), unless a buffer of it is exported, the
    allocation is over ``KEEP_BUFFER`` (a small message's: thousands of idle connections then
    hold a few MiB, not a large buffer each), or the bytearray's layout may not be the one
    declared here (CPython after 3.14): False then, and ``b`` is as it was."""
    cdef PyByteArrayObject* o = <PyByteArrayObject*>b
    if PY_VERSION_HEX >= 0x030F0000 or o.ob_exports > 0 or o.ob_bytes == NULL \
            or o.ob_alloc > KEEP_BUFFER:
        return False
    o.ob_start = o.ob_bytes
    Py_SET_SIZE(b, 0)
    o.ob_bytes[0] = 0               # (the trailing null a bytearray keeps)
    return True


cdef inline Py_ssize_t _key_slot(const uint8_t* key, Py_ssize_t n) noexcept nogil:
    """Where ``Engine.recent`` keeps the connection of this key: the string tables' hash of its
    bytes, eight at a time (a key is 12 bytes, 36 for IPv6; FNV-1a byte by byte was 2 % of a
    convert)."""
    return <Py_ssize_t>(_text_hash(<const char*>key, n) & <uint64_t>(CONN_CACHE - 1))


cdef inline void _put_ports(uint8_t* p, int a, int b) noexcept nogil:
    p[0] = a >> 8
    p[1] = a & 0xFF
    p[2] = b >> 8
    p[3] = b & 0xFF


class ResponseFramer:
    """The responses a server sends on one connection, framed by the same rules as a capture.

    See the twin's docstring: ``expect(method)``, ``feed(data, ts_ns)``, ``eof(ts_ns)``.
    """

    def __init__(self, client=("", 0), server=("", 0), max_message=MAX_MESSAGE, max_head=MAX_HEAD):
        eng = Engine(DLT_RAW, max_message=max_message, max_head=max_head)
        self._eng = eng
        self._state = _ResponseState(eng, tuple(client), tuple(server))
        self.closed = False

    def expect(self, method):
        """A request with this method was sent: the next response not yet framed answers it."""
        self._state.expect(method)

    @property
    def outstanding(self):
        """Requests sent whose final response has not been framed."""
        return self._state.outstanding()

    @property
    def tunnel(self):
        """A 101 or a CONNECT 2xx ended HTTP on this connection."""
        return self._state.is_tunnel()

    def feed(self, data, ts_ns):
        if data:
            self._state.feed(data, ts_ns)
        return self._eng._take_py()

    def eof(self, ts_ns):
        """The server closed the connection: a close-delimited body ends here, others are cut."""
        if not self.closed:
            self.closed = True
            self._state.eof(ts_ns)
        return self._eng._take_py()

    def stats(self):
        return self._eng.stats()


cdef class _ResponseState:
    """The connection behind a ResponseFramer: only its server side carries bytes."""

    cdef Connection conn
    cdef Framer framer

    def __init__(self, Engine eng, tuple client, tuple server):
        cdef Connection conn = Connection(eng, 0, None, b"", client[1], b"", server[1])
        conn.client_side = 0
        conn.client = client
        conn.server = server
        (<Stream>conn.streams[0]).framer.role = ROLE_CLIENT
        self.framer = (<Stream>conn.streams[1]).framer
        self.framer.role = ROLE_SERVER
        self.framer.base = 0
        self.conn = conn

    def expect(self, method):
        cdef Connection conn = self.conn
        conn.pending.append(_new_pending(conn.next_index, method, None, 0, method == "CONNECT"))
        conn.next_index += 1

    def outstanding(self):
        return len(self.conn.pending) + (self.framer.answer is not None)

    def is_tunnel(self):
        return self.conn.tunnel

    def feed(self, data, int64_t ts):
        cdef const uint8_t[::1] view
        if type(data) is bytes:         # (what a socket read gives: no buffer to acquire)
            self.framer.feed_ptr(<const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                                 ts, -1)
            return
        view = data
        self.framer.feed_ptr(&view[0], view.shape[0], ts, -1)

    def eof(self, int64_t ts):
        self.conn.last_ts = ts
        self.framer.eof(ts, True)


# -- classic pcap records -------------------------------------------------------------------------

cdef inline uint32_t _u32(const uint8_t* p, bint big) noexcept nogil:
    if big:
        return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]
    return (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]


def pcap_records(buf, Py_ssize_t start, Py_ssize_t end, bint swapped, bint nano,
                 uint32_t snapshot, Py_ssize_t max_packets):
    """The twin's ``pcap_records``: the records written from C, in one pass over the buffer."""
    cdef Py_buffer view
    cdef const uint8_t* b
    cdef Py_ssize_t pos = start, n = 0, nbytes = 0
    cdef uint32_t caplen, frac
    cdef uint32_t* rec
    cdef bint odd = False
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if start < 0 or end > view.len or start > end or max_packets < 0 \
                or end - start > 0xFFFFFFFF:
            raise ValueError("pcap_records: bounds outside the buffer")
        out = PyBytes_FromStringAndSize(NULL, 16 * min(max_packets, (end - start) // 16))
        rec = <uint32_t*>PyBytes_AS_STRING(out)
        b = <const uint8_t*>view.buf
        with nogil:
            while n < max_packets and end - pos >= 16:
                caplen = _u32(b + pos + 8, swapped)
                frac = _u32(b + pos + 4, swapped)
                if caplen > snapshot or (nano and frac >= 1_000_000_000):
                    odd = True
                    break
                if end - pos - 16 < caplen:
                    break
                rec[4 * n] = _u32(b + pos, swapped)
                rec[4 * n + 1] = frac // 1000 if nano else frac
                rec[4 * n + 2] = <uint32_t>(pos + 16 - start)
                rec[4 * n + 3] = caplen
                nbytes += caplen
                pos += 16 + caplen
                n += 1
    finally:
        PyBuffer_Release(&view)
    return out[:16 * n], pos, odd, nbytes


# -- JSON bodies compared in lockstep ----------------------------------------------------------
#
# The twin of ``json_diff`` in ``replay._fastparse_py``, whose comments give the rules: the same
# walk over two ``const unsigned char*`` cursors, without a Python object per token. The walking
# functions return 1 (compared: the cursors are past both values), 0 (give up: the caller
# parses) or -1 (a Python error); only the differing paths become Python strings, collected in a
# list that reaches ``out`` only when the walk succeeds. Every byte is read through a pointer
# checked against its text's end.

from libc.stdlib cimport calloc, free, malloc, qsort, realloc

from cpython.set cimport PySet_Add

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    unsigned char* PyUnicode_1BYTE_DATA(object o)

cdef enum:
    JD_MAX_DEPTH = 64       # a container this deep or deeper gives up
    JD_MAX_NUMBER = 640     # a longer number token gives up
    JD_INLINE_KEYS = 32     # keys held without malloc
    JD_LINEAR_KEYS = 16     # an object's first keys are checked for repeats one by one; beyond,
                            # all of its keys are sorted and checked when it closes

JSON_DIFF_MAX_DEPTH = JD_MAX_DEPTH
JSON_DIFF_MAX_NUMBER = JD_MAX_NUMBER

# Kinds of scalar tokens
cdef enum:
    JK_STR = 0              # a string without a backslash: its bytes are its value
    JK_STR_ESC = 1          # a string with an escape
    JK_INT = 2              # a number without fraction or exponent
    JK_NUM = 3              # any other number
    JK_TRUE = 4
    JK_FALSE = 5
    JK_NULL = 6

ctypedef const unsigned char* cptr

cdef struct JKey:
    cptr p                  # the key's first byte (in text a), without the quote
    Py_ssize_t n
    uint32_t h

cdef struct JWalk:
    cptr a_end
    cptr b_end
    cptr pa                 # the cursors
    cptr pb
    cptr seg[JD_MAX_DEPTH + 1]          # the key naming the value at depth d; NULL: an element
    Py_ssize_t seglen[JD_MAX_DEPTH + 1]
    JKey* keys              # the keys of the objects open in the walk, innermost last
    Py_ssize_t nkeys
    Py_ssize_t capkeys
    JKey inline_keys[JD_INLINE_KEYS]


cdef inline cptr _jd_ws(cptr p, cptr end) noexcept nogil:
    while p < end and (p[0] == c' ' or p[0] == c'\n' or p[0] == c'\r' or p[0] == c'\t'):
        p += 1
    return p


cdef inline bint _jd_digit(unsigned char c) noexcept nogil:
    return c'0' <= c <= c'9'


cdef inline bint _jd_hex(unsigned char c) noexcept nogil:
    return c'0' <= c <= c'9' or c'a' <= c <= c'f' or c'A' <= c <= c'F'


cdef inline bint _jd_name_start(unsigned char c) noexcept nogil:
    return c'a' <= c <= c'z' or c'A' <= c <= c'Z' or c == c'_' or c == c'$'


cdef cptr _jd_string(cptr p, cptr end, bint* esc) noexcept nogil:
    """The end of the string token whose opening quote is at ``p``, or NULL if it is not one
    (or holds a byte >= 0x80); ``esc`` is set when it holds an escape."""
    cdef unsigned char c
    p += 1
    while p < end:
        c = p[0]
        if c == c'"':
            return p + 1
        if c < 0x20 or c >= 0x80:
            return NULL
        if c == c'\\':
            esc[0] = True
            if end - p < 2:
                return NULL
            c = p[1]
            if c == c'u':
                if end - p < 6 or not (_jd_hex(p[2]) and _jd_hex(p[3]) and _jd_hex(p[4])
                                       and _jd_hex(p[5])):
                    return NULL
                p += 6
                continue
            if not (c == c'"' or c == c'\\' or c == c'/' or c == c'b' or c == c'f' or c == c'n'
                    or c == c'r' or c == c't'):
                return NULL
            p += 2
            continue
        p += 1
    return NULL


cdef cptr _jd_number(cptr p, cptr end, int* kind) noexcept nogil:
    """The end of the number token at ``p`` (``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][-+]?[0-9]+)?``),
    or NULL."""
    cdef cptr start = p
    kind[0] = JK_INT
    if p < end and p[0] == c'-':
        p += 1
    if p >= end:
        return NULL
    if p[0] == c'0':
        p += 1
    elif c'1' <= p[0] <= c'9':
        p += 1
        while p < end and _jd_digit(p[0]):
            p += 1
    else:
        return NULL
    if p < end and p[0] == c'.':
        p += 1
        if p >= end or not _jd_digit(p[0]):
            return NULL
        while p < end and _jd_digit(p[0]):
            p += 1
        kind[0] = JK_NUM
    if p < end and (p[0] == c'e' or p[0] == c'E'):
        p += 1
        if p < end and (p[0] == c'+' or p[0] == c'-'):
            p += 1
        if p >= end or not _jd_digit(p[0]):
            return NULL
        while p < end and _jd_digit(p[0]):
            p += 1
        kind[0] = JK_NUM
    if p - start > JD_MAX_NUMBER:
        return NULL
    return p


cdef cptr _jd_scalar(cptr p, cptr end, int* kind) noexcept nogil:
    """The end of the scalar token at ``p`` and its kind, or NULL."""
    cdef bint esc = False
    cdef unsigned char c
    if p >= end:
        return NULL
    c = p[0]
    if c == c'"':
        p = _jd_string(p, end, &esc)
        kind[0] = JK_STR_ESC if esc else JK_STR
        return p
    if c == c'-' or _jd_digit(c):
        return _jd_number(p, end, kind)
    if c == c't' and end - p >= 4 and memcmp(p, b"true", 4) == 0:
        kind[0] = JK_TRUE
        return p + 4
    if c == c'f' and end - p >= 5 and memcmp(p, b"false", 5) == 0:
        kind[0] = JK_FALSE
        return p + 5
    if c == c'n' and end - p >= 4 and memcmp(p, b"null", 4) == 0:
        kind[0] = JK_NULL
        return p + 4
    return NULL         # not JSON, or NaN/Infinity


cdef cptr _jd_skip(cptr p, cptr end, int depth) noexcept nogil:
    """The end of the value at ``p`` in one text, read and checked but not compared, or NULL."""
    cdef bint esc = False
    cdef int kind
    if p >= end:
        return NULL
    if p[0] == c'{':
        if depth >= JD_MAX_DEPTH:
            return NULL
        p = _jd_ws(p + 1, end)
        if p < end and p[0] == c'}':
            return p + 1
        while True:
            if p >= end or p[0] != c'"':
                return NULL
            p = _jd_string(p, end, &esc)
            if p == NULL:
                return NULL
            p = _jd_ws(p, end)
            if p >= end or p[0] != c':':
                return NULL
            p = _jd_skip(_jd_ws(p + 1, end), end, depth + 1)
            if p == NULL:
                return NULL
            p = _jd_ws(p, end)
            if p >= end:
                return NULL
            if p[0] == c'}':
                return p + 1
            if p[0] != c',':
                return NULL
            p = _jd_ws(p + 1, end)
    if p[0] == c'[':
        if depth >= JD_MAX_DEPTH:
            return NULL
        p = _jd_ws(p + 1, end)
        if p < end and p[0] == c']':
            return p + 1
        return _jd_skip_elements(p, end, depth)
    return _jd_scalar(p, end, &kind)


cdef cptr _jd_skip_elements(cptr p, cptr end, int depth) noexcept nogil:
    """The end of the array at ``depth`` whose next element starts at ``p``, or NULL."""
    while True:
        p = _jd_skip(p, end, depth + 1)
        if p == NULL:
            return NULL
        p = _jd_ws(p, end)
        if p >= end:
            return NULL
        if p[0] == c']':
            return p + 1
        if p[0] != c',':
            return NULL
        p = _jd_ws(p + 1, end)


cdef bint _jd_simple_key(cptr k, Py_ssize_t n) noexcept nogil:
    """The key fullmatches ``[A-Za-z_$][A-Za-z0-9_$\\-]*`` (replay.analysis.diff._key)."""
    cdef cptr end = k + n
    if n == 0 or not _jd_name_start(k[0]):
        return False
    k += 1
    while k < end:
        if not (_jd_name_start(k[0]) or _jd_digit(k[0]) or k[0] == c'-'):
            return False
        k += 1
    return True


cdef int _jd_add(JWalk* w, int depth, list found) except -1:
    """Add the generic path of the value at ``depth`` to ``found``; 1."""
    cdef Py_ssize_t n = 1, i
    cdef unsigned char* q
    for i in range(1, depth + 1):
        if w.seg[i] == NULL:
            n += 3
        elif _jd_simple_key(w.seg[i], w.seglen[i]):
            n += 1 + w.seglen[i]
        else:
            n += 4 + w.seglen[i]
    path = PyUnicode_New(n, 127)
    q = PyUnicode_1BYTE_DATA(path)
    q[0] = c'$'
    q += 1
    for i in range(1, depth + 1):
        if w.seg[i] == NULL:
            memcpy(q, b"[*]", 3)
            q += 3
        elif _jd_simple_key(w.seg[i], w.seglen[i]):
            q[0] = c'.'
            memcpy(q + 1, w.seg[i], w.seglen[i])
            q += 1 + w.seglen[i]
        else:
            memcpy(q, b'["', 2)
            memcpy(q + 2, w.seg[i], w.seglen[i])
            memcpy(q + 2 + w.seglen[i], b'"]', 2)
            q += 4 + w.seglen[i]
    found.append(path)
    return 1


cdef int _jd_key_cmp(const void* x, const void* y) noexcept nogil:
    cdef const JKey* kx = <const JKey*>x
    cdef const JKey* ky = <const JKey*>y
    if kx.h != ky.h:
        return -1 if kx.h < ky.h else 1
    if kx.n != ky.n:
        return -1 if kx.n < ky.n else 1
    return memcmp(kx.p, ky.p, kx.n)


cdef bint _jd_repeated(JWalk* w, Py_ssize_t base) noexcept nogil:
    """Some key of the object whose keys start at ``base`` is there twice (sorts them)."""
    cdef JKey* k = w.keys + base
    cdef JKey* end = w.keys + w.nkeys
    qsort(k, w.nkeys - base, sizeof(JKey), _jd_key_cmp)
    k += 1
    while k < end:
        if _jd_key_cmp(k - 1, k) == 0:
            return True
        k += 1
    return False


cdef int _jd_push_key(JWalk* w, cptr p, Py_ssize_t n, uint32_t h) except -1:
    cdef JKey* grown
    if w.nkeys == w.capkeys:
        if w.keys == &w.inline_keys[0]:
            grown = <JKey*>malloc(2 * w.capkeys * sizeof(JKey))
            if grown != NULL:
                memcpy(grown, w.keys, w.nkeys * sizeof(JKey))
        else:
            grown = <JKey*>realloc(w.keys, 2 * w.capkeys * sizeof(JKey))
        if grown == NULL:
            raise MemoryError()
        w.keys = grown
        w.capkeys *= 2
    w.keys[w.nkeys].p = p
    w.keys[w.nkeys].n = n
    w.keys[w.nkeys].h = h
    w.nkeys += 1
    return 0


cdef int _jd_objects(JWalk* w, int depth, list found) except -1:
    """Both cursors at ``{``."""
    cdef cptr pa, pb, ea, key, q
    cdef Py_ssize_t n, base = w.nkeys
    cdef JKey* k
    cdef uint32_t h
    cdef bint esc = False
    cdef int r
    if depth >= JD_MAX_DEPTH:
        return 0
    pa = _jd_ws(w.pa + 1, w.a_end)
    pb = _jd_ws(w.pb + 1, w.b_end)
    if pa < w.a_end and pb < w.b_end and pa[0] == c'}' and pb[0] == c'}':
        w.pa = pa + 1
        w.pb = pb + 1
        return 1
    while True:
        # the same key, byte for byte, on both sides; plain printable ASCII
        if pa >= w.a_end or pa[0] != c'"':
            return 0
        ea = _jd_string(pa, w.a_end, &esc)
        if ea == NULL or esc:
            return 0
        n = ea - pa
        if w.b_end - pb < n or memcmp(pa, pb, n) != 0:
            return 0        # keys out of step: a member on one side only, another order
        key = pa + 1
        n -= 2
        h = 2166136261
        q = key
        while q < ea - 1:
            if q[0] == 0x7f:
                return 0
            h = (h ^ q[0]) * 16777619
            q += 1
        if w.nkeys - base < JD_LINEAR_KEYS:
            k = w.keys + base
            while k < w.keys + w.nkeys:
                if k.h == h and k.n == n and memcmp(k.p, key, n) == 0:
                    return 0        # json.loads keeps the last of repeated keys
                k += 1
        _jd_push_key(w, key, n, h)
        pa = _jd_ws(ea, w.a_end)
        pb = _jd_ws(pb + n + 2, w.b_end)
        if pa >= w.a_end or pb >= w.b_end or pa[0] != c':' or pb[0] != c':':
            return 0
        w.seg[depth + 1] = key
        w.seglen[depth + 1] = n
        w.pa = _jd_ws(pa + 1, w.a_end)
        w.pb = _jd_ws(pb + 1, w.b_end)
        r = _jd_pair(w, depth + 1, found)
        if r != 1:
            return r
        pa = _jd_ws(w.pa, w.a_end)
        pb = _jd_ws(w.pb, w.b_end)
        if pa >= w.a_end or pb >= w.b_end:
            return 0
        if pa[0] == c'}' and pb[0] == c'}':
            if w.nkeys - base > JD_LINEAR_KEYS and _jd_repeated(w, base):
                return 0
            w.nkeys = base
            w.pa = pa + 1
            w.pb = pb + 1
            return 1
        if pa[0] != c',' or pb[0] != c',':
            return 0        # one object ends before the other, or not JSON
        pa = _jd_ws(pa + 1, w.a_end)
        pb = _jd_ws(pb + 1, w.b_end)


cdef int _jd_arrays(JWalk* w, int depth, list found) except -1:
    """Both cursors at ``[``."""
    cdef cptr pa, pb
    cdef int r
    if depth >= JD_MAX_DEPTH:
        return 0
    pa = _jd_ws(w.pa + 1, w.a_end)
    pb = _jd_ws(w.pb + 1, w.b_end)
    if pa >= w.a_end or pb >= w.b_end:
        return 0
    w.seg[depth + 1] = NULL
    if pa[0] != c']' and pb[0] != c']':
        while True:         # both have an element here
            w.pa = pa
            w.pb = pb
            r = _jd_pair(w, depth + 1, found)
            if r != 1:
                return r
            pa = _jd_ws(w.pa, w.a_end)
            pb = _jd_ws(w.pb, w.b_end)
            if pa >= w.a_end or pb >= w.b_end:
                return 0
            if pa[0] == c',' and pb[0] == c',':
                pa = _jd_ws(pa + 1, w.a_end)
                pb = _jd_ws(pb + 1, w.b_end)
            elif pa[0] == c']' and pb[0] == c']':
                w.pa = pa + 1
                w.pb = pb + 1
                return 1
            elif pa[0] == c',' and pb[0] == c']':       # a is longer
                w.pa = _jd_skip_elements(_jd_ws(pa + 1, w.a_end), w.a_end, depth)
                w.pb = pb + 1
                return 0 if w.pa == NULL else _jd_add(w, depth + 1, found)
            elif pa[0] == c']' and pb[0] == c',':       # b is longer
                w.pa = pa + 1
                w.pb = _jd_skip_elements(_jd_ws(pb + 1, w.b_end), w.b_end, depth)
                return 0 if w.pb == NULL else _jd_add(w, depth + 1, found)
            else:
                return 0
    if pa[0] == c']' and pb[0] == c']':
        w.pa = pa + 1
        w.pb = pb + 1
        return 1
    # one is empty, the other is not
    if pa[0] == c']':
        w.pa = pa + 1
        w.pb = _jd_skip_elements(pb, w.b_end, depth)
    else:
        w.pa = _jd_skip_elements(pa, w.a_end, depth)
        w.pb = pb + 1
    return 0 if w.pa == NULL or w.pb == NULL else _jd_add(w, depth + 1, found)


cdef inline bint _jd_is_string(int kind) noexcept nogil:
    return kind == JK_STR or kind == JK_STR_ESC


cdef inline bint _jd_is_number(int kind) noexcept nogil:
    return kind == JK_INT or kind == JK_NUM


cdef inline bint _jd_is_bool(int kind) noexcept nogil:
    return kind == JK_TRUE or kind == JK_FALSE


cdef inline bint _jd_holds_json(cptr p, cptr end) noexcept nogil:
    """The string token [p, end) (no escapes) has more than one character and starts like JSON."""
    return end - p > 3 and (p[1] == c'{' or p[1] == c'[')


cdef inline bint _jd_minus_zero(cptr p, cptr end) noexcept nogil:
    return end - p == 2 and p[0] == c'-' and p[1] == c'0'


cdef int _jd_pair(JWalk* w, int depth, list found) except -1:
    """Compare the values at the cursors; on 1 the cursors are past both."""
    cdef cptr pa = w.pa, pb = w.pb, ea, eb
    cdef int ka = 0, kb = 0
    cdef unsigned char ca, cb
    if pa >= w.a_end or pb >= w.b_end:
        return 0
    ca = pa[0]
    cb = pb[0]
    if ca == c'{' and cb == c'{':
        return _jd_objects(w, depth, found)
    if ca == c'[' and cb == c'[':
        return _jd_arrays(w, depth, found)
    if ca == c'{' or ca == c'[' or cb == c'{' or cb == c'[':     # a container against another type
        w.pa = _jd_skip(pa, w.a_end, depth)
        w.pb = _jd_skip(pb, w.b_end, depth)
        return 0 if w.pa == NULL or w.pb == NULL else _jd_add(w, depth, found)
    ea = _jd_scalar(pa, w.a_end, &ka)
    if ea == NULL:
        return 0
    if (ka != JK_INT and ka != JK_NUM and w.b_end - pb >= ea - pa
            and memcmp(pa, pb, ea - pa) == 0):
        # a string or a literal ends where its bytes say: b holds the same token
        w.pa = ea
        w.pb = pb + (ea - pa)
        return 1
    eb = _jd_scalar(pb, w.b_end, &kb)
    if eb == NULL:
        return 0
    w.pa = ea
    w.pb = eb
    if ea - pa == eb - pb and memcmp(pa, pb, ea - pa) == 0:
        return 1
    if _jd_is_string(ka) and _jd_is_string(kb):
        if ka == JK_STR_ESC or kb == JK_STR_ESC:
            return 0        # "\u0041" == "A"
        if _jd_holds_json(pa, ea) or _jd_holds_json(pb, eb):
            return 0        # value_diff compares the JSON they hold
    elif _jd_is_number(ka) and _jd_is_number(kb):
        if ka != JK_INT or kb != JK_INT or _jd_minus_zero(pa, ea) or _jd_minus_zero(pb, eb):
            return 0        # 1 == 1.0 == 1e0, 0 == -0
    elif (_jd_is_bool(ka) and _jd_is_number(kb)) or (_jd_is_bool(kb) and _jd_is_number(ka)):
        return 0            # True == 1 inside an equal container
    return _jd_add(w, depth, found)


def json_diff(bytes a not None, bytes b not None, set out not None):
    """Add to ``out`` the generic paths that differ between the JSON texts ``a`` and ``b``, as
    ``value_diff(json.loads(a), json.loads(b), "$", out)`` would, and return True; or return
    False, ``out`` untouched, when that cannot be decided without parsing."""
    cdef JWalk w
    cdef list found = []
    cdef int r = 0
    w.a_end = <cptr>PyBytes_AS_STRING(a) + PyBytes_GET_SIZE(a)
    w.b_end = <cptr>PyBytes_AS_STRING(b) + PyBytes_GET_SIZE(b)
    w.pa = _jd_ws(<cptr>PyBytes_AS_STRING(a), w.a_end)
    w.pb = _jd_ws(<cptr>PyBytes_AS_STRING(b), w.b_end)
    if w.pa >= w.a_end or w.pb >= w.b_end:
        return False
    w.keys = &w.inline_keys[0]
    w.nkeys = 0
    w.capkeys = JD_INLINE_KEYS
    try:
        r = _jd_pair(&w, 0, found)
    finally:
        if w.keys != &w.inline_keys[0]:
            free(w.keys)
    if r != 1 or _jd_ws(w.pa, w.a_end) != w.a_end or _jd_ws(w.pb, w.b_end) != w.b_end:
        return False
    for path in found:
        PySet_Add(out, path)
    return True


# ---------------------------------------------------------------------------------------------
# the strings of a log block's table

from cpython.unicode cimport PyUnicode_DecodeUTF8


def split_strings(bytes buf not None, Py_ssize_t off, Py_ssize_t count):
    """The ``count`` strings at ``off`` of ``buf``, each a u32 little-endian length and its
    UTF-8 bytes (lone surrogates allowed), as ``[None, s1, s2, ...]`` and the offset after
    them. ValueError when one runs past the end of ``buf``, UnicodeDecodeError when one does
    not decode (as the twin's loop)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef Py_ssize_t i, ln
    cdef list out = [None]
    if off < 0 or count < 0:
        raise ValueError("negative offset or count")
    for i in range(count):
        if off + 4 > n:
            raise ValueError("string runs past its end")
        ln = <Py_ssize_t>(p[off] | (p[off + 1] << 8) | (p[off + 2] << 16) | (<uint32_t>p[off + 3] << 24))
        off += 4
        if ln > n - off:
            raise ValueError("string runs past its end")
        out.append(PyUnicode_DecodeUTF8(<const char*>(p + off), ln, b"surrogatepass"))
        off += ln
    return out, off


# ---------------------------------------------------------------------------------------------
# a log block's messages as rows, and its payload put back in row order (docs/log-format.md)

from cpython.number cimport PyNumber_Index
from cpython.unicode cimport PyUnicode_AsEncodedString
from libc.stdint cimport uint16_t, uint64_t

from replay.layout import (TABLE_COLUMNS, TABLE_PREFIX, TABLE_ROW_BYTES, WIDTHS, bad_address,
                           unfit)

# The table's columns as encode_block writes them (names, widths): replay.layout's, checked
_C_TABLE = (("kind", 1), ("flags", 4), ("conn", 4), ("index", 8), ("ts_first", 8),
            ("ts_last", 8), ("status", 2), ("body_length", 8), ("head_length", 4),
            ("extra", 8), ("client", 4), ("server", 4), ("method", 4), ("uri", 4),
            ("elided", 1))
if tuple((name, WIDTHS[code]) for name, code in TABLE_COLUMNS) != _C_TABLE or TABLE_PREFIX != 12:
    raise ImportError("replay._fastparse was built for another log table layout")
cdef Py_ssize_t ROW_BYTES = TABLE_ROW_BYTES

cdef packed struct Row:          # replay.layout.ROW_FIELDS, field for field
    uint8_t kind
    uint32_t flags
    uint64_t conn
    int64_t index
    int64_t ts_first
    int64_t ts_last
    uint16_t status
    uint64_t body_length
    uint32_t head_length
    uint64_t extra
    uint32_t client
    uint32_t server
    uint32_t method
    uint32_t uri
    uint8_t elided

ROW_SIZE = sizeof(Row)
cdef uint8_t C_REQUEST = KIND_REQUEST
cdef object _NOTHING = object()     # no address seen yet (None is an address that is refused)


cdef object _row_int(object v, str name):
    """``v`` as an int (``operator.index``), or the column's error."""
    if isinstance(v, int):
        return v
    try:
        return PyNumber_Index(v)
    except TypeError:
        raise unfit(name, v) from None


cdef uint64_t _row_u(object v, uint64_t hi, str name) except? 0xFFFFFFFFFFFFFFFF:
    cdef uint64_t x
    try:
        x = _row_int(v, name)
    except OverflowError:
        raise unfit(name, v) from None
    if x > hi:
        raise unfit(name, v)
    return x


cdef int64_t _row_i(object v, str name) except? -1:
    try:
        return _row_int(v, name)
    except OverflowError:
        raise unfit(name, v) from None


from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)


cdef bytes _utf8(object s):
    """UTF-8 of a str (or a subclass: str's own encoding, as the twin's ``_text``)."""
    return PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass")


cdef uint32_t _row_address(str name, object a, dict addrs, bytearray table) except? 0xFFFFFFFF:
    cdef object k
    cdef bytes ip
    try:
        k = addrs.get(a)
    except TypeError:               # unhashable
        raise unfit(name, a) from None
    if k is not None:
        return k
    if not isinstance(a, tuple) or len(a) != 2 or not isinstance(a[0], str) \
            or not isinstance(a[1], int):
        raise unfit(name, a)
    ip = _utf8(a[0])
    port = a[1]
    if len(ip) > 255 or not 0 <= port <= 0xFFFF:
        raise bad_address(a)
    table.append(len(ip))
    table += ip
    table.append(port & 0xFF)
    table.append(port >> 8)
    k = len(addrs)
    addrs[a] = k
    return k


cdef object _text_of(object s):
    """What a string table holds of ``s``: ``s`` itself when it is an ASCII str (whose UTF-8 is
    its own data: no bytes made, as for nearly every target), else its UTF-8 bytes (``_utf8``:
    surrogates pass). ``_text_ptr`` reads either."""
    if type(s) is str and PyUnicode_IS_COMPACT_ASCII(s):
        return s
    return _utf8(s)


cdef inline const char* _text_ptr(object t, Py_ssize_t* n) except NULL:
    if type(t) is bytes:
        n[0] = PyBytes_GET_SIZE(t)
        return PyBytes_AS_STRING(t)
    return PyUnicode_AsUTF8AndSize(t, n)


cdef inline void _le32(char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


def gather_rows(msgs):
    """``(rows, tail, payload)`` of a log block holding ``msgs``: the twin's
    ``gather_rows``, byte for byte, in one pass of C over the messages."""
    cdef list ms = list(msgs)
    cdef bytes rows = PyBytes_FromStringAndSize(NULL, len(ms) * sizeof(Row))
    tail, payload = _gather(ms, <Row*>PyBytes_AS_STRING(rows))
    return rows, tail, payload


cdef class _Strings:
    """A block's address and string tables as its rows name them (ids in order of first use).

    ``name`` (with the GIL, row by row) gives each row its address ids and keeps where the
    UTF-8 of its uri and method is; ``prepare`` (once, in the writer's thread, its loops
    without the GIL) gives the uris and methods their ids through C hash tables of those bytes,
    then makes the block's tail and the text arrays ``elide`` and ``fill`` use. The texts stay
    where they are: in the row's str (ASCII: its own data), or in a bytes object, each kept
    here (a text read through a property may be a new object, gone once read)."""
    cdef dict addrs
    cdef bytearray addr_table
    cdef list keep                   # each text ``rtext`` points into (a str, or its UTF-8)
    cdef list seen                   # ADDR_SEEN addresses by their object's address, and
    cdef uint32_t seen_id[ADDR_SEEN]  # their ids: rows of interleaved connections hash none
    cdef const char** rtext          # each row's uri, then its method (NULL: None)
    cdef Py_ssize_t* rlen
    cdef Py_ssize_t rn, rcap
    cdef bint prepared
    cdef readonly bytes tail
    cdef const char** text           # the uris (in id order), then the methods
    cdef Py_ssize_t* text_len
    cdef uint32_t* final             # method id -> the table's string id
    cdef Py_ssize_t nuri

    def __cinit__(self):
        self.addrs = {}
        self.addr_table = bytearray()
        self.keep = []
        self.seen = [_NOTHING] * ADDR_SEEN

    def __dealloc__(self):
        free(self.rtext)
        free(self.rlen)
        free(self.text)
        free(self.text_len)
        free(self.final)

    cdef int name(self, Row* row, object client, object server, object uri,
                  object method, bint held=False) except -1:
        """``held``: the caller keeps ``uri`` and ``method`` alive as long as this (a
        ``RowBlock``'s refs): an ASCII str's own data is pointed at, and not kept again."""
        row.client = self._address("client", client)
        row.server = self._address("server", server)
        if self.rn + 2 > self.rcap:
            self._grow()
        self._text("uri", uri, held)
        self._text("method", method, held)
        return 0

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = max(64, 2 * self.rcap)
        cdef void* p = realloc(self.rtext, cap * sizeof(char*))
        if p == NULL:
            raise MemoryError()
        self.rtext = <const char**>p
        p = realloc(self.rlen, cap * sizeof(Py_ssize_t))
        if p == NULL:
            raise MemoryError()
        self.rlen = <Py_ssize_t*>p
        self.rcap = cap
        return 0

    cdef int _text(self, str name, object s, bint held) except -1:
        cdef Py_ssize_t n = 0
        cdef const char* p = NULL
        if held and type(s) is str and PyUnicode_IS_COMPACT_ASCII(s):
            p = <const char*>PyUnicode_DATA(s)      # (its UTF-8: _text_of would return it)
            n = PyUnicode_GET_LENGTH(s)
        elif s is not None:
            if not isinstance(s, str):
                raise unfit(name, s)
            t = _text_of(s)
            self.keep.append(t)     # (what ``rtext`` points into lives as long as this)
            p = _text_ptr(t, &n)
        self.rtext[self.rn] = p
        self.rlen[self.rn] = n
        self.rn += 1
        return 0

    cdef uint32_t _address(self, str name, object a) except? 0xFFFFFFFF:
        """``_row_address``, first looked up by the object (each connection's addresses are
        the same two objects on all its rows)."""
        cdef Py_ssize_t slot = (<size_t><void*>a >> 4) & (ADDR_SEEN - 1)
        if self.seen[slot] is a:
            return self.seen_id[slot]
        k = _row_address(name, a, self.addrs, self.addr_table)
        self.seen[slot] = a
        self.seen_id[slot] = k
        return k

    cdef int prepare(self, Row* r, Py_ssize_t n) except -1:
        """Once all ``n`` rows ``r`` are named: their uri and method ids, the tail (the
        address table, then the strings: the uris first, then the methods that are no uri)
        and the C arrays ``elide`` and ``fill`` use. A second call changes nothing."""
        if self.prepared:
            return 0
        if 2 * n != self.rn:
            raise ValueError(f"{n} rows, {self.rn // 2} named")
        cdef Py_ssize_t i, j, pos, nu = 0, nm = 0, nt, size, at = len(self.addr_table)
        cdef bytes tail
        cdef char* out
        cdef _TextTable uris, methods
        cdef uint32_t* extra = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))  # the tail's methods
        free(self.text)             # (what a first call that failed left)
        free(self.text_len)
        free(self.final)
        self.text = <const char**>malloc((2 * n + 1) * sizeof(char*))
        self.text_len = <Py_ssize_t*>malloc((2 * n + 1) * sizeof(Py_ssize_t))
        self.final = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))
        if extra == NULL or self.text == NULL or self.text_len == NULL or self.final == NULL:
            free(extra)
            raise MemoryError()
        if _table_init(&uris, n) < 0 or _table_init(&methods, n) < 0:
            _table_free(&uris)
            free(extra)
            raise MemoryError()
        try:
            with nogil:
                for i in range(n):          # the uris, ids in order of first use
                    r[i].uri = _table_id(&uris, self.rtext[2 * i], self.rlen[2 * i], self.text,
                                         self.text_len, &nu)
                self.nuri = nu
                for i in range(n):          # the methods, after them in text
                    r[i].method = _table_id(&methods, self.rtext[2 * i + 1],
                                            self.rlen[2 * i + 1], self.text + nu,
                                            self.text_len + nu, &nm)
                self.final[0] = 0
                nt = nu
                size = 8 + at
                for i in range(nu):
                    size += 4 + self.text_len[i]
                for i in range(nm):         # a method that is also a uri is that string
                    j = _table_find(&uris, self.text[nu + i], self.text_len[nu + i], self.text,
                                    self.text_len)
                    if j == 0:
                        extra[nt - nu] = nu + i
                        nt += 1
                        j = nt
                        size += 4 + self.text_len[nu + i]
                    self.final[i + 1] = j
            tail = PyBytes_FromStringAndSize(NULL, size)
            out = PyBytes_AS_STRING(tail)
            _le32(out, len(self.addrs))
            memcpy(out + 4, PyByteArray_AS_STRING(self.addr_table), at)
            with nogil:
                pos = 4 + at
                _le32(out + pos, nt)
                pos += 4
                for i in range(nt):
                    j = i if i < nu else extra[i - nu]
                    _le32(out + pos, self.text_len[j])
                    memcpy(out + pos + 4, self.text[j], self.text_len[j])
                    pos += 4 + self.text_len[j]
        finally:
            free(extra)
            _table_free(&uris)
            _table_free(&methods)
        self.tail = tail
        self.prepared = True
        return 0

    cdef Py_ssize_t elide(self, Row* r, Py_ssize_t n, const char** dp, const Py_ssize_t* ds,
                          Py_ssize_t* cut, Py_ssize_t* start) noexcept nogil:
        """Each row's ``extra``, and ``elided`` (with where its target starts and how long it
        is) for a request whose bytes start with its method, a space and its uri; returns the
        payload's size. Before ``fill``, which renames the methods."""
        cdef Py_ssize_t i, p, size, total = 0, ulen
        cdef const char* d
        cdef const char* u
        for i in range(n):
            size = ds[i]
            r[i].extra = <uint64_t>size - <uint64_t>r[i].head_length - r[i].body_length
            r[i].elided = 0
            cut[i] = 0
            if r[i].kind == C_REQUEST and r[i].uri and r[i].method:
                p = self.text_len[self.nuri + r[i].method - 1] + 1
                u = self.text[r[i].uri - 1]
                ulen = self.text_len[r[i].uri - 1]
                d = dp[i]
                if (p > 1 and ulen and size >= p + ulen
                        and memcmp(d, self.text[self.nuri + r[i].method - 1], p - 1) == 0
                        and d[p - 1] == b' ' and memcmp(d + p, u, ulen) == 0):
                    r[i].elided = 1
                    start[i] = p
                    cut[i] = ulen
            total += size - cut[i]
        return total

    cdef void fill(self, Row* r, Py_ssize_t n, const char** dp, const Py_ssize_t* ds,
                   const Py_ssize_t* cut, const Py_ssize_t* start, char* out) noexcept nogil:
        """The payload into ``out``: the requests first, then the others, each without its
        target where ``elide`` left it out; the methods get the table's string ids."""
        cdef Py_ssize_t i, p, size, pos = 0
        cdef int second
        cdef const char* d
        for i in range(n):
            r[i].method = self.final[r[i].method]
        for second in range(2):
            for i in range(n):
                if (r[i].kind != C_REQUEST) != second:
                    continue
                d = dp[i]
                size = ds[i]
                if r[i].elided:
                    p = start[i]
                    memcpy(out + pos, d, p)
                    memcpy(out + pos + p, d + p + cut[i], size - p - cut[i])
                    pos += size - cut[i]
                else:
                    memcpy(out + pos, d, size)
                    pos += size

    cdef bytes payload(self, Row* r, Py_ssize_t n, const char** dp, const Py_ssize_t* ds):
        """After ``prepare``: the payload of the rows ``r``, every one named, whose bytes are
        ``dp[i][:ds[i]]`` (``elide`` then ``fill``, without the GIL)."""
        cdef Py_ssize_t total
        cdef bytes payload
        cdef char* out
        cdef Py_ssize_t* cut = <Py_ssize_t*>malloc((2 * n + 1) * sizeof(Py_ssize_t))
        if cut == NULL:
            raise MemoryError()
        try:
            with nogil:
                total = self.elide(r, n, dp, ds, cut, cut + n)
            payload = PyBytes_FromStringAndSize(NULL, total)
            out = PyBytes_AS_STRING(payload)
            with nogil:
                self.fill(r, n, dp, ds, cut, cut + n, out)
        finally:
            free(cut)
        return payload

    cdef tuple assemble(self, Row* r, Py_ssize_t n, const char** dp, const Py_ssize_t* ds):
        """(tail, payload) of the rows ``r``, every one named, whose bytes are
        ``dp[i][:ds[i]]``."""
        self.prepare(r, n)
        return self.tail, self.payload(r, n, dp, ds)


cdef struct _TextTable:
    # open addressing over texts by their bytes: slot -> 1 + the text's index, 0 empty
    uint32_t* slot
    uint64_t* hash
    Py_ssize_t mask


cdef int _table_init(_TextTable* t, Py_ssize_t n) noexcept:
    cdef Py_ssize_t cap = 16
    while cap < 2 * n + 2:
        cap <<= 1
    t.slot = <uint32_t*>calloc(cap, sizeof(uint32_t))
    t.hash = <uint64_t*>malloc(cap * sizeof(uint64_t))
    t.mask = cap - 1
    if t.slot == NULL or t.hash == NULL:
        free(t.slot)
        free(t.hash)
        t.slot = NULL
        t.hash = NULL
        return -1
    return 0


cdef void _table_free(_TextTable* t) noexcept:
    free(t.slot)
    free(t.hash)
    t.slot = NULL
    t.hash = NULL


# a seed drawn once a process, as Python's own string hash has: crafted targets cannot make a
# block's string table slow
cdef uint64_t _TEXT_SEED = int.from_bytes(__import__("os").urandom(8), "little")


cdef inline uint64_t _text_hash(const char* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = (_TEXT_SEED ^ 0x9E3779B97F4A7C15ULL) + <uint64_t>n, w
    while n >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * 0xff51afd7ed558ccdULL
        h ^= h >> 32
        p += 8
        n -= 8
    w = 0
    memcpy(&w, p, n)
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL
    return h ^ (h >> 29)


cdef inline Py_ssize_t _table_slot(_TextTable* t, const char* p, Py_ssize_t n, uint64_t h,
                                   const char** text, const Py_ssize_t* text_len) noexcept nogil:
    """Where the text ``p[:n]`` is, or the empty slot where it would go."""
    cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>t.mask)
    cdef uint32_t k
    while True:
        k = t.slot[i]
        if k == 0 or (t.hash[i] == h and text_len[k - 1] == n
                      and memcmp(text[k - 1], p, n) == 0):
            return i
        i = (i + 1) & t.mask


cdef uint32_t _table_id(_TextTable* t, const char* p, Py_ssize_t n, const char** text,
                        Py_ssize_t* text_len, Py_ssize_t* count) noexcept nogil:
    """The id (1 on) of the text ``p[:n]`` among ``text``, added there when new; 0 for None
    (``p`` NULL)."""
    if p == NULL:
        return 0
    cdef uint64_t h = _text_hash(p, n)
    cdef Py_ssize_t i = _table_slot(t, p, n, h, text, text_len)
    if t.slot[i] == 0:
        text[count[0]] = p
        text_len[count[0]] = n
        count[0] += 1
        t.slot[i] = <uint32_t>count[0]
        t.hash[i] = h
    return t.slot[i]


cdef inline uint32_t _table_find(_TextTable* t, const char* p, Py_ssize_t n, const char** text,
                                 const Py_ssize_t* text_len) noexcept nogil:
    """The id of the text ``p[:n]`` in the table filled from ``text``, 0 when not there."""
    return t.slot[_table_slot(t, p, n, _text_hash(p, n), text, text_len)]


cdef tuple _gather(list ms, Row* r):
    """Fill ``r`` with the rows of ``ms``; (tail, payload)."""
    cdef Py_ssize_t n = len(ms), i
    cdef bint fast
    cdef Row* row
    cdef list datas = [None] * n
    cdef bytes data
    cdef _Strings names = _Strings()
    cdef const char** dp = <const char**>malloc((n + 1) * sizeof(char*))
    cdef Py_ssize_t* ds = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
    if dp == NULL or ds == NULL:
        free(dp); free(ds)
        raise MemoryError()
    try:
        for i in range(n):
            m = ms[i]
            fast = _slots_known and type(m) is Message
            row = &r[i]
            row.kind = <uint8_t>_row_u(_field(m, fast, M_KIND, "kind"), 0xFF, "kind")
            row.flags = <uint32_t>_row_u(_field(m, fast, M_FLAGS, "flags"), 0xFFFFFFFF, "flags")
            row.conn = _row_u(_field(m, fast, M_CONN, "conn"), 0xFFFFFFFFFFFFFFFF, "conn")
            row.index = _row_i(_field(m, fast, M_INDEX, "index"), "index")
            row.ts_first = _row_i(_field(m, fast, M_TS_FIRST, "ts_first"), "ts_first")
            row.ts_last = _row_i(_field(m, fast, M_TS_LAST, "ts_last"), "ts_last")
            row.status = <uint16_t>_row_u(_field(m, fast, M_STATUS, "status"), 0xFFFF, "status")
            row.body_length = _row_u(_field(m, fast, M_BODY_LENGTH, "body_length"),
                                     0xFFFFFFFFFFFFFFFF, "body_length")
            row.head_length = <uint32_t>_row_u(_field(m, fast, M_HEAD_LENGTH, "head_length"),
                                               0xFFFFFFFF, "head_length")
            obj = _field(m, fast, M_DATA, "data")
            if type(obj) is bytes:
                data = <bytes>obj
            elif isinstance(obj, (bytes, bytearray, memoryview)):
                data = bytes(memoryview(obj))
            else:
                raise unfit("data", obj)
            datas[i] = data
            dp[i] = PyBytes_AS_STRING(data)
            ds[i] = PyBytes_GET_SIZE(data)
            names.name(row, _field(m, fast, M_CLIENT, "client"),
                       _field(m, fast, M_SERVER, "server"), _field(m, fast, M_URI, "uri"),
                       _field(m, fast, M_METHOD, "method"))
        return names.assemble(r, n, dp, ds)
    finally:
        free(dp)
        free(ds)


cdef Py_ssize_t ROWS_ROOM_KEEP = 1 << 20   # bytes a RowBuffer keeps allocated at least
cdef Py_ssize_t ROWS_FRESH_MAX = 16 << 20  # room of the buffer made by a hand-over, at most


cdef class _Rows:
    """Rows, each message's size, their bytes one after another, and their references. A row
    whose message was framed into memory of its own (``ROWS_DIRECT_FROM``) keeps that memory:
    its ``ext`` is not NULL, and its bytes are not in ``buf``."""
    cdef Row* rows
    cdef Py_ssize_t* size        # bytes of each row's message
    cdef Py_ssize_t n
    cdef char* buf
    cdef char** ext              # each row's own memory, or NULL (the array: NULL until needed)
    cdef list refs               # client, server, uri, method of each row

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.ext != NULL:
            for i in range(self.n):
                free(self.ext[i])
        free(self.ext)
        free(self.rows)
        free(self.size)
        free(self.buf)

    def __len__(self):
        return self.n


cdef class RowBuffer(_Rows):
    """The twin's ``RowBuffer``: messages the core finished (``Engine(rows=True)``), held as
    table rows, their bytes one after another in one buffer, and their addresses and strings
    (the objects a Message would hold); no Message is made for them. The log writer takes them
    a block at a time (``block_end``, ``take``). The rows held are ``first`` on (their bytes
    ``head`` on): taking a block copies its rows out and only moves those, and what was taken
    is let go of at the next ``add``, so that taking many blocks in a row costs no more than the
    blocks. A block of ``hand_over`` bytes or more, taken from the start of the buffer with at
    most a quarter of its size held after it, takes the buffer itself instead (large bodies:
    no copy of them), and the rows left move to a new one."""
    cdef Py_ssize_t cap
    cdef Py_ssize_t used, room           # bytes in buf, and its size
    cdef Py_ssize_t owned                # bytes of the rows held in memory of their own
    cdef Py_ssize_t first, head
    cdef public Py_ssize_t hand_over     # a block this large may take the buffer (``take``)
    cdef public Py_ssize_t direct_from   # a framer's message this large gets memory of its own
    cdef public Py_ssize_t direct_spare  # of which, all framers together, this much not filled
    cdef readonly Py_ssize_t spare       # the room the framers' memory has now, not filled

    def __cinit__(self):
        self.refs = []
        self.hand_over = ROWS_HAND_OVER
        self.direct_from = ROWS_DIRECT_FROM
        self.direct_spare = ROWS_DIRECT_SPARE

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.ext != NULL:        # (the rows held are first on; those before were taken)
            for i in range(self.first, self.first + self.n):
                free(self.ext[i])
            free(self.ext)
            self.ext = NULL

    @property
    def nbytes(self):
        """Bytes of the messages held."""
        return self.used + self.owned

    cdef int add(self, uint8_t kind, uint64_t conn, int64_t index, int64_t ts_first,
                 int64_t ts_last, object client, object server, uint32_t flags,
                 const char* data, Py_ssize_t size, object method, object uri, uint16_t status,
                 uint64_t body_length, Py_ssize_t head_length, bint own=False) except -1:
        """A row for the message ``data[:size]``, its bytes copied in; with ``own``, ``data``
        is memory of its own (``malloc``) that the row takes as it is, whatever happens (on an
        exception it is freed)."""
        if own:
            try:
                self._room_for(0, head_length, True)
            except BaseException:
                free(<void*>data)
                raise
        else:
            self._room_for(size, head_length, False)
        cdef Row* r = &self.rows[self.n]
        r.kind = kind
        r.flags = flags
        r.conn = conn
        r.index = index
        r.ts_first = ts_first
        r.ts_last = ts_last
        r.status = status
        r.body_length = body_length
        r.head_length = head_length
        if own:
            self.ext[self.n] = <char*>data
            self.owned += size
        else:
            if self.ext != NULL:
                self.ext[self.n] = NULL
            memcpy(self.buf + self.used, data, size)
            self.used += size
        self.size[self.n] = size
        self.n += 1
        cdef list refs = self.refs          # (four appends: no tuple a message)
        refs.append(client)
        refs.append(server)
        refs.append(uri)
        refs.append(method)
        return 0

    cdef int _room_for(self, Py_ssize_t size, Py_ssize_t head_length, bint own) except -1:
        """Room for one more row, and ``size`` more bytes in ``buf``; for a row of its own
        memory, its place in ``ext``."""
        cdef Py_ssize_t cap, room
        cdef void* p
        if head_length > SEQ_MASK:          # the column's range (2^32 - 1), as encode_block checks it
            raise unfit("head_length", head_length)
        if self.first:
            self._compact()
        if self.n == self.cap:
            cap = max(64, 2 * self.cap)
            p = realloc(self.rows, cap * sizeof(Row))
            if p == NULL:
                raise MemoryError()
            self.rows = <Row*>p
            p = realloc(self.size, cap * sizeof(Py_ssize_t))
            if p == NULL:
                raise MemoryError()
            self.size = <Py_ssize_t*>p
            if self.ext != NULL:
                p = realloc(self.ext, cap * sizeof(char*))
                if p == NULL:
                    raise MemoryError()
                self.ext = <char**>p
            self.cap = cap
        if own and self.ext == NULL:
            self.ext = <char**>calloc(self.cap, sizeof(char*))
            if self.ext == NULL:
                raise MemoryError()
        if self.used + size > self.room:
            room = max(1 << 16, 2 * self.room, self.used + size)
            p = realloc(self.buf, room)
            if p == NULL:
                raise MemoryError()
            self.buf = <char*>p
            self.room = room
        return 0

    def block_end(self, Py_ssize_t records, Py_ssize_t max_bytes):
        """How many of the rows held make the next block: the first ``records`` of them, or
        fewer when their bytes reach ``max_bytes`` (the log writer's rule); 0 when the rows
        held do not fill a block yet."""
        cdef Py_ssize_t i, total = 0
        if self.n < records and self.used + self.owned < max_bytes:
            return 0        # (asked after every batch: the rows held, not a scan of them)
        for i in range(min(self.n, max(records, 1))):
            total += self.size[self.first + i]
            if i + 1 >= records or total >= max_bytes:
                return i + 1
        return 0

    def take(self, Py_ssize_t count):
        """The first ``count`` rows (1 to all) as a ``RowBlock``; the rest stay."""
        if not 0 < count <= self.n:
            raise ValueError(f"take {count} of {self.n} rows")
        cdef RowBlock b = RowBlock.__new__(RowBlock)
        cdef Py_ssize_t i, nbytes = 0, f = self.first
        cdef Py_ssize_t inb = 0             # of those, bytes in buf (not in memory of their own)
        for i in range(count):
            nbytes += self.size[f + i]
            if self.ext == NULL or self.ext[f + i] == NULL:
                inb += self.size[f + i]
        cdef Py_ssize_t rest = self.used - inb, room = 0
        cdef char* fresh = NULL
        cdef char** ext = NULL
        cdef void* q
        b.rows = <Row*>malloc(count * sizeof(Row))
        b.size = <Py_ssize_t*>malloc(count * sizeof(Py_ssize_t))
        if b.rows == NULL or b.size == NULL:
            raise MemoryError()         # b frees what it got
        if inb != nbytes:
            ext = <char**>malloc(count * sizeof(char*))
            if ext == NULL:
                raise MemoryError()
        if self.head == 0 and inb >= self.hand_over and rest <= inb // 4:
            # the block takes the buffer itself, and what follows its rows moves to a new one
            # with room for another such block: a block of large bodies is not copied once more
            # (8 MiB a block)
            room = rest + min(inb + inb // 2, ROWS_FRESH_MAX)
            fresh = <char*>malloc(max(room, 1))
            if fresh == NULL:
                free(ext)
                raise MemoryError()
            memcpy(fresh, self.buf + inb, rest)
        else:
            b.buf = <char*>malloc(max(inb, 1))
            if b.buf == NULL:
                free(ext)
                raise MemoryError()
            memcpy(b.buf, self.buf + self.head, inb)
        b.n = count
        b.nbytes = nbytes
        memcpy(b.rows, self.rows + f, count * sizeof(Row))
        memcpy(b.size, self.size + f, count * sizeof(Py_ssize_t))
        try:
            b.refs = self.refs[4 * f:4 * (f + count)]
            b.names = _Strings()        # named here (what needs the GIL), prepared by encode
            for i in range(count):
                b.names.name(&b.rows[i], b.refs[4 * i], b.refs[4 * i + 1], b.refs[4 * i + 2],
                             b.refs[4 * i + 3], True)     # (b.refs holds them while b lives)
        except BaseException:
            free(fresh)
            free(ext)
            raise
        # nothing can fail from here on: the rows leave this buffer
        if ext != NULL:             # (their own memory goes with them)
            memcpy(ext, self.ext + f, count * sizeof(char*))
            memset(self.ext + f, 0, count * sizeof(char*))
            b.ext = ext
            self.owned -= nbytes - inb
        self.n -= count
        self.used -= inb
        if fresh != NULL:
            b.buf = self.buf
            self.buf = fresh
            self.room = room
            q = realloc(b.buf, max(inb, 1))     # (the room beyond the block given back)
            if q != NULL:
                b.buf = <char*>q
            # the rows left go to the front now, beside their bytes (no compaction at the next
            # add, which would give the new buffer's room back)
            self.first += count
            self._to_front()
            return b
        self.head += inb
        self.first += count
        if not self.n:
            self._compact()
        return b

    cdef int _to_front(self) except -1:
        """The rows held (``first`` on, their bytes ``head`` on) move to the front."""
        memmove(self.rows, self.rows + self.first, self.n * sizeof(Row))
        memmove(self.size, self.size + self.first, self.n * sizeof(Py_ssize_t))
        if self.ext != NULL and self.first:
            memmove(self.ext, self.ext + self.first, self.n * sizeof(char*))
            memset(self.ext + self.n, 0, self.first * sizeof(char*))   # (moved: not theirs)
        if self.head:
            memmove(self.buf, self.buf + self.head, self.used)
        del self.refs[:4 * self.first]
        self.first = self.head = 0
        return 0

    cdef int _compact(self) except -1:
        """Let go of the rows taken: the rows held move to the front, and a buffer grown far
        beyond what is held is given back (one huge message in a long capture would otherwise
        keep its size allocated until the end)."""
        cdef Py_ssize_t room = max(self.used * 2, ROWS_ROOM_KEEP)
        cdef void* p
        self._to_front()
        if self.room > 4 * room:
            p = realloc(self.buf, room)
            if p != NULL:
                self.buf = <char*>p
                self.room = room
        return 0


cdef class RowBlock(_Rows):
    """The twin's ``RowBlock``: rows taken from a ``RowBuffer``, one log block's worth."""
    cdef readonly Py_ssize_t nbytes     # bytes of its messages
    cdef _Strings names

    def encode(self):
        """``encode_block(self.messages())``, byte for byte, without making them, and mostly
        without the GIL (the rows were named when taken)."""
        cdef Py_ssize_t i, n = self.n, pos = 0
        if self.names is None:
            raise ValueError("a RowBlock is made by RowBuffer.take")
        self.names.prepare(self.rows, n)
        cdef Row* r = <Row*>malloc(n * sizeof(Row))
        cdef const char** dp = <const char**>malloc(n * sizeof(char*))
        if r == NULL or dp == NULL:
            free(r); free(dp)
            raise MemoryError()
        try:
            with nogil:
                memcpy(r, self.rows, n * sizeof(Row))
                for i in range(n):
                    if self.ext != NULL and self.ext[i] != NULL:
                        dp[i] = self.ext[i]
                    else:
                        dp[i] = self.buf + pos
                        pos += self.size[i]
            payload = self.names.payload(r, n, dp, self.size)
            return _encode_rows(r, n, self.names.tail, payload)
        finally:
            free(r)
            free(dp)

    def messages(self):
        """The rows as the ``Message`` objects ``Engine(rows=False)`` would have made."""
        cdef Py_ssize_t i, pos = 0
        cdef Row* r
        cdef list out = []
        cdef list refs = self.refs
        for i in range(self.n):
            r = &self.rows[i]
            if self.ext != NULL and self.ext[i] != NULL:
                data = PyBytes_FromStringAndSize(self.ext[i], self.size[i])
            else:
                data = PyBytes_FromStringAndSize(self.buf + pos, self.size[i])
                pos += self.size[i]
            out.append(_message(r.kind, r.conn, r.index, r.ts_first, r.ts_last, refs[4 * i],
                                refs[4 * i + 1], r.flags, data, refs[4 * i + 3], refs[4 * i + 2],
                                r.status, r.body_length, r.head_length))
        return out


cdef inline uint64_t _zz(int64_t q) noexcept nogil:
    return (<uint64_t>q << 1) ^ <uint64_t>(q >> 63)


cdef inline uint64_t _gcd(uint64_t a, uint64_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef inline uint64_t _abs(int64_t q) noexcept nogil:
    return <uint64_t>q if q >= 0 else <uint64_t>0 - <uint64_t>q


cdef inline void _planes(uint8_t* out, const uint64_t* v, Py_ssize_t n, int width) noexcept nogil:
    """``width`` byte planes of the low bytes of ``v``: byte 0 of every value, then byte 1..."""
    cdef Py_ssize_t i
    cdef int b
    for b in range(width):
        for i in range(n):
            out[i] = <uint8_t>(v[i] >> (8 * b))
        out += n


cdef enum:      # the table's columns, in the order of _C_TABLE (replay.layout.TABLE_COLUMNS)
    C_KIND, C_FLAGS, C_CONN, C_INDEX, C_TS_FIRST, C_TS_LAST, C_STATUS, C_BODY_LENGTH,
    C_HEAD_LENGTH, C_EXTRA, C_CLIENT, C_SERVER, C_METHOD, C_URI, C_ELIDED, C_COLUMNS

cdef int _width[C_COLUMNS]
for _k, (_, _w) in enumerate(_C_TABLE):
    _width[_k] = _w


cdef inline uint64_t _coded(int c, const Row* r, Py_ssize_t i, int64_t p, int64_t rank,
                            int64_t t_min, int64_t unit, uint64_t* seen) noexcept nogil:
    """Row ``i``'s value of column ``c`` as the table stores it (replay.log.format.COLUMNS):
    ``p`` is the previous row of its connection (-1: none), ``rank`` its connection's place in
    the connection table, ``seen`` the highest uri id of the rows before it (updated)."""
    cdef const Row* x = &r[i]
    cdef uint64_t v = 0
    if c == C_KIND:
        return x.kind
    elif c == C_FLAGS:
        return x.flags
    elif c == C_CONN:
        return <uint64_t>(rank + 1) if p >= 0 else 0
    elif c == C_INDEX:
        if p < 0:
            return _zz(x.index)
        return _zz(<int64_t>(<uint64_t>x.index - <uint64_t>r[p].index
                             - <uint64_t>(x.kind == C_REQUEST)))
    elif c == C_TS_FIRST:     # wrapping differences, exact after the reader's wrapping sum
        return _zz(<int64_t>(<uint64_t>x.ts_first - <uint64_t>(r[i - 1].ts_first if i else t_min))
                   // unit)
    elif c == C_TS_LAST:
        return _zz(<int64_t>(<uint64_t>x.ts_last - <uint64_t>x.ts_first) // unit)
    elif c == C_STATUS:
        return x.status
    elif c == C_BODY_LENGTH:
        return x.body_length
    elif c == C_HEAD_LENGTH:
        return x.head_length
    elif c == C_EXTRA:
        return _zz(<int64_t>x.extra)
    elif c == C_CLIENT:
        return 0 if p >= 0 and x.client == r[p].client else <uint64_t>x.client + 1
    elif c == C_SERVER:
        return x.server
    elif c == C_METHOD:
        return x.method
    elif c == C_URI:          # uri strings come first, in the order rows first name them
        if p >= 0 and x.uri == r[p].uri:
            v = 0
        elif x.uri == seen[0] + 1:
            v = 1
        else:
            v = <uint64_t>x.uri + 2
        if x.uri > seen[0]:
            seen[0] = x.uri
        return v
    else:
        return x.elided


def encode_block(msgs):
    """``(table, payload, t_min, t_max, summary)`` of a version 2 data block holding ``msgs``
    (at least one): the twin's ``encode_block``, byte for byte."""
    cdef list ms = list(msgs)
    cdef Py_ssize_t n = len(ms)
    if not n:
        raise ValueError("a data block holds at least one message")
    cdef Row* r = <Row*>malloc(n * sizeof(Row))
    if r == NULL:
        raise MemoryError()
    try:
        tail, payload = _gather(ms, r)
        return _encode_rows(r, n, tail, payload)
    finally:
        free(r)


cdef tuple _encode_rows(Row* r, Py_ssize_t n, bytes tail, bytes payload):
    """``encode_block``'s result for the rows ``r`` (ids named, see ``_Strings``) with their
    ``tail`` and ``payload``; the columns are made without the GIL."""
    cdef Py_ssize_t i, k, nconn = 0, cap = 16, slot
    cdef int c
    while cap < 2 * n:
        cap *= 2
    cdef uint64_t* col = <uint64_t*>malloc(n * sizeof(uint64_t))
    cdef int64_t* prev = <int64_t*>malloc(n * sizeof(int64_t))
    cdef int64_t* rank = <int64_t*>malloc(n * sizeof(int64_t))
    cdef uint64_t* keys = <uint64_t*>malloc(cap * sizeof(uint64_t))     # conn -> rank, open
    cdef int64_t* vals = <int64_t*>malloc(cap * sizeof(int64_t))        # addressing
    cdef int64_t* last = <int64_t*>malloc(n * sizeof(int64_t))          # rank -> its last row
    cdef uint64_t* conns = <uint64_t*>malloc(n * sizeof(uint64_t))      # rank -> conn
    cdef int64_t* reqlast = <int64_t*>malloc(n * sizeof(int64_t))       # rank -> last request
    cdef uint8_t* hasreq = <uint8_t*>malloc(n)
    cdef int64_t t_min, t_max, d, req_min = 0, req_max = 0
    cdef uint64_t max_conn = 0
    cdef bint any_conn = False
    cdef Py_ssize_t requests = 0
    cdef uint64_t unit = 0, seen = 0, h
    cdef uint8_t* out
    cdef Py_ssize_t size
    if not (col and prev and rank and keys and vals and last and conns and reqlast and hasreq):
        free(col); free(prev); free(rank); free(keys); free(vals); free(last); free(conns)
        free(reqlast); free(hasreq)
        raise MemoryError()
    try:
        with nogil:
            for i in range(cap):
                vals[i] = -1
            t_min = t_max = r[0].ts_first
            for i in range(n):
                t_min = min(t_min, r[i].ts_first, r[i].ts_last)
                t_max = max(t_max, r[i].ts_first, r[i].ts_last)
                h = r[i].conn * <uint64_t>0x9E3779B97F4A7C15       # Fibonacci hashing
                slot = <Py_ssize_t>(h >> 32) & (cap - 1)
                while vals[slot] >= 0 and keys[slot] != r[i].conn:
                    slot = (slot + 1) & (cap - 1)
                if vals[slot] < 0:
                    keys[slot] = r[i].conn
                    vals[slot] = nconn
                    conns[nconn] = r[i].conn
                    last[nconn] = -1
                    hasreq[nconn] = 0
                    nconn += 1
                k = vals[slot]
                rank[i] = k
                prev[i] = last[k]
                last[k] = i
                if r[i].flags & CF_REPLAYED:
                    continue
                if not any_conn or r[i].conn > max_conn:
                    max_conn = r[i].conn
                    any_conn = True
                if r[i].kind == CKIND_REQUEST:
                    if not requests or r[i].ts_first < req_min:
                        req_min = r[i].ts_first
                    if not requests or r[i].ts_first > req_max:
                        req_max = r[i].ts_first
                    requests += 1
                    if not hasreq[k] or r[i].index > reqlast[k]:
                        reqlast[k] = r[i].index
                    hasreq[k] = 1
            for i in range(n):      # wrapping differences, exact after the reader's wrapping sum
                d = <int64_t>(<uint64_t>r[i].ts_first - <uint64_t>(r[i - 1].ts_first if i else t_min))
                unit = _gcd(unit, _abs(d))
                unit = _gcd(unit, _abs(<int64_t>(<uint64_t>r[i].ts_last - <uint64_t>r[i].ts_first)))
            if not 0 < unit < (<uint64_t>1 << 62):
                unit = 1
        size = 12 + n * ROW_BYTES + 8 * nconn + len(tail)
        table = PyBytes_FromStringAndSize(NULL, size)
        out = <uint8_t*>PyBytes_AS_STRING(table)
        for k in range(4):
            out[8 + k] = <uint8_t>(nconn >> (8 * k))
        for k in range(8):
            out[k] = <uint8_t>(unit >> (8 * k))
        out += 12
        with nogil:
            for c in range(C_COLUMNS):
                for i in range(n):
                    col[i] = _coded(c, r, i, prev[i], rank[i], t_min, <int64_t>unit, &seen)
                _planes(out, col, n, _width[c])
                out += _width[c] * n
            for k in range(nconn):
                col[k] = _zz(<int64_t>(conns[k] - (conns[k - 1] if k else 0)))
            _planes(out, col, nconn, 8)
            out += 8 * nconn
        memcpy(out, PyBytes_AS_STRING(tail), len(tail))
        req_conns, req_last = [], []
        for k in range(nconn):
            if hasreq[k]:
                req_conns.append(conns[k])
                req_last.append(reqlast[k])
    finally:
        free(col); free(prev); free(rank); free(keys); free(vals); free(last); free(conns)
        free(reqlast); free(hasreq)
    return table, payload, t_min, t_max, (requests, req_min, req_max,
                                          max_conn if any_conn else -1, req_conns, req_last)


def restore_payload(bytes stored not None, const uint8_t[::1] kind, const uint64_t[::1] data_length,
                    const uint8_t[::1] elided, const uint32_t[::1] method,
                    const uint32_t[::1] uri, list strings not None):
    """The twin's ``restore_payload``: the messages' bytes in row order, copied once."""
    cdef Py_ssize_t n = kind.shape[0], i, a, p, pos = 0, ns = len(strings), targets = 0
    cdef int second
    cdef uint64_t room = <uint64_t>PyBytes_GET_SIZE(stored), size
    cdef const char* src = PyBytes_AS_STRING(stored)
    cdef char* out
    cdef list texts = [None] * ns       # string id -> its UTF-8, as needed
    cdef bytes payload, t
    if not (data_length.shape[0] == elided.shape[0] == method.shape[0] == uri.shape[0] == n):
        raise ValueError("columns of different lengths")
    cdef Py_ssize_t* cut = <Py_ssize_t*>malloc((3 * n + 1) * sizeof(Py_ssize_t))
    if cut == NULL:
        raise MemoryError()
    cdef Py_ssize_t* start = cut + n
    cdef Py_ssize_t* at = cut + 2 * n
    try:
        for i in range(n):
            cut[i] = start[i] = 0
            if not elided[i]:
                continue
            if uri[i] >= <uint64_t>ns or method[i] >= <uint64_t>ns \
                    or not isinstance(strings[uri[i]], str) \
                    or not isinstance(strings[method[i]], str):
                raise ValueError("bad table section: an elided target without its strings")
            for k in (uri[i], method[i]):
                if texts[k] is None:
                    texts[k] = _utf8(strings[k])
            cut[i] = PyBytes_GET_SIZE(<bytes>texts[uri[i]])
            start[i] = PyBytes_GET_SIZE(<bytes>texts[method[i]]) + 1
            targets += cut[i]
        for i in range(n):
            if elided[i] and kind[i] != C_REQUEST:
                raise ValueError("bad table section: a target left out of a message that is "
                                 "no request")
        for i in range(n):
            if data_length[i] < <uint64_t>cut[i]:
                raise ValueError("payload length does not match the table")
            size = data_length[i] - <uint64_t>cut[i]
            if size > room:
                raise ValueError("payload length does not match the table")
            room -= size
        if room:
            raise ValueError("payload length does not match the table")
        for second in range(2):         # the requests first, then the others
            for i in range(n):
                if (kind[i] != C_REQUEST) == second:
                    at[i] = pos
                    pos += <Py_ssize_t>(data_length[i] - <uint64_t>cut[i])
        payload = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(stored) + targets)
        out = PyBytes_AS_STRING(payload)
        pos = 0
        for i in range(n):
            a = at[i]
            size = data_length[i] - <uint64_t>cut[i]
            if elided[i]:
                p = start[i]
                if <uint64_t>p > size:
                    raise ValueError("payload length does not match the table")
                t = <bytes>texts[uri[i]]
                memcpy(out + pos, src + a, p)
                memcpy(out + pos + p, PyBytes_AS_STRING(t), cut[i])
                memcpy(out + pos + p + cut[i], src + a + p, size - p)
                pos += size + cut[i]
            else:
                memcpy(out + pos, src + a, size)
                pos += size
    finally:
        free(cut)
    return payload


def make_messages(const uint8_t[::1] kind, const uint64_t[::1] conn, const int64_t[::1] index,
                  const int64_t[::1] ts_first, const int64_t[::1] ts_last,
                  const uint32_t[::1] client, const uint32_t[::1] server,
                  const uint32_t[::1] flags, const uint64_t[::1] offset,
                  const uint64_t[::1] length, const uint32_t[::1] method,
                  const uint32_t[::1] uri, const uint16_t[::1] status,
                  const uint64_t[::1] body_length, const uint32_t[::1] head_length,
                  bytes payload not None, list addrs not None, list strings not None):
    """The twin's ``make_messages``: the Message objects of a block's rows, in C."""
    cdef Py_ssize_t n = kind.shape[0], i, na = len(addrs), ns = len(strings)
    cdef uint64_t size = <uint64_t>PyBytes_GET_SIZE(payload)
    cdef const char* p = PyBytes_AS_STRING(payload)
    cdef list out = []
    if not (conn.shape[0] == index.shape[0] == ts_first.shape[0] == ts_last.shape[0]
            == client.shape[0] == server.shape[0] == flags.shape[0] == offset.shape[0]
            == length.shape[0] == method.shape[0] == uri.shape[0] == status.shape[0]
            == body_length.shape[0] == head_length.shape[0] == n):
        raise ValueError("columns of different lengths")
    for i in range(n):
        if client[i] >= <uint64_t>na or server[i] >= <uint64_t>na or method[i] >= <uint64_t>ns \
                or uri[i] >= <uint64_t>ns:
            raise IndexError("id out of range")
        if offset[i] > size or length[i] > size - offset[i]:
            raise IndexError("message bytes out of range")
        out.append(_message(kind[i], conn[i], index[i], ts_first[i], ts_last[i],
                            addrs[client[i]], addrs[server[i]], flags[i],
                            PyBytes_FromStringAndSize(p + offset[i], <Py_ssize_t>length[i]),
                            strings[method[i]], strings[uri[i]], status[i], body_length[i],
                            head_length[i]))
    return out


# ---------------------------------------------------------------------------------------------
# the first header field of a name, found fast (replay.httpmsg.replace_header: play's Host)


cdef inline unsigned char _low(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c      # bytes.lower(): ASCII letters only


cdef int _first_field(const unsigned char* h, Py_ssize_t n, const unsigned char* nm, Py_ssize_t k,
                      Py_ssize_t* colon_at, Py_ssize_t* stop_at) noexcept nogil:
    """``first_field`` on ``h[:n]``: 1 found (its colon and the end of its value), 0 none, -1
    when the head cannot be read plainly (the twin's False)."""
    cdef Py_ssize_t i, j, found = -1, colon, end
    cdef unsigned char c
    cdef const unsigned char* p
    for i in range(n):
        c = h[i]
        if c == 0x0b or c == 0x0c:
            return -1
        if c == 13 and (i + 1 >= n or h[i + 1] != 10):         # a CR without its LF
            return -1
        if c != 10:
            continue
        # an empty line before the head's end (the twin: within head[:-1])
        if (i + 2 <= n - 1 and h[i + 1] == 10
                or i + 3 <= n - 1 and h[i + 1] == 13 and h[i + 2] == 10):
            return -1
        if i + 1 + k >= n:
            continue
        j = 0
        while j < k and _low(h[i + 1 + j]) == nm[j]:
            j += 1
        if j < k:
            continue
        c = h[i + 1 + k]
        if c == 32 or c == 9:                  # white space between the name and the colon
            return -1
        if c == 58 and found < 0:
            found = i
    if found < 0:
        return 0
    colon = found + 1 + k
    p = <const unsigned char*>memchr(h + colon, 10, n - colon)
    if p == NULL:
        end = n
    else:
        end = p - h
        if end + 1 < n and (h[end + 1] == 32 or h[end + 1] == 9):
            return -1
    colon_at[0] = colon
    stop_at[0] = end - 1 if h[end - 1] == 13 else end
    return 1


def first_field(bytes head not None, bytes name not None):
    """The twin's ``first_field``, in one pass over the head and one search."""
    cdef Py_ssize_t colon = 0, stop = 0
    cdef int r = _first_field(<const unsigned char*>PyBytes_AS_STRING(head),
                              PyBytes_GET_SIZE(head),
                              <const unsigned char*>PyBytes_AS_STRING(name),
                              PyBytes_GET_SIZE(name), &colon, &stop)
    if r < 0:
        return False
    if r == 0:
        return None
    return colon, stop


# -- the answer path of a replay connection ------------------------------------------------------
#
# The twin of ``PumpCore`` in ``replay._fastparse_py`` (its docstrings give the rules): the same
# steps, without the interpreter between them. ``--speed max`` runs one answer and one send per
# request through here.

from collections import deque as _deque
import time as _time

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* tp)
    int CLOCK_MONOTONIC

cdef object _monotonic_ns = _time.monotonic_ns


cdef inline int64_t _monotonic() noexcept nogil:
    """``time.monotonic_ns()``, read here."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1_000_000_000 + ts.tv_nsec


cdef class Attempt:
    """One planned request on its way: its deadline, when it was sent, on which pass."""

    cdef public object req, iteration, deadline, conn_id, sent_ns
    cdef public bint unknown

    def __init__(self, req, iteration, deadline, conn_id):
        self._set(req, iteration, deadline, conn_id)

    cdef int _set(self, object req, object iteration, object deadline, object conn_id) except -1:
        self.req = req
        self.unknown = req.recorded_status is None     # as counted when it was tried
        self.iteration = iteration
        self.deadline = deadline
        self.sent_ns = 0
        self.conn_id = conn_id
        return 0


cdef Attempt _attempt(object req, object iteration, object deadline, object conn_id):
    """``Attempt(req, iteration, deadline, conn_id)``, without the call of its ``__init__``."""
    cdef Attempt a = Attempt.__new__(Attempt)
    a._set(req, iteration, deadline, conn_id)
    return a


# The deadline of a request in a timed run: ``Schedule.deadline`` (replay.play.scheduler), the
# same value computed here when the schedule is a ``Schedule`` whose numbers are as a run makes
# them (float speed, rate and period; ints that int64 holds with room, recorded times of the
# Unix epoch in ns included): the same float operations in the same order (an int turned into a
# float rounds to nearest, ties to even, in C as in Python; the build keeps a product and a sum
# rounded apart), and ``int()``'s truncation. Any other schedule, or number, is asked.

from cpython.long cimport PyLong_AsLongLongAndOverflow

cdef object _Schedule = None
cdef int64_t C_EXACT = 1 << 53      # an int a float holds exactly
cdef int64_t C_ROOM = 1 << 62       # an int whose sum or difference with another stays in int64
cdef int64_t C_SMALL = 1 << 31      # ints whose product stays in int64


cdef inline bint _int64(object v, int64_t bound, int64_t* out) except -1:
    """``v`` an int within +-``bound``, into ``out``."""
    cdef int overflow = 0
    if type(v) is not int:
        return False
    out[0] = PyLong_AsLongLongAndOverflow(v, &overflow)
    return not overflow and -bound < out[0] < bound


def deadline(sched, t, seq, iteration=0):
    """``sched.deadline(t, seq, iteration)``: the twin's ``deadline``."""
    return _deadline(sched, t, seq, iteration)


cdef object _deadline(object sched, object t, object seq, object it):
    global _Schedule
    cdef int64_t ct, cseq, cit, t0, start, requests, n
    cdef double v, speed, period, rate
    if _Schedule is None:
        from replay.play.scheduler import Schedule
        _Schedule = Schedule
    if type(sched) is not _Schedule:
        return sched.deadline(t, seq, it)
    r = sched.rate
    s = sched.speed
    if not (_int64(it, C_EXACT, &cit) and _int64(sched.start, C_ROOM, &start)):
        return sched.deadline(t, seq, it)
    if r is not None:
        if type(r) is not float or not (_int64(seq, C_SMALL, &cseq) and _int64(
                sched.requests, C_SMALL, &requests)) or not -C_SMALL < cit < C_SMALL:
            return sched.deadline(t, seq, it)
        rate = r
        n = cseq + cit * requests               # (within 2**63: each within 2**31)
        if not -9_000_000_000 < n < 9_000_000_000:
            return sched.deadline(t, seq, it)
        v = <double>(n * 1_000_000_000) / rate
    elif s is not None:
        p = sched.period
        if type(s) is not float or type(p) is not float \
                or not (_int64(t, C_ROOM, &ct) and _int64(sched.t0, C_ROOM, &t0)):
            return sched.deadline(t, seq, it)
        speed = s
        period = p
        v = <double>(ct - t0) / speed
        v = v + <double>cit * period
    else:
        return None
    if not (-4e18 < v < 4e18):       # (NaN too)
        return sched.deadline(t, seq, it)
    return start + <int64_t>v


cdef inline bint _has(const unsigned char* h, Py_ssize_t n, const char* word, Py_ssize_t k):
    """``word`` (lower-case) in ``h[:n]``, case-insensitively."""
    cdef Py_ssize_t i, j
    for i in range(n - k + 1):
        j = 0
        while j < k and _low(h[i + j]) == word[j]:
            j += 1
        if j == k:
            return True
    return False


cdef inline bint _space(unsigned char c):
    return c == 32 or 9 <= c <= 13      # what bytes.strip() removes


def connection_closes(bytes data not None, Py_ssize_t head_length):
    """The twin's ``connection_closes``."""
    cdef const unsigned char* h = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i, j, start = -1, end = 0
    cdef const char* key = b"\nconnection:"
    cdef Py_ssize_t k = 12
    if head_length:
        n = min(n, head_length)
    else:
        n = min(n, 65536)
    for i in range(n - k + 1):
        if h[i] != 10:
            continue
        j = 1
        while j < k and _low(h[i + j]) == key[j]:
            j += 1
        if j == k:
            start = i + k
            break
    if start >= 0:
        p = <const unsigned char*>memchr(h + start, 10, n - start)
        end = n if p == NULL else p - h
        while start < end and _space(h[start]):
            start += 1
        while end > start and _space(h[end - 1]):
            end -= 1
        if _has(h + start, end - start, b"close", 5):
            return True
    if PyBytes_GET_SIZE(data) < 8 or memcmp(PyBytes_AS_STRING(data), b"HTTP/1.0", 8) != 0:
        return False
    return not (start >= 0 and _has(h + start, end - start, b"keep-alive", 10))


# Counting in the player's and the report's place (``core_counts`` on the player: ``sender.Player``
# says so, a subclass that counts otherwise does not): the same effects as ``Player._took``,
# ``Player._tried`` with ``Report.on_attempt``, ``Report.on_sent``, and ``Player.answered`` with
# ``Report.on_answer`` for an answer whose recorded status is known, without a Python call; the
# report's part goes into its ``Tally``, added to the report when it is read (``Report.fold``).
# tests/test_pump_core.py holds the reports of both ways equal.

from cpython cimport array as _carray
from array import array as _array

cdef enum:
    T_CODES = 1000          # status codes counted in arrays; others in dicts
    T_FOLD_AT = 65536       # latencies, or lateness of sends, held before the report takes them


cdef inline int _sample(_carray.array a, object v) except -1:
    cdef Py_ssize_t n = len(a)
    _carray.resize_smart(a, n + 1)
    a.data.as_longlongs[n] = <long long>v
    return 0


cdef class Tally:
    """The twin's ``Tally``: what the core counted for a report, in C until ``fold``."""

    cdef public long long attempted, sent, bytes_sent, bytes_received, answered, same, different
    cdef public long long first_send_ns, last_answer_ns, held
    cdef long long recorded[T_CODES]
    cdef long long statuses[T_CODES]
    cdef dict other_recorded, other_statuses, changes
    cdef _carray.array latency, intended, late, late_free
    cdef object report

    def __cinit__(self, report=None):
        self.report = report
        self._reset()

    cdef void _reset(self) except *:
        self.attempted = self.sent = self.bytes_sent = self.bytes_received = self.answered = 0
        self.same = self.different = self.first_send_ns = self.last_answer_ns = self.held = 0
        memset(self.recorded, 0, sizeof(self.recorded))
        memset(self.statuses, 0, sizeof(self.statuses))
        self.other_recorded = {}
        self.other_statuses = {}
        self.changes = {}
        self.latency = _array("q")
        self.intended = _array("q")
        self.late = _array("q")
        self.late_free = _array("q")

    cdef inline int tried(self, object recorded) except -1:
        self.attempted += 1
        if recorded is not None:
            _code(self.recorded, self.other_recorded, recorded)
        return 0

    cdef inline int sent_one(self, Py_ssize_t nbytes, long long now) except -1:
        self.sent += 1
        self.bytes_sent += nbytes
        if not self.first_send_ns:
            self.first_send_ns = now
        return 0

    cdef inline int sent_timed(self, Py_ssize_t nbytes, long long now, long long lateness,
                               bint held) except -1:
        """``Report.on_sent`` of a timed request."""
        self.sent_one(nbytes, now)
        _sample(self.late, lateness)
        if held:
            self.held += 1
        else:
            _sample(self.late_free, lateness)
        if len(self.late) >= T_FOLD_AT and self.report is not None:
            self.fold(self.report)
        return 0

    cdef inline int answer(self, Attempt att, object status, object now) except -1:
        recorded = att.req.recorded_status
        intended = att.deadline if att.deadline is not None else att.sent_ns
        self.answered += 1
        self.last_answer_ns = now
        _code(self.statuses, self.other_statuses, status)
        _sample(self.latency, now - att.sent_ns)
        _sample(self.intended, now - intended)
        if recorded == status:
            self.same += 1
        else:
            self.different += 1
            key = (recorded, status)
            self.changes[key] = self.changes.get(key, 0) + 1
        if len(self.latency) >= T_FOLD_AT and self.report is not None:
            self.fold(self.report)           # memory stays bounded in a run never read
        return 0

    def fold(self, report):
        """Add what was counted into ``report`` (a ``Report``) and start again from nothing."""
        cdef int code
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
        for code in range(T_CODES):
            if self.recorded[code]:
                report.recorded_statuses[code] += self.recorded[code]
            if self.statuses[code]:
                report.statuses[code] += self.statuses[code]
        for k, v in self.other_recorded.items():
            report.recorded_statuses[k] += v
        for k, v in self.other_statuses.items():
            report.statuses[k] += v
        for (r, st), v in self.changes.items():
            report.changes[f"{r} -> {st}"] += v
        report.latency.extend(self.latency)
        report.latency_intended.extend(self.intended)
        if len(self.late):
            report.lateness.extend(self.late)
            report.lateness_free.extend(self.late_free)
            recent = report.recent_lateness          # (a deque of the last ``maxlen``)
            recent.extend(self.late[-recent.maxlen:] if recent.maxlen else self.late)
            report.held_by_response += self.held
        self._reset()


cdef inline int _code(long long* counts, dict other, object code) except -1:
    if type(code) is int and 0 <= code < T_CODES:
        counts[<int>code] += 1
    else:
        other[code] = other.get(code, 0) + 1
    return 0


cdef inline int _count_took(object player) except -1:
    player.fed -= 1
    if player.fed < player.room_at and player.room is not None:
        player.room.set()
    return 0


cdef inline int _count_tried(object player, Tally tally, object req) except -1:
    if player.budget is not None:
        player.budget -= 1
        if player.budget == 0:
            player._spent()
    tally.tried(req.recorded_status)
    return 0


cdef class PumpCore:
    """The twin's ``PumpCore``: receiving, answering, and sending what the answers let go (at
    once at ``--speed max``, timed at its deadline) of a replay connection, in C.
    ``replay.play.sender.ReplayProtocol`` (a Python subclass) holds the rest."""

    cdef public object player, loop, now, transport, framer, pending, waiter, pump, retry, soon
    cdef public object due
    cdef public bint closed, reusable
    cdef public object answers, rx, rx_answered
    cdef bint _clock            # ``now`` is time.monotonic_ns: read CLOCK_MONOTONIC here
    cdef Tally _tally           # the report's, when the player lets the core count (else None)
    cdef object __weakref__
    cdef dict __dict__

    def init_core(self, player):
        self.player = player
        self.loop = player.loop
        self.now = player.clock.now
        self._clock = self.now is _monotonic_ns
        tally = getattr(player.report, "tally", None) if getattr(player, "core_counts", False) \
            else None
        self._tally = tally if type(tally) is Tally else None
        self.transport = None
        self.framer = None
        self.pending = _deque()
        self.closed = False
        self.reusable = True
        self.waiter = None
        self.pump = None
        self.due = None
        self.soon = self.loop.call_soon
        self.answers = 0
        self.rx = 0
        self.rx_answered = 0
        self.retry = []

    cdef inline object _now(self):
        if self._clock:
            return _monotonic()
        return self.now()

    def data_received(self, data):
        now = self._now()
        n = len(data)
        self.rx += n
        if self._tally is not None:
            self._tally.bytes_received += n
        else:
            self.player.report.bytes_received += n
        msgs = self.framer.feed(data, now)
        if msgs:
            self._answered(msgs, now)
        if self.framer.tunnel:
            self.reusable = False
            self.transport.close()

    def _answered(self, list msgs, now):
        cdef object player = self.player
        cdef object pending = self.pending
        cdef bint fast
        for m in msgs:
            fast = _slots_known and type(m) is Message
            if <int64_t>_field(m, fast, M_FLAGS, "flags") & CF_INTERIM:
                continue
            if not pending:
                player.report.unsolicited += 1
                continue
            att = pending.popleft()
            self.answers += 1
            data = _field(m, fast, M_DATA, "data")
            self.rx_answered += len(data)
            head = _field(m, fast, M_HEAD_LENGTH, "head_length")
            if head and connection_closes(data, head):
                self.reusable = False
            if self._tally is not None and not (<Attempt>att).unknown \
                    and player.on_exchange is None and (<Attempt>att).req.recorded_status is not None:
                self._tally.answer(<Attempt>att, _field(m, fast, M_STATUS, "status"), now)
            else:
                player.answered(att, m, now, self)
        if not pending:
            if self.pump is None:
                self._wake(True)
            else:
                self.soon(self._pump_or_wake)

    def _pump_or_wake(self):
        cdef bint ok
        if self.pending or self.pump is None:
            ok = False
        elif self._tally is not None:
            try:
                ok = self.pump_next()
            except Exception as e:  # (a bug: the player stops the run and raises it at the end)
                self.player._crashed(e)
                ok = False
        else:
            ok = self.player._pump(self)
        if not ok:
            self._wake(True)

    def _wake(self, value):
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(value)

    def send(self, Attempt att not None):
        req = att.req
        self.framer.expect(req.method)
        self.pending.append(att)
        t = self._now()
        att.sent_ns = t
        self.transport.write(req.data)
        return t

    def pump_next(self):
        feed, it, conn_id, dues = self.pump
        items = feed.items
        player = self.player
        if not items or not self._may_send(player):
            return False
        if dues is not None:
            return self.due is not None or self._pump_timed(
                items, it, conn_id, dues, not self.pending and not items[0].pipelined, None)
        report = player.report
        while True:
            req = items.popleft()
            self._count(player, req)
            t = self.send(_attempt(req, it, None, conn_id))
            if self._tally is not None:
                self._tally.sent_one(len(req.data), t)
            else:
                report.on_sent(len(req.data), None, False, t)
            if not items or not items[0].pipelined or player.budget == 0 or player.stopping:
                return True

    cdef inline bint _may_send(self, object player) except -1:
        return not (player.stopping or player.budget == 0 or self.closed or not self.reusable
                    or self.retry or self.framer.tunnel)

    cdef inline int _count(self, object player, object req) except -1:
        """A request of the feed taken and tried (``player._took``, ``player._tried``)."""
        if self._tally is not None:
            _count_took(player)
            _count_tried(player, self._tally, req)
        else:
            player._took()
            player._tried(req)
        return 0

    cdef bint _pump_timed(self, object items, object it, object conn_id, object dues,
                          bint held, object d) except -1:
        cdef object player = self.player
        cdef object report = player.report
        cdef object sched = player.schedule
        while True:
            req = items[0]
            if d is None:
                d = _deadline(sched, req.t, req.seq, it)
            if player.end_ns is not None and d >= player.end_ns:
                return False
            if d > self._now():
                self.due = req
                dues.add(d, self, req)
                return True
            items.popleft()
            t = self.send(_attempt(req, it, d, conn_id))
            self._count(player, req)
            if self._tally is not None:
                self._tally.sent_timed(len(req.data), t, t - d, held)
            else:
                report.on_sent(len(req.data), t - d, held, t)
            if not items or not items[0].pipelined or player.budget == 0 or player.stopping:
                return True
            held = False
            d = None

    def send_due(self, req, deadline):
        if self.due is not req or self.pump is None:
            return
        feed, it, conn_id, dues = self.pump
        items = feed.items
        player = self.player
        if not items or items[0] is not req or (self.pending and not req.pipelined):
            self.due = None
            return
        if not self._may_send(player):
            self._wake(True)
            return
        self.due = None
        if not self._pump_timed(items, it, conn_id, dues, False, deadline):
            self._wake(True)


# -- the streamed replay's planner ----------------------------------------------------------------
#
# The twin of ``StreamPlanner`` in ``replay._fastparse_py`` (its docstrings, and the opening of
# ``replay.play.stream``, give the rules): the same containers and the same steps, with the
# messages' fields read through their slots and the common edits of a request (the Host value,
# its body's length) made here; an edit the twin's helpers do differently from the plain case
# (a head that cannot be read plainly, a Transfer-Encoding field, a request cut by the capture)
# is handed to those same helpers (``replay.httpmsg``).

cdef struct _HeapItem:       # a request waiting in the window: its order, and its _Waiting
    int64_t t
    uint64_t conn
    int64_t index
    int64_t seq
    PyObject* p


cdef inline bint _before(const _HeapItem* a, const _HeapItem* b) noexcept nogil:
    """The twin's heap order: (ts_first, conn, index, seq), seq unique."""
    if a.t != b.t:
        return a.t < b.t
    if a.conn != b.conn:
        return a.conn < b.conn
    if a.index != b.index:
        return a.index < b.index
    return a.seq < b.seq

from replay.events import CUT as _CUT_FLAGS, PlannedRequest
from replay.limits import (ANSWER_WAIT_NS, CONN_IDLE_NS, EXPIRE_EVERY_NS, MAX_EARLY, MAX_LATE,
                           MAX_PENDING, REORDER_NS)

cdef int CF_CUT = _CUT_FLAGS
cdef int64_t C_REORDER_NS = REORDER_NS
cdef int64_t C_ANSWER_WAIT_NS = ANSWER_WAIT_NS

cdef enum:
    P_CONN, P_INDEX, P_T, P_DATA, P_METHOD, P_URI, P_HEAD_LENGTH, P_RECORDED_STATUS, P_PIPELINED,
    P_SEQ, P_BODY_LENGTH, P_FLAGS, P_FIELDS

_PLANNED_NAMES = ("conn", "index", "t", "data", "method", "uri", "head_length", "recorded_status",
                  "pipelined", "seq", "body_length", "flags")
cdef Py_ssize_t _pslot[P_FIELDS]
cdef bint _pslots_known


_pslots_known = _find_offsets(PlannedRequest, _PLANNED_NAMES, _pslot)


cdef inline void _pput(object r, int k, object v):
    Py_INCREF(v)
    (<PyObject**>((<char*><PyObject*>r) + _pslot[k]))[0] = <PyObject*>v


cdef object _planned(object conn, object index, object t, object data, object method, object uri,
                     object head_length, object status, object pipelined, object seq,
                     object body_length, object flags):
    """``PlannedRequest(...)`` with these fields, made through its slots."""
    if not _pslots_known:
        return PlannedRequest(conn, index, t, data, method, uri, head_length, status, pipelined,
                              seq, body_length, flags)
    r = _new_object(PlannedRequest)
    _pput(r, P_CONN, conn)
    _pput(r, P_INDEX, index)
    _pput(r, P_T, t)
    _pput(r, P_DATA, data)
    _pput(r, P_METHOD, method)
    _pput(r, P_URI, uri)
    _pput(r, P_HEAD_LENGTH, head_length)
    _pput(r, P_RECORDED_STATUS, status)
    _pput(r, P_PIPELINED, pipelined)
    _pput(r, P_SEQ, seq)
    _pput(r, P_BODY_LENGTH, body_length)
    _pput(r, P_FLAGS, flags)
    return r


cdef inline bint _has_field_line(const unsigned char* h, Py_ssize_t n, const char* key,
                                 Py_ssize_t k) noexcept nogil:
    """Whether ``h[:n]``, lower-cased, holds ``"\\n" + key`` (``key`` lower-case): the search of
    ``httpmsg.header_value``."""
    cdef const unsigned char* p = h
    cdef const unsigned char* end = h + n
    cdef Py_ssize_t j
    while True:
        p = <const unsigned char*>memchr(p, 10, end - p)
        if p == NULL or end - (p + 1) < k:
            return False
        p += 1
        j = 0
        while j < k and _low(p[j]) == <unsigned char>key[j]:
            j += 1
        if j == k:
            return True


cdef class _Waiting:
    cdef object msg, final, key


cdef class _ConnState:
    cdef object resp_end, last_t, last


cdef class StreamPlanner:
    """The twin's ``StreamPlanner``, with the same API, for messages whose fields are as the core
    and the log make them (ints within the log's widths: a ``head_length`` or ``flags`` beyond
    64 bits is an OverflowError here)."""

    cdef readonly object host, header
    cdef readonly bint keep_host
    cdef readonly Py_ssize_t max_pending
    cdef _HeapItem* _heap       # a binary heap, as heapq keeps the twin's list
    cdef Py_ssize_t _n, _cap
    cdef readonly dict waiting
    cdef readonly object early, conns, late
    cdef public list ended
    cdef public object now
    cdef public Py_ssize_t n, seq, planned, pipelined, reordered, unknown_status
    cdef public dict skipped
    cdef object _last_t, _expired, _edit, _host_b

    def __init__(self, host, keep_host=False, header=None, max_pending=MAX_PENDING):
        from collections import OrderedDict
        from replay import httpmsg

        self._edit = httpmsg
        self.host = host
        self.keep_host = keep_host
        self.header = header
        self.max_pending = max_pending
        self._host_b = None
        if type(host) is str:
            try:
                self._host_b = (<str>host).encode("latin-1")
            except UnicodeEncodeError:
                pass                       # the twin's helper says so, at the first request
        self._n = 0
        self.waiting = {}
        self.early = OrderedDict()
        self.conns = OrderedDict()
        self.late = OrderedDict()
        self.ended = []
        self.now = None
        self.n = self.seq = self.planned = self.pipelined = 0
        self.reordered = self.unknown_status = 0
        self.skipped = {}
        self._last_t = None
        self._expired = -(1 << 63)

    def push(self, m):
        cdef bint fast = _slots_known and type(m) is Message
        cdef int64_t flags = _field(m, fast, M_FLAGS, "flags")
        cdef _Waiting p
        if flags & CF_REPLAYED:
            return []
        ts_last = _field(m, fast, M_TS_LAST, "ts_last")
        if self.now is None or ts_last > self.now:
            self.now = ts_last
        conn = _field(m, fast, M_CONN, "conn")
        index = _field(m, fast, M_INDEX, "index")
        key = (conn, index)
        if _field(m, fast, M_KIND, "kind") == KIND_REQUEST:
            if key not in self.waiting:
                p = _Waiting.__new__(_Waiting)
                p.msg = m
                p.key = key
                seq = self.n
                self.n += 1
                p.final = self.early.pop(key, None)
                self.waiting[key] = p
                self._push(_field(m, fast, M_TS_FIRST, "ts_first"), conn, index, seq, p)
        elif index >= 0 and not flags & CF_INTERIM:
            got = self.waiting.get(key)
            if got is not None:
                (<_Waiting>got).final = m
            else:
                req = self.late.pop(key, None)
                if req is not None:
                    req.recorded_status = _field(m, fast, M_STATUS, "status")
                    self.unknown_status -= 1
                    out = self._release(False)
                    out.append((None, None, m))
                    return out
                self.early[key] = m
                if len(self.early) > MAX_EARLY:
                    self.early.popitem(last=False)
        return self._release(False)

    def advance(self, now):
        if self.now is None or now <= self.now:
            return []
        self.now = now
        return self._release(False)

    def finish(self):
        out = self._release(True)
        self.ended.extend(self.conns.keys())
        self.conns.clear()
        self.early.clear()
        return out

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._heap != NULL:
            for i in range(self._n):
                Py_XDECREF(self._heap[i].p)
            free(self._heap)
            self._heap = NULL

    @property
    def heap(self):
        """The window's requests, as the twin's heap holds them (in the heap's order)."""
        cdef Py_ssize_t i
        return [(self._heap[i].t, self._heap[i].conn, self._heap[i].index, self._heap[i].seq,
                 <object>self._heap[i].p) for i in range(self._n)]

    cdef int _push(self, object t, object conn, object index, Py_ssize_t seq,
                   _Waiting p) except -1:
        cdef _HeapItem item
        cdef _HeapItem* grown
        cdef Py_ssize_t i, up
        item.t = t
        item.conn = conn
        item.index = index
        item.seq = seq
        if self._n == self._cap:
            grown = <_HeapItem*>realloc(self._heap, (self._cap * 2 + 64) * sizeof(_HeapItem))
            if grown == NULL:
                raise MemoryError()
            self._heap = grown
            self._cap = self._cap * 2 + 64
        Py_INCREF(p)
        item.p = <PyObject*>p
        i = self._n
        self._n += 1
        while i > 0:
            up = (i - 1) >> 1
            if not _before(&item, &self._heap[up]):
                break
            self._heap[i] = self._heap[up]
            i = up
        self._heap[i] = item
        return 0

    cdef _Waiting _pop(self):
        """The first of the window (its reference passes to the caller)."""
        cdef _HeapItem last
        cdef Py_ssize_t i = 0, child, n
        cdef PyObject* first = self._heap[0].p
        self._n -= 1
        n = self._n
        if n > 0:
            last = self._heap[n]
            while True:
                child = 2 * i + 1
                if child >= n:
                    break
                if child + 1 < n and _before(&self._heap[child + 1], &self._heap[child]):
                    child += 1
                if not _before(&self._heap[child], &last):
                    break
                self._heap[i] = self._heap[child]
                i = child
            self._heap[i] = last
        p = <_Waiting>first
        Py_XDECREF(first)            # (``p`` holds it now)
        return p

    cdef list _release(self, bint everything):
        cdef list out = []
        cdef _Waiting p
        cdef int64_t now_c = 0, age
        now = self.now
        if now is not None:
            now_c = now
        while self._n:
            p = <_Waiting>self._heap[0].p
            if not everything and self._n <= self.max_pending:
                age = now_c - self._heap[0].t
                if age < C_REORDER_NS or (p.final is None and age < C_ANSWER_WAIT_NS):
                    break
            self._pop()
            del self.waiting[p.key]
            got = self._plan(p)
            if got is not None:
                out.append(got)
        if now is not None and (everything or now - self._expired >= EXPIRE_EVERY_NS):
            self._expired = now
            self._expire(now)
        return out

    cdef object _plan(self, _Waiting p):
        m = p.msg
        final = p.final
        cdef bint fast = _slots_known and type(m) is Message
        cdef _ConnState st
        cdef int64_t flags
        cdef Py_ssize_t mhl, old_len, hl
        conn = _field(m, fast, M_CONN, "conn")
        index = _field(m, fast, M_INDEX, "index")
        ts_first = _field(m, fast, M_TS_FIRST, "ts_first")
        got = self.conns.get(conn)
        if got is None:
            st = _ConnState.__new__(_ConnState)
            st.last = self.header.last_of(conn) if self.header is not None else None
            self.conns[conn] = st
        else:
            st = <_ConnState>got
            self.conns.move_to_end(conn)
        prev_end = st.resp_end
        st.resp_end = (_field(final, _slots_known and type(final) is Message, M_TS_LAST,
                              "ts_last") if final is not None else None)
        st.last_t = ts_first
        if st.last is not None and index >= st.last:
            del self.conns[conn]
            self.ended.append(conn)
        if self._last_t is not None and ts_first < self._last_t:
            self.reordered += 1
        else:
            self._last_t = ts_first
        data = _field(m, fast, M_DATA, "data")
        old_len = len(data)
        flags = _field(m, fast, M_FLAGS, "flags")
        mhl = _field(m, fast, M_HEAD_LENGTH, "head_length")
        if flags & CF_CUT:
            if flags & CF_CHUNKED:
                self.skipped["cut_chunked_body"] = self.skipped.get("cut_chunked_body", 0) + 1
                return None
            data = self._edit.set_content_length(data, mhl)
        if not self.keep_host and self.host is not None:
            data = self._set_host(data, mhl + (len(data) - old_len) if mhl else 0)
        pipe = prev_end is not None and ts_first < prev_end
        hl = mhl + (len(data) - old_len) if mhl else 0
        blen, chunked = self._body_length(data, hl)
        method = _field(m, fast, M_METHOD, "method")
        uri = _field(m, fast, M_URI, "uri")
        status = (_field(final, _slots_known and type(final) is Message, M_STATUS, "status")
                  if final is not None else None)
        req = _planned(conn, index, ts_first, data, method or "GET", uri or "", hl, status,
                       pipe, self.seq, blen, F_CHUNKED if chunked else 0)
        self.seq += 1
        self.planned += 1
        self.pipelined += pipe
        if final is None:
            self.unknown_status += 1
            self.late[(conn, index)] = req
            if len(self.late) > MAX_LATE:
                self.late.popitem(last=False)
        return req, m, final

    cdef object _set_host(self, data, Py_ssize_t hl):
        """``httpmsg.set_host(data, hl, host)``: here when the head reads plainly."""
        cdef Py_ssize_t n, colon = 0, stop = 0, v
        cdef int r
        cdef char* out
        if self._host_b is None or type(data) is not bytes or hl <= 0 or hl > len(data):
            return self._edit.set_host(data, hl, self.host)
        n = PyBytes_GET_SIZE(data)
        r = _first_field(<const unsigned char*>PyBytes_AS_STRING(data), hl,
                         <const unsigned char*>b"host", 4, &colon, &stop)
        if r < 0:
            return self._edit.set_host(data, hl, self.host)
        if r == 0:
            return data
        v = PyBytes_GET_SIZE(self._host_b)
        new = PyBytes_FromStringAndSize(NULL, colon + 2 + v + (n - stop))
        out = PyBytes_AS_STRING(new)
        memcpy(out, PyBytes_AS_STRING(data), colon + 1)
        out[colon + 1] = 32
        memcpy(out + colon + 2, PyBytes_AS_STRING(self._host_b), v)
        memcpy(out + colon + 2 + v, PyBytes_AS_STRING(data) + stop, n - stop)
        return new

    cdef tuple _body_length(self, data, Py_ssize_t hl):
        """``httpmsg.body_length(data, hl)``: here when the head has no Transfer-Encoding."""
        if type(data) is not bytes or hl <= 0 or hl > len(data) or _has_field_line(
                <const unsigned char*>PyBytes_AS_STRING(data), hl, "transfer-encoding:", 18):
            return tuple(self._edit.body_length(data, hl))
        return PyBytes_GET_SIZE(data) - hl, False

    cdef void _expire(self, now) except *:
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
            if (<_ConnState>st).last_t >= limit:
                break
            del conns[conn]
            self.ended.append(conn)


# -- planned requests across the reader's pipe ----------------------------------------------------
#
# The twin of ``pack_planned`` / ``unpack_planned`` in ``replay._fastparse_py`` (its docstrings
# give the layout): one record a request, written and read with memcpy, the strings as UTF-8.

from cpython.unicode cimport PyUnicode_AsUTF8AndSize


cdef packed struct PackedHead:
    int64_t it
    uint64_t conn
    int64_t index
    int64_t t
    int64_t head_length
    int64_t recorded_status
    int64_t seq
    int64_t body_length
    int64_t flags
    uint32_t data_len
    uint32_t method_len
    uint32_t uri_len
    uint8_t bits              # 1: pipelined, 2: a recorded status


cdef enum:
    PK_PIPELINED = 1
    PK_STATUS = 2


cdef inline bint _exact_int(object v):
    return type(v) is int


def pack_planned(list batch not None):
    """The twin's ``pack_planned``."""
    cdef bytearray out = bytearray()
    cdef list others = []
    cdef PackedHead h
    cdef Py_ssize_t pos = 0, i, at
    cdef const char* m
    cdef const char* u
    cdef char* p
    cdef Py_ssize_t mlen, ulen
    for i in range(len(batch)):
        entry = batch[i]
        if _packable(entry):
            item = (<tuple>entry)[1]
            r = (<tuple>item)[0]
            try:
                h.it = (<tuple>entry)[0]
                h.conn = r.conn
                h.index = r.index
                h.t = r.t
                h.head_length = r.head_length
                status = r.recorded_status
                h.recorded_status = 0 if status is None else status
                h.seq = r.seq
                h.body_length = r.body_length
                h.flags = r.flags
                m = PyUnicode_AsUTF8AndSize(r.method, &mlen)
                u = PyUnicode_AsUTF8AndSize(r.uri, &ulen)
            except (OverflowError, UnicodeError):
                others.append((i, entry))
                continue
            data = r.data
            if mlen > 0xFFFFFFFF or ulen > 0xFFFFFFFF or len(data) > 0xFFFFFFFF:
                others.append((i, entry))
                continue
            h.data_len = <uint32_t>len(data)
            h.method_len = <uint32_t>mlen
            h.uri_len = <uint32_t>ulen
            h.bits = (PK_PIPELINED if r.pipelined else 0) | (0 if status is None else PK_STATUS)
            at = len(out)
            PyByteArray_Resize(out, at + sizeof(PackedHead) + h.data_len + mlen + ulen)
            p = PyByteArray_AS_STRING(out) + at
            memcpy(p, &h, sizeof(PackedHead))
            p += sizeof(PackedHead)
            memcpy(p, PyBytes_AS_STRING(data), h.data_len)
            p += h.data_len
            memcpy(p, m, mlen)
            memcpy(p + mlen, u, ulen)
        else:
            others.append((i, entry))
    return bytes(out), others


cdef bint _packable(object entry):
    """``(it, (PlannedRequest, None, None))`` whose fields are of the types a plan makes."""
    if type(entry) is not tuple or len(<tuple>entry) != 2 or not _exact_int((<tuple>entry)[0]):
        return False
    item = (<tuple>entry)[1]
    if type(item) is not tuple or len(<tuple>item) != 3 or (<tuple>item)[1] is not None \
            or (<tuple>item)[2] is not None:
        return False
    r = (<tuple>item)[0]
    if type(r) is not PlannedRequest:
        return False
    status = r.recorded_status
    return (_exact_int(r.conn) and _exact_int(r.index) and _exact_int(r.t)
            and _exact_int(r.head_length) and (status is None or _exact_int(status))
            and _exact_int(r.seq) and _exact_int(r.body_length) and _exact_int(r.flags)
            and type(r.pipelined) is bool and type(r.data) is bytes
            and type(r.method) is str and type(r.uri) is str)


def unpack_planned(bytes blob not None, list others not None):
    """The twin's ``unpack_planned``."""
    cdef list out = []
    cdef PackedHead h
    cdef const char* p = PyBytes_AS_STRING(blob)
    cdef const char* end = p + PyBytes_GET_SIZE(blob)
    cdef Py_ssize_t k = 0, n_others = len(others)
    cdef dict methods = {}
    for o in others:
        if type(o) is not tuple or len(<tuple>o) != 2:
            raise ValueError("a packed batch of planned requests lists what is not (position, "
                             "entry)")
    while p < end or k < n_others:
        if k < n_others and (<tuple>others[k])[0] == len(out):
            out.append((<tuple>others[k])[1])
            k += 1
            continue
        if end - p < <Py_ssize_t>sizeof(PackedHead):
            raise ValueError("a packed batch of planned requests is cut short")
        memcpy(&h, p, sizeof(PackedHead))
        p += sizeof(PackedHead)
        if end - p < <Py_ssize_t>h.data_len + h.method_len + h.uri_len:
            raise ValueError("a packed batch of planned requests is cut short")
        data = PyBytes_FromStringAndSize(p, h.data_len)
        p += h.data_len
        mkey = PyBytes_FromStringAndSize(p, h.method_len)
        method = methods.get(mkey)
        if method is None:
            method = methods[mkey] = PyUnicode_DecodeUTF8(p, h.method_len, NULL)
        p += h.method_len
        uri = PyUnicode_DecodeUTF8(p, h.uri_len, NULL)
        p += h.uri_len
        r = _planned(h.conn, h.index, h.t, data, method, uri, h.head_length,
                     h.recorded_status if h.bits & PK_STATUS else None,
                     True if h.bits & PK_PIPELINED else False, h.seq, h.body_length, h.flags)
        out.append((h.it, (r, None, None)))
    return out


# -- the stream feeder's common step --------------------------------------------------------------
#
# The twin of ``feed_ready`` in ``replay._fastparse_py`` (its docstring gives the rules): the same
# steps, with a planned request's fields read through its slots, the deadline computed here
# (``_deadline``) and the clock read here when it is ``time.monotonic_ns``.

cdef inline object _pf(object r, int k, str name):
    return _at(r, _pslots_known, _pslot[k], name)


def feed_ready(object queued, object feeds, object player, object sched, object due,
               object on_recorded, int64_t slice_end, int64_t ahead):
    """The twin's ``feed_ready``."""
    cdef Py_ssize_t n = 0
    cdef int64_t t
    cdef object now = player.clock.now
    cdef bint clock = now is _monotonic_ns
    cdef object get = feeds.get
    cdef object to_end = feeds.move_to_end
    cdef object popleft = queued.popleft
    end_ns = player.end_ns
    try:
        while queued:
            t = _monotonic() if clock else now()
            if t >= slice_end:
                break
            got = queued[0]
            it = (<tuple?>got)[0]
            item = (<tuple?>got)[1]
            req = (<tuple?>item)[0]
            if type(req) is not PlannedRequest or _pf(req, P_RECORDED_STATUS,
                                                      "recorded_status") is None:
                break
            d = _deadline(sched, _pf(req, P_T, "t"), _pf(req, P_SEQ, "seq"), it)
            if d is None or (end_ns is not None and d >= end_ns) or d - ahead > t:
                break
            key = (_pf(req, P_CONN, "conn"), it)
            f = get(key)
            if f is None or (f.pumping is not None and _pf(req, P_PIPELINED, "pipelined")):
                break
            popleft()
            to_end(key)
            f.items.append(req)
            n += 1
            w = f.waiter
            if w is not None and not w.done():
                w.set_result(None)
            if due is not None:
                due.append(d)
            if on_recorded is not None and it == 0:
                on_recorded((<tuple?>item)[1], (<tuple?>item)[2])
    finally:
        if n:
            player.fed += n
    return n
