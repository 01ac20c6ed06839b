"""The .rlog 2.0 table and payload: columns stored against each connection's previous row,
request targets stored once, 1.x logs still read, damage reported, and the size it is for."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.events import F_FAILED, F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message
from replay.log import LogReader, LogWriter
from replay.log import format as fmt
from replay.log import table as tbl
from tests import rlog_v1
from tests.conftest import DATA, ROOT

# (1.1 log written by the release before 2.0, the capture it was converted from)
V1_LOGS = [
    ("rlog-1.1-sample.rlog", ROOT / "captures" / "sample.pcap"),
    ("rlog-1.1-multiple100.rlog", DATA / "OISF_suricata-verify_http-multiple100.pcap"),
]
FIELDS = ("kind", "conn", "index", "ts_first", "ts_last", "client", "server", "flags", "data",
          "method", "uri", "status", "body_length", "head_length")
COLUMNS = ("kind", "flags", "conn", "index", "ts_first", "ts_last", "status", "body_length",
           "head_length", "data_length", "data_offset", "client", "server", "block")


def fields(m: Message) -> tuple:
    return tuple(getattr(m, f) for f in FIELDS)


def convert(pcap, out) -> None:
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", "convert", str(pcap), "-o", str(out),
                        "-q"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def same_tables(a: LogReader, b: LogReader) -> None:
    """The same columns; method, uri, client and server name the same strings and addresses
    (their ids may differ)."""
    ta, tb = a.table(), b.table()
    for name in COLUMNS:
        if name not in ("client", "server"):
            assert np.array_equal(ta[name], tb[name]), name
    for name in ("method", "uri"):
        assert [a.strings[i] for i in ta[name].tolist()] == [b.strings[i] for i in tb[name].tolist()]
    for name in ("client", "server"):
        assert [a.addresses[i] for i in ta[name].tolist()] == \
            [b.addresses[i] for i in tb[name].tolist()]


@pytest.mark.parametrize("name,capture", V1_LOGS)
def test_logs_of_version_1_read_as_their_capture_converted_now(tmp_path, name, capture):
    new = tmp_path / "new.rlog"
    convert(capture, new)
    with LogReader(DATA / name) as old, LogReader(new) as now:
        assert old.version == (1, 1) and now.version == (2, 1)
        assert old.warnings == [] and now.warnings == []
        assert [fields(m) for m in old] == [fields(m) for m in now]
        same_tables(old, now)
        for b_old, b_new in zip(old.blocks, now.blocks):
            for names in (["ts_last"], ["conn", "index"], ["uri", "kind"], ["client", "status"]):
                co, cn = old.columns(b_old, names), now.columns(b_new, names)
                assert sorted(co.cols) == sorted(cn.cols)
                for k in ("conn", "index", "ts_first", "ts_last", "kind", "status"):
                    if k in co.cols:
                        assert np.array_equal(co.cols[k], cn.cols[k]), k


# -- messages built to meet every rule of the table and the payload ----------------------------

URIS = ["/", "/api/items/1?rid=1", "/api/items/2?rid=2", "/caf\xe9/\xff", "*", "", "/x\udcff",
        "http://example.com/p", "/" + "a" * 700, "GET"]
METHODS = ["GET", "POST", "DELETE", "M-SEARCH", "", "g\xe9t", "/", "*"]     # some are uris too
ADDRS = [("10.0.0.1", 40000), ("10.0.0.2", 40001), ("2001:db8::1", 443), ("::1", 80)]


def _request_bytes(method: str, uri: str, how: int, rnd: random.Random) -> bytes:
    tail = b" HTTP/1.1\r\nHost: h\r\n\r\n" + rnd.randbytes(rnd.randrange(0, 40))
    mb, ub = method.encode("utf-8", "surrogatepass"), uri.encode("utf-8", "surrogatepass")
    if how == 0:
        return mb + b" " + ub + tail                   # as captured: the target elided
    if how == 1:
        return mb + b" " + ub[:-1] + b"?" + tail       # rewritten after the uri was taken
    if how == 2:
        return mb + b"  " + ub + tail                  # two spaces: not the request line's form
    if how == 3:
        return mb + b" " + ub                          # nothing after the target
    return rnd.randbytes(rnd.randrange(0, 60))


def build(seed: int, n: int) -> list:
    rnd = random.Random(seed)
    out, ts = [], 1_700_000_000_000_000_000
    state: dict = {}
    for _ in range(n):
        conn = rnd.choice([0, 1, 2, 3, 2**64 - 1, rnd.randrange(2**64)]) if rnd.random() < 0.9 \
            else rnd.randrange(100)
        last = state.setdefault(conn, {"index": rnd.choice([-1, 0, 5, 2**63 - 1]),
                                       "client": rnd.choice(ADDRS), "uri": rnd.choice(URIS),
                                       "method": rnd.choice(METHODS)})
        kind = rnd.choice([KIND_REQUEST, KIND_RESPONSE, KIND_RESPONSE, 7])
        if rnd.random() < 0.8:
            index = last["index"] + (kind == KIND_REQUEST)
        else:
            index = rnd.choice([-1, 0, rnd.randrange(-2**63, 2**63)])
        index = (index + 2**63) % 2**64 - 2**63
        client = last["client"] if rnd.random() < 0.85 else rnd.choice(ADDRS)
        if kind == KIND_REQUEST or rnd.random() < 0.2:
            uri = rnd.choice(URIS + [f"/api/items/{rnd.randrange(10**6)}"] + [None])
            method = rnd.choice(METHODS + [None])
        else:
            uri, method = last["uri"], last["method"]
        last.update(index=index, client=client, uri=uri, method=method)
        if kind == KIND_REQUEST and uri is not None and method is not None:
            data = _request_bytes(method, uri, rnd.randrange(6), rnd)
        else:
            data = b"HTTP/1.1 200 OK\r\n\r\n" + rnd.randbytes(rnd.randrange(0, 30))
        flags = rnd.choice([0, 0, F_REPLAYED, F_REPLAYED | F_FAILED, 1 << 31])
        ts += rnd.randrange(0, 3_000_000)
        out.append(Message(kind, conn, index, ts, ts + rnd.choice([0, 1000, 2**40]), client,
                           rnd.choice(ADDRS), flags, data, method, uri,
                           0 if kind == KIND_REQUEST else rnd.choice([200, 404, 0]),
                           rnd.choice([0, len(data), 2**64 - 1]),
                           rnd.choice([0, min(len(data), 20), 2**32 - 1])))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), n=st.integers(0, 300), block=st.integers(1, 120))
def test_round_trip_of_connections_targets_and_odd_values(tmp_path, seed, n, block):
    msgs = build(seed, n)
    path = tmp_path / f"r{seed}-{n}-{block}.rlog"
    with LogWriter(path, block_records=block, threads=False) as w:
        for m in msgs:
            w.write(m)
    with LogReader(path) as r:
        assert [fields(m) for m in r] == [fields(m) for m in msgs]
        assert r.warnings == []
        t = r.table()
        assert t["conn"].tolist() == [m.conn for m in msgs]
        assert t["index"].tolist() == [m.index for m in msgs]
        assert [r.strings[i] for i in t["uri"].tolist()] == [m.uri for m in msgs]
        assert [r.addresses[i] for i in t["client"].tolist()] == [m.client for m in msgs]
        assert t["data_length"].tolist() == [len(m.data) for m in msgs]
        # a row's bytes where data_offset says, in its block's payload
        for row in random.Random(seed).sample(range(n), min(n, 20)):
            payload = r.block_payload(int(t["block"][row]))
            o, ln = int(t["data_offset"][row]), int(t["data_length"][row])
            assert payload[o:o + ln] == msgs[row].data
        # a scan's subsets of columns decode as the whole table does
        start = 0
        for b in r.blocks:
            for names in (["conn"], ["index"], ["uri"], ["client"], ["ts_last", "kind"]):
                c = r.columns(b, names)
                assert set(c.cols) == set(names) | ({"ts_first"} if "ts_last" in names else set())
                for k in names:
                    if k in ("uri", "client"):
                        continue            # block-local ids: compared through the whole table
                    assert np.array_equal(c.cols[k], t[k][start:start + b.count]), k
            start += b.count


def test_targets_are_stored_once():
    """A request whose bytes hold its method, a space and its uri keeps the uri in the table
    only; one rewritten since (or not of that form) is stored whole."""
    rnd = random.Random(3)
    reqs = [Message(KIND_REQUEST, 1, i, 10 + i, 10 + i, ADDRS[0], ADDRS[1], 0,
                    _request_bytes("GET", "/api/items/%d" % i, how, rnd), "GET", "/api/items/%d" % i,
                    0, 0, 0) for i, how in enumerate([0, 1, 2, 3, 4, 0])]
    table, parts, _, _, _ = fmt.encode_table(reqs)
    t = tbl.Table(table, len(reqs), 10)
    assert t.cols["elided"].tolist() == [1, 0, 0, 1, 0, 1]
    stored = b"".join(parts)
    assert b"/api/items/0 " not in stored and b"GET /api/items/? HTTP" in stored     # rewritten: whole
    assert t.payload(stored) == b"".join(m.data for m in reqs)


def _tampered_log(path, msgs, change) -> None:
    """A log whose one data block's raw table went through ``change(table, n)``."""
    real = fmt.encode_table

    def encode(block):
        table, parts, t0, t1, summary = real(block)
        return change(bytearray(table), len(block)), parts, t0, t1, summary

    fmt.encode_table = encode
    try:
        with LogWriter(path, threads=False) as w:
            for m in msgs:
                w.write(m)
    finally:
        fmt.encode_table = real


