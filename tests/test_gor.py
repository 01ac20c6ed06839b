"""GoReplay ``.gor`` files in and out (``replay.formats.gor``): a real recording, round trips
through the log, gzip, GoReplay's framing bug, out-of-order records, damage, and the CLI.

What GoReplay's own reader needs (github.com/buger/goreplay, read at 251e45a), which
``test_goreplay_reader_reads_what_we_write`` checks on our output:

- ``protocol.go``: ``payloadSeparator = "\\n🐵🙈🙉\\n"``; ``payloadHeader`` writes
  ``"%c %s %d %d\\n"`` (type, id, timestamp, latency); types ``'1'`` request, ``'2'`` response,
  ``'3'`` replayed response; ``payloadMeta`` splits the first line on single spaces;
- ``input_file.go`` (``fileInputReader.parse``): reads line by line (``ReadBytes('\\n')``); a
  line equal to the separator without its first byte ends a record; the record is what was read
  before, minus its last byte (the separator's own LF); fewer than 3 meta fields is a malformed
  record (skipped); meta[2] is the timestamp, parsed as a decimal int64 and used to sort records
  in a heap; gzip when the file name ends ``.gz``;
- ``output_file.go`` (``PluginWrite``): writes meta (with its LF), the payload, the separator;
  a ``gzip.Writer`` when the name ends ``.gz``;
- ``internal/tcp/tcp_message.go`` (``UUID``): 1.x ids are 12 bytes in hex, the flow (client port
  << 48 | server port << 32 | client IP) then the request's ack.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from replay.errors import InputError
from replay.events import F_CHUNKED, F_INCOMPLETE, F_REPLAYED, F_UNPAIRED, KIND_REQUEST, KIND_RESPONSE
from replay.formats import gor, output_format, sniff
from replay.pipeline import open_input
from tests.conftest import DATA, ROOT

SAMPLE = ROOT / "captures" / "sample.pcap"
REAL = DATA / "DataDog_ecommerce-workshop_requests_0.gor"
SEP = gor.SEPARATOR


def replay(*args, timeout=120):
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    return p


def record(typ, rid, ts, payload, latency=None):
    head = b"%d %s %d" % (typ, rid.encode(), ts) + (b" %d" % latency if latency is not None else b"")
    return head + b"\n" + payload + SEP


def goreplay_read(path):
    """The records GoReplay's file input would emit from ``path``, by the rules in this module's
    docstring: (meta fields, payload) each."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    out, buf = [], b""
    for line in lines:
        if line == SEP[1:]:
            nl = buf.find(b"\n")
            meta = buf[:nl].split(b" ") if nl >= 0 else []
            if len(meta) >= 3:
                int(meta[2])
                out.append((meta, buf[:-1][nl + 1:]))
            buf = b""
            continue
        buf += line
    return out


def request(uri, body=b"", method=b"GET", extra=b""):
    cl = b"Content-Length: %d\r\n" % len(body) if body or method == b"POST" else b""
    return (method + b" " + uri.encode() + b" HTTP/1.1\r\nHost: shop.test:8080\r\n" + extra + cl
            + b"\r\n" + body)


def response(body=b"ok", status=b"200 OK"):
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# -- the real recording ----------------------------------------------------------------------------


def test_real_recording_every_request():
    raw = REAL.read_bytes()
    records = [r for r in raw.split(SEP) if r]
    assert sniff(str(REAL)) == "gor"
    r = open_input(str(REAL))
    msgs = list(r)
    assert r.warnings == [] and r.meta["header_fields"] == 3 and r.meta["id_digits"] == 40
    assert len(msgs) == len(records) == 101 and all(m.kind == KIND_REQUEST for m in msgs)
    # every record's payload, unchanged, in time order; each 0.x id its own connection
    assert [m.data for m in msgs] == [rec.split(b"\n", 1)[1] for rec in records]
    assert [m.ts_first for m in msgs] == sorted(int(rec.split(b" ", 3)[2].split(b"\n")[0])
                                                for rec in records)
    assert len({m.conn for m in msgs}) == 101 and all(m.index == 0 for m in msgs)
    assert [m.method for m in msgs].count("GET") == 99
    posts = [m for m in msgs if m.method == "POST"]
    assert [(m.uri, m.body_length) for m in posts] == [("/api/v2/storefront/cart/add_item", 45),
                                                      ("/api/v2/storefront/cart/add_item", 44)]
    assert msgs[0].uri == "/" and msgs[0].server == ("0.0.0.0", 3000)
    assert all(m.head_length + m.body_length == len(m.data) for m in msgs)


