"""The summary block (.rlog 2.1): what a streamed replay needs before it reads the first block,
written once at close. ``index_header`` from it must be what the scan of every block's table
gives, field for field; a log without one (not closed, too many connections, damaged) is
scanned as before."""

from __future__ import annotations

import random

import pytest

from replay.events import F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message
from replay.log import LogReader, LogWriter
from replay.log import format as fmt
from replay.play.stream import index_header

A, B = ("10.0.0.1", 40000), ("10.0.0.2", 80)


def messages(seed: int, n: int) -> list:
    """Requests and responses on many connections, a few of them replayed (``play -o``), conns
    and indexes out of order now and then, times going back and forth."""
    rng = random.Random(seed)
    out = []
    nxt: dict = {}
    for k in range(n):
        conn = rng.choice([rng.randrange(40), rng.randrange(1 << 20), 2**64 - 1 - rng.randrange(3)])
        index = nxt.get(conn, 0) if rng.random() < 0.9 else rng.randrange(50)
        nxt[conn] = index + 1
        kind = KIND_REQUEST if rng.random() < 0.55 else KIND_RESPONSE
        flags = F_REPLAYED if rng.random() < 0.1 else 0
        t = 1_000_000 + k * 1000 + rng.randrange(-5000, 5000)
        data = b"GET /x HTTP/1.1\r\n\r\n" if kind == KIND_REQUEST else b"HTTP/1.1 200 OK\r\n\r\n"
        out.append(Message(kind, conn, index, t, t + 10, A, B, flags, data,
                           "GET" if kind == KIND_REQUEST else None, "/x" if kind == KIND_REQUEST
                           else None, 200 if kind == KIND_RESPONSE else 0, 0, len(data)))
    return out


def fields(h):
    return (h.requests, h.t0, h.t_last, h.conn_stride, h.connections, h.conns.tolist(),
            h.last_index.tolist())


def write(path, msgs, block_records=37):
    # (a fixed creation time: two logs of the same messages are the same bytes, whenever made)
    with LogWriter(path, {"created": "2026-01-01T00:00:00+00:00"},
                   block_records=block_records) as w:
        w.write_many(msgs)
    return path


@pytest.mark.parametrize("seed,n", [(1, 1), (2, 5), (3, 300), (4, 2000), (5, 40)])
def test_the_summary_says_what_the_scan_finds(tmp_path, seed, n):
    path = write(tmp_path / "a.rlog", messages(seed, n))
    with LogReader(path) as r:
        assert r.version == (2, 1)
        assert r.summary() is not None
        assert fields(index_header(r)) == fields(index_header(r, summary=False))
        assert r.warnings == []


def test_only_replayed_or_only_responses(tmp_path):
    msgs = messages(6, 50)
    for m in msgs:
        m.flags = F_REPLAYED
    only_replayed = write(tmp_path / "r.rlog", msgs)
    resp = [m for m in messages(7, 80) if m.kind == KIND_RESPONSE]
    only_responses = write(tmp_path / "s.rlog", resp)
    for path in (only_replayed, only_responses):
        with LogReader(path) as r:
            got = index_header(r)
            assert fields(got) == fields(index_header(r, summary=False))
            assert got.requests == 0 and got.connections == 0
    with LogReader(only_responses) as r:
        assert index_header(r).conn_stride == max(m.conn for m in resp) + 1


def test_a_log_without_one_is_scanned(tmp_path):
    msgs = messages(8, 500)
    path = write(tmp_path / "a.rlog", msgs)
    want = fields(index_header(LogReader(path), summary=False))
    # a writer that did not close: no index (the summary is not trusted without it)
    data = path.read_bytes()
    index_off, _ = fmt.INDEX_TRAILER.unpack_from(data, len(data) - fmt.INDEX_TRAILER.size)
    cut = tmp_path / "cut.rlog"
    cut.write_bytes(data[:index_off])
    with LogReader(cut) as r:
        assert r.summary() is None and fields(index_header(r)) == want


def test_a_damaged_summary_is_said_and_scanned(tmp_path):
    path = write(tmp_path / "a.rlog", messages(9, 500))
    want = fields(index_header(LogReader(path), summary=False))
    with LogReader(path) as r:
        off = r._summaries[-1]
    data = bytearray(path.read_bytes())
    data[off + fmt.BLOCK_HEADER_LEN + 3] ^= 0xFF
    bad = tmp_path / "bad.rlog"
    bad.write_bytes(bytes(data))
    with LogReader(bad) as r:
        assert fields(index_header(r)) == want
        assert len(r.warnings) == 1 and "summary block at offset" in r.warnings[0]
    with LogReader(bad) as r, LogReader(path) as good:
        assert list(r) == list(good)


