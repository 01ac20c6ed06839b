"""Harness: the response framer of ``replay play`` (``ResponseFramer``) and the head/body helpers
of ``replay.httpmsg`` that edit what it frames.

Input: ``head u8`` (bits 0-2 how many requests were sent, bit 3 the server closes at the end),
one ``u8`` per request choosing its method, ``step u8`` (bytes per read; 0: all at once), then
the bytes the server sent. Both cores must frame the same responses and counters, whole or read
by read; every framed message, and the raw bytes as a request and as a response, go through the
``httpmsg`` helpers, which must not raise at all (they serve rewrites and middleware answers of
any shape).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's replay

import atheris

with atheris.instrument_imports(include=["replay"]):
    from replay import _fastparse_py as pure
    from replay import httpmsg
    from replay.errors import ReplayError
    from replay.events import KIND_REQUEST, KIND_RESPONSE, Message

from fuzz._common import T0, capture_messages, capture_paths, compiled_core, differ, main

compiled = compiled_core()
MAX_READS = 512
METHODS = ("GET", "HEAD", "POST", "CONNECT", "PUT", "OPTIONS", "DELETE", "PATCH")


def frame(mod, methods, reads, close):
    try:
        f = mod.ResponseFramer(("10.0.0.1", 40000), ("10.0.0.2", 80))
        for m in methods:
            f.expect(m)
        out = []
        for i, r in enumerate(reads):
            out += f.feed(r, T0 + i)
        if close:
            out += f.eof(T0 + len(reads))
        return out, f.stats(), f.outstanding, f.tunnel
    except ReplayError as e:
        return type(e).__name__, str(e)


def helpers(m: Message) -> None:
    """Every helper on one message; none may raise."""
    data, hl = m.data, m.head_length
    httpmsg.head_end(data)
    httpmsg.header_value(data, hl, b"host")
    fields = httpmsg.header_fields(data, hl)
    httpmsg.header_values(data, hl, b"content-length")
    if httpmsg.is_chunked(data, hl):
        httpmsg.decode_chunked(data[hl:])
    for name in {b"host", b"content-length"} | {k.lower() for k, _ in fields[:3]}:
        gone = httpmsg.remove_header(data, hl, name)
        if name and httpmsg.header_values(gone, 0, name) and b"\n\n" not in data and b"\r\n\r\n" in data:
            pass  # a bare-LF head inside a CRLF one can hide a field from the cut; not an error
        httpmsg.set_header(data, hl, name or b"x", b"v")
    httpmsg.set_host(data, hl, "example.test:8080")
    httpmsg.set_content_length(data, hl)
    new = httpmsg.with_data(m, data + b"x")
    httpmsg.with_data(new, data[: max(0, hl - 1)])
    httpmsg.decode_chunked(data)


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    head = data[0]
    n = head & 7
    methods = [METHODS[b % len(METHODS)] for b in data[1:1 + n]]
    step = data[1 + n] if len(data) > 1 + n else 0
    wire = data[2 + n:]
    # While resynchronising, the core spends ~50 us on each read however small (it searches the
    # bytes it holds for a start line again), so 1-byte reads of a large garbage body take
    # seconds: at most MAX_READS reads, so that a slow input means a new slow path.
    if step:
        step = max(step, -(-len(wire) // MAX_READS))
    close = bool(head & 8)
    whole = frame(pure, methods, [wire], close)
    reads = [wire[i:i + step] for i in range(0, len(wire), step)] if step else [wire]
    split = frame(pure, methods, reads, close)
    if compiled is not None:
        got = frame(compiled, methods, reads, close)
        if got != split:
            raise differ("ResponseFramer", split, got)
    if isinstance(whole[0], list):
        for m in whole[0]:
            helpers(m)
    for kind in (KIND_REQUEST, KIND_RESPONSE):
        helpers(Message(kind, 0, 0, T0, T0, ("10.0.0.1", 1), ("10.0.0.2", 80), 0, wire,
                        head_length=max(0, httpmsg.head_end(wire))))
        helpers(Message(kind, 0, 0, T0, T0, ("10.0.0.1", 1), ("10.0.0.2", 80), 0, wire,
                        head_length=step))


def seeds():
    """Each connection's responses of the captures, with the methods of their requests."""
    for path in capture_paths():
        by_conn: dict = {}
        for m in capture_messages(path):
            by_conn.setdefault(m.conn, []).append(m)
        for i, msgs in enumerate(list(by_conn.values())[:30]):
            resp = [m for m in msgs if m.kind == KIND_RESPONSE][:7]
            if not resp:
                continue
            methods = []
            for m in resp:
                if m.method and not m.flags & 16 and len(methods) < 7:
                    methods.append(METHODS.index(m.method) if m.method in METHODS else 0)
            wire = b"".join(m.data[:8192] for m in resp)
            yield bytes([len(methods) | (8 if i % 2 else 0), *methods, (0, 1, 7, 200)[i % 4]]) + wire
    yield bytes([0x09, 0, 0]) + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"


if __name__ == "__main__":
    main(TestOneInput)
