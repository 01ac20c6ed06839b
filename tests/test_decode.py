"""Link, IP and TCP decoding: every supported link type and the IP features captures carry."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, IPOption
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting

from replay.events import F_GAP, F_TRUNCATED
from tests.flow import Flow, ethernet, requests, responses, run

GET = b"GET /x?q=1 HTTP/1.1\r\nHost: h\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"


def _etype(ip):
    return 0x86DD if ip[0] >> 4 == 6 else 0x0800


def mac():
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


def vlan(ip):
    return mac() + struct.pack("!HHH", 0x8100, 42, _etype(ip)) + ip


def qinq(ip):
    return mac() + struct.pack("!HHHHH", 0x88A8, 7, 0x8100, 42, _etype(ip)) + ip


def mpls(ip):
    # two labels, bottom of stack on the second
    return mac() + struct.pack("!HII", 0x8847, (16 << 12) | 0x40, (17 << 12) | 0x140) + ip


def pppoe(ip):
    proto = 0x0057 if ip[0] >> 4 == 6 else 0x0021
    return mac() + struct.pack("!HBBHHH", 0x8864, 0x11, 0, 0x1234, len(ip) + 2, proto) + ip


def sll(ip):
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", _etype(ip)) + ip


def sll2(ip):
    return struct.pack("!HHIHBB8s", _etype(ip), 0, 3, 1, 0, 6, b"\x02" + b"\x00" * 7) + ip


def null(ip):
    af = 30 if ip[0] >> 4 == 6 else 2  # host byte order; 30: AF_INET6 on Darwin
    return struct.pack("=I", af) + ip


def loop(ip):
    af = 24 if ip[0] >> 4 == 6 else 2  # network byte order
    return struct.pack("!I", af) + ip


def raw(ip):
    return ip


LINKS = [
    ("ethernet", 1, ethernet),
    ("vlan", 1, vlan),
    ("qinq", 1, qinq),
    ("mpls", 1, mpls),
    ("pppoe", 1, pppoe),
    ("sll", 113, sll),
    ("sll2", 276, sll2),
    ("null", 0, null),
    ("loop", 108, loop),
    ("raw", 101, raw),
    ("raw12", 12, raw),
]


def exchange(**flow):
    f = Flow(**flow).handshake()
    f.c(GET)
    f.s(RESP)
    f.close()
    return f


@pytest.mark.parametrize("name,linktype,link", LINKS, ids=[x[0] for x in LINKS])
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_link_types(impl, name, linktype, link, family):
    addrs = dict(client=("10.1.2.3", 51000), server=("10.9.8.7", 8080)) if family == "v4" else \
        dict(client=("2001:db8::1", 51000), server=("2001:db8::2", 8080))
    f = exchange(link=link, **addrs)
    msgs, st = run(impl, f.packets, linktype=linktype)
    assert [m.data for m in msgs] == [GET, RESP]
    assert msgs[0].client == addrs["client"] and msgs[0].server == addrs["server"]
    assert st["not_ip"] == 0 and st["malformed"] == 0


@pytest.mark.parametrize("linktype,family", [(228, "v4"), (229, "v6")])
def test_raw_ip_linktypes(impl, linktype, family):
    addrs = dict(client=("10.1.2.3", 51000), server=("10.9.8.7", 80)) if family == "v4" else \
        dict(client=("2001:db8::1", 51000), server=("2001:db8::2", 80))
    f = exchange(link=raw, **addrs)
    msgs, _ = run(impl, f.packets, linktype=linktype)
    assert [m.data for m in msgs] == [GET, RESP]


def test_ipv4_options(impl):
    f = exchange(ip_layer=lambda s, d: IP(src=s, dst=d, options=[IPOption(b"\x01\x01\x01\x00"),
                                                                 IPOption(b"\x07\x07\x04" + bytes(4))]))
    assert f.packets[0][1][14] & 0x0F > 5  # the header really carries options
    msgs, _ = run(impl, f.packets)
    assert [m.data for m in msgs] == [GET, RESP]


def test_ipv6_extension_headers(impl):
    f = exchange(client=("2001:db8::1", 51000), server=("2001:db8::2", 80),
                 ip_layer=lambda s, d: IPv6(src=s, dst=d) / IPv6ExtHdrHopByHop() /
                 IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt())
    msgs, _ = run(impl, f.packets)
    assert [m.data for m in msgs] == [GET, RESP]


def test_ip_fragments_are_counted(impl):
    f = exchange()
    ip = IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0, proto=6) / (b"\x00" * 40)
    ip2 = IP(src="10.0.0.1", dst="10.0.0.2", flags=0, frag=5, proto=6) / (b"\x00" * 40)
    pkts = f.packets + [(f.t + 1000, ethernet(bytes(ip))), (f.t + 2000, ethernet(bytes(ip2)))]
    msgs, st = run(impl, pkts)
    assert [m.data for m in msgs] == [GET, RESP]
    assert st["ip_fragments"] == 2


def test_not_ip_and_not_tcp_are_counted(impl):
    arp = bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(28)
    udp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / b"")
    udp = udp[:9] + b"\x11" + udp[10:]
    msgs, st = run(impl, [(1000, arp), (2000, ethernet(udp + bytes(8)))])
    assert msgs == [] and st["not_ip"] == 1 and st["not_tcp"] == 1


def test_malformed_frames_never_raise(impl):
    f = exchange()
    pkts = []
    for k, (ts, frame) in enumerate(f.packets):
        for cut in (0, 1, 13, 14, 20, 33, 34, 40, 53):
            pkts.append((ts + cut, frame[:cut]))
    msgs, st = run(impl, pkts)
    assert st["packets"] == len(pkts)


def test_snaplen_truncated_packet_is_flagged(impl):
    f = Flow().handshake()
    f.c(GET)
    body = b"z" * 1000
    ts, frame = f.s(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body, send=False)[0]
    f.packets.append((ts, frame[:200]))  # cut by a 200-byte snaplen
    f.c(GET)
    f.s(RESP)
    f.close()
    msgs, st = run(impl, f.packets)
    resp = responses(msgs)
    assert resp[0].flags & F_TRUNCATED and resp[0].flags & F_GAP and resp[0].status == 200
    assert resp[1].data == RESP and resp[1].index == 1
    assert st["truncated_packets"] == 1
    assert len(requests(msgs)) == 2


def test_tso_super_frame_with_zero_ip_length(impl):
    """A GSO/TSO super-frame as captured before segmentation: IP total length 0, 60 KB of TCP."""
    f = Flow().handshake()
    f.c(GET)
    body = bytes(range(256)) * 240  # 61,440 bytes in one frame
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    ts, frame = f.s(resp, size=len(resp), send=False)[0]
    frame = frame[:16] + b"\x00\x00" + frame[18:]  # IPv4 total length 0
    f.packets.append((ts, frame))
    f.close()
    msgs, st = run(impl, f.packets)
    assert responses(msgs)[0].data == resp and st["gaps"] == 0
