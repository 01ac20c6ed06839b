"""Small helpers to read fields out of a framed message's head (already known to be HTTP/1.x)."""

from __future__ import annotations


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
    te = header_value(data, head_length, b"transfer-encoding")
    chunked = te is not None and te.split(",")[-1].strip().lower() == "chunked"
    body = data[head_length:]
    fields["body_length"] = _chunked_length(body) if chunked else len(body)
    fields["flags"] = (msg.flags | F_CHUNKED) if chunked else (msg.flags & ~F_CHUNKED)
    return replace(msg, **fields)
