"""Packets from a pcap or pcapng file, in pcapy-ng batches.

Rules:
- the file is opened through libpcap (pcapy-ng ``open_offline``), so every format libpcap reads is
  accepted: pcap in either byte order, micro- or nanosecond resolution, and pcapng;
- packets cross into the core in batches (``next_batch``): one buffer of packet bytes and an array
  of 16-byte records ``sec, usec, offset, caplen`` (native uint32);
- a classic pcap file (not pcapng) is read here, in reads of ``CHUNK`` bytes, its records
  written by the core (``pcap_records``), with libpcap's rules: a nanosecond fraction is cut to
  microseconds; a record whose caplen is over the header's snapshot length (or over
  ``MAX_CAPLEN``) hands the rest of the file to libpcap from that packet on, and so does a record
  cut short, so whatever libpcap does there (and says) is what happens. With ``reuse``, a batch's
  buffer is a view of the reading buffer, valid until the next batch is asked for (for a core
  that copies what it keeps: the compiled one); otherwise each batch is bytes of its own;
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

# bytes read at once from a classic pcap file: what the core reads next is still in the CPU's
# cache (4 MiB reads: 5-10 % slower, median of 8 converts)
CHUNK = 512 << 10
MAX_CAPLEN = 262144      # libpcap's largest caplen for the link types the core reads
assert CHUNK > 16 + MAX_CAPLEN      # (a record always fits: an empty read is the file's end)
_SWAPPED_PSEUDO_HEADERS = (113, 276)     # DLT_LINUX_SLL, DLT_LINUX_SLL2

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

    def __init__(self, path: str, batch_size: int = 4096, reuse: bool = False):
        import pcapy

        self.path = path
        self.batch_size = batch_size
        self.reuse = reuse
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
            with open(path, "rb") as f:
                head = f.read(24)
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
        self._classic = _classic_header(head, self.linktype)
        self._started = False

    def batches(self):
        """Yield ``(buf, meta)`` until the end of the file or the first unreadable packet (once:
        a second call yields nothing more)."""
        import pcapy

        if self._started:
            return
        self._started = True
        if self._classic is not None:
            if (yield from self._own_batches()):
                return
            try:
                self._skip(self._reader, self.packets_read)   # libpcap goes on from there
            except pcapy.PcapError as e:        # (the file changed under us)
                self._cut(str(e), self.packets_read)
                return
        yield from self._libpcap_batches()

    def _libpcap_batches(self):
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

    def _own_batches(self):
        """A classic pcap file's batches, read here; True at its end, False where libpcap has to
        go on (an odd record, or one cut short)."""
        from replay.core import pcap_records

        swapped, nano, snapshot = self._classic
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        start = end = 0
        eof = False
        n = self.batch_size
        with open(self.path, "rb", buffering=0) as f:
            f.seek(24)
            while True:
                meta, pos, odd, nbytes = pcap_records(buf, start, end, swapped, nano, snapshot, n)
                if meta:
                    self.packets_read += len(meta) // 16
                    self.bytes_read += nbytes
                    yield (view[start:pos] if self.reuse else bytes(view[start:pos])), meta
                    start = pos
                    continue
                if odd:
                    return False
                if eof:
                    return start == end
                if start:                  # the record begun at the end goes to the front
                    buf[:end - start] = bytes(view[start:end])      # (the two may overlap)
                    end -= start
                    start = 0
                got = f.readinto(view[end:])
                if got:
                    end += got
                else:
                    eof = True

    def _skip(self, reader, count: int) -> None:
        """Move a libpcap reader past the first ``count`` packets."""
        while count:
            _, meta = reader.next_batch(min(count, self.batch_size))
            if not meta:
                return
            count -= len(meta) // 16

    def _salvage(self, error: str):
        """Re-read, one packet at a time, the batch that hit a cut, and stop at the cut."""
        import pcapy

        try:
            reader = pcapy.open_offline(self.path)
            self._skip(reader, self.packets_read)
        except pcapy.PcapError:         # the file was cut further under us: stop where we are
            self._cut(error, self.packets_read)
            return
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
        self._cut(error, self.packets_read + len(recs))
        if recs:
            self.packets_read += len(recs)
            self.bytes_read += off
            yield b"".join(parts), b"".join(recs)

    def _cut(self, error: str, count: int) -> None:
        self.warnings.append(
            f"{given_name(self.path)}: capture is cut short after packet {count} "
            f"({error}); every packet before the cut was read")

    def close(self):
        self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _classic_header(head: bytes, linktype: int):
    """``(swapped, nano, snapshot)`` of a classic pcap file (``head``: its first 24 bytes) of
    version 2.4 (big-endian, nanoseconds, the caplen over which libpcap's rules apply) whose
    packets libpcap hands over as they are, else None: a link type the core reads, and not one
    whose pseudo-header libpcap byte-swaps in a big-endian file (Linux cooked v1/v2, for CAN)."""
    from replay.core import SUPPORTED_LINKTYPES

    if linktype not in SUPPORTED_LINKTYPES or len(head) < 24 or head[:4] not in PCAP_MAGICS:
        return None
    kind = PCAP_MAGICS.index(head[:4])      # (µs little-endian, µs big, ns little, ns big)
    swapped, nano = kind % 2 == 1, kind >= 2
    major, minor, _zone, _sigfigs, snaplen = struct.unpack((">" if swapped else "<") + "HHiII",
                                                            head[4:20])
    if (major, minor) != (2, 4) or (swapped and linktype in _SWAPPED_PSEUDO_HEADERS):
        return None
    return swapped, nano, snaplen if 0 < snaplen <= MAX_CAPLEN else MAX_CAPLEN