def test_real_recording_replays_against_the_sink(tmp_path):
    rep = tmp_path / "report.json"
    p = replay("play", REAL, "--sink", "--speed", "max", "--report", rep, "-q")
    assert p.returncode == 0, p.stderr
    report = json.loads(rep.read_text())
    assert report["sent"] == report["answered"] == 101


# -- round trips -----------------------------------------------------------------------------------


def pairs(msgs):
    """Each request (method, uri, bytes, µs times) with its responses (status, bytes, µs times,
    replayed), and the requests grouped by connection."""
    reqs = {}
    resps = {}
    for m in msgs:
        key = (m.conn, m.index)
        if m.kind == KIND_REQUEST:
            reqs[key] = (m.method, m.uri, m.data, m.ts_first // 1000, m.ts_last // 1000,
                         m.head_length, m.body_length, bool(m.flags & F_CHUNKED))
        else:
            resps.setdefault(key if m.index >= 0 else None, []).append(
                (m.status, m.method, m.data, m.ts_first // 1000, m.ts_last // 1000,
                 bool(m.flags & F_REPLAYED), bool(m.flags & F_UNPAIRED)))
    paired = sorted((req, sorted(resps.get(k, []))) for k, req in reqs.items())
    conns = {}
    for (conn, index), req in reqs.items():
        conns.setdefault(conn, []).append((index, req))
    grouping = sorted(tuple(req for _, req in sorted(v)) for v in conns.values())
    return paired, sorted(resps.get(None, [])), grouping


@pytest.mark.parametrize("pcap", [SAMPLE, DATA / "zeek_zeek_100-continue.pcap",
                                  DATA / "OISF_suricata-verify_http-post-file.pcap",
                                  DATA / "kbandla_dpkt_http.pcap"], ids=lambda p: p.name)
@pytest.mark.parametrize("ext", [".gor", ".gor.gz"])
def test_round_trip_pcap_rlog_gor_rlog(tmp_path, pcap, ext):
    log, out, back = tmp_path / "a.rlog", tmp_path / ("a" + ext), tmp_path / "b.rlog"
    for src, dst in ((pcap, log), (log, out), (out, back)):
        p = replay("convert", src, "-o", dst)
        assert p.returncode == 0, p.stderr
    assert output_format(str(out)) == "gor"
    assert (out.read_bytes()[:2] == b"\x1f\x8b") == ext.endswith(".gz")
    before, after = list(open_input(str(log))), list(open_input(str(back)))
    assert len(before) == len(after)
    assert pairs(before) == pairs(after)
    # headers and bodies byte for byte, timestamps to the µs
    assert sorted(m.data for m in before) == sorted(m.data for m in after)
    # GoReplay's reader sees every message, with 4 fields and 24-digit ids
    got = goreplay_read(out)
    assert sorted(p for _, p in got) == sorted(m.data for m in before)
    assert all(len(meta) == 4 and len(meta[1]) == 24 for meta, _ in got)


def test_gzip_is_found_by_content(tmp_path):
    plain = tmp_path / "x.gor"
    plain.write_bytes(record(1, "a" * 24, 10, request("/a")) + record(2, "a" * 24, 20, response(), 5))
    hidden = tmp_path / "x.bin"
    hidden.write_bytes(gzip.compress(plain.read_bytes()))
    assert sniff(str(hidden)) == "gor"
    r = open_input(str(hidden))
    msgs = list(r)
    assert r.meta["compressed"] == "gzip" and [m.kind for m in msgs] == [KIND_REQUEST, KIND_RESPONSE]
    assert msgs[1].ts_first == 20 and msgs[1].ts_last == 25 and msgs[1].method == "GET"


def test_goreplay_reader_reads_what_we_write(tmp_path):
    """Our writer against GoReplay's reading rules (module docstring), for every type."""
    from replay.events import Message

    def msg(kind, conn, index, ts, data, flags=0, ts_last=None):
        return Message(kind, conn, index, ts, ts_last or ts, ("10.0.0.1", 40000), ("10.0.0.2", 80),
                       flags, data)

    msgs = [msg(KIND_REQUEST, 7, 0, 1_000, request("/a"), ts_last=1_500),
            msg(KIND_RESPONSE, 7, 0, 2_000, response(b"recorded"), ts_last=2_700),
            msg(KIND_RESPONSE, 7, 0, 3_000, response(b"replayed"), F_REPLAYED),
            msg(KIND_RESPONSE, 8, -1, 4_000, response(b"orphan"), F_UNPAIRED)]
    for name in ("w.gor", "w.gor.gz"):
        path = tmp_path / name
        w = gor.open_writer(str(path), os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), {})
        for m in msgs:
            w.write(m)
        w.update_meta({"ignored": True})
        w.close()
        got = goreplay_read(path)
        assert [(meta, p) for meta, p in got] == [
            ([b"1", b"0000000000000007" + b"00000000", b"1000", b"500"], msgs[0].data),
            ([b"2", b"0000000000000007" + b"00000000", b"2000", b"700"], msgs[1].data),
            ([b"3", b"0000000000000007" + b"00000000", b"3000", b"0"], msgs[2].data),
            ([b"2", b"0000000000000008" + b"ffffffff", b"4000", b"0"], msgs[3].data)]
        back = list(open_input(str(path)))
        assert [(m.kind, m.index, m.ts_first, m.ts_last, m.flags & (F_REPLAYED | F_UNPAIRED))
                for m in back] == [(0, 0, 1000, 1500, 0), (1, 0, 2000, 2700, 0),
                                   (1, 0, 3000, 3000, F_REPLAYED), (1, -1, 4000, 4000, F_UNPAIRED)]
        assert back[0].conn == back[1].conn == back[2].conn != back[3].conn


