"""The .rlog log: round trips, damage a reader must survive, errors a writer must report, the CLI."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.errors import InputError, LogFormatError, OutputError, ReplayError
from replay.events import FLAG_NAMES, KIND_REQUEST, KIND_RESPONSE, Message
from replay.log import LogReader, LogWriter, is_rlog
from replay.log import format as fmt
from replay.log import table as tbl
from replay.log import writer as writer_mod
from tests.conftest import DATA, ROOT

SAMPLE = ROOT / "captures" / "sample.pcap"
T0 = 1_700_000_000_000_000_000

ADDRS = [("10.0.0.1", 40000), ("192.168.1.20", 8080), ("2001:db8::1", 443), ("::1", 80),
         ("fe80::1%eth0", 65535), ("0.0.0.0", 0)]
URIS = ["/", "/api/users?id=1001&fields=name,email", "/caf\xe9/\xff\xfe?q=na\xefve", "*",
        "http://example.com:8080/x", "/" + "a" * 3000]
METHODS = ["GET", "POST", "HEAD", "DELETE", "PATCH", "CONNECT", "M-SEARCH"]
ALL_FLAGS = 0
for _bit, _ in FLAG_NAMES:
    ALL_FLAGS |= _bit


def make_messages(n: int, seed: int = 1, t0: int = T0, step: int = 1_000_000) -> list:
    """Varied messages: every field exercised, empty and binary bodies, IPv6, None method/uri."""
    rnd = random.Random(seed)
    out = []
    ts = t0
    for i in range(n):
        ts += rnd.randrange(0, 2 * step)
        kind = KIND_REQUEST if i % 2 == 0 else KIND_RESPONSE
        shape = rnd.randrange(6)
        if shape == 0:
            data = b""
        elif shape == 1:
            data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 600)))
        elif shape == 2:
            body = json.dumps({"id": i, "name": f"user-{i}", "tags": ["a", "b"]}).encode()
            data = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body)
        elif shape == 3:
            data = b"GET /caf\xe9 HTTP/1.1\r\nHost: x\r\nCookie: sid=" + os.urandom(8).hex().encode() + b"\r\n\r\n"
        else:
            data = b"x" * rnd.randrange(0, 5000)
        unpaired = kind == KIND_RESPONSE and rnd.random() < 0.1
        method = None if unpaired or rnd.random() < 0.05 else rnd.choice(METHODS)
        uri = None if unpaired or rnd.random() < 0.05 else rnd.choice(URIS)
        client, server = rnd.sample(ADDRS, 2)
        out.append(Message(
            kind=kind, conn=rnd.choice([0, 1, 7, 2**32 + 5, 2**64 - 1]) if i % 97 == 0 else i // 10,
            index=-1 if unpaired else rnd.randrange(0, 50),
            ts_first=ts, ts_last=ts + rnd.choice([0, 0, 1000, 123_456_789]),
            client=client, server=server,
            flags=rnd.choice([0, 0, 0, ALL_FLAGS, 1 << 10, 1 << 31, rnd.randrange(1 << 11)]),
            data=data, method=method, uri=uri,
            status=0 if kind == KIND_REQUEST else rnd.choice([100, 200, 204, 304, 404, 599, 65535]),
            body_length=rnd.choice([0, len(data), 2**63 + 1, rnd.randrange(10_000)]),
            head_length=rnd.choice([0, min(len(data), 40), 2**32 - 1]),
        ))
    return out


def write_log(path, msgs, **kw) -> Path:
    with LogWriter(path, **kw) as w:
        for m in msgs:
            w.write(m)
    return Path(path)


def block_ends(reader: LogReader) -> list:
    """(offset, end) of every data block, from their headers."""
    out = []
    for b in reader.blocks:
        h = fmt.unpack_block_header(reader._mm, b.offset)
        out.append((b.offset, b.offset + h.total_len))
    return out


# ---------------------------------------------------------------------------------------------
# round trips


def test_checksums_are_zlibs_crc32():
    """The format's CRC-32 is zlib's (docs/log-format.md), whichever code computes it."""
    rnd = random.Random(7)
    for n in (0, 1, 15, 16, 63, 64, 255, 4096, 100_003, (1 << 20) + 7):
        data = rnd.randbytes(n)
        assert fmt.crc32(data) == zlib.crc32(data)
        assert fmt.crc32(memoryview(data)[1:]) == zlib.crc32(data[1:])


@pytest.mark.parametrize("threads", [True, False])
def test_round_trip_many_messages_in_many_blocks(tmp_path, threads):
    msgs = make_messages(3000)
    path = write_log(tmp_path / "a.rlog", msgs, meta={"source": "x.pcap", "ports": [80]},
                     block_records=256, threads=threads)
    with LogReader(path) as r:
        assert r.indexed and r.warnings == []
        assert len(r) == 3000 and len(r.blocks) >= 12
        back = list(r)
        assert back == msgs
        assert r.meta["source"] == "x.pcap" and r.meta["ports"] == [80]
        assert r.meta["format"] == "rlog 2.1" and r.meta["tool"].startswith("replay ")
        assert r.version == (2, 1)
        assert [b.first_row for b in r.blocks] == list(np.cumsum([0] + [b.count for b in r.blocks])[:-1])
        assert r.time_span() == (min(m.ts_first for m in msgs), max(m.ts_last for m in msgs))


def test_block_bytes_cuts_blocks(tmp_path):
    msgs = make_messages(400)
    path = write_log(tmp_path / "a.rlog", msgs, block_bytes=20_000)
    with LogReader(path) as r:
        assert len(r.blocks) > 5 and list(r) == msgs


def _payload_frames(path) -> list:
    """(compressed, raw length, window size) of each data block's payload section."""
    import zstandard as zstd

    out = []
    with LogReader(path) as r:
        for b in r.blocks:
            h = fmt.unpack_block_header(r._mm, b.offset)
            b0 = b.offset + h.hlen + h.a_len
            frame = bytes(r._mm[b0:b0 + h.b_len])
            out.append((len(frame), h.b_raw, zstd.get_frame_parameters(frame).window_size))
    return out


