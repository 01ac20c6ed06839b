"""Small helpers to read and edit the head and body of a framed message (already known to be HTTP/1.x).

Editing rules (what ``play``'s Host and Content-Length fixes and the rewrites of ``replay.rules``
share): a header keeps its place and the spelling of its name when its value changes, with one
space after the colon; a new header goes after the last one, spelled as given, with the line
ending the head already uses; the start line, the other headers and the body are left byte for
byte. Field names compare case-insensitively (RFC 9110 §5.1). A line that starts with a space or
a tab continues the field before it (obs-fold, RFC 9112 §5.2) and goes with it when it is removed.
"""

from __future__ import annotations

from replay.core import first_field


def header_value(data: bytes, head_length: int, name: bytes) -> str | None:
    """The value of the first header ``name`` (lower-case bytes) in the message head, or None."""
    head = data[:head_length] if head_length else data[:65536]
    low = head.lower()
    key = b"\n" + name + b":"
    i = low.find(key)
    if i < 0:
        return None
    start = i + len(key)
    end = head.find(b"\n", start)
    if end < 0:
        end = len(head)
    return head[start:end].strip().decode("latin-1")


def format_addr(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def head_end(data: bytes) -> int:
    """Length of the head (start line, fields and the empty line), or -1 when it is not whole."""
    i = data.find(b"\r\n\r\n")
    j = data.find(b"\n\n")
    if i < 0 and j < 0:
        return -1
    if i < 0 or (0 <= j < i):
        return j + 2
    return i + 4


def is_chunked(data: bytes, head_length: int) -> bool:
    """True when the last transfer coding of the head is chunked (RFC 9112 §6.3)."""
    te = header_value(data, head_length, b"transfer-encoding")
    return te is not None and te.split(",")[-1].strip().lower() == "chunked"


def _chunked_length(body: bytes) -> int:
    """Payload octets of a chunked body (RFC 9112 §7.1); what can be read of a malformed one."""
    total = 0
    pos = 0
    while True:
        nl = body.find(b"\n", pos)
        if nl < 0:
            return total
        try:
            size = int(body[pos:nl].split(b";", 1)[0].strip(), 16)
        except ValueError:
            return total
        if size <= 0:
            return total
        total += size
        pos = nl + 1 + size
        if body[pos:pos + 2] == b"\r\n":
            pos += 2
        elif body[pos:pos + 1] == b"\n":
            pos += 1


def body_length(data: bytes, head_length: int):
    """(payload octets, chunked) of the body of ``data``, whose head is ``head_length`` bytes."""
    if head_length <= 0 or head_length > len(data):
        end = head_end(data)
        head_length = end if end >= 0 else len(data)
    if is_chunked(data, head_length):
        return _chunked_length(data[head_length:]), True
    return len(data) - head_length, False


def with_data(msg, data: bytes):
    """A copy of ``msg`` carrying ``data`` instead of its bytes, its parsed fields made true again.

    For the rewrites, plugins and middleware that change a message: the start line gives
    ``method`` and ``uri`` (requests) or ``status`` (responses), the head its length, the rest its
    body length (payload octets for a chunked body). ``conn``, ``index``, timestamps and
    addresses stay; so do ``flags``, except ``chunked``, which follows the new head. On a
    response, ``method`` and ``uri`` (those of the request answered) stay."""
    from dataclasses import replace

    from replay.events import F_CHUNKED, KIND_REQUEST

    hl = head_end(data)
    head_length = hl if hl >= 0 else len(data)
    first = data[:data.find(b"\n")] if b"\n" in data else data
    parts = first.rstrip(b"\r").split(b" ")
    fields = dict(data=data, head_length=head_length)
    if msg.kind == KIND_REQUEST:
        if len(parts) >= 3:
            fields["method"] = parts[0].decode("latin-1")
            fields["uri"] = b" ".join(parts[1:-1]).decode("latin-1")
    elif len(parts) >= 2 and parts[1].isdigit() and len(parts[1]) == 3:
        fields["status"] = int(parts[1])
    fields["body_length"], chunked = body_length(data, head_length)
    fields["flags"] = (msg.flags | F_CHUNKED) if chunked else (msg.flags & ~F_CHUNKED)
    return replace(msg, **fields)


# -- editing ---------------------------------------------------------------------------------------


def split_head(data: bytes, head_length: int):
    """(head, body) of ``data``; ``head_length`` 0 (or wrong) means: find the end of the head."""
    if head_length <= 0 or head_length > len(data):
        end = head_end(data)
        head_length = end if end >= 0 else len(data)
    return data[:head_length], data[head_length:]


def header_lines(head: bytes):
    """(start, end) of each header line's content, line endings excluded (CRLF or bare LF)."""
    out = []
    pos = head.find(b"\n") + 1          # skip the start line
    n = len(head)
    while 0 < pos < n:
        end = head.find(b"\n", pos)
        if end < 0:
            end = n
        stop = end - 1 if end > pos and head[end - 1:end] == b"\r" else end
        if stop > pos:
            out.append((pos, stop))
        pos = end + 1
    return out


def header_fields(data: bytes, head_length: int) -> list:
    """Every header of the head as (name, value) bytes, whitespace around both stripped, in order."""
    head, _ = split_head(data, head_length)
    out = []
    for start, stop in header_lines(head):
        if head[start] in b" \t":
            if out:   # obs-fold: the line continues the previous value
                name, value = out[-1]
                out[-1] = (name, value + b" " + head[start:stop].strip())
            continue
        colon = head.find(b":", start, stop)
        if colon > start:
            out.append((head[start:colon].strip(), head[colon + 1:stop].strip()))
    return out


def header_values(data: bytes, head_length: int, name: bytes) -> list:
    """The values (latin-1 text) of every header ``name`` (lower-case bytes), in order."""
    return [v.decode("latin-1") for k, v in header_fields(data, head_length) if k.lower() == name]


def field_spans(head: bytes, name: bytes):
    """(start, colon, stop, next) of each line of header ``name``: ``next`` is where the line
    after it (and its obs-fold continuations) begins."""
    spans = []
    lines = header_lines(head)
    for i, (start, stop) in enumerate(lines):
        if head[start] in b" \t":
            continue
        colon = head.find(b":", start, stop)
        if colon < 0 or head[start:colon].strip().lower() != name:
            continue
        j = i + 1
        while j < len(lines) and head[lines[j][0]] in b" \t":
            j += 1
        last = lines[j - 1][1]
        nl = head.find(b"\n", last)
        spans.append((start, colon, last, len(head) if nl < 0 else nl + 1))
    return spans


def _add_field(head: bytes, body: bytes, name: bytes, value: bytes) -> bytes:
    lines = header_lines(head)
    eol = b"\r\n" if b"\r\n" in head else b"\n"
    if lines:
        at = lines[-1][1]
        return head[:at] + eol + name + b": " + value + head[at:] + body
    at = head.find(b"\n") + 1
    return head[:at] + name + b": " + value + eol + head[at:] + body


def replace_header(data: bytes, head_length: int, name: bytes, value: bytes,
                   add: bool = False) -> bytes:
    """``data`` with the value of its first header ``name`` (lower-case bytes) set to ``value``;
    without one, unchanged, or (``add``) with ``Name: value`` added."""
    head, body = split_head(data, head_length)
    found = first_field(head, name)
    if found is False:
        spans = field_spans(head, name)
        found = (spans[0][1], spans[0][2]) if spans else None
    if found is not None:
        colon, stop = found
        return head[:colon + 1] + b" " + value + head[stop:] + body
    if not add:
        return data
    return _add_field(head, body, name.title(), value)


def set_header(data: bytes, head_length: int, name: bytes, value: bytes) -> bytes:
    """``data`` with exactly one header ``name`` (spelled as given when added) set to ``value``:
    the first keeps its place and spelling, any later ones are removed."""
    head, body = split_head(data, head_length)
    spans = field_spans(head, name.lower())
    if not spans:
        return _add_field(head, body, name, value)
    start, colon, stop, _ = spans[0]
    return head[:colon + 1] + b" " + value + _cut(head, spans[1:], stop) + body


def remove_header(data: bytes, head_length: int, name: bytes) -> bytes:
    """``data`` without any header ``name`` (lower-case bytes); unchanged when it has none."""
    head, body = split_head(data, head_length)
    spans = field_spans(head, name)
    if not spans:
        return data
    return _cut(head, spans, 0) + body


def _cut(head: bytes, spans, pos: int) -> bytes:
    """``head[pos:]`` without the field lines of ``spans`` (``field_spans`` entries, at or after ``pos``)."""
    parts = []
    for s, _, _, nxt in spans:
        parts.append(head[pos:s])
        pos = nxt
    parts.append(head[pos:])
    return b"".join(parts)


def set_host(data: bytes, head_length: int, host: str) -> bytes:
    """``data`` with its Host header's value set to ``host`` (unchanged when it has none)."""
    return replace_header(data, head_length, b"host", host.encode("latin-1"))


def set_content_length(data: bytes, head_length: int) -> bytes:
    """``data`` with a Content-Length equal to the body bytes it carries (RFC 9112 §6.2)."""
    head, body = split_head(data, head_length)
    return replace_header(data, len(head), b"content-length", str(len(body)).encode(), add=bool(body))


def decode_chunked(body: bytes):
    """(payload, trailer fields, complete) of a chunked body (RFC 9112 §7.1).

    ``trailer fields`` are the raw lines after the last chunk, without the final empty line;
    ``complete`` is False when the body ends before its last chunk (a cut message): the payload
    is then what could be read."""
    out = []
    pos = 0
    n = len(body)
    while True:
        nl = body.find(b"\n", pos)
        if nl < 0:
            return b"".join(out), b"", False
        try:
            size = int(body[pos:nl].split(b";", 1)[0].strip(), 16)
        except ValueError:
            return b"".join(out), b"", False
        pos = nl + 1
        if size < 0:
            return b"".join(out), b"", False
        if size == 0:
            rest = body[pos:]
            if rest[:2] == b"\r\n" or rest[:1] == b"\n":
                return b"".join(out), b"", True
            end = head_end(b"\n" + rest)      # the empty line that ends the trailer section
            if end < 0:
                return b"".join(out), rest, False
            return b"".join(out), rest[:end - 1].rstrip(b"\r\n"), True
        if pos + size > n:
            out.append(body[pos:])
            return b"".join(out), b"", False
        out.append(body[pos:pos + size])
        pos += size
        if body[pos:pos + 2] == b"\r\n":
            pos += 2
        elif body[pos:pos + 1] == b"\n":
            pos += 1


def encode_chunked(payload: bytes, trailers: bytes = b"") -> bytes:
    """``payload`` as one chunk, then the last chunk, ``trailers`` (field lines) and the end."""
    out = b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b""
    return out + b"0\r\n" + (trailers + b"\r\n" if trailers else b"") + b"\r\n"