# -- GoReplay's quirks -----------------------------------------------------------------------------


def test_separator_inside_a_body_framing_decides(tmp_path):
    evil = b"before" + SEP + b"1 " + b"b" * 24 + b" 5\nGET /fake HTTP/1.1\r\n\r\n" + SEP + b"after"
    chunk = b"x" + SEP + b"y"
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
    rid = "0a0b0c0d0e0f0a0b00000001"
    path = tmp_path / "evil.gor"
    path.write_bytes(record(1, rid, 100, request("/up", evil, b"POST"), 3)
                     + record(2, rid, 200, chunked, 4)
                     + record(1, "c" * 24, 300, request("/next")))
    # GoReplay's own reader splits the first two inside their bodies
    assert len(goreplay_read(path)) > 3
    r = open_input(str(path))
    msgs = list(r)
    assert [(m.kind, m.uri) for m in msgs] == [(0, "/up"), (1, "/up"), (0, "/next")]
    assert msgs[0].data.endswith(evil) and msgs[0].body_length == len(evil)
    assert msgs[1].data == chunked and msgs[1].flags & F_CHUNKED and msgs[1].body_length == len(chunk)
    assert not any(m.flags & F_INCOMPLETE for m in msgs)
    assert any("2 records held the record separator inside their payload" in w for w in r.warnings)


def test_message_cut_by_goreplay_is_flagged_incomplete(tmp_path):
    path = tmp_path / "cut.gor"
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this"
    cut_chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\nonly this"
    path.write_bytes(record(1, "d" * 24, 1, request("/big")) + record(2, "d" * 24, 2, cut, 1)
                     + record(1, "e" * 24, 3, request("/after"))
                     + record(2, "e" * 24, 4, cut_chunked, 1)
                     + record(1, "f" * 24, 5, request("/last")))
    r = open_input(str(path))
    msgs = list(r)
    assert [m.data for m in msgs] == [request("/big"), cut, request("/after"), cut_chunked,
                                      request("/last")]
    assert [bool(m.flags & F_INCOMPLETE) for m in msgs] == [False, True, False, True, False]
    assert any("2 messages are shorter than their HTTP framing says" in w for w in r.warnings)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_reading_in_small_pieces(tmp_path, monkeypatch, chunk):
    """Records, separators and headers cut across every read boundary read the same."""
    path = tmp_path / "x.gor"
    evil = b"a" + SEP + b"b"
    path.write_bytes(record(1, "1" * 24, 1, request("/p", evil, b"POST"), 0)
                     + record(2, "1" * 24, 2, response(evil), 0)
                     + record(1, "2" * 24, 3, request("/q")))
    whole = [(m.kind, m.data, m.flags) for m in open_input(str(path))]
    monkeypatch.setattr(gor, "CHUNK", chunk)
    r = open_input(str(path))
    assert [(m.kind, m.data, m.flags) for m in r] == whole and len(whole) == 3
    assert r.warnings == ["2 records held the record separator inside their payload; their HTTP "
                          "framing decided where they end"]


def test_out_of_order_records_sorted_and_counted(tmp_path):
    path = tmp_path / "order.gor"
    ts = [500, 100, 300, 200, 400]
    path.write_bytes(b"".join(record(1, "%024x" % (i + 1 << 40), t, request(f"/{t}"))
                              for i, t in enumerate(ts)))
    r = open_input(str(path))
    msgs = list(r)
    assert [m.ts_first for m in msgs] == sorted(ts)
    assert r.warnings == ["4 of 5 records were out of time order in the file (GoReplay writes "
                          "them as they complete); sorted within 10000 records / 60 s"]
    # a window too small: what comes later than it is yielded late, and said so
    r = gor.GorReader(str(path), window_records=1)
    assert [m.ts_first for m in r] == [100, 300, 200, 400, 500]
    assert any("records came later than that window" in w for w in r.warnings)


