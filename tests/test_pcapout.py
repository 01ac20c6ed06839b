"""A log written back as a capture (replay.formats.pcapout, docs/formats-pcap.md).

The round trips go through the CLI: capture -> .rlog -> .pcap/.pcapng -> .rlog, and the two logs
must hold the same messages: bytes, method, URI, status, timestamps to the microsecond, the same
connections with the same requests and responses in the same order. Packets are decoded with
scapy (crafting and decoding only) to check headers, checksums and sequence numbers; tshark, when
installed, must list the same requests and statuses as ``replay ls``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from replay.events import (F_FAILED, F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message)
from replay.formats import pcapout
from replay.log import LogReader, LogWriter

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SAMPLE = ROOT / "captures" / "sample.pcap"
CAPTURES = [SAMPLE] + sorted(DATA.glob("*.pcap"))
T0 = 1_700_000_000_123_456_000


def replay(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 0, p.stderr
    return p


def read_log(path):
    with LogReader(path) as r:
        return list(r)


def us(ns):
    return ns // 1000


def connections(msgs):
    """The connections of a log as a sorted list: for each, its requests and its responses in
    order, each message as (method, uri, status, data, µs first, µs last, client, server)."""
    by = defaultdict(lambda: ([], []))
    for m in msgs:
        by[m.conn][m.kind].append((m.method, m.uri, m.status, m.data, us(m.ts_first),
                                   us(m.ts_last), tuple(m.client), tuple(m.server)))
    return sorted((tuple(a), tuple(b)) for a, b in by.values())


def assert_same_log(a, b):
    ca, cb = connections(a), connections(b)
    assert len(ca) == len(cb), "connections"
    for x, y in zip(ca, cb):
        assert x == y
    assert len(a) == len(b)


def round_trip(tmp_path, log, ext):
    out = tmp_path / f"out.{ext}"
    back = tmp_path / f"back-{ext}.rlog"
    replay("convert", log, "-o", out, "-q")
    replay("convert", out, "-o", back, "-q")
    return out, read_log(back)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    out = {}
    for cap in CAPTURES:
        log = d / (cap.stem + ".rlog")
        replay("convert", cap, "-o", log, "-q")
        out[cap.name] = log
    return out


@pytest.mark.parametrize("ext", ["pcapng", "pcap"])
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_round_trip_keeps_every_message(tmp_path, logs, capture, ext):
    log = logs[capture.name]
    _, back = round_trip(tmp_path, log, ext)
    assert_same_log(read_log(log), back)


# -- a log made by hand: IPv6, missing addresses, large and chunked bodies, interleaving ----------

def req(conn, index, t, data, client=("2001:db8::1", 40000), server=("2001:db8::80", 8080),
        dt=0, flags=0):
    method, uri = data.split(b" ", 2)[:2]
    return Message(KIND_REQUEST, conn, index, t, t + dt, client, server, flags, data,
                   method.decode(), uri.decode(), 0, 0, 0)


def resp(conn, index, t, data, status=200, client=("2001:db8::1", 40000),
         server=("2001:db8::80", 8080), dt=0, flags=0, method="GET", uri="/"):
    return Message(KIND_RESPONSE, conn, index, t, t + dt, client, server, flags, data, method,
                   uri, status, 0, 0)


def get(uri, host="example.test"):
    return f"GET {uri} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n".encode()


def ok(body: bytes, status=b"200 OK"):
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def chunked(parts):
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        out += b"%x\r\n" % len(p) + p + b"\r\n"
    return out + b"0\r\nX-Trailer: 1\r\n\r\n"


def handmade():
    big = bytes(range(256)) * 1200                       # 300 KiB: ~212 segments
    ms = 1_000_000
    v4c, v4s = ("192.0.2.7", 51000), ("198.51.100.9", 80)
    unknown = ("", 0)
    post = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    return [
        # IPv6, a large body spread over 40 ms
        req(0, 0, T0, get("/big")),
        # IPv4 connection interleaved with the IPv6 one; two pipelined requests
        req(1, 0, T0 + 1 * ms, get("/a"), v4c, v4s),
        req(1, 1, T0 + 1 * ms + 500, get("/b"), v4c, v4s),
        resp(1, 0, T0 + 2 * ms, ok(b"a" * 10), client=v4c, server=v4s, uri="/a"),
        resp(0, 0, T0 + 2 * ms, ok(big), dt=40 * ms, uri="/big"),
        resp(1, 1, T0 + 3 * ms, chunked([b"x" * 3000, b"y" * 10]), client=v4c, server=v4s,
             dt=2 * ms, uri="/b"),
        # no addresses at all: synthetic IPv4 ones
        req(2, 0, T0 + 5 * ms, get("/nowhere"), unknown, unknown),
        resp(2, 0, T0 + 6 * ms, b"HTTP/1.1 204 No Content\r\n\r\n", status=204,
             client=unknown, server=unknown, uri="/nowhere"),
        # an interim answer logged before its request (it came while the body was being sent)
        resp(3, 0, T0 + 8 * ms, b"HTTP/1.1 100 Continue\r\n\r\n", 100, v4c, ("198.51.100.9", 81),
             method="POST", uri="/up"),
        req(3, 0, T0 + 7 * ms, post + b"p" * 5000, v4c, ("198.51.100.9", 81), dt=3 * ms),
        resp(3, 0, T0 + 11 * ms, ok(b"done"), 200, v4c, ("198.51.100.9", 81), method="POST",
             uri="/up"),
        req(0, 1, T0 + 50 * ms, get("/after"), dt=1000),
        resp(0, 1, T0 + 51 * ms, ok(b"z" * 2000), dt=2000, uri="/after"),
    ]


def write_rlog(path, msgs):
    with LogWriter(path, meta={"source": "handmade"}) as w:
        for m in msgs:
            w.write(m)
    return path


@pytest.mark.parametrize("ext", ["pcapng", "pcap"])
def test_handmade_log_round_trip(tmp_path, ext):
    msgs = handmade()
    log = write_rlog(tmp_path / "in.rlog", msgs)
    _, back = round_trip(tmp_path, log, ext)
    synth_c = (str(pcapout.synthetic_client(4, False)[0]), 1024 + 4)   # conn 2: id 2 * 2
    synth_s = (str(pcapout.synthetic_server(False)[0]), 80)
    want = []
    for m in msgs:
        if m.conn == 2:
            m.client, m.server = synth_c, synth_s
        want.append(m)
    assert_same_log(want, back)
    assert {m.client[0] for m in back} >= {"2001:db8::1", "192.0.2.7", synth_c[0]}


def test_failed_records_are_left_out_and_replayed_ones_get_connections_of_their_own(tmp_path):
    a = req(0, 0, T0, get("/x"))
    b = resp(0, 0, T0 + 1000, ok(b"rec"), uri="/x")
    ra = req(0, 0, T0 + 5000, get("/x"), flags=F_REPLAYED)
    rb = resp(0, 0, T0 + 6000, ok(b"replayed"), flags=F_REPLAYED, uri="/x")
    fa = req(1, 0, T0 + 7000, get("/y"), flags=F_REPLAYED)
    fb = resp(1, 0, T0 + 8000, b"timeout", flags=F_REPLAYED | F_FAILED, uri="/y")
    log = write_rlog(tmp_path / "in.rlog", [a, b, ra, rb, fa, fb])
    out = tmp_path / "out.pcapng"
    p = replay("convert", log, "-o", out)
    assert "1 failed replay records left out" in p.stderr
    replay("convert", out, "-o", tmp_path / "back.rlog", "-q")
    back = read_log(tmp_path / "back.rlog")
    assert len({m.conn for m in back}) == 3
    assert [m.data for m in back if m.kind == KIND_RESPONSE] == [ok(b"rec"), ok(b"replayed")]


# -- packets: headers, checksums, sequence numbers ------------------------------------------------

def packets(path):
    scapy_all = pytest.importorskip("scapy.all")
    return scapy_all, scapy_all.rdpcap(str(path))


@pytest.mark.parametrize("ext", ["pcapng", "pcap"])
def test_packets_are_well_formed(tmp_path, ext):
    log = write_rlog(tmp_path / "in.rlog", handmade())
    out = tmp_path / f"out.{ext}"
    replay("convert", log, "-o", out, "-q")
    sc, pkts = packets(out)
    flows = defaultdict(list)
    for p in pkts:
        assert p[sc.Ether].src in (pcapout.MAC_CLIENT.hex(":"), pcapout.MAC_SERVER.hex(":"))
        ip = p[sc.IP] if sc.IP in p else p[sc.IPv6]
        tcp = p[sc.TCP]
        again = p.copy()     # checksums as written == as scapy computes them from scratch
        if sc.IP in again:
            del again[sc.IP].chksum
        del again[sc.TCP].chksum
        rebuilt = again.__class__(bytes(again))
        assert rebuilt[sc.TCP].chksum == tcp.chksum
        if sc.IP in p:
            assert rebuilt[sc.IP].chksum == ip.chksum
        assert len(bytes(tcp.payload)) <= pcapout.MSS
        flows[(ip.src, tcp.sport, ip.dst, tcp.dport)].append((float(p.time), tcp))
    for (src, sport, dst, dport), segs in flows.items():
        assert segs[0][1].flags & 0x02, "each direction starts with a SYN"
        assert segs[-1][1].flags & 0x01 or any(s.flags & 0x01 for _, s in segs), "and has a FIN"
        times = [t for t, _ in segs]
        assert times == sorted(times)
        nxt = segs[0][1].seq
        peer = flows[(dst, dport, src, sport)]
        for _, s in segs:       # no hole, no overlap: each segment starts where the last ended
            assert s.seq == nxt
            nxt = (nxt + len(bytes(s.payload)) + (1 if s.flags & 0x03 else 0)) & 0xFFFFFFFF
        assert peer, "the other direction exists"
    sent = {}                   # in file order, an ACK covers exactly what the peer sent before it
    for p in pkts:
        ip = p[sc.IP] if sc.IP in p else p[sc.IPv6]
        tcp = p[sc.TCP]
        if tcp.flags & 0x10:
            assert tcp.ack == sent[(ip.dst, tcp.dport, ip.src, tcp.sport)]
        sent[(ip.src, tcp.sport, ip.dst, tcp.dport)] = \
            (tcp.seq + len(bytes(tcp.payload)) + (1 if tcp.flags & 0x03 else 0)) & 0xFFFFFFFF


def test_sequence_numbers_wrap(tmp_path):
    conn = next(c for c in range(1 << 20)
                if pcapout._isn(c * 2, 1) > (1 << 32) - 100_000)   # the server's ISN near 2**32
    body = b"w" * 300_000
    msgs = [req(conn, 0, T0, get("/wrap")), resp(conn, 0, T0 + 10_000, ok(body), dt=1_000_000)]
    log = write_rlog(tmp_path / "in.rlog", msgs)
    _, back = round_trip(tmp_path, log, "pcapng")
    assert [m.data for m in back] == [m.data for m in msgs]


def test_file_headers(tmp_path):
    log = write_rlog(tmp_path / "in.rlog", handmade()[:1])
    replay("convert", log, "-o", tmp_path / "o.pcap", "-q")
    replay("convert", log, "-o", tmp_path / "o.pcapng", "-q")
    head = (tmp_path / "o.pcap").read_bytes()[:24]
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("=IHHiIII", head)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1)
    ng = (tmp_path / "o.pcapng").read_bytes()
    assert ng[:4] == b"\x0a\x0d\x0d\x0a"
    shb_len = struct.unpack("=I", ng[4:8])[0]
    assert b"source: in.rlog" in ng[:shb_len]
    idb = ng[shb_len:]
    assert struct.unpack("=IIHH", idb[:12])[::2] == (1, 1)
    assert struct.pack("=HHB", 9, 1, 9) in idb[:struct.unpack("=I", idb[4:8])[0]]   # if_tsresol 9


def test_nanoseconds_in_pcapng_microseconds_in_pcap(tmp_path):
    t = T0 + 789                                     # not a whole microsecond
    msgs = [req(0, 0, t, get("/ns")), resp(0, 0, t + 1001, ok(b"k"))]
    for ext, want in (("pcapng", t), ("pcap", t - 789)):
        path = tmp_path / f"o.{ext}"
        with pcapout.open_writer(path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), {},
                                 format=ext) as w:
            for m in msgs:
                w.write(m)
        sc, pkts = packets(path)
        first_data = next(p for p in pkts if len(bytes(p[sc.TCP].payload)))
        assert int(first_data.time * 10**9) // 1000 == want // 1000
        if ext == "pcapng":
            assert round(first_data.time * 10**9) % 1000 == 789


def test_idle_connection_is_closed_and_its_id_reopened(tmp_path):
    idle = 200 * 10**9    # beyond the core's idle timeout
    msgs = [req(0, 0, T0, get("/1")), resp(0, 0, T0 + 1000, ok(b"1")),
            req(0, 1, T0 + idle, get("/2")), resp(0, 1, T0 + idle + 1000, ok(b"2"))]
    log = write_rlog(tmp_path / "in.rlog", msgs)
    out, back = round_trip(tmp_path, log, "pcapng")
    assert len({m.conn for m in back}) == 2
    sc, pkts = packets(out)
    fins = [p for p in pkts if p[sc.TCP].flags & 0x01]
    assert len(fins) == 4 and float(fins[0].time) < T0 / 1e9 + 1


def test_memory_stays_bounded_packets_go_out_before_close(tmp_path):
    path = tmp_path / "o.pcapng"
    w = pcapout.open_writer(path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), {},
                            format="pcapng")
    for i in range(200):
        t = T0 + i * 10**9      # one second apart: the 10 s reorder window lets old ones out
        w.write(req(i, 0, t, get(f"/{i}")))
        w.write(resp(i, 0, t + 1000, ok(b"x" * 100)))
    assert w.packets_written > 150 * 6
    assert len(w._heap) < 20 * 12
    w.close()
    assert w.packets_written == 200 * (3 + 4 + 3)   # handshake, 2 x (data + ACK) ... FIN


# -- tshark ---------------------------------------------------------------------------------------

def tshark_http(path):
    p = subprocess.run(["tshark", "-r", str(path), "-Y", "http", "-T", "fields",
                        "-e", "http.request.method", "-e", "http.request.uri",
                        "-e", "http.response.code", "-E", "aggregator=/s"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    req, st = Counter(), Counter()
    for line in p.stdout.splitlines():
        m, u, s = (line.split("\t") + ["", "", ""])[:3]
        if m:
            for mm, uu in zip(m.split(" "), u.split(" ")):   # URIs hold commas, never spaces
                req[(mm, uu)] += 1
        for code in filter(None, s.split(" ")):
            st[int(code)] += 1
    return req, st


def ls_http(log):
    p = replay("ls", log, "--format", "jsonl")
    req, st = Counter(), Counter()
    for line in p.stdout.splitlines():
        m = json.loads(line)
        if m["kind"] == "request":
            req[(m["method"], m["uri"])] += 1
        else:
            st[m["status"]] += 1
    return req, st


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_tshark_reads_what_replay_ls_lists(tmp_path, logs, capture):
    log = logs[capture.name]
    out = tmp_path / "out.pcapng"
    replay("convert", log, "-o", out, "-q")
    t_req, t_st = tshark_http(out)
    r_req, r_st = ls_http(log)
    assert t_req == r_req
    assert t_st == r_st


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_tshark_finds_no_bad_checksum_nor_tcp_problem(tmp_path):
    log = write_rlog(tmp_path / "in.rlog", handmade())
    for ext in ("pcap", "pcapng"):
        out = tmp_path / f"out.{ext}"
        replay("convert", log, "-o", out, "-q")
        p = subprocess.run(
            ["tshark", "-r", str(out), "-o", "ip.check_checksum:TRUE",
             "-o", "tcp.check_checksum:TRUE", "-Y",
             "ip.checksum.status == 0 || tcp.checksum.status == 0 || tcp.analysis.flags"
             " || _ws.malformed || _ws.expert.severity >= warning"],
            capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == ""
        t_req, t_st = tshark_http(out)
        assert sum(t_req.values()) == 6 and t_st == Counter({200: 5, 204: 1, 100: 1})
