"""Harness: what a GoReplay middleware writes back (``replay.rules.middleware.decode_answer``).

Input: the bytes of the middleware's stdout. Each line is decoded as the reader thread decodes
it (hex of ``TYPE ID TIMESTAMP LATENCY\\n`` and the payload); a decoded payload replaces the
message it answers (``httpmsg.with_data``, which re-reads its start line, head and body), as a
request and as a response. ``decode_answer`` may raise ``MiddlewareError`` only; ``with_data``
nothing at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's replay

import binascii

import atheris

with atheris.instrument_imports(include=["replay"]):
    from replay.errors import ReplayError
    from replay.events import KIND_REQUEST, KIND_RESPONSE, Message
    from replay.httpmsg import with_data
    from replay.rules.middleware import decode_answer, message_id, message_type

from fuzz._common import T0, capture_messages, capture_paths, main

ORIGINALS = [Message(k, 3, 1, T0, T0 + 5, ("10.0.0.1", 40000), ("10.0.0.2", 80), 0,
                     b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "GET", "/", 200 * k, 0, 27)
             for k in (KIND_REQUEST, KIND_RESPONSE)]


def TestOneInput(data: bytes) -> None:
    for n, line in enumerate(data.split(b"\n")[:64], 1):
        try:
            answer = decode_answer(line + b"\n", n)
        except ReplayError:
            continue
        if answer is None:
            continue
        (mtype, mid), payload = answer
        assert mtype in (b"1", b"2", b"3") and mid, answer
        for m in ORIGINALS:
            new = with_data(m, payload)
            assert new.data == payload


def encode(m) -> bytes:
    meta = b"%s %s %d -1" % (message_type(m), message_id(m.conn, m.index), m.ts_first)
    return binascii.hexlify(meta + b"\n" + m.data)


def seeds():
    for path in capture_paths(shared=False):
        msgs = capture_messages(path)[:8]
        if msgs:
            yield b"\n".join(encode(m) for m in msgs) + b"\n"
            yield encode(msgs[0]).upper() + b"\r\n\n" + encode(msgs[-1])


if __name__ == "__main__":
    main(TestOneInput)
