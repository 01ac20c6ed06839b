"""ResponseFramer: the replayer's view of one connection, framed by the capture's rules."""

from __future__ import annotations

from replay.events import F_CLOSE_DELIMITED, F_INCOMPLETE, F_INTERIM, F_UPGRADE

WIRE = (b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"           # answers a HEAD: no body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n\r\nuntil close")


def frame_all(impl, chunks):
    f = impl.ResponseFramer(("127.0.0.1", 5000), ("127.0.0.1", 80))
    for m in ("POST", "HEAD", "GET", "GET"):
        f.expect(m)
    out = []
    for i, c in enumerate(chunks):
        out += f.feed(c, i)
    out += f.eof(len(chunks))
    return f, out


def test_whole_and_bytewise_agree(impl):
    f, whole = frame_all(impl, [WIRE])
    _, bytewise = frame_all(impl, [WIRE[i:i + 1] for i in range(len(WIRE))])
    assert [m.data for m in whole] == [m.data for m in bytewise]
    assert b"".join(m.data for m in whole) == WIRE
    assert [(m.index, m.status, m.method) for m in whole] == [
        (0, 100, "POST"), (0, 200, "POST"), (1, 200, "HEAD"), (2, 200, "GET"), (3, 200, "GET")]
    assert whole[0].flags & F_INTERIM
    assert whole[3].body_length == 3
    assert whole[4].flags & F_CLOSE_DELIMITED and not whole[4].flags & F_INCOMPLETE
    assert f.outstanding == 0


def test_outstanding_and_cut_body(impl):
    f = impl.ResponseFramer()
    f.expect("GET")
    f.expect("GET")
    assert f.outstanding == 2
    assert f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", 1) == []
    assert f.outstanding == 2
    out = f.eof(2)
    assert len(out) == 1 and out[0].flags & F_INCOMPLETE and out[0].data.endswith(b"12345")
    assert f.outstanding == 1


def test_garbage_is_counted_not_raised(impl):
    f = impl.ResponseFramer()
    f.expect("GET")
    assert f.feed(b"\x00\x01garbage that is not http\r\n" * 10, 1) == []
    f.eof(2)
    st = f.stats()
    assert st["responses"] == 0 and st["skipped_bytes"] > 0


def test_connect_tunnel(impl):
    f = impl.ResponseFramer()
    f.expect("CONNECT")
    out = f.feed(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01binary", 1)
    assert len(out) == 1 and out[0].flags & F_UPGRADE
    assert f.tunnel
