"""with_data: a changed message gets its parsed fields back in step with its bytes."""

from __future__ import annotations

from replay.events import F_CHUNKED, KIND_REQUEST, KIND_RESPONSE, Message
from replay.httpmsg import head_end, with_data
from replay.pipeline import open_input
from tests.conftest import DATA, ROOT


def test_unchanged_bytes_give_the_same_message():
    paths = [ROOT / "captures" / "sample.pcap", *sorted(DATA.glob("*.pcap*"))]
    for path in paths:
        for m in open_input(str(path)):
            if m.flags & 1 or m.head_length == 0 or m.head_length == len(m.data) and not m.data.endswith(b"\n\n"):
                continue  # incomplete messages: the framer's view of what is missing is not in the bytes
            assert with_data(m, m.data) == m, (path.name, m.uri)


def test_rewritten_request_and_response():
    req = Message(KIND_REQUEST, 3, 1, 10, 20, ("10.0.0.1", 5), ("10.0.0.2", 80), 0,
                  b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/a", 0, 0, 27)
    new = with_data(req, b"POST /v2/a?k=v HTTP/1.1\r\nHost: y\r\nContent-Length: 2\r\n\r\nhi")
    assert (new.method, new.uri, new.body_length, new.conn, new.index) == ("POST", "/v2/a?k=v", 2, 3, 1)
    assert new.head_length == head_end(new.data) == len(new.data) - 2
    resp = Message(KIND_RESPONSE, 3, 1, 30, 40, req.client, req.server, 0, b"", "GET", "/a", 200, 0, 0)
    new = with_data(resp, b"HTTP/1.1 404 No\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert (new.status, new.body_length, new.method) == (404, 5, "GET") and new.flags & F_CHUNKED


# -- the fast search for a header agrees with the line-by-line one ---------------------------------
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from replay import _fastparse_py as pure  # noqa: E402
from replay import httpmsg  # noqa: E402

try:
    from replay import _fastparse as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

_PIECES = [b"Host", b"host", b"HOST", b"X-Host", b"Hostname", b":", b": ", b" ", b"\t", b"\r",
           b"\n", b"\r\n", b"\x0b", b"\x0c", b"a.example", b"v", b"Accept"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30), st.sampled_from([b"\r\n", b"\n"]))
@example([b"Host", b":", b"\n", b"\n", b" "], b"\r\n")      # a line after an empty one
@example([b"Host", b": ", b"v", b"\n", b"\r\n", b" ", b"v"], b"\n")
def test_first_field_agrees_with_field_spans(pieces, eol):
    head = b"GET / HTTP/1.1" + eol + b"".join(pieces) + eol + eol
    spans = httpmsg.field_spans(head, b"host")
    want = (spans[0][1], spans[0][2]) if spans else None
    got = pure.first_field(head, b"host")
    if got is not False:
        assert got == want
    if compiled is not None:
        for h in (head, head[:-1], head[:-2], head[1:], head.replace(b"\r\n\r\n", b"")):
            assert compiled.first_field(h, b"host") == pure.first_field(h, b"host"), h
    data = head + b"body"
    slow = (head[:want[0] + 1] + b" h" + head[want[1]:] + b"body") if want else data
    assert httpmsg.replace_header(data, len(head), b"host", b"h") == slow


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_PIECES + [b"x", b"\rx", b"\n\n", b"\n\r\n"]), max_size=20),
       st.sampled_from([b"host", b"h", b"x-host", b"", b"HOST"]))
def test_both_cores_find_the_first_field_alike(pieces, name):
    if compiled is None:
        return
    head = b"".join(pieces)
    for h in (head, b"\n" + head, head + b"\r\n\r\n"):
        assert compiled.first_field(h, name) == pure.first_field(h, name), (h, name)
