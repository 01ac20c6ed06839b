"""Packets from a pcap or pcapng file, in pcapy-ng batches.

Rules:
- the file is read through libpcap (pcapy-ng ``open_offline``), so every format libpcap reads is
  accepted: pcap in either byte order, micro- or nanosecond resolution, and pcapng;
- packets cross into the core in batches (``next_batch``): one buffer of packet bytes and an array
  of 16-byte records ``sec, usec, offset, caplen`` (native uint32);
- a file cut short (a torn last packet) keeps every packet before the cut: libpcap reports the
  cut for the whole batch, so the batch is read again one packet at a time up to the cut; the
  problem is kept in ``warnings``, never raised;
- a file that cannot be opened at all raises ``InputError`` with one line naming the file.
"""

from __future__ import annotations

import os
import struct

from replay.errors import InputError
from replay.spool import given_name

_META = struct.Struct("=IIII")

PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


def is_capture(path: str) -> bool:
    """True when the file starts like a pcap or pcapng file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in PCAP_MAGICS or head == PCAPNG_MAGIC


class PcapFile:
    """An open capture file. Iterate ``batches()`` for ``(buf, meta)`` pairs."""

    def __init__(self, path: str, batch_size: int = 4096):
        import pcapy

        self.path = path
        self.batch_size = batch_size
        self.warnings: list[str] = []
        self.packets_read = 0
        self.bytes_read = 0
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except OSError as e:
            raise InputError(f"{path}: {e.strerror}") from None
        if os.path.isdir(path):
            raise InputError(f"{path}: is a directory, not a capture file")
        if st.st_size == 0:
            raise InputError(f"{path}: empty file, not a capture")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise InputError(f"{path}: {e.strerror}") from None
        try:
            self._reader = pcapy.open_offline(path)
        except pcapy.PcapError as e:
            msg = str(e)
            if "unknown file format" in msg or "bad dump file format" in msg:
                raise InputError(f"{path}: not a pcap or pcapng capture file") from None
            if "truncated dump file" in msg and "file header" in msg:
                raise InputError(f"{path}: capture file header is cut short") from None
            raise InputError(f"{path}: cannot read capture: {msg}") from None
        self.linktype = self._reader.datalink()
        self.size = st.st_size

    def batches(self):
        """Yield ``(buf, meta)`` until the end of the file or the first unreadable packet."""
        import pcapy

        reader = self._reader
        n = self.batch_size
        while True:
            try:
                buf, meta = reader.next_batch(n)
            except pcapy.PcapError as e:
                yield from self._salvage(str(e))
                return
            if not meta:
                return
            self.packets_read += len(meta) // 16
            self.bytes_read += len(buf)
            yield buf, meta

    def _salvage(self, error: str):
        """Re-read, one packet at a time, the batch that hit a cut, and stop at the cut."""
        import pcapy

        reader = pcapy.open_offline(self.path)
        skip = self.packets_read
        while skip:
            buf, meta = reader.next_batch(min(skip, self.batch_size))
            if not meta:
                break
            skip -= len(meta) // 16
        parts = []
        recs = []
        off = 0
        while True:
            try:
                hdr, data = reader.next()
            except pcapy.PcapError:
                break
            if hdr is None:
                break
            sec, usec = hdr.getts()
            parts.append(data)
            recs.append(_META.pack(sec, usec, off, len(data)))
            off += len(data)
        self.warnings.append(
            f"{given_name(self.path)}: capture is cut short after packet {self.packets_read + len(recs)} "
            f"({error}); every packet before the cut was read")
        if recs:
            self.packets_read += len(recs)
            self.bytes_read += off
            yield b"".join(parts), b"".join(recs)

    def close(self):
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