def _column_at(name: str, n: int) -> int:
    off = fmt.TABLE_PREFIX
    for col, dt in tbl.COLUMN_DTYPES:
        if col == name:
            return off
        off += dt.itemsize * n
    raise KeyError(name)


@pytest.mark.parametrize("what,reason", [
    ("conn", "connection"),           # a row names a connection past the table's end
    ("first", "inherits"),            # a connection's first row says "as the previous row"
    ("elided", "elided target"),      # a target left out of a message that has no uri
])
def test_a_damaged_table_is_one_warning_and_its_block_skipped(tmp_path, what, reason):
    msgs = build(11, 40)
    msgs[0] = Message(KIND_REQUEST, 5, 0, msgs[0].ts_first, msgs[0].ts_first, ADDRS[0], ADDRS[1],
                      0, b"GET / HTTP/1.1\r\n\r\n", "GET", None, 0, 0, 18)

    def change(table, n):
        if what == "conn":
            table[_column_at("conn", n) + 1] = 0xEE         # row 1: connection 0xEE - 1
        elif what == "first":
            table[_column_at("client", n)] = 0              # row 0 inherits its client
        else:
            table[_column_at("elided", n)] = 1              # row 0: no uri to put back
        return bytes(table)

    path = tmp_path / "d.rlog"
    _tampered_log(path, msgs, change)
    with LogReader(path) as r:
        assert list(r) == []
        assert len(r.warnings) == 1 and "corrupt block" in r.warnings[0] and reason in r.warnings[0]


