"""Harness: the .rlog reader (``replay.log.reader.LogReader`` over ``replay.log.format``).

Input: ``mode u8`` then the bytes of a file. With bit 0 of ``mode`` set, the harness first makes
the checksums true (the file header's, and those of every block header and section found at a
sync marker), so that mutations get past the CRC checks into decompression, the table, the
index and the metadata. The file is opened and read every way the commands read it: ``len``,
iteration, ``table()`` and ``messages_at`` over its rows, ``block_payload``, ``read_range``,
``time_span``, ``message_at``, ``meta``. Only ``ReplayError`` may escape (``IndexError`` from
``message_at`` on a block found damaged is its documented answer); every read ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's replay

import os
import tempfile
import zlib

import atheris

with atheris.instrument_imports(include=["replay"]):
    from replay.errors import ReplayError
    from replay.log import format as fmt
    from replay.log.reader import LogReader

from fuzz._common import scratch_file, capture_messages, capture_paths, main

_PATH, _write = scratch_file(".rlog")


def repair(buf: bytearray) -> None:
    """Make the checksums of the file header and of every block found at a sync marker true."""
    if len(buf) >= fmt.FILE_HEADER.size:
        hlen = fmt.FILE_HEADER.unpack_from(buf)[3]
        if fmt.FILE_HEADER_LEN <= hlen <= len(buf):
            fmt.CRC.pack_into(buf, hlen - 4, zlib.crc32(buf[:hlen - 4]))
    pos = buf.find(fmt.SYNC)
    while pos >= 0:
        if len(buf) - pos >= fmt.BLOCK_HEADER_LEN:
            f = list(fmt.BLOCK_HEADER.unpack_from(buf, pos))
            hlen, a_len, b_len = f[3], f[7], f[9]
            if fmt.BLOCK_HEADER_LEN <= hlen <= len(buf) - pos:
                a0 = pos + hlen
                f[11] = zlib.crc32(buf[a0:a0 + a_len])
                f[12] = zlib.crc32(buf[a0 + a_len:a0 + a_len + b_len])
                fmt.BLOCK_HEADER.pack_into(buf, pos, *f)
                fmt.CRC.pack_into(buf, pos + hlen - 4, zlib.crc32(buf[pos:pos + hlen - 4]))
        pos = buf.find(fmt.SYNC, pos + 1)


def read_all(path: str) -> None:
    with LogReader(path) as r:
        r.summary()
        n = len(r)
        for _ in r:
            pass
        table = r.table()
        for _ in r.messages_at(range(len(table))):
            pass
        for b in range(len(r._table_blocks or ())):
            r.block_payload(b)
        t0, t1 = r.time_span()
        if t0 is not None:
            for _ in r.read_range(t0, (t0 + t1) // 2):
                pass
        for row in (0, n // 2, -1):
            if n:
                try:
                    r.message_at(row)
                except IndexError as e:
                    if "damaged" not in str(e) and "out of range" not in str(e):
                        raise
        r.meta.get("stats")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    buf = bytearray(data[1:])
    if data[0] & 1:
        repair(buf)
    _write(bytes(buf))
    try:
        read_all(_PATH)
    except ReplayError:
        pass


# -- seeds ----------------------------------------------------------------------------------------
def raw_log(msgs, per_block=8) -> bytes:
    """A log like the writer's, with sections stored uncompressed (mutations then mean something)."""
    out = bytearray(fmt.pack_file_header())
    entries = []
    summary = fmt.Summary()
    for i in range(0, len(msgs), per_block):
        part = msgs[i:i + per_block]
        table, parts, t_min, t_max, block = fmt.encode_table(part)
        summary.add(block)
        payload = b"".join(parts)
        entries.append((len(out), t_min, t_max, len(part), fmt.BLOCK_DATA))
        out += b"".join(fmt.pack_block(fmt.BLOCK_DATA, 0, len(part), t_min, t_max, table,
                                       len(table), payload, len(payload)))
    meta = b'{"tool": "replay", "command": "convert", "stats": {"packets": 1}}'
    entries.append((len(out), 0, 0, 0, fmt.BLOCK_META))
    out += b"".join(fmt.pack_block(fmt.BLOCK_META, 0, 0, 0, 0, meta, len(meta)))
    sa = fmt.encode_summary(summary)
    entries.append((len(out), 0, 0, 0, fmt.BLOCK_SUMMARY))
    out += b"".join(fmt.pack_block(fmt.BLOCK_SUMMARY, 0, 0, 0, 0, sa, len(sa)))
    a = fmt.encode_index(entries, len(out))
    data = [e for e in entries if e[4] == fmt.BLOCK_DATA]
    out += b"".join(fmt.pack_block(fmt.BLOCK_INDEX, 0, len(entries), min(e[1] for e in data),
                                   max(e[2] for e in data), a, len(a)))
    return bytes(out)


def written_log(msgs) -> bytes:
    """The log ``replay convert`` writes (zstd sections), through ``LogWriter``."""
    from replay.log.writer import LogWriter

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "seed.rlog")
        with LogWriter(path, meta={"command": "convert"}, block_records=16, threads=False) as w:
            for m in msgs:
                w.write(m)
            w.close(fsync=False)
        with open(path, "rb") as f:
            return f.read()


def seeds():
    from dataclasses import replace

    for path in capture_paths():
        msgs = [replace(m, data=m.data[:1500]) for m in capture_messages(path)[:24]]
        if not msgs:
            continue
        yield b"\x01" + raw_log(msgs)
        yield b"\x00" + written_log(msgs)
        yield b"\x00" + written_log(msgs)[:-100]   # a torn tail: no index


if __name__ == "__main__":
    main(TestOneInput)
