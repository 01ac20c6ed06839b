"""Harness: link/IP/TCP decoding of one raw frame, and that frame through an Engine.

Input: ``linktype selector u8, offset u8, frame bytes``. The selector picks one of the link
types the core supports; ``decode(linktype, frame)`` and ``decode(linktype, frame, offset)``
must agree between the compiled core and its pure twin, and so must what an Engine makes of the
frame given twice (the second copy a retransmission) and of the frame cut at the offset
(a snaplen cut). Only ``ReplayError`` may escape.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's replay

import struct

import atheris

with atheris.instrument_imports(include=["replay"]):
    from replay import _fastparse_py as pure
    from replay.errors import ReplayError

from fuzz._common import T0, batch, capture_packets, capture_paths, compiled_core, differ, main

compiled = compiled_core()
LINKTYPES = sorted(pure.SUPPORTED_LINKTYPES)


def _engine(mod, linktype, packets):
    try:
        eng = mod.Engine(linktype)
        out = eng.feed_batch(*batch(packets))
        out += eng.finish()
        return out, eng.stats()
    except ReplayError as e:
        return type(e).__name__, str(e)


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    linktype = LINKTYPES[data[0] % len(LINKTYPES)]
    off = data[1]
    fr = data[2:]
    want = (pure.decode(linktype, fr), pure.decode(linktype, fr, min(off, len(fr))))
    packets = [(T0, fr), (T0 + 1000, fr), (T0 + 2000, fr[:off])]
    eng_want = _engine(pure, linktype, packets)
    if compiled is not None:
        got = (compiled.decode(linktype, fr), compiled.decode(linktype, fr, min(off, len(fr))))
        if got != want:
            raise differ("decode", want, got)
        eng_got = _engine(compiled, linktype, packets)
        if eng_got != eng_want:
            raise differ("Engine on one frame", eng_want, eng_got)


def seeds():
    """Frames of real captures (the first 30 of each, and any carrying HTTP start lines)."""
    for path in capture_paths():
        linktype, packets = capture_packets(path, limit=3000)
        if linktype not in LINKTYPES:
            continue
        sel = LINKTYPES.index(linktype)
        n = 0
        for i, (_, fr) in enumerate(packets):
            if i < 30 or (n < 30 and (b"HTTP/1." in fr[:400])):
                n += i >= 30
                yield bytes([sel, 54]) + fr[:2048]
    # link types no capture has: the same IPv4/TCP packet behind each header
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 58, 0, 0x4000, 64, 6, 0, b"\x0a\0\0\x01", b"\x0a\0\0\x02")
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 0xFFFFFFF0, 7, 0x50, 0x18, 65535, 0, 0) + b"GET / HTTP/1.1\r\n\r\n"
    for lt, head in ((0, b"\x02\0\0\0"), (108, b"\0\0\0\x02"), (113, bytes(14) + b"\x08\x00"),
                     (276, b"\x08\x00" + bytes(18)), (101, b""), (228, b"")):
        yield bytes([LINKTYPES.index(lt), 0]) + head + ip + tcp


if __name__ == "__main__":
    main(TestOneInput)
