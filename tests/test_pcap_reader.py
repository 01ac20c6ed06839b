"""The classic pcap reader of ``replay.sources.pcapfile`` (records written by the core's
``pcap_records``) against libpcap's own reading of the same files: the same packets with the same
timestamps, the same warnings and counts, for both byte orders and both resolutions, and for files
cut or odd at every kind of place (where libpcap takes over from the packet at which the reader
stopped). Both cores' ``pcap_records`` give the same records."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from replay import _fastparse_py as pure
from replay.sources.pcapfile import MAX_CAPLEN, PcapFile

try:
    from replay import _fastparse as compiled
except ImportError:      # pragma: no cover - the pure run
    compiled = None

SAMPLE = Path(__file__).resolve().parent.parent / "captures" / "sample.pcap"


def _packets():
    """sample.pcap's packets: (sec, usec, data)."""
    raw = SAMPLE.read_bytes()
    assert raw[:4] == b"\xd4\xc3\xb2\xa1"
    out, pos = [], 24
    while pos < len(raw):
        sec, usec, cap, _ = struct.unpack_from("<IIII", raw, pos)
        out.append((sec, usec, raw[pos + 16:pos + 16 + cap]))
        pos += 16 + cap
    return out


def _write(path, packets, *, big=False, nano=False, snaplen=65535, version=(2, 4), linktype=1,
           caplens=None):
    e = ">" if big else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    parts = [struct.pack(e + "IHHiIII", magic, version[0], version[1], 0, 0, snaplen, linktype)]
    for i, (sec, usec, data) in enumerate(packets):
        frac = usec * 1000 + i % 1000 if nano else usec     # (a fraction libpcap has to cut)
        cap = len(data) if caplens is None or i not in caplens else caplens[i]
        parts.append(struct.pack(e + "IIII", sec, frac, cap, len(data)) + data)
    path.write_bytes(b"".join(parts))
    return path


def _read(path, own, batch_size):
    pf = PcapFile(str(path), batch_size=batch_size, reuse=own)
    if not own:
        pf._classic = None       # every packet through libpcap
    used = pf._classic is not None
    got = []
    for buf, meta in pf.batches():
        buf = bytes(buf)
        got.extend((s, u, buf[o:o + c]) for s, u, o, c in struct.iter_unpack("=IIII", meta))
    return used, (got, pf.warnings, pf.packets_read, pf.bytes_read, pf.linktype)


def _same(path, batch_size=7, classic=True):
    used, mine = _read(path, True, batch_size)
    _, theirs = _read(path, False, batch_size)
    assert used is classic
    assert mine == theirs
    return mine


@pytest.mark.parametrize("big", [False, True], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("nano", [False, True], ids=["usec", "nsec"])
@pytest.mark.parametrize("batch_size", [1, 5, 1024])
def test_whole_files_read_as_libpcap_reads_them(tmp_path, big, nano, batch_size):
    pk = _packets()
    got, warnings, count, nbytes, _ = _same(_write(tmp_path / "a.pcap", pk, big=big, nano=nano),
                                            batch_size)
    assert len(got) == count == len(pk) and not warnings
    assert nbytes == sum(len(d) for _, _, d in pk)
    assert [d for _, _, d in got] == [d for _, _, d in pk]


def test_a_file_cut_anywhere_keeps_what_libpcap_keeps(tmp_path):
    """Cut inside the file header's end, inside a record's header and inside its data, at every
    byte of the last records: the same packets kept and the same warning."""
    pk = _packets()
    whole = _write(tmp_path / "whole.pcap", pk).read_bytes()
    cuts = list(range(len(whole) - 400, len(whole))) + [24, 30, 40, 100]
    for cut in cuts:
        p = tmp_path / "cut.pcap"
        p.write_bytes(whole[:cut])
        got, warnings, count, _, _ = _same(p, batch_size=3)
        assert count == len(got) <= len(pk)
        assert bool(warnings) is (cut not in (24, len(whole)) and
                                  sum(16 + len(d) for _, _, d in pk[:count]) + 24 != cut)


def test_odd_records_are_left_to_libpcap(tmp_path):
    """A caplen over the header's snapshot length, over the largest libpcap takes, a snapshot
    length of 0 (libpcap's largest then), another version: libpcap's rules, libpcap's words."""
    pk = _packets()
    big_data = [(1, 2, b"\x00" * 300)] + pk[:5]
    cases = {
        "over-snaplen": dict(snaplen=200, packets=big_data),
        "over-max": dict(caplens={3: MAX_CAPLEN + 1}),
        "snaplen-0": dict(snaplen=0),
        "snaplen-huge": dict(snaplen=1 << 30),
    }
    for name, kw in cases.items():
        packets = kw.pop("packets", pk)
        _same(_write(tmp_path / f"{name}.pcap", packets, **kw), batch_size=4)
    _same(_write(tmp_path / "v22.pcap", pk, version=(2, 2)), batch_size=4, classic=False)


def test_pcapng_stays_with_libpcap():
    pytest.importorskip("pcapy")
    corpus = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    found = sorted(corpus.rglob("*.pcapng")) if corpus.is_dir() else []
    if not found:
        pytest.skip("no pcapng file in ../shared/corpus")
    _same(found[0], batch_size=64, classic=False)


@pytest.mark.skipif(compiled is None, reason="the compiled core is not built")
def test_both_cores_write_the_same_records(tmp_path):
    pk = _packets()
    for big in (False, True):
        for nano in (False, True):
            raw = bytearray(_write(tmp_path / "x.pcap", pk, big=big, nano=nano).read_bytes())
            for start, end, limit, snap in ((24, len(raw), 1000, 65535), (24, len(raw) - 5, 3, 65535),
                                            (24, len(raw), 1000, 60), (24, 24, 5, 65535),
                                            (24, 30, 5, 65535)):
                a = pure.pcap_records(raw, start, end, big, nano, snap, limit)
                b = compiled.pcap_records(raw, start, end, big, nano, snap, limit)
                assert a == b
    with pytest.raises(ValueError):
        compiled.pcap_records(b"x" * 10, 0, 11, False, False, 65535, 1)