def test_a_summary_the_index_contradicts_is_not_trusted(tmp_path, monkeypatch):
    """A summary that counts more requests than the data blocks hold messages, or times outside
    theirs, is said and the log scanned."""
    msgs = messages(10, 400)
    want = fields(index_header(LogReader(write(tmp_path / "good.rlog", msgs)), summary=False))
    real = fmt.encode_summary
    for name, change in (("requests", lambda v: (10**9,) + v[1:]),
                         ("first", lambda v: v[:1] + (v[1] - 10**12,) + v[2:]),
                         ("last", lambda v: v[:2] + (v[2] + 10**12,) + v[3:])):
        def lying(s, change=change):
            a = real(s)
            head = fmt.SUMMARY_HEAD.unpack_from(a, 0)
            return fmt.SUMMARY_HEAD.pack(*change(head)) + a[fmt.SUMMARY_HEAD.size:]

        monkeypatch.setattr(fmt, "encode_summary", lying)
        path = write(tmp_path / f"{name}.rlog", msgs)
        with LogReader(path) as r:
            assert r.summary() is None, name
            assert fields(index_header(r)) == want
            assert "does not agree with the index" in r.warnings[0]


def test_an_oversized_summary_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    path = write(tmp_path / "a.rlog", messages(11, 400))
    want = fields(index_header(LogReader(path), summary=False))
    monkeypatch.setattr(fmt, "SUMMARY_MAX_RAW", fmt.SUMMARY_HEAD.size + 16)
    with LogReader(path) as r:
        assert fields(index_header(r)) == want
        assert "more than a summary holds" in r.warnings[0]


@pytest.mark.parametrize("dict_max,compact_from", [(0, 1), (3, 7), (50, 1000)])
def test_the_summary_in_arrays_is_the_summary_in_a_dict(tmp_path, monkeypatch, dict_max,
                                                        compact_from):
    """Past ``DICT_MAX`` connections the writer keeps them in arrays, put together now and
    then: the block it writes is the same, byte for byte."""
    msgs = messages(12, 3000)
    want = write(tmp_path / "dict.rlog", msgs)
    monkeypatch.setattr(fmt.Summary, "DICT_MAX", dict_max)
    monkeypatch.setattr(fmt.Summary, "COMPACT_FROM", compact_from)
    got = write(tmp_path / "arrays.rlog", msgs)
    assert got.read_bytes() == want.read_bytes()
    monkeypatch.setattr(fmt, "SUMMARY_MAX_CONNS", 30)
    with LogReader(write(tmp_path / "many.rlog", msgs)) as r:
        assert r._summaries == [] and index_header(r).connections > 30


def test_too_many_connections_write_none(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "SUMMARY_MAX_CONNS", 3)
    path = write(tmp_path / "a.rlog", messages(10, 300))
    with LogReader(path) as r:
        assert r._summaries == [] and r.summary() is None
        h = index_header(r)
        assert h.connections > 3


def test_a_log_of_version_2_0_is_scanned(tmp_path):
    """What a 2.0 writer wrote (no summary block) reads and plans as before."""
    msgs = messages(11, 400)
    with LogReader(write(tmp_path / "a.rlog", msgs)) as r:
        want = fields(index_header(r, summary=False))
    with LogWriter(tmp_path / "plain.rlog", block_records=37) as w:
        w._summary = None           # as a 2.0 writer: data blocks, metadata and index only
        w.write_many(msgs)
    with LogReader(tmp_path / "plain.rlog") as r:
        assert r._summaries == [] and fields(index_header(r)) == want


def test_the_summary_block_is_small_and_skipped_by_readers(tmp_path):
    msgs = messages(12, 3000)
    path = write(tmp_path / "a.rlog", msgs, block_records=500)
    with LogReader(path) as r:
        assert [m.conn for m in r] == [m.conn for m in msgs]
        assert sum(b.count for b in r.blocks) == len(msgs)
        conns, last = r.summary()[4:]
        c = conns.tolist()
        assert c == sorted(set(c)) and len(c) == len(last)
        assert c == sorted({m.conn for m in msgs if m.kind == KIND_REQUEST and not m.flags})
