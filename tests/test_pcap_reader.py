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


def _read(path, own, batch_size, reuse=None):
    pf = PcapFile(str(path), batch_size=batch_size, reuse=own if reuse is None else reuse)
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
            cases = ((24, len(raw), 1000, 65535), (24, len(raw) - 5, 3, 65535),
                     (24, len(raw), 1000, 60), (24, 24, 5, 65535), (24, 30, 5, 65535))
            for start, end, limit, snap in cases:
                a = pure.pcap_records(raw, start, end, big, nano, snap, limit)
                b = compiled.pcap_records(raw, start, end, big, nano, snap, limit)
                assert a == b
    with pytest.raises(ValueError):
        compiled.pcap_records(b"x" * 10, 0, 11, False, False, 65535, 1)


def test_refills_of_the_reading_buffer(tmp_path, monkeypatch):
    """Records across the end of the reading buffer (moved to its front, then read on), with
    buffers of many sizes: the same as libpcap, with ``reuse`` and without."""
    import replay.sources.pcapfile as pcapfile

    pk = _packets()
    path = _write(tmp_path / "a.pcap", pk * 3, nano=True)
    largest = max(len(d) for _, _, d in pk) + 16
    _, want = _read(path, False, 5)
    for chunk in list(range(largest, largest + 40)) + [5000, 7777, 65536]:
        monkeypatch.setattr(pcapfile, "CHUNK", chunk)
        for own_batch in (1, 5, 1024):
            for reuse in (True, False):
                used, got = _read(path, True, own_batch, reuse)
                assert used and got == want


def test_a_file_cut_while_read_ends_with_a_warning(tmp_path, monkeypatch):
    """The file is cut short after its first batches were read (the rest of it through libpcap,
    which no longer finds the packets read): a warning, no exception, what was read kept."""
    import replay.sources.pcapfile as pcapfile

    monkeypatch.setattr(pcapfile, "CHUNK", 4096)
    pk = _packets() * 4
    snap = max(len(d) for _, _, d in pk)
    odd_last = (1, 1, b"\x00" * (snap + 1))
    path = _write(tmp_path / "a.pcap", pk + [odd_last], snaplen=snap)
    pf = PcapFile(str(path), batch_size=8, reuse=True)
    it = pf.batches()
    first = next(it)
    with open(path, "r+b") as f:
        f.truncate(2000)
    rest = list(it)
    assert first and pf.packets_read >= 8
    assert len(pf.warnings) == 1 and "cut short" in pf.warnings[0]
    assert sum(len(m) // 16 for _, m in [first] + rest) == pf.packets_read


def test_what_libpcap_reads_otherwise_goes_to_libpcap(tmp_path):
    """Nanoseconds of a second or more (libpcap reads them its own way), a big-endian Linux
    cooked capture (libpcap swaps its CAN pseudo-headers), a link type the core does not read:
    the same as libpcap."""
    pk = _packets()
    raw = bytearray(_write(tmp_path / "n.pcap", pk, nano=True).read_bytes())
    struct.pack_into("<I", raw, 24 + 16 + len(pk[0][2]) + 4, 4_000_000_123)   # 2nd record
    (tmp_path / "n.pcap").write_bytes(raw)
    got = _same(tmp_path / "n.pcap", batch_size=3)
    assert len(got[0]) == len(pk)
    _same(_write(tmp_path / "sll.pcap", pk, big=True, linktype=113), batch_size=3, classic=False)
    _same(_write(tmp_path / "sll-le.pcap", pk, linktype=113), batch_size=3, classic=True)
    _same(_write(tmp_path / "usb.pcap", pk, linktype=189), batch_size=3, classic=False)


def test_a_reader_is_read_once_and_closes_as_a_context():
    with PcapFile(str(SAMPLE), reuse=True) as pf:
        assert sum(len(m) // 16 for _, m in pf.batches()) == 377
        assert list(pf.batches()) == [] and pf.packets_read == 377


def test_the_buffer_is_reused_only_for_an_engine_that_copies(monkeypatch):
    import replay.core as core
    from replay.pipeline import CaptureReader

    assert CaptureReader(str(SAMPLE)).source.reuse is bool(getattr(core.Engine, "copies_input",
                                                                   False))
    monkeypatch.setattr(core, "Engine", pure.Engine)
    assert CaptureReader(str(SAMPLE)).source.reuse is False


@pytest.mark.parametrize("twin", [pure] + ([compiled] if compiled is not None else []),
                         ids=["pure"] + (["compiled"] if compiled is not None else []))
def test_pcap_records_refuses_bounds_outside_the_buffer(twin):
    for start, end in ((-1, 5), (0, 11), (6, 5)):
        with pytest.raises(ValueError):
            twin.pcap_records(b"x" * 10, start, end, False, False, 65535, 1)
    with pytest.raises(ValueError):
        twin.pcap_records(b"x" * 10, 0, 10, False, False, 65535, -1)