def api_messages(exchanges: int, seed: int = 7) -> list:
    """Keep-alive API traffic: small JSON requests and answers on 32 connections, unique URIs."""
    rnd = random.Random(seed)
    out, ts = [], 1_700_000_000_000_000_000
    nxt = dict.fromkeys(range(32), 0)
    for rid in range(exchanges):
        conn = rnd.randrange(32)
        ts += rnd.randrange(1, 500) * 1000
        uri = f"/api/items/{rnd.randrange(5000)}?rid={rid}&fields=id,sku,price"
        req = (f"GET {uri} HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: app/2.3\r\n"
               f"Accept: application/json\r\n\r\n").encode()
        body = ('{"id":%d,"sku":"SKU-%05d","price":%d.%02d,"stock":%d}' % (
            rid, rnd.randrange(99999), rnd.randrange(200), rnd.randrange(100),
            rnd.randrange(50))).encode()
        resp = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)) + body
        client = ("10.1.0.%d" % conn, 50000 + conn)
        server = ("10.0.0.10", 80)
        out.append(Message(KIND_REQUEST, conn, nxt[conn], ts, ts, client, server, 0, req, "GET",
                           uri, 0, 0, len(req)))
        ts2 = ts + rnd.randrange(100, 300) * 1000
        out.append(Message(KIND_RESPONSE, conn, nxt[conn], ts2, ts2, client, server, 0, resp, "GET",
                           uri, 200, len(body), len(resp) - len(body)))
        nxt[conn] += 1
    return out