def _repeated_bodies(n: int, size: int, gap: int) -> list:
    """``n`` responses of the same random body of ``size`` bytes, ``gap`` random bytes between
    them (other responses), as a server sends the same image again and again."""
    rnd = random.Random(5)
    body = rnd.randbytes(size)
    msgs = []
    for i in range(n):
        for data in (body, rnd.randbytes(gap)):
            msgs.append(Message(kind=KIND_RESPONSE, conn=i, index=0, ts_first=T0 + len(msgs),
                                ts_last=T0 + len(msgs), client=ADDRS[0], server=ADDRS[1],
                                flags=0, data=data, method=None, uri=None, status=200,
                                body_length=len(data), head_length=0))
    return msgs


@pytest.mark.parametrize("level", [1, 3])
def test_a_payload_window_covers_the_block(tmp_path, level):
    # the same 600 KB body three times, 1.2 MB apart: beyond level 1's 512 KiB window and level
    # 3's 2 MiB, within one block's
    msgs = _repeated_bodies(3, 600_000, 1_200_000)
    path = write_log(tmp_path / "a.rlog", msgs, level=level)
    (size, raw, window), = _payload_frames(path)
    assert raw == 3 * 1_800_000
    assert size < 4_250_000 and window >= 4 << 20     # (4.2 MB of random bytes; 5.4 without)
    assert window <= 1 << writer_mod.PAYLOAD_WINDOW_LOG
    with LogReader(path) as r:
        assert list(r) == msgs


def test_a_payload_window_is_8_mib_at_most_and_small_payloads_keep_the_levels(tmp_path):
    big = _repeated_bodies(1, 20_000_000, 0)[:1]
    small = make_messages(50)
    path = write_log(tmp_path / "a.rlog", big + small, block_records=1)
    frames = _payload_frames(path)
    assert frames[0][1] == 20_000_000 and frames[0][2] == 1 << writer_mod.PAYLOAD_WINDOW_LOG
    import zstandard as zstd

    for (_, raw, window), m in zip(frames[1:], small):
        if raw:     # as zstd's level 1 makes it for that size
            assert window == zstd.get_frame_parameters(
                zstd.ZstdCompressor(level=1).compress(m.data)).window_size
    with LogReader(path) as r:
        assert list(r) == big + small


@pytest.mark.parametrize("level", [1, 19, 22])
def test_one_payload_context_a_level_serves_every_size(level):
    # zstd fits the window to the payload it is given: payloads of any size above the level's own
    # window share one context (a context at level 19 holds about 90 MiB), and levels whose own
    # window is 8 MiB or more keep it
    w = writer_mod._payload_window
    own = writer_mod.zstd.ZstdCompressionParameters.from_level(level).window_log
    sizes = (0, 100, 1 << 19, (1 << 19) + 1, 3_000_000, 20_000_000, 1 << 30)
    wide = writer_mod.PAYLOAD_WINDOW_LOG
    assert {w(level, n) for n in sizes} == ({0} if own >= wide else {0, wide})


def test_random_bodies_at_a_slow_level_keep_the_fast_frame(tmp_path, monkeypatch):
    # at level 3 or more, a payload that does not compress is compressed once, at FAST_LEVEL
    # (the contexts made with a window: those of the payload; the meta's is the level's own)
    levels = []
    real = writer_mod._payload_compressor

    def made(level, window):
        if window:
            levels.append(level)
        return real(level, window)

    monkeypatch.setattr(writer_mod, "_payload_compressor", made)
    msgs = _repeated_bodies(1, 3_000_000, 0)[:1]
    for level in (1, 2, 0, 3, 19):       # (0 is zstd's default, level 3)
        levels.clear()
        path = write_log(tmp_path / f"{level}.rlog", msgs, level=level, threads=False)
        slow = level >= writer_mod.FAST_PROBE_FROM or level == 0
        assert levels == [writer_mod.FAST_LEVEL if slow else level]
        with LogReader(path) as r:
            assert list(r) == msgs


def test_threaded_and_inline_writers_write_the_same_bytes(tmp_path):
    msgs = make_messages(1000)
    meta = {"created": "fixed"}
    a = write_log(tmp_path / "a.rlog", msgs, meta=meta, block_records=100, threads=True)
    b = write_log(tmp_path / "b.rlog", msgs, meta=meta, block_records=100, threads=False)
    assert a.read_bytes() == b.read_bytes()


def _slow_even_blocks(monkeypatch, msgs, per_block, fail_at=None):
    """Block ``i`` of ``msgs`` (``per_block`` messages each) takes 40 ms longer to make when
    ``i`` is even, so with two workers the odd one after it is ready first; block ``fail_at``
    raises. Returns the block numbers in the order they were made."""
    import threading
    import time

    first = {min(m.ts_first for m in msgs[i:i + per_block]): i // per_block
             for i in range(0, len(msgs), per_block)}
    real = LogWriter._data_block
    lock, made = threading.Lock(), []

    def data_block(self, table, datas, count, t_min, t_max):
        i = first[t_min]
        if i == fail_at:
            raise RuntimeError(f"block {i} cannot be made")
        time.sleep(0.04 if i % 2 == 0 else 0.0)
        out = real(self, table, datas, count, t_min, t_max)
        with lock:
            made.append(i)
        return out

    monkeypatch.setattr(LogWriter, "_data_block", data_block)
    return made


def test_blocks_compressed_out_of_order_are_written_in_order(tmp_path, monkeypatch):
    """With ``WORKERS`` threads, a block ready before the one given before it waits for it: the
    file, its index and its bytes are those of the inline writer, rows or messages."""
    assert writer_mod.WORKERS >= 2
    msgs = make_messages(2000)
    meta = {"created": "fixed"}
    inline = write_log(tmp_path / "inline.rlog", msgs, meta=meta, block_records=100, threads=False)
    made = _slow_even_blocks(monkeypatch, msgs, 100)
    threaded = write_log(tmp_path / "threaded.rlog", msgs, meta=meta, block_records=100,
                         workers=writer_mod.WORKERS)
    assert sorted(made) == list(range(20)) and made != sorted(made), made  # some made out of order
    assert threaded.read_bytes() == inline.read_bytes()
    with LogReader(threaded) as r:
        assert r.indexed and list(r) == msgs


