"""Rewrites: each one on hand-built messages, then the bytes that reach a real server.

Expected bytes are built here with plain string edits of the recorded requests, not with the
helpers the rewrites use.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import subprocess

import pytest

from play_helpers import SAMPLE, SinkThread, env, replay_cmd
from replay.errors import UsageError
from replay.events import F_CHUNKED, F_INCOMPLETE, F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message
from replay.httpmsg import head_end, with_data
from replay.pipeline import open_input
from replay.rules.ruleset import Rules, settings_from_values

T = 1_700_000_000_000_000_000


def msg(data: bytes, kind=KIND_REQUEST, flags=0):
    m = Message(kind, 1, 0, T, T + 1, ("10.0.0.1", 5000), ("10.0.0.2", 80), flags, b"",
                None, None, 0, 0, 0)
    return with_data(m, data)


def rw(values, m):
    return Rules(settings_from_values(values)).rewrite(m)


def one(values, data: bytes, kind=KIND_REQUEST, flags=0) -> bytes:
    return rw(values, msg(data, kind, flags)).data


GET = b"GET /v1/users/42/ping?a=1&b=2 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"


# -- path and query ------------------------------------------------------------------------------


def test_rewrite_path():
    assert one({"rewrite-path": "^/v1/:/v2/"}, GET).startswith(b"GET /v2/users/42/ping?a=1&b=2 HTTP/1.1\r\n")
    out = rw({"rewrite-path": r"/users/([^/]+)/ping:/u/$1/pong"}, msg(GET))
    assert out.uri == "/v1/u/42/pong?a=1&b=2" and out.data.endswith(b"\r\nHost: h\r\nAccept: */*\r\n\r\n")
    assert one({"rewrite-path": r"/users/(?P<id>\d+):/people/\g<id>"}, GET).startswith(b"GET /v1/people/42/")
    # the first colon outside (?:...) and not escaped separates regex and replacement
    assert one({"rewrite-path": r"(?:a|b)=(\d):\1=x"}, GET).startswith(b"GET /v1/users/42/ping?1=x&2=x ")
    assert one({"rewrite-path": r"a\=1:a=3"}, GET).startswith(b"GET /v1/users/42/ping?a=3&b=2 ")
    colon = b"GET /x:y HTTP/1.1\r\nHost: h\r\n\r\n"
    assert one({"rewrite-path": r"x\:y:z"}, colon).startswith(b"GET /z HTTP/1.1")
    # absolute-form: scheme and authority stay
    absolute = b"GET http://h.example/v1/x HTTP/1.1\r\nHost: h.example\r\n\r\n"
    assert one({"rewrite-path": "^/v1/:/v2/"}, absolute).startswith(b"GET http://h.example/v2/x HTTP/1.1")
    # several rules in order; responses and unmatched requests are the same object
    assert one({"rewrite-path": ["^/v1/:/v2/", "^/v2/:/v3/"]}, GET).startswith(b"GET /v3/")
    m = msg(GET)
    assert rw({"rewrite-path": "^/nothing:/x"}, m) is m
    r = msg(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", KIND_RESPONSE)
    assert rw({"rewrite-path": "^/v1/:/v2/"}, r) is r


def test_query():
    assert one({"set-query": "debug=1"}, b"GET /a HTTP/1.1\r\n\r\n").startswith(b"GET /a?debug=1 ")
    assert one({"set-query": "b=9"}, GET).startswith(b"GET /v1/users/42/ping?a=1&b=9 ")
    assert one({"set-query": "b=9"}, GET.replace(b"a=1", b"b=3")).startswith(b"GET /v1/users/42/ping?b=9 ")
    assert one({"remove-query": ["a", "b"]}, GET).startswith(b"GET /v1/users/42/ping HTTP/1.1")
    assert one({"remove-query": "a", "set-query": "a=new"}, GET).startswith(b"GET /v1/users/42/ping?b=2&a=new ")
    enc = b"GET /s?user%5Fid=7&x=1 HTTP/1.1\r\n\r\n"
    assert one({"remove-query": "user_id"}, enc).startswith(b"GET /s?x=1 ")


def test_bad_rewrites_name_the_rule():
    for values, text in [
        ({"rewrite-path": "no-colon"}, "--rewrite-path no-colon: expected 'REGEX:REPLACEMENT'"),
        ({"rewrite-path": "([:x"}, "invalid regex"),
        ({"rewrite-path": "(a):$2"}, "the regex has no group 2"),
        ({"rewrite-body": "(?P<n>a):${m}"}, "no group m"),
        ({"rewrite-path": r"a:\q"}, "bad replacement: bad escape"),
        ({"set-header": "X-A 1"}, "expected 'Name: value'"),
        ({"set-header": "X A: 1"}, "expected 'Name: value'"),
        ({"remove-header": "X A"}, "not a header name"),
        ({"set-query": "novalue"}, "expected NAME=VALUE"),
        ({"set-query": "a=b&c=d"}, "expected NAME=VALUE"),
        ({"redact-header": "a b"}, "not a header name"),
    ]:
        with pytest.raises(UsageError) as e:
            Rules(settings_from_values(values))
        assert text in str(e.value), (values, str(e.value))


# -- headers -------------------------------------------------------------------------------------


def test_set_and_remove_headers():
    data = b"GET / HTTP/1.1\r\nHost: h\r\nx-a: 1\r\nAccept: */*\r\nX-A: 2\r\n\r\nbody"
    out = rw({"set-header": "X-A: 9"}, msg(data))
    assert out.data == b"GET / HTTP/1.1\r\nHost: h\r\nx-a: 9\r\nAccept: */*\r\n\r\nbody"
    assert out.head_length == len(out.data) - 4
    out = rw({"set-header": ["X-New: v w", "X-Other:"]}, msg(data))
    assert out.data.endswith(b"X-A: 2\r\nX-New: v w\r\nX-Other: \r\n\r\nbody")
    assert one({"remove-header": ["x-A", "host"]}, data) == b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nbody"
    # remove, then set: the header comes back once
    assert one({"remove-header": "Accept", "set-header": "Accept: a/b"}, data).count(b"Accept") == 1
    lf = b"GET / HTTP/1.0\nHost: h\n\n"
    assert one({"set-header": "X: 1"}, lf) == b"GET / HTTP/1.0\nHost: h\nX: 1\n\n"
    r = msg(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", KIND_RESPONSE)
    assert rw({"set-header": "X-A: 2", "remove-header": "X-A"}, r) is r


# -- bodies --------------------------------------------------------------------------------------


def test_rewrite_body_fixes_content_length():
    data = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
    out = rw({"rewrite-body": "o:0000"}, msg(data))
    assert out.data == b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\n\r\nhell0000 w0000rld"
    assert out.body_length == 17 and out.head_length == head_end(out.data)
    # unicode patterns and $-groups on bytes
    data = "POST /a HTTP/1.1\r\nContent-Length: 6\r\n\r\ncafé!".encode()
    assert one({"rewrite-body": "(é)!:[$1]"}, data).endswith("\r\nContent-Length: 7\r\n\r\ncaf[é]".encode())
    # a body cut by the capture keeps its recorded promise, moved by the change
    cut = b"POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\nabcabc"
    assert b"Content-Length: 94\r\n" in one({"rewrite-body": "abc:"}, cut, flags=F_INCOMPLETE)


def test_rewrite_body_rechunks_a_chunked_body():
    data = (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    out = rw({"rewrite-body": "world:there"}, msg(data))
    assert out.data == (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"b\r\nhello there\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert out.flags & F_CHUNKED and out.body_length == 11
    cut = data[:-30]
    assert one({"rewrite-body": "hello:bye"}, cut) == cut      # cut before its last chunk: left alone
    gz = b"POST /g HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"
    assert one({"rewrite-body": "hello:x"}, gz) == gz          # encoded bodies are not decoded


# -- redaction -----------------------------------------------------------------------------------


def ph(secret: bytes, key=b"k") -> bytes:
    return b"redacted-" + hmac.new(key, secret, hashlib.sha256).hexdigest()[:12].encode()


def test_redact_headers_and_cookies_consistently():
    v = {"redact": True, "redact-key": "k", "redact-header": "X-Session"}
    r = Rules(settings_from_values(v))
    login = msg(b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=abc123; Path=/; HttpOnly\r\n"
                b"Set-Cookie: theme=dark\r\nContent-Length: 0\r\n\r\n", KIND_RESPONSE)
    out = r.rewrite(login).data
    assert b"Set-Cookie: sid=" + ph(b"abc123") + b"; Path=/; HttpOnly\r\n" in out
    assert b"Set-Cookie: theme=" + ph(b"dark") + b"\r\n" in out
    nxt = msg(b"GET / HTTP/1.1\r\nCookie: theme=dark;  sid=abc123\r\nAuthorization: Bearer tok.en\r\n"
              b"proxy-authorization: opaque\r\nX-Api-Key: k1\r\nX-Session:  s1 \r\nX-Other: keep\r\n\r\n")
    out = r.rewrite(nxt).data
    assert out == (b"GET / HTTP/1.1\r\nCookie: theme=" + ph(b"dark") + b"; sid=" + ph(b"abc123") +
                   b"\r\nAuthorization: Bearer " + ph(b"tok.en") + b"\r\nproxy-authorization: " +
                   ph(b"opaque") + b"\r\nX-Api-Key: " + ph(b"k1") + b"\r\nX-Session: " + ph(b"s1") +
                   b"\r\nX-Other: keep\r\n\r\n")
    # a new run without --redact-key: other placeholders, still equal for equal secrets
    r2 = Rules(settings_from_values({"redact": True}))
    a = r2.rewrite(nxt).data
    assert ph(b"abc123") not in a and a == r2.rewrite(nxt).data


def test_redact_fields_in_json_form_and_query():
    v = {"redact-field": ["password", "token"], "redact-key": "k"}
    body = (b'{"user": "al", "Password": "p\\u00e4ss", "nested": {"token": [1, {"a": "}"}], '
            b'"n": 5}, "list": [{"password" :12.5e3}], "s": "password"}')
    data = (b"POST /login?token=t%%20x&keep=1 HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    out = rw(v, msg(data))
    want = (b'{"user": "al", "Password": "' + ph("päss".encode()) + b'", "nested": {"token": "'
            + ph(b'[1, {"a": "}"}]') + b'", "n": 5}, "list": [{"password" :"' + ph(b"12.5e3")
            + b'"}], "s": "password"}')
    assert out.data[out.head_length:] == want
    assert json.loads(want)["user"] == "al"
    assert out.uri == "/login?token=" + ph(b"t x").decode() + "&keep=1"
    assert b"Content-Length: %d\r\n" % len(want) in out.data
    form = b"username=a%40b&password=correct+horse&remember=1"
    data = (b"POST /f HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % len(form) + form)
    out = rw(v, msg(data))
    assert out.data.endswith(b"\r\n\r\nusername=a%40b&password=" + ph(b"correct horse") + b"&remember=1")
    # responses too (a token handed out by a login), and a JSON body cut short
    resp = msg(b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"token": "abc", "more": "text cut', KIND_RESPONSE,
               flags=F_INCOMPLETE)
    out = rw(v, resp)
    assert out.data.endswith(b'{"token": "' + ph(b"abc") + b'", "more": "text cut')
    assert b"Content-Length: %d\r\n" % (40 + len(out.data) - len(resp.data)) in out.data



@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_redact_inside_a_compressed_body(coding):
    """A secret inside gzip'd (or deflate'd) JSON is redacted; the body stays in its coding."""
    import gzip
    import zlib

    v = {"redact-field": ["token"], "redact-key": "k"}
    plain = b'{"token": "s3cret", "n": 1}'
    if coding == "gzip":
        enc, name = gzip.compress(plain), b"gzip"
    elif coding == "deflate":
        enc, name = zlib.compress(plain), b"deflate"
    else:
        c = zlib.compressobj(wbits=-15)
        enc, name = c.compress(plain) + c.flush(), b"deflate"
    data = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: " + name +
            b"\r\nContent-Length: %d\r\n\r\n" % len(enc) + enc)
    out = rw(v, msg(data, KIND_RESPONSE))
    body = out.data[out.head_length:]
    decoded = gzip.decompress(body) if coding == "gzip" else zlib.decompress(body)
    assert decoded == b'{"token": "' + ph(b"s3cret") + b'", "n": 1}'
    assert b"Content-Length: %d\r\n" % len(body) in out.data
    # a coding we do not re-encode is left alone
    br = data.replace(b"Content-Encoding: " + name, b"Content-Encoding: br")
    assert rw(v, msg(br, KIND_RESPONSE)).data == br


# -- on the wire: what a real server receives --------------------------------------------------


def recorded_requests():
    return [m for m in open_input(str(SAMPLE)) if m.kind == KIND_REQUEST]


def expect_request(m, host, *, set_headers=(), remove=(), path=None, query=None, body=None):
    """The request as it should arrive, made with plain text edits of the recorded bytes."""
    head, _, rest = m.data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    if path:
        target = re.sub(path[0], path[1], target)
    if query:
        target += (b"&" if b"?" in target else b"?") + query
    fields = []
    for line in lines[1:]:
        name = line.split(b":")[0].lower()
        if name in remove:
            continue
        if name == b"host":
            line = b"Host: " + host
        fields.append(line)
    fields += list(set_headers)
    if body is not None:
        rest = body(m, fields)
    return b"\r\n".join([b" ".join([method, target, version]), *fields]) + b"\r\n\r\n" + rest


def play(*args):
    p = subprocess.run(replay_cmd() + ["play", *map(str, args)], capture_output=True, text=True,
                       timeout=120, env=env())
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 0, p.stderr
    return p


def arrived(sink):
    out = {}
    for rec, raw in sink.records:
        out.setdefault(rec["conn"], []).append((rec, raw))
    return sorted(out.values(), key=lambda v: v[0][0]["ts"])


def test_header_path_and_query_rewrites_reach_the_server():
    with SinkThread() as sink:
        play(SAMPLE, "--target", sink.url, "--speed", "max", "-q",
             "--set-header", "X-Shadow: 1", "--remove-header", "accept-language",
             "--rewrite-path", "^/api/:/v2/api/", "--set-query", "replayed=1")
        got = sorted(raw for _, raw in sink.records)
    host = f"127.0.0.1:{sink.port}".encode()
    want = sorted(expect_request(m, host, set_headers=[b"X-Shadow: 1"], remove={b"accept-language"},
                                 path=(rb"^/api/", b"/v2/api/"), query=b"replayed=1")
                  for m in recorded_requests())
    assert len(got) == 37 and got == want


def test_body_rewrites_reach_the_server_with_true_lengths():
    reqs = recorded_requests()
    bodies = {m.uri: m for m in reqs if m.body_length}
    assert any(m.flags & F_CHUNKED for m in bodies.values())

    def body(m, fields):
        raw = m.data.split(b"\r\n\r\n", 1)[1]
        if m.flags & F_CHUNKED:
            payload = b""
            while True:
                size, _, raw = raw.partition(b"\r\n")
                n = int(size.split(b";")[0], 16)
                if n == 0:
                    break
                payload += raw[:n]
                raw = raw[n + 2:]
            new = payload.replace(b"DEBUG", b"DBG")
            return b"%x\r\n%s\r\n0\r\n\r\n" % (len(new), new) if new != payload else m.data.split(b"\r\n\r\n", 1)[1]
        new = raw.replace(b"DEBUG", b"DBG").replace(b"alice", b"bob")
        for i, f in enumerate(fields):
            if f.lower().startswith(b"content-length:"):
                fields[i] = b"Content-Length: %d" % len(new)
        return new

    with SinkThread() as sink:
        play(SAMPLE, "--target", sink.url, "--speed", "max", "-q",
             "--rewrite-body", "DEBUG:DBG", "--rewrite-body", "alice:bob")
        recs = list(sink.records)
    host = f"127.0.0.1:{sink.port}".encode()
    assert sorted(raw for _, raw in recs) == sorted(expect_request(m, host, body=body) for m in reqs)
    # the server framed every body by what the headers say: lengths are true
    for rec, raw in recs:
        head, _, rest = raw.partition(b"\r\n\r\n")
        cl = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        if cl:
            assert int(cl.group(1)) == rec["body"] == len(rest)
    login = [raw for _, raw in recs if raw.startswith(b"POST /api/login")]
    assert login and b"username=bob%40example.com" in login[0]
    ingest = [rec for rec, raw in recs if rec["uri"].startswith("/api/logs/ingest")]
    assert ingest[0]["body"] == bodies["/api/logs/ingest?host=web-3"].body_length - 2 * \
        bodies["/api/logs/ingest?host=web-3"].data.count(b"DEBUG")


def test_redaction_reaches_the_server_and_the_output_log(tmp_path):
    out = tmp_path / "played.rlog"
    with SinkThread() as sink:
        play(SAMPLE, "--target", sink.url, "--speed", "max", "-q", "--redact", "--redact-key", "k",
             "--redact-field", "password", "--output", out)
        got = [raw for _, raw in sink.records]
    assert len(got) == 37
    joined = b"".join(got)
    assert b"5f2c9a1e; theme" not in joined and b"correct+horse" not in joined
    assert b"session=" + ph(b"5f2c9a1e") + b"; theme=" + ph(b"dark") in joined
    assert b"sid=" + ph(b"7f3a9c0e2b41d5a8") in joined
    # the recorded responses written beside the replayed ones are redacted with the same key
    from replay.log import LogReader

    recorded = [m for m in LogReader(out) if m.kind == KIND_RESPONSE and b"Set-Cookie: sid" in m.data]
    assert recorded and all(b"sid=" + ph(b"7f3a9c0e2b41d5a8") in m.data for m in recorded)
    replayed = [m for m in LogReader(out) if m.kind == KIND_RESPONSE and m.flags & F_REPLAYED]
    assert replayed and all(b"7f3a9c0e2b41d5a8" not in m.data for m in replayed)


def test_a_host_set_by_the_rules_is_sent_instead_of_the_targets():
    with SinkThread() as sink:
        play(SAMPLE, "--target", sink.url, "--speed", "max", "-q", "--path-include", "^/index",
             "--set-header", "Host: shop.example")
        got = [raw for _, raw in sink.records]
    assert len(got) == 3 and all(b"\r\nHost: shop.example\r\n" in raw for raw in got)


def test_rewrite_path_cannot_break_the_request_line():
    # the literal part of the replacement is checked at start ...
    for repl in ["/a b", "/a\r\nX: y", r"/a\r\nX: y", "/a\tb", '/a"b']:
        with pytest.raises(UsageError) as e:
            Rules(settings_from_values({"rewrite-path": "^/v1/:" + repl}))
        assert "--rewrite-path" in str(e.value) and "request-target" in str(e.value), repl
    assert one({"rewrite-path": "^/v1/:/a%20b/"}, GET).startswith(b"GET /a%20b/users/42/ping?a=1")
    # ... and each result: a group that brings a line break from elsewhere (a target left so by a
    # plugin or a broken capture) is refused, the request keeps its target, the refusal is counted
    rules = Rules(settings_from_values({"rewrite-path": r"(?s)^/v1/(.*)$:/\1.html"}))
    crafted = msg(GET)
    crafted.uri = "/v1/a b\r\nX: y"
    out = rules.rewrite(crafted)
    assert out is crafted and b"X: y.html" not in out.data
    assert rules.refused_rewrites == 1
    # characters the recorded target already had are its own business
    odd = msg(b"GET /v1/a|b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert rules.rewrite(odd).data.startswith(b"GET /a|b.html HTTP/1.1\r\n")
    assert rules.refused_rewrites == 1


def test_rewrite_path_injection_is_refused_on_the_command_line(tmp_path):
    p = subprocess.run(replay_cmd() + ["play", str(SAMPLE), "--dry-run", "--rewrite-path",
                                       "^/(.*):/\\1 b\r\nX: y"],
                       capture_output=True, text=True, env=env())
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--rewrite-path" in lines[0], p.stderr


def test_a_compression_bomb_is_left_alone(monkeypatch):
    """A coded body that decodes to more than MAX_DECODED is not decoded (memory stays bounded):
    it is sent as recorded; gzip members one after another still decode as one body."""
    import gzip

    from replay.rules import rewrites

    monkeypatch.setattr(rewrites, "MAX_DECODED", 1 << 20)
    v = {"redact-field": ["token"], "redact-key": "k"}
    bomb = gzip.compress(b'{"token": "s3cret", "pad": "' + b"0" * (4 << 20) + b'"}')
    data = (b"POST /b HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb)
    assert len(bomb) < 64 << 10
    assert rw(v, msg(data)).data == data
    two = gzip.compress(b'{"token": ') + gzip.compress(b'"s3cret"}')
    data = (b"POST /b HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(two) + two)
    out = rw(v, msg(data))
    assert gzip.decompress(out.data[out.head_length:]) == b'{"token": "' + ph(b"s3cret") + b'"}'