def test_small_api_messages_take_a_third_less_than_in_version_1(tmp_path):
    """Against the same messages in 1.x's layout (its table, its block size, level 3 tables).
    ``benchmarks/bench_log.py`` and ``bench_convert.py --api`` set the log against gzip -6."""
    msgs = api_messages(20_000)
    path = tmp_path / "api.rlog"
    with LogWriter(path) as w:
        for m in msgs:
            w.write(m)
    with LogReader(path) as r:
        assert [fields(m) for m in r] == [fields(m) for m in msgs]
    old = tmp_path / "v1-layout.rlog"
    real = fmt.encode_table
    fmt.encode_table = lambda block: (*rlog_v1.encode_table_v1(block), real(block)[4])
    try:
        with LogWriter(old, block_records=4096) as w:
            w.table_level = w.level
            for m in msgs:
                w.write(m)
    finally:
        fmt.encode_table = real
    size, before = path.stat().st_size, old.stat().st_size
    assert size < 0.75 * before, (size, before)
    assert size < 1.2 * len(gzip.compress(b"".join(m.data for m in msgs), 6))


def test_tables_are_compressed_as_level_8_would_at_least():
    """Up to level 8 a table is compressed with ``TABLE_PARAMS`` (level 8's match finder, tuned
    for time): within 1 % of level 8's size on API tables of 8,192 rows, in frames that carry
    their size; above level 8 with the level itself."""
    import zstandard as zstd

    from replay.log.writer import TABLE_LEVEL, _table_compressor

    msgs = api_messages(8_192 * 3)
    tables = [fmt.encode_table(msgs[i:i + 8_192])[0] for i in range(0, len(msgs), 8_192)]
    level8 = zstd.ZstdCompressor(level=TABLE_LEVEL)
    for level in (-1, TABLE_LEVEL):      # (the same parameters at every level up to 8)
        tuned = _table_compressor(level)
        frames = [tuned.compress(t) for t in tables]
        assert [zstd.frame_content_size(f) for f in frames] == [len(t) for t in tables]
        assert [zstd.ZstdDecompressor().decompress(f) for f in frames] == tables
        size, size8 = sum(map(len, frames)), sum(len(level8.compress(t)) for t in tables)
        assert size <= 1.01 * size8, (level, size, size8)
    for level in (TABLE_LEVEL + 1, 12):
        assert _table_compressor(level).compress(tables[0]) == \
            zstd.ZstdCompressor(level=level).compress(tables[0])


def test_a_method_that_is_also_a_uri_elsewhere(tmp_path):
    """Methods and targets are coded apart: a uri equal to a method (or the reverse) is cut at
    its own length, never one byte more."""
    a, b = ADDRS[0], ADDRS[1]
    msgs = [Message(KIND_REQUEST, 1, i, 10 + i, 10 + i, a, b, 0, data, method, uri, 0, 0, len(data))
            for i, (method, uri, data) in enumerate([
                ("GET", "/", b"GET / HTTP/1.1\r\n\r\n"),
                ("GET", "GET", b"GET GET HTTP/1.1\r\n\r\n"),
                ("X", "/", b"X / HTTP/1.1\r\n\r\n"),
                ("/", "/p", b"//p HTTP/1.1\r\n\r\n"),
                ("POST", "POST", b"POST POST HTTP/1.1\r\n\r\n")])]
    path = tmp_path / "m.rlog"
    with LogWriter(path, threads=False) as w:
        for m in msgs:
            w.write(m)
    with LogReader(path) as r:
        assert [fields(m) for m in r] == [fields(m) for m in msgs] and r.warnings == []