def test_old_three_field_headers_and_mixed_generations(tmp_path):
    rid = "113f561a06c66a5a49746ea9feb2747a275732f1"
    path = tmp_path / "old.gor"
    # 0.x: a request with 3 fields, its response with the request's timestamp and the latency
    path.write_bytes(record(1, rid, 1499932720871971000, request("/api/mapmaker"))
                     + record(2, rid, 1499932720871971000, response(b"teapot", b"418 I'm a teapot"),
                              352870697))
    assert sniff(str(path)) == "gor"
    req, resp = list(open_input(str(path)))
    assert (req.method, req.uri, req.ts_last) == ("GET", "/api/mapmaker", 1499932720871971000)
    assert (resp.conn, resp.index, resp.status, resp.method) == (req.conn, 0, 418, "GET")
    assert resp.ts_last == 1499932720871971000 + 352870697


def test_replayed_responses_and_flows(tmp_path):
    # 1.x ids: client port 0x9c40 (40000), server port 80, client 10.0.0.1, then the ack
    flow = "9c4000500a000001"
    path = tmp_path / "flows.gor"
    path.write_bytes(record(1, flow + "00000010", 1, request("/one"), 0)
                     + record(2, flow + "00000010", 2, response(), 0)
                     + record(3, flow + "00000010", 3, response(b"again"), 0)
                     + record(1, flow + "00000020", 4, request("/two"), 0)
                     + record(2, "f" * 24, 5, response(b"who?"), 0))
    msgs = list(open_input(str(path)))
    assert [(m.kind, m.index, bool(m.flags & F_REPLAYED)) for m in msgs] == [
        (0, 0, False), (1, 0, False), (1, 0, True), (0, 1, False), (1, -1, False)]
    assert len({m.conn for m in msgs[:4]}) == 1 and msgs[4].conn != msgs[0].conn
    assert msgs[0].client == ("10.0.0.1", 40000) and msgs[0].server == ("0.0.0.0", 80)
    assert msgs[4].flags & F_UNPAIRED and msgs[4].method is None


def test_sniff_wants_a_record_header(tmp_path):
    for content in (b"", b"{\"log\": {}}", b"1 2 3 4 5\n", b"GET / HTTP/1.1\r\n\r\n", b"4 ab 12\n"):
        p = tmp_path / "x"
        p.write_bytes(content)
        assert not gor.sniff(str(p)), content
    assert not gor.sniff(str(tmp_path / "missing"))


# -- damage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail,what", [
    (b"not a header\nGET / HTTP/1.1\r\n\r\n" + SEP, "the header line 'not a header' does not parse "
     "(expected 'TYPE ID TIMESTAMP [LATENCY]', TYPE 1, 2 or 3)"),
    (b"1 " + b"a" * 24 + b" 9\nGET /cut HTTP/1.1\r\n", "the record is cut before its separator"),
])
def test_damage_stops_with_one_error_after_what_came_before(tmp_path, tail, what):
    good = record(1, "1" * 24, 1, request("/a")) + record(1, "2" * 24, 2, request("/b"))
    path = tmp_path / "bad.gor"
    path.write_bytes(good + tail)
    got = []
    with pytest.raises(InputError) as e:
        for m in open_input(str(path)):
            got.append(m.uri)
    assert got == ["/a", "/b"]
    assert str(e.value) == f"{path}: record 3 at byte offset {len(good)}: {what}"
    out = tmp_path / "x.rlog"
    p = replay("convert", path, "-o", out)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"replay: {path}: record 3 at byte offset {len(good)}: {what}"]
    assert not out.exists() and [f.name for f in tmp_path.iterdir()] == ["bad.gor"]


def test_damage_in_a_gz_names_the_decompressed_offset(tmp_path):
    path = tmp_path / "bad.gor.gz"
    good = record(1, "1" * 24, 1, request("/a"))
    path.write_bytes(gzip.compress(good + b"garbage\n"))
    with pytest.raises(InputError, match=f"record 2 at byte offset {len(good)} of the decompressed data"):
        list(open_input(str(path)))


# -- filter writes .gor ----------------------------------------------------------------------------


def test_filter_writes_gor(tmp_path):
    log, out = tmp_path / "prod.rlog", tmp_path / "x.gor"
    assert replay("convert", SAMPLE, "-o", log).returncode == 0
    p = replay("filter", log, "-o", out)
    assert p.returncode == 0, p.stderr
    assert pairs(list(open_input(str(log)))) == pairs(list(open_input(str(out))))
    p = replay("filter", log, "-o", out, "--method", "POST")
    assert p.returncode == 0, p.stderr
    msgs = list(open_input(str(out)))
    assert msgs and all(m.method == "POST" for m in msgs)