def test_a_block_that_cannot_be_made_stops_the_writing_after_the_blocks_before(tmp_path,
                                                                             monkeypatch):
    """Its exception reaches the caller; the blocks before it are in the file, in order, and
    none after it (though the other worker had one ready)."""
    msgs = make_messages(2000)
    _slow_even_blocks(monkeypatch, msgs, 100, fail_at=5)
    path = tmp_path / "broken.rlog"
    w = LogWriter(path, block_records=100, workers=writer_mod.WORKERS)
    with pytest.raises(RuntimeError, match="block 5 cannot be made"):
        for m in msgs:
            w.write(m)
        w.close()
    w.close()
    monkeypatch.undo()
    with LogReader(path) as r:
        assert list(r) == msgs[:500] and not r.indexed


def test_a_block_interrupted_as_it_is_handed_over_does_not_hang_the_close(tmp_path):
    """A Ctrl-C that lands inside the hand-over to a worker: the block is lost with it, but the
    blocks after it are written and ``close`` returns."""
    import threading

    msgs = make_messages(1000)
    w = LogWriter(tmp_path / "i.rlog", block_records=100, workers=writer_mod.WORKERS)
    real, calls = w._executor.submit, [0]

    def submit(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    w._executor.submit = submit
    with pytest.raises(KeyboardInterrupt):
        for m in msgs:
            w.write(m)
    for m in msgs[len(msgs) // 2:]:
        w.write(m)
    t = threading.Thread(target=w.close, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    with LogReader(tmp_path / "i.rlog") as r:
        assert r.indexed and len(r) > 0


def _direct_or_skip(path):
    w = LogWriter(path, direct=True)
    ok = w.direct
    w.close()
    if not ok:
        pytest.skip(f"no O_DIRECT on the file system of {path}")


@pytest.fixture
def small_stage(monkeypatch):
    """A stage of 3 pages, written out from 1: every path of the stage runs on small logs."""
    monkeypatch.setattr(writer_mod, "DIRECT_STAGE", 3 * writer_mod.PAGE)
    monkeypatch.setattr(writer_mod, "DIRECT_OUT", writer_mod.PAGE)


@pytest.mark.parametrize("stage", ["small", "default"])
def test_a_direct_writer_writes_the_bytes_of_the_page_cache_one(tmp_path, monkeypatch, stage):
    """Past the page cache, whole pages at a time: the same file, also after a flush in the
    middle (the file then ends where the last block does) and more blocks after it."""
    _direct_or_skip(tmp_path / "probe.rlog")
    if stage == "small":
        monkeypatch.setattr(writer_mod, "DIRECT_STAGE", 3 * writer_mod.PAGE)
        monkeypatch.setattr(writer_mod, "DIRECT_OUT", 2 * writer_mod.PAGE)
    msgs = make_messages(3000)
    meta = {"created": "fixed"}
    for direct in (False, True):
        path = tmp_path / f"direct-{direct}.rlog"
        w = LogWriter(path, meta=meta, block_records=100, direct=direct, workers=2)
        assert w.direct is direct
        for m in msgs[:1234]:
            w.write(m)
        w.flush(fsync=False)
        assert path.stat().st_size == w.bytes_written
        with LogReader(path) as r:
            assert list(r) == msgs[:1234]
        for m in msgs[1234:]:
            w.write(m)
        w.close()
    assert (tmp_path / "direct-True.rlog").read_bytes() == \
        (tmp_path / "direct-False.rlog").read_bytes()


def test_a_file_system_that_refuses_direct_writes_gets_them_through_the_page_cache(
        tmp_path, monkeypatch, small_stage):
    """O_DIRECT taken by ``fcntl`` but its writes refused (EINVAL, as some file systems do):
    the log is written whole through the page cache, the same bytes, and no error."""
    import fcntl

    _direct_or_skip(tmp_path / "probe.rlog")
    msgs = make_messages(1000)
    meta = {"created": "fixed"}
    plain = write_log(tmp_path / "plain.rlog", msgs, meta=meta, block_records=100)
    real, refused = os.pwrite, [0]

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and offset >= 2 * writer_mod.PAGE:
            refused[0] += 1
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    path = tmp_path / "refused.rlog"
    with LogWriter(path, meta=meta, block_records=100, direct=True) as w:
        for m in msgs:
            w.write(m)
    assert refused[0] == 1 and not w.direct
    assert path.read_bytes() == plain.read_bytes()


def test_a_direct_writer_keeps_the_blocks_before_one_that_cannot_be_made(tmp_path, monkeypatch,
                                                                         small_stage):
    """The complete blocks still staged go into the file as the writer closes, as the page
    cache writer's would be there."""
    _direct_or_skip(tmp_path / "probe.rlog")
    msgs = make_messages(1000)
    _slow_even_blocks(monkeypatch, msgs, 100, fail_at=5)
    path = tmp_path / "broken.rlog"
    w = LogWriter(path, block_records=100, direct=True, workers=2)
    with pytest.raises(RuntimeError, match="block 5 cannot be made"):
        for m in msgs:
            w.write(m)
        w.close()
    w.close()
    monkeypatch.undo()
    with LogReader(path) as r:
        assert list(r) == msgs[:500] and r.warnings == [] and not r.indexed


def test_a_direct_write_that_fails_after_a_flush_keeps_what_was_flushed(tmp_path, monkeypatch,
                                                                        small_stage):
    _direct_or_skip(tmp_path / "probe.rlog")
    msgs = make_messages(1000)
    path = tmp_path / "flushed.rlog"
    w = LogWriter(path, block_records=100, direct=True)
    for m in msgs[:550]:
        w.write(m)
    w.flush(fsync=False)

    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    with pytest.raises(OutputError, match=r"\(550 messages written before it are kept\)"):
        for m in msgs[550:]:
            w.write(m)
        w.close()
    w.close()
    monkeypatch.undo()
    with LogReader(path) as r:
        assert list(r) == msgs[:550] and r.warnings == []


@pytest.mark.parametrize("rescue", [True, False])
def test_a_direct_write_that_fails_keeps_the_whole_blocks(tmp_path, monkeypatch, small_stage,
                                                          rescue):
    """The complete blocks still staged go in through the page cache (``rescue``); when that
    fails too, the file keeps the blocks whole on the disk. Either way it reads back without a
    torn block, and the error counts what it keeps."""
    _direct_or_skip(tmp_path / "probe.rlog")
    msgs = make_messages(1000)
    path = tmp_path / "full.rlog"
    real, calls, fail_at = os.pwrite, [0], [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if fail_at[0] and (calls[0] == fail_at[0] or (calls[0] > fail_at[0] and not rescue)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    write_log(tmp_path / "count.rlog", msgs, block_records=100, direct=True)
    assert calls[0] > 4
    calls[0], fail_at[0] = 0, calls[0] // 2      # half way through the writes
    w = LogWriter(path, block_records=100, direct=True)
    with pytest.raises(OutputError) as e:
        for m in msgs:
            w.write(m)
        w.close()
    w.close()
    monkeypatch.undo()
    with LogReader(path) as r:
        back = list(r)
        assert r.warnings == [] and not r.indexed
    assert 0 < len(back) < len(msgs) and back == msgs[:len(back)]
    assert str(e.value) == (f"{path}: cannot write: {os.strerror(errno.ENOSPC).lower()} "
                            f"({len(back)} messages written before it are kept)")


@pytest.mark.parametrize("pcap", sorted(p.name for p in DATA.glob("*.pcap")) + ["sample.pcap"])
def test_round_trip_of_real_captures(tmp_path, pcap):
    from replay.pipeline import CaptureReader

    path = SAMPLE if pcap == "sample.pcap" else DATA / pcap
    msgs = list(CaptureReader(str(path)))
    log = write_log(tmp_path / "c.rlog", msgs, block_records=7)
    with LogReader(log) as r:
        assert list(r) == msgs and r.warnings == []


def test_empty_log(tmp_path):
    path = write_log(tmp_path / "e.rlog", [])
    with LogReader(path) as r:
        assert len(r) == 0 and list(r) == [] and r.blocks == [] and r.warnings == []
        assert r.time_span() == (None, None)
        t = r.table()
        assert len(t) == 0 and t.dtype == tbl.TABLE_DTYPE
        assert list(r.read_range(0, 2**62)) == []
        with pytest.raises(IndexError):
            r.message_at(0)


def test_flush_makes_blocks_readable_while_writing(tmp_path):
    msgs = make_messages(50)
    path = tmp_path / "live.rlog"
    w = LogWriter(path, meta={"command": "capture"})
    for m in msgs[:20]:
        w.write(m)
    w.flush()
    with LogReader(path) as r:  # no index yet: found by walking the blocks
        assert not r.indexed and r.warnings == []
        assert list(r) == msgs[:20] and r.meta["command"] == "capture"
    size = w.bytes_written
    assert size == path.stat().st_size
    for m in msgs[20:]:
        w.write(m)
    w.flush()
    w.write(msgs[0])
    w.close()
    assert w.records_written == 51
    with LogReader(path) as r:
        assert r.indexed and list(r) == msgs + msgs[:1] and len(r.blocks) == 3


def test_meta_last_one_wins(tmp_path):
    path = tmp_path / "m.rlog"
    msgs = make_messages(30)
    with LogWriter(path, meta={"source": "a.pcap", "stats": {"packets": 1}}) as w:
        for i, m in enumerate(msgs):
            w.write(m)
            if i % 10 == 0:
                w.update_meta({"stats": {"packets": i}})
        w.update_meta({"warnings": ["cut short"], "drops": {"kernel": 3}})
    with LogReader(path) as r:
        assert r.meta["stats"] == {"packets": 20}
        assert r.meta["warnings"] == ["cut short"] and r.meta["source"] == "a.pcap"
        index_at = max(b.offset for b in r.blocks)
    # without the index (cut just after the last data block) the scan finds the same last one
    data = path.read_bytes()
    with LogReader(path) as r:
        end = block_ends(r)[-1][1]
    cut = tmp_path / "cut.rlog"
    cut.write_bytes(data[:end])
    with LogReader(cut) as r:
        assert not r.indexed and r.meta["stats"] == {"packets": 20} and r.warnings == []
        assert list(r) == msgs and max(b.offset for b in r.blocks) == index_at


def test_context_manager_keeps_the_log_when_the_body_raises(tmp_path):
    msgs = make_messages(10)
    path = tmp_path / "k.rlog"
    with pytest.raises(KeyboardInterrupt):
        with LogWriter(path) as w:
            for m in msgs:
                w.write(m)
            raise KeyboardInterrupt
    with LogReader(path) as r:
        assert r.indexed and list(r) == msgs


def test_field_out_of_range_is_a_value_error(tmp_path):
    m = make_messages(1)[0]
    m.status = 70000
    with LogWriter(tmp_path / "v.rlog") as w:
        w.write(make_messages(1)[0])
        with pytest.raises(ValueError, match="status"):
            w.write(m)
            w.flush()


# ---------------------------------------------------------------------------------------------
# reading by time, by row, by column


def test_read_range_uses_the_index_and_matches_a_filter(tmp_path):
    msgs = make_messages(2000, step=10_000_000)
    path = write_log(tmp_path / "r.rlog", msgs, block_records=100)
    with LogReader(path) as r:
        loaded = []
        real = r._load
        r._load = lambda b, want_payload: loaded.append(b.offset) or real(b, want_payload)
        lo, hi = msgs[0].ts_first, msgs[-1].ts_last
        for t0, t1 in [(lo, hi + 1), (lo + (hi - lo) // 3, lo + (hi - lo) // 2), (hi + 1, hi + 5),
                       (None, lo + 1), (lo + (hi - lo) // 2, None), (5, 4)]:
            loaded.clear()
            a = -(2**63) if t0 is None else t0
            b = 2**63 if t1 is None else t1
            want = [m for m in msgs if a <= m.ts_first < b]
            assert list(r.read_range(t0, t1)) == want
            touched = [blk for blk in r.blocks if blk.t_max >= a and blk.t_min < b]
            assert sorted(set(loaded)) == sorted(blk.offset for blk in touched)
        loaded.clear()
        mid = lo + (hi - lo) // 2
        list(r.read_range(mid, mid + 1))
        assert len(set(loaded)) <= 2 < len(r.blocks)


def test_table_columns_equal_the_messages_without_reading_payloads(tmp_path):
    msgs = make_messages(1500)
    path = write_log(tmp_path / "t.rlog", msgs, block_records=200)
    with LogReader(path) as r:
        sizes = []

        class Spy:
            def __init__(self, d):
                self.d = d

            def decompress(self, buf, max_output_size=0):
                out = self.d.decompress(buf, max_output_size=max_output_size)
                sizes.append(len(out))
                return out

        r._dctx = Spy(r._dctx)
        t = r.table()
        payload_bytes = sum(len(m.data) for m in msgs)
        assert len(sizes) == len(r.blocks) and sum(sizes) < payload_bytes / 3
        assert t.dtype == tbl.TABLE_DTYPE and len(t) == len(msgs)
        for i, m in enumerate(msgs):
            row = t[i]
            assert (row["kind"], row["flags"], row["conn"], row["index"], row["ts_first"],
                    row["ts_last"], row["status"], row["body_length"], row["head_length"],
                    row["data_length"]) == (m.kind, m.flags, m.conn, m.index, m.ts_first, m.ts_last,
                                            m.status, m.body_length, m.head_length, len(m.data))
            assert r.addresses[row["client"]] == m.client and r.addresses[row["server"]] == m.server
            assert r.strings[row["method"]] == m.method and r.strings[row["uri"]] == m.uri
            blk = r.blocks[row["block"]]
            assert blk.first_row <= i < blk.first_row + blk.count
        # data_offset: where the message starts in its block's payload
        for bi, blk in enumerate(r.blocks):
            rows = t[t["block"] == bi]
            assert rows["data_offset"][0] == 0
            assert list(rows["data_offset"][1:]) == list(np.cumsum(rows["data_length"])[:-1])
        # vectorised questions, answered from the columns alone
        assert int((t["kind"] == KIND_REQUEST).sum()) == sum(m.kind == KIND_REQUEST for m in msgs)
        assert int(t["data_length"].sum()) == payload_bytes


def test_message_at(tmp_path):
    msgs = make_messages(700)
    path = write_log(tmp_path / "x.rlog", msgs, block_records=64)
    with LogReader(path) as r:
        for row in [0, 1, 63, 64, 65, 300, 699, -1, -700] + random.Random(3).sample(range(700), 50):
            assert r.message_at(row) == msgs[row]
        for row in (700, -701):
            with pytest.raises(IndexError):
                r.message_at(row)


# ---------------------------------------------------------------------------------------------
# damage: torn tails, corrupt blocks, lost index


def test_torn_tail_at_every_byte_of_the_last_block(tmp_path):
    msgs = make_messages(60)
    path = write_log(tmp_path / "full.rlog", msgs, block_records=19)  # a last block of 3
    data = path.read_bytes()
    with LogReader(path) as r:
        (last_off, last_end), = block_ends(r)[-1:]
        assert [b.count for b in r.blocks] == [19, 19, 19, 3]
    # after the last data block: the summary block, then the index (where the trailer points)
    index_off, _ = fmt.INDEX_TRAILER.unpack_from(data, len(data) - fmt.INDEX_TRAILER.size)
    cut_path = tmp_path / "cut.rlog"
    for cut in range(last_off, len(data)):
        cut_path.write_bytes(data[:cut])
        with LogReader(cut_path) as r:
            got = list(r)
            if cut < last_end:
                assert got == msgs[:57], cut
            else:
                assert got == msgs, cut
            assert len(r) == len(got)
            if cut in (last_off, last_end, index_off):
                assert r.warnings == [], cut
            else:
                assert len(r.warnings) == 1, (cut, r.warnings)
                start = last_off if cut < last_end else last_end if cut < index_off else index_off
                assert r.warnings[0] == f"{cut - start} bytes at offset {start} are a torn block, ignored"


def test_cut_anywhere_never_raises_after_the_file_header(tmp_path):
    msgs = make_messages(200)
    path = write_log(tmp_path / "f.rlog", msgs, block_records=40)
    data = path.read_bytes()
    cut_path = tmp_path / "c.rlog"
    for cut in sorted(set(random.Random(5).sample(range(fmt.FILE_HEADER_LEN, len(data)), 300))):
        cut_path.write_bytes(data[:cut])
        with LogReader(cut_path) as r:
            got = list(r)
            assert got == msgs[:len(got)] and len(got) % 40 == 0
    for cut in range(1, fmt.FILE_HEADER_LEN):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(LogFormatError):
            LogReader(cut_path)


def _corrupt(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x41
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["sync", "header", "table", "payload"])
@pytest.mark.parametrize("indexed", [True, False])
def test_corrupt_middle_block_is_skipped_and_later_blocks_read(tmp_path, where, indexed):
    msgs = make_messages(500)
    path = write_log(tmp_path / "c.rlog", msgs, block_records=100)
    with LogReader(path) as r:
        ends = block_ends(r)
        off, end = ends[2]
        h = fmt.unpack_block_header(r._mm, off)
    if not indexed:
        path.write_bytes(path.read_bytes()[:ends[-1][1]])
    spot = {"sync": off + 3, "header": off + 20, "table": off + h.hlen + h.a_len // 2,
            "payload": end - 5}[where]
    _corrupt(path, spot)
    want = msgs[:200] + msgs[300:]
    with LogReader(path) as r:
        assert r.indexed == indexed
        assert list(r) == want
        assert len(r) == 400 and [b.count for b in r.blocks] == [100] * 4
        assert len(r.warnings) == 1, r.warnings
        w = r.warnings[0]
        assert w.startswith(f"corrupt block at offset {off} (")
        if not indexed:
            assert w.endswith(f"skipped; resynced at offset {end}")
        t = r.table()
        assert len(t) == 400 and list(t["ts_first"]) == [m.ts_first for m in want]
        assert r.message_at(250) == want[250]


def test_two_corrupt_blocks_and_garbage_between_blocks(tmp_path):
    msgs = make_messages(600)
    path = write_log(tmp_path / "g.rlog", msgs, block_records=100)
    with LogReader(path) as r:
        ends = block_ends(r)
    data = path.read_bytes()
    # junk inserted between blocks 1 and 2 (bytes a broken copy could leave), blocks 3 and 4 damaged
    junk = os.urandom(333)
    damaged = bytearray(data[:ends[1][1]] + junk + data[ends[1][1]:ends[-1][1]])
    shift = len(junk)
    damaged[ends[3][0] + shift + 70] ^= 1
    damaged[ends[4][0] + shift + 8] ^= 1
    path.write_bytes(bytes(damaged))
    with LogReader(path) as r:
        assert list(r) == msgs[:300] + msgs[500:]
        assert len(r.warnings) == 3
        assert r.warnings[0] == (f"corrupt block at offset {ends[1][1]} (no sync marker), skipped; "
                                 f"resynced at offset {ends[2][0] + shift}")


def test_missing_index_is_rebuilt(tmp_path):
    msgs = make_messages(800)
    path = write_log(tmp_path / "i.rlog", msgs, block_records=100)
    with LogReader(path) as r:
        blocks = r.blocks
        end = block_ends(r)[-1][1]
        assert r.indexed
    path.write_bytes(path.read_bytes()[:end])
    with LogReader(path) as r:
        assert not r.indexed and r.warnings == [] and r.blocks == blocks
        assert list(r) == msgs
        assert list(r.read_range(msgs[100].ts_first, msgs[400].ts_first)) == \
            [m for m in msgs if msgs[100].ts_first <= m.ts_first < msgs[400].ts_first]


@pytest.mark.parametrize("spot", ["entries", "trailer-offset"])
def test_damaged_index_is_rebuilt_with_a_warning(tmp_path, spot):
    msgs = make_messages(300)
    path = write_log(tmp_path / "d.rlog", msgs, block_records=100)
    size = path.stat().st_size
    _corrupt(path, size - 40 if spot == "entries" else size - 12)
    with LogReader(path) as r:
        assert not r.indexed and list(r) == msgs
        assert len(r.warnings) == 1 and "index rebuilt by scanning" in r.warnings[0]


def test_damaged_last_meta_falls_back_to_an_earlier_one(tmp_path):
    path = tmp_path / "m.rlog"
    with LogWriter(path, meta={"v": 1}) as w:
        w.write(make_messages(1)[0])
        w.flush()
        w.update_meta({"v": 2})
    with LogReader(path) as r:
        assert r.meta["v"] == 2
    data = path.read_bytes()
    # the second metadata block is the one after the data block
    with LogReader(path) as r:
        meta2 = block_ends(r)[0][1]
    _corrupt(path, meta2 + fmt.BLOCK_HEADER_LEN + 2)
    with LogReader(path) as r:
        assert r.meta["v"] == 1 and len(r.warnings) == 1
    del data


# ---------------------------------------------------------------------------------------------
# files that are not logs


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path}/missing.rlog: no such file"):
        LogReader(tmp_path / "missing.rlog")
    good = write_log(tmp_path / "good.rlog", make_messages(3)).read_bytes()
    cases = {
        "empty.rlog": (b"", "empty file"),
        "text.rlog": (b"hello, this is text\n" * 10, "not a .rlog file (bad magic)"),
        "crlf.rlog": (good.replace(b"\r\n", b"\n", 1), "not a .rlog file (bad magic)"),
        "short.rlog": (good[:12], "cut short inside its file header"),
        "v3.rlog": (good[:8] + (3).to_bytes(2, "little") + good[10:], f"unsupported .rlog format version 3.{fmt.VERSION_MINOR} (this replay reads 1.x and 2.x)"),
        "crc.rlog": (good[:16] + b"\x01" + good[17:], "file header checksum mismatch"),
    }
    for name, (content, words) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LogFormatError) as e:
            LogReader(p)
        assert str(e.value) == f"{p}: {words}", name
        assert isinstance(e.value, InputError)
    assert is_rlog(tmp_path / "good.rlog") and is_rlog(tmp_path / "v3.rlog")
    assert not is_rlog(tmp_path / "text.rlog") and not is_rlog(tmp_path / "missing.rlog")
    assert not is_rlog(SAMPLE) and not is_rlog(tmp_path)


def test_newer_minor_version_and_unknown_block_types_are_read(tmp_path):
    msgs = make_messages(50)
    path = write_log(tmp_path / "n.rlog", msgs, block_records=10)
    data = bytearray(path.read_bytes())
    data[10:12] = (7).to_bytes(2, "little")  # minor 7
    head = bytes(data[:fmt.FILE_HEADER_LEN - 4])
    data[fmt.FILE_HEADER_LEN - 4:fmt.FILE_HEADER_LEN] = fmt.CRC.pack(__import__("zlib").crc32(head))
    with LogReader(path) as r:
        end = block_ends(r)[-1][1]
    extra = b"".join(fmt.pack_block(42, 0, 0, 0, 0, b"from the future", 15))
    path.write_bytes(bytes(data[:end]) + extra)  # no index, a block type this reader does not know
    with LogReader(path) as r:
        assert r.version == (2, 7) and list(r) == msgs and r.warnings == []


# ---------------------------------------------------------------------------------------------
# the writer's file and its failures


def test_file_mode_is_0600(tmp_path):
    path = tmp_path / "secret.rlog"
    path.write_bytes(b"old")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_log(path, make_messages(5))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    assert list(LogReader(path)) == make_messages(5)


def test_unwritable_paths_raise_one_clear_error(tmp_path):
    for bad, words in [(tmp_path / "no" / "such" / "dir.rlog", "no such file or directory"),
                       (tmp_path, "is a directory")]:
        with pytest.raises(OutputError) as e:
            LogWriter(bad)
        assert str(e.value) == f"{bad}: cannot create: {words}"
        assert isinstance(e.value, ReplayError)


@pytest.mark.parametrize("threads", [True, False])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_failure_raises_and_keeps_earlier_blocks(tmp_path, monkeypatch, threads, err):
    msgs = make_messages(1000)
    path = tmp_path / "full.rlog"
    calls = {"n": 0}
    real = os.writev

    def writev(fd, parts):
        calls["n"] += 1
        if calls["n"] == 6:  # header, meta, then 3 data blocks; the 4th data block half-fits
            half = sum(len(p) for p in parts) // 2
            return real(fd, [b"".join(parts)[:half]])
        if calls["n"] > 6:
            raise OSError(err, os.strerror(err))
        return real(fd, parts)

    def write(fd, buf):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(writer_mod.os, "writev", writev)
    monkeypatch.setattr(writer_mod.os, "write", write)
    w = LogWriter(path, block_records=100, threads=threads)
    with pytest.raises(OutputError) as e:
        for m in msgs:
            w.write(m)
        w.close()
    monkeypatch.undo()
    assert str(e.value) == (f"{path}: cannot write: {os.strerror(err).lower()} "
                            "(300 messages written before it are kept)")
    with pytest.raises(OutputError):  # it stays failed
        w.write(msgs[0])
    w.close()  # already reported: closing releases the file quietly
    with LogReader(path) as r:
        assert list(r) == msgs[:300] and r.warnings == [] and not r.indexed


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mnt = Path(tempfile.mkdtemp(prefix="rlog-full-"))
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        rnd = random.Random(9)
        msgs = [Message(0, i, 0, T0 + i, T0 + i, ("10.0.0.1", 1), ("10.0.0.2", 80), 0,
                        bytes(rnd.getrandbits(8) for _ in range(2000))) for i in range(200)]
        path = mnt / "x.rlog"
        with pytest.raises(OutputError, match=f"^{path}: cannot write: no space left on device"):
            with LogWriter(path, block_records=4) as w:
                for m in msgs:
                    w.write(m)
                    w.flush()
        with LogReader(path) as r:
            got = list(r)
            assert 4 <= len(got) < len(msgs) and got == msgs[:len(got)] and r.warnings == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        mnt.rmdir()


# ---------------------------------------------------------------------------------------------
# property: any messages the format can hold come back equal


ip_text = st.one_of(st.sampled_from([a for a, _ in ADDRS]), st.text(max_size=40))
addr = st.tuples(ip_text, st.integers(0, 65535))
i64 = st.integers(-(2**63), 2**63 - 1)
message = st.builds(
    Message,
    kind=st.sampled_from([KIND_REQUEST, KIND_RESPONSE]),
    conn=st.integers(0, 2**64 - 1),
    index=i64,
    ts_first=i64,
    ts_last=i64,
    client=addr,
    server=addr,
    flags=st.integers(0, 2**32 - 1),
    data=st.binary(max_size=300),
    method=st.none() | st.text(max_size=10),
    uri=st.none() | st.text(max_size=60),
    status=st.integers(0, 65535),
    body_length=st.integers(0, 2**64 - 1),
    head_length=st.integers(0, 2**32 - 1),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(message, max_size=40), block_records=st.integers(1, 9),
       threads=st.booleans())
def test_round_trip_property(tmp_path, msgs, block_records, threads):
    path = write_log(tmp_path / "p.rlog", msgs, block_records=block_records, threads=threads)
    with LogReader(path) as r:
        assert list(r) == msgs and len(r) == len(msgs) and r.warnings == []
        t = r.table()
        assert list(t["ts_first"]) == [m.ts_first for m in msgs]
        assert list(t["ts_last"]) == [m.ts_last for m in msgs]
        assert list(t["data_length"]) == [len(m.data) for m in msgs]
        assert [r.addresses[i] for i in t["client"]] == [m.client for m in msgs]


# ---------------------------------------------------------------------------------------------
# the command line on logs


def replay(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def no_traceback(p):
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


@pytest.mark.parametrize("capture", [SAMPLE, DATA / "zeek_zeek_zero-length-bodies-with-drops.pcap",
                                     DATA / "OISF_suricata-verify_http-multiple100.pcap"])
def test_cli_convert_then_ls_equals_ls_of_the_capture(tmp_path, capture):
    log = tmp_path / "x.rlog"
    p = replay("convert", capture, "-o", log)
    assert p.returncode == 0, p.stderr
    assert log.stat().st_mode & 0o777 == 0o600
    a = replay("ls", log, "--format", "jsonl")
    b = replay("ls", capture, "--format", "jsonl")
    assert a.returncode == 0 and b.returncode == 0
    assert a.stdout == b.stdout and a.stdout
    assert replay("ls", log).stdout == replay("ls", capture).stdout


def test_cli_info_on_a_log(tmp_path):
    log = tmp_path / "x.rlog"
    assert replay("convert", SAMPLE, "-o", log, "-q").returncode == 0
    p = replay("info", log)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "(rlog," in out and "37 requests, 38 responses" in out
    assert "connections:  14" in out and "time span:" in out and " .. " in out
    assert "source:       sample.pcap (convert, replay" in out
    assert "packets:      377" in out and "no gaps" in out
    j = json.loads(replay("info", log, "--json").stdout)
    assert j["format"] == "rlog" and j["blocks"] == 1 and j["meta"]["stats"]["packets"] == 377
    assert j["warnings"] == []


def test_cli_on_a_torn_log_warns_once_and_lists_what_was_kept(tmp_path):
    log = tmp_path / "x.rlog"
    assert replay("convert", SAMPLE, "-o", log, "-q").returncode == 0
    full = replay("ls", log, "--format", "jsonl").stdout.splitlines()
    # a log of several blocks, cut inside its last one (as a killed writer leaves it)
    msgs = list(LogReader(log))
    many = write_log(tmp_path / "many.rlog", msgs, block_records=20)
    with LogReader(many) as r:
        off, end = block_ends(r)[-1]
    torn = tmp_path / "torn.rlog"
    torn.write_bytes(many.read_bytes()[:off + (end - off) // 2])
    p = replay("ls", torn, "--format", "jsonl")
    no_traceback(p)
    assert p.returncode == 0
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "torn block" in lines[0] and lines[0].startswith("replay: warning:")
    assert p.stdout.splitlines() == full[:60]
    p = replay("info", torn)
    assert p.returncode == 0 and "torn block" in p.stdout


def test_cli_on_garbage_files_one_line_and_an_error(tmp_path):
    cases = {
        "garbage.rlog": os.urandom(5000),
        "fake.rlog": b"RLOG" + os.urandom(5000),
        "newer.rlog": fmt.MAGIC + (9).to_bytes(2, "little") + b"\0" * 200,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        for cmd in ("ls", "info"):
            p = replay(cmd, tmp_path / name)
            no_traceback(p)
            assert p.returncode != 0, (name, cmd)
            lines = [x for x in p.stderr.splitlines() if x.strip()]
            assert len(lines) == 1 and str(tmp_path / name) in lines[0], (name, cmd, p.stderr)


def test_cli_convert_to_an_unwritable_path(tmp_path):
    out = tmp_path / "no" / "dir" / "x.rlog"
    p = replay("convert", SAMPLE, "-o", out)
    no_traceback(p)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines == [f"replay: {out}: cannot create: directory {out.parent} does not exist"]


def test_the_format_document_states_the_constants_of_the_code():
    doc = (ROOT / "docs" / "log-format.md").read_text()
    spaced = lambda b: " ".join(f"{x:02X}" for x in b)  # noqa: E731
    assert f"sync marker `{spaced(fmt.SYNC)}`" in doc
    assert f"magic `{spaced(fmt.MAGIC)}`" in doc
    assert f"`{spaced(fmt.INDEX_MAGIC)}`" in doc
    assert f"| {fmt.TABLE_PREFIX} | {fmt.ROW_BYTES}·`n` |" in doc
    assert f"(the columns start at offset {fmt.TABLE_PREFIX_V1}, {fmt.ROW_BYTES_V1}·`n` bytes)" in doc
    assert f"the {len(fmt.COLUMNS)} columns below" in doc
    assert f"header length `L` = {fmt.BLOCK_HEADER_LEN}" in doc
    assert f"header length `H` = {fmt.FILE_HEADER_LEN}" in doc
    assert f"{fmt.INDEX_ENTRY.size} bytes each" in doc
    for i, (name, dt) in enumerate(tbl.COLUMN_DTYPES, 1):
        kind = {"u": "u", "i": "i"}[dt.kind] + str(dt.itemsize * 8)
        assert f"| {i} | {name} | {kind} |" in doc, name
    for bit, name in FLAG_NAMES:
        assert f"| {bit.bit_length() - 1} | 0x{bit:03x} | `{name}` |" in doc, name


def test_device_output_keeps_its_mode(tmp_path):
    """Writing to a device (a private copy of /dev/null) must not chmod it: 0600 is for files."""
    import stat as st_

    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    dev = tmp_path / "null"
    os.mknod(dev, st_.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(dev, 0o666)
    from replay.log import LogWriter as W

    with W(str(dev)) as w:
        w.close(fsync=False)
    assert st_.S_IMODE(os.stat(dev).st_mode) == 0o666


# ---------------------------------------------------------------------------------------------
# write_rows: the core's rows (Engine(rows=True)) in the blocks write() cuts


def _rows_of(pcap, **opts):
    """The messages of ``pcap``, and a reader of the same capture keeping rows."""
    from replay.pipeline import CaptureReader

    msgs = list(CaptureReader(str(pcap), batch_size=64))
    reader = CaptureReader(str(pcap), batch_size=64)
    reader.keep_rows()
    return msgs, reader


@pytest.mark.parametrize("pcap", sorted(p.name for p in DATA.glob("*.pcap")) + ["sample.pcap"])
@pytest.mark.parametrize("threads", [True, False])
def test_write_rows_writes_the_bytes_write_does(tmp_path, pcap, threads):
    path = SAMPLE if pcap == "sample.pcap" else DATA / pcap
    msgs, reader = _rows_of(path)
    meta = {"created": "fixed"}
    a = write_log(tmp_path / "a.rlog", msgs, meta=meta, block_records=7, block_bytes=3000,
                  threads=threads)
    with LogWriter(tmp_path / "b.rlog", meta=meta, block_records=7, block_bytes=3000,
                   threads=threads) as w:
        for rows in reader.row_buffers():
            w.write_rows(rows)
        assert w.records_written <= len(msgs)     # the rows short of a block wait for close
    assert w.records_written == len(msgs)
    assert (tmp_path / "b.rlog").read_bytes() == a.read_bytes()


def test_write_rows_flush_and_mixed_writes_keep_the_order(tmp_path):
    msgs, reader = _rows_of(SAMPLE)
    extra = make_messages(5)
    with LogWriter(tmp_path / "c.rlog", block_records=1000) as w:
        w.write(extra[0])                   # a message before the rows: its own block
        for rows in reader.row_buffers():
            w.write_rows(rows)
        held = len(rows)
        assert held == len(msgs)            # no block of 1000 yet
        w.flush(fsync=False)                # the rows held go to the file now
        assert len(rows) == 0
        with LogReader(tmp_path / "c.rlog") as r:
            assert list(r) == [extra[0]] + msgs
        w.write_many(extra[1:3])
        w.write(extra[3])
    with LogReader(tmp_path / "c.rlog") as r:
        assert list(r) == [extra[0]] + msgs + extra[1:4] and r.warnings == []


@pytest.mark.parametrize("script", [
    "R R W R R F",      # rows held, a message (cuts them first), more rows
    "W R R F",          # a message held, then rows come
    "W R R W F",        # ... and another message
    "R W W R W R R F",
])
def test_mixed_writes_keep_the_order(tmp_path, script):
    """Messages given to write() and rows the core adds between calls, in any order: the log
    holds them in the order they came (R: the core finishes a message, W: write(), F: flush)."""
    from replay._fastparse_py import RowBuffer

    msgs = make_messages(len(script.split()))
    rows = RowBuffer()
    with LogWriter(tmp_path / "m.rlog", block_records=1000) as w:
        w.write_rows(rows)
        for step, m in zip(script.split(), msgs):
            if step == "R":
                rows.add(m)
            elif step == "W":
                w.write(m)
            else:
                w.flush(fsync=False)
        w.write_rows(rows)
    with LogReader(tmp_path / "m.rlog") as r:
        assert list(r) == [m for step, m in zip(script.split(), msgs) if step != "F"]


def test_rows_held_beyond_a_block_are_cut_as_blocks(tmp_path):
    from replay._fastparse_py import RowBuffer

    msgs = make_messages(25)
    rows = RowBuffer()
    with LogWriter(tmp_path / "b.rlog", block_records=10) as w:
        w.write_rows(rows)
        for m in msgs:              # the core finishes 25 messages before the writer is called
            rows.add(m)
    with LogReader(tmp_path / "b.rlog") as r:
        assert list(r) == msgs and [b.count for b in r.blocks] == [10, 10, 5]
