"""Random capture loss among 100k messages: what survives is exact, what was hit says so.

Frames are built with struct here (scapy would take minutes for 150k packets); the layout is the
same Ethernet/IPv4/TCP that tests/flow.py crafts with scapy.
"""

from __future__ import annotations

import random
import struct

from replay.events import F_GAP, F_INCOMPLETE, F_UNPAIRED

MSS = 1448


def frame(src, dst, sport, dport, seq, ack, payload, flags=0x18):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0,
                     bytes(src), bytes(dst))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags,
                      65535, 0, 0)
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp + payload


def make_messages(rng, conn, k):
    uri = f"/c{conn}/r{k}?q={rng.randrange(10**6)}".encode()
    r = rng.random()
    if r < 0.6:
        req = b"GET " + uri + b" HTTP/1.1\r\nHost: api.test\r\nCookie: s=" + b"a" * rng.randrange(200) + b"\r\n\r\n"
    else:
        body = b'{"k": "' + b"v" * rng.randrange(0, 5000) + b'"}'
        req = (b"POST " + uri + b" HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    size = rng.choice((0, 20, 300, 3000, 20000))
    body = bytes(rng.randrange(256) for _ in range(16)) * (size // 16)
    if rng.random() < 0.3 and body:
        half = len(body) // 2
        chunks = b"%x\r\n" % half + body[:half] + b"\r\n" + b"%x\r\n" % (len(body) - half) + body[half:] + b"\r\n0\r\n\r\n"
        resp = b"HTTP/1.1 200 OK\r\nX-For: " + uri + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    else:
        resp = b"HTTP/1.1 200 OK\r\nX-For: " + uri + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    return uri.decode(), req, resp


def build(seed, n_conns=40, exchanges=1250, p_drop=0.003):
    """Packets of n_conns keep-alive connections; returns packets and the truth per message."""
    rng = random.Random(seed)
    packets = []
    truth = []  # (conn, kind, k, data, dropped, uri)
    state = []
    for c in range(n_conns):
        cli = (bytes([10, 0, c // 256, c % 256]), 30000 + c)
        srv = (bytes([10, 1, 0, 1]), 80)
        state.append([cli, srv, rng.randrange(2**32), rng.randrange(2**32)])
    t = 1_700_000_000_000_000
    for c, (cli, srv, cs, ss) in enumerate(state):
        t += 1000
        packets.append((t, frame(cli[0], srv[0], cli[1], srv[1], cs, 0, b"", 0x02)))
        packets.append((t + 10, frame(srv[0], cli[0], srv[1], cli[1], ss, cs + 1, b"", 0x12)))
        state[c][2] += 1
        state[c][3] += 1
    for k in range(exchanges):
        for c in range(n_conns):
            cli, srv, cs, ss = state[c]
            uri, req, resp = make_messages(rng, c, k)
            for kind, data in ((0, req), (1, resp)):
                dropped = False
                for i in range(0, len(data), MSS):
                    seg = data[i:i + MSS]
                    t += 1000
                    if rng.random() < p_drop:
                        dropped = True
                    elif kind == 0:
                        packets.append((t, frame(cli[0], srv[0], cli[1], srv[1], cs + i, ss, seg)))
                    else:
                        packets.append((t, frame(srv[0], cli[0], srv[1], cli[1], ss + i, cs, seg)))
                if kind == 0:
                    cs += len(data)
                else:
                    ss += len(data)
                truth.append((c, kind, k, data, dropped, uri))
            t += 1000
            # the client acknowledges everything it received (the endpoint saw what the capture lost)
            packets.append((t, frame(cli[0], srv[0], cli[1], srv[1], cs, ss, b"", 0x10)))
            state[c][2], state[c][3] = cs, ss
    return packets, truth


def test_random_drops_among_100k_messages(impl):
    packets, truth = build(seed=7)
    assert len(truth) == 100_000  # 40 connections x 1250 exchanges x 2 messages
    eng = impl.Engine(1)
    out = []
    for ts, fr in packets:
        out.extend(eng.feed(ts * 1000, fr))
    out.extend(eng.finish())
    st = eng.stats()

    got = {}
    for m in out:
        got.setdefault((m.conn, m.kind, bytes(m.data[:64])), []).append(m)
    by_data = {(m.conn, m.kind, m.data): m for m in out}
    intact = [t for t in truth if not t[4]]
    dropped = [t for t in truth if t[4]]
    assert dropped, "the seed must drop something"
    missing = [t for t in intact if (t[0], t[1], t[3]) not in by_data]
    # every message the capture saw whole is in the output, byte for byte
    assert not missing, f"{len(missing)} intact messages lost, e.g. {missing[0][:3]}"
    # every message in the output that the loss touched says so
    intact_keys = {(t[0], t[1], t[3]) for t in intact}
    for m in out:
        if (m.conn, m.kind, m.data) not in intact_keys:
            assert m.flags & (F_GAP | F_INCOMPLETE), m
    # responses to intact requests pair with the request they answer, or say they are unpaired
    req_uri = {}
    for m in out:
        if m.kind == 0:
            req_uri[(m.conn, m.index)] = m.uri
    true_uri = {(t[0], t[1], t[3]): t[5] for t in intact}
    wrong = 0
    for m in out:
        if m.kind == 1 and (m.conn, 1, m.data) in true_uri:
            if m.flags & F_UNPAIRED:
                continue
            if m.uri != true_uri[(m.conn, 1, m.data)]:
                wrong += 1
    assert wrong == 0
    assert st["gaps"] > 0 and st["requests"] + st["responses"] == len(out)
