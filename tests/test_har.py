"""HAR 1.2 in and out (``replay.formats.har``, docs/formats-har.md).

Everything we write is checked against the HAR 1.2 JSON Schema of har-schema
(tests/data/har-1.2.schema.json, see PROVENANCE.md); its ``min`` keywords are no JSON Schema
keywords, so ``timings >= 0`` is checked here by hand.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replay.errors import InputError
from replay.events import (F_CHUNKED, F_INCOMPLETE, F_INTERIM, F_TRUNCATED, KIND_REQUEST,
                           KIND_RESPONSE, Message)
from replay.formats import har
from replay.httpmsg import decode_chunked, header_fields, is_chunked, split_head
from replay.pipeline import open_input

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SAMPLE = ROOT / "captures" / "sample.pcap"
CHROME = DATA / "har" / "chrome-http1.har"
FIREFOX = DATA / "har" / "firefox.har"
MS = 1_000_000
# startedDateTime has ms precision (truncated), the timings µs (3 decimals of a ms)
TS_TOLERANCE = MS + 2_000

sys.path.insert(0, str(ROOT / "tests"))


def replay(*args, check=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, p.stderr
    return p


_VALIDATOR = None


def validate(path) -> dict:
    """The HAR document at ``path``, after checking it against the schema."""
    global _VALIDATOR
    if _VALIDATOR is None:
        schema = json.loads((DATA / "har-1.2.schema.json").read_text())
        cls = jsonschema.Draft6Validator
        # the format checker is needed: without it serverIPAddress's oneOf(ipv4, ipv6) fails
        _VALIDATOR = cls(schema, format_checker=cls.FORMAT_CHECKER)
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    _VALIDATOR.validate(doc)
    for e in doc["log"]["entries"]:
        for k in ("send", "wait", "receive"):
            assert e["timings"][k] >= 0
        assert e["time"] >= 0
        assert e["startedDateTime"].endswith("Z") and len(e["startedDateTime"]) == 24
    return doc


def payload(m) -> bytes:
    _, body = split_head(m.data, m.head_length)
    if is_chunked(m.data, m.head_length):
        return decode_chunked(body)[0]
    return body


def exchanges(msgs):
    """{(conn, index): [request, final response or None]} of ``msgs``."""
    out = {}
    for m in msgs:
        if m.kind == KIND_REQUEST:
            out.setdefault((m.conn, m.index), [None, None])[0] = m
    for m in msgs:
        if m.kind == KIND_RESPONSE and not m.flags & F_INTERIM and (m.conn, m.index) in out:
            out[(m.conn, m.index)][1] = m
    return out


# -- writing --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("har")
    replay("convert", SAMPLE, "-o", d / "s.rlog", "-q", check=True)
    replay("convert", d / "s.rlog", "-o", d / "s.har", "-q", check=True)
    replay("convert", d / "s.har", "-o", d / "back.rlog", "-q", check=True)
    return d


def test_sample_validates(sample_files):
    doc = validate(sample_files / "s.har")
    log = doc["log"]
    assert log["creator"]["name"] == "replay"
    assert len(log["entries"]) == 37
    # the 100 Continue ends before its request's body: it still joins its entry
    assert log["_replay"]["written"]["unpaired_responses"] == 0
    assert log["_replay"]["written"]["interim"] == 1
    assert [e["_replay"]["interim"] for e in log["entries"] if "interim" in e["_replay"]] == [[100]]
    assert log["_replay"]["meta"]["command"] == "convert"
    assert "37 entries" in log["comment"]
    e = log["entries"][0]
    assert e["connection"] == str(e["_replay"]["conn"])
    assert e["request"]["url"].startswith("http://")
    assert e["cache"] == {}
    assert any(c["request"]["cookies"] for c in log["entries"])
    assert any(c["request"].get("postData") for c in log["entries"])


@pytest.mark.parametrize("pcap", sorted(p.name for p in DATA.glob("*.pcap")))
def test_test_captures_validate(tmp_path, pcap):
    out = tmp_path / "x.har"
    replay("convert", DATA / pcap, "-o", out, "-q", check=True)
    doc = validate(out)
    reqs = [m for m in open_input(str(DATA / pcap)) if m.kind == KIND_REQUEST]
    assert len(doc["log"]["entries"]) == len(reqs)


def test_round_trip_keeps_what_har_holds(sample_files):
    orig = list(open_input(str(sample_files / "s.rlog")))
    back = list(open_input(str(sample_files / "back.rlog")))
    a = exchanges(orig)
    b = exchanges(back)
    assert len(a) == len(b) == 37
    # pair them up: same method, target and headers, start within the ms
    unused = dict(b)
    pairs = []
    for key, (q, r) in sorted(a.items(), key=lambda kv: kv[1][0].ts_first):
        match = next(k for k, (q2, _) in unused.items()
                     if (q2.method, q2.uri) == (q.method, q.uri)
                     and header_fields(q2.data, q2.head_length) == header_fields(q.data, q.head_length)
                     and abs(q2.ts_first - q.ts_first) <= TS_TOLERANCE)
        pairs.append(((q, r), unused.pop(match)))
    conn_map = {}
    for (q, r), (q2, r2) in pairs:
        assert conn_map.setdefault(q.conn, q2.conn) == q2.conn        # same grouping
        assert q2.index == q.index
        assert payload(q2) == payload(q)
        assert (q2.flags & F_CHUNKED) == (q.flags & F_CHUNKED)
        assert abs(q2.ts_last - q.ts_last) <= TS_TOLERANCE
        assert (r is None) == (r2 is None)
        if r is None:
            continue
        assert r2.status == r.status
        assert header_fields(r2.data, r2.head_length) == header_fields(r.data, r.head_length)
        assert payload(r2) == payload(r)
        assert r2.data.split(b"\r\n", 1)[0] == r.data.split(b"\r\n", 1)[0]
        if r.ts_first >= q.ts_last:       # HAR's wait cannot be negative
            assert abs(r2.ts_first - r.ts_first) <= TS_TOLERANCE
            assert abs(r2.ts_last - r.ts_last) <= TS_TOLERANCE
        if not r.flags & F_CHUNKED:
            assert r2.data == r.data
    assert len(set(conn_map.values())) == len(conn_map)
    assert {q.client for q, _ in a.values()} == {q.client for q, _ in b.values()}
    assert {q.server for q, _ in a.values()} == {q.server for q, _ in b.values()}


def _req(conn, index, t, data, **kw):
    from replay.httpmsg import with_data

    m = Message(KIND_REQUEST, conn, index, t, t + MS, ("10.0.0.1", 40000 + conn),
                ("10.0.0.2", 8080), 0, b"")
    return with_data(m, data)


def _resp(conn, index, t, data, method="GET"):
    from replay.httpmsg import with_data

    m = Message(KIND_RESPONSE, conn, index, t, t + 2 * MS, ("10.0.0.1", 40000 + conn),
                ("10.0.0.2", 8080), 0, b"", method=method, uri="/")
    return with_data(m, data)


def _write(path, msgs, **kw):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    w = har.open_writer(str(path), fd, {"command": "test"}, **kw)
    for m in msgs:
        w.write(m)
    w.update_meta({"done": True})
    w.close()
    return w


T0 = 1_700_000_000_123_456_789


def test_binary_chunked_gzip_and_large_bodies(tmp_path):
    big = os.urandom(300_000)
    zipped = gzip.compress(b"hello " * 1000)
    text = "caf\u00e9 \u2013 ok".encode()
    chunked = b"5\r\nhello\r\n4;ext=1\r\n abc\r\n0\r\n\r\n"
    msgs = [
        _req(0, 0, T0, b"POST /up?x=1&y=%%20z HTTP/1.1\r\nHost: a.test\r\nContent-Type: "
             b"application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(big) + big),
        _resp(0, 0, T0 + 5 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
              method="POST"),
        _req(0, 1, T0 + 10 * MS, b"GET /z HTTP/1.1\r\nHost: a.test\r\nAccept-Encoding: gzip\r\n\r\n"),
        _resp(0, 1, T0 + 12 * MS, b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: "
              b"text/plain\r\nContent-Length: %d\r\n\r\n" % len(zipped) + zipped),
        _req(1, 0, T0 + 11 * MS, b"GET /c HTTP/1.1\r\nHost: a.test\r\n\r\n"),
        _resp(1, 0, T0 + 13 * MS, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked),
        _req(1, 1, T0 + 20 * MS, b"PUT /t HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n"
             % len(text) + text),
        _resp(1, 1, T0 + 21 * MS, b"HTTP/1.1 204 No Content\r\n\r\n", method="PUT"),
        _req(2, 0, T0 + 30 * MS, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n"),
    ]
    path = tmp_path / "b.har"
    _write(path, msgs)
    doc = validate(path)
    e = doc["log"]["entries"]
    assert [x["request"]["method"] for x in e] == ["POST", "GET", "GET", "PUT", "OPTIONS"]
    assert e[0]["request"]["postData"]["_encoding"] == "base64"
    assert base64.b64decode(e[0]["request"]["postData"]["text"]) == big
    assert e[0]["response"]["content"]["encoding"] == "base64"
    assert e[0]["request"]["queryString"] == [{"name": "x", "value": "1"}, {"name": "y", "value": " z"}]
    assert e[1]["response"]["content"]["_contentEncoding"] == "gzip"     # kept as sent
    assert base64.b64decode(e[1]["response"]["content"]["text"]) == zipped
    c = e[2]["response"]
    assert c["content"] == {"size": 9, "mimeType": "", "text": "hello abc"}
    assert c["bodySize"] == len(chunked)
    assert e[3]["request"]["postData"]["text"] == text.decode()
    assert e[4]["response"]["status"] == 0 and e[4]["_replay"]["target"] == "*"
    assert doc["log"]["_replay"]["meta"] == {"command": "test", "done": True}
    # and back
    back = exchanges(list(har.open_reader(str(path))))
    q, r = back[(0, 0)]
    assert payload(q) == big and payload(r) == big and q.uri == "/up?x=1&y=%20z"
    q, r = back[(0, 1)]
    assert payload(r) == zipped and b"Content-Encoding: gzip" in r.data
    q, r = back[(1, 0)]
    assert r.flags & F_CHUNKED and payload(r) == b"hello abc"
    q, r = back[(1, 1)]
    assert payload(q) == text and r.status == 204
    q, r = back[(2, 0)]
    assert q.data.startswith(b"OPTIONS * HTTP/1.1\r\n") and r is None


def test_window_bounds_pending_requests(tmp_path):
    msgs = [_req(0, i, T0 + i * MS, b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i) for i in range(3)]
    msgs += [_resp(0, i, T0 + 10 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
             for i in range(3)]
    msgs.append(_resp(5, -1, T0 + 20 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    path = tmp_path / "w.har"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    w = har.open_writer(str(path), fd, {}, window=2)
    for m in msgs[:3]:
        w.write(m)
    assert w.entries_written == 1                 # /0 left the window unanswered
    for m in msgs[3:]:
        w.write(m)
    assert w.entries_written == 3                 # written as the answers came
    w.close()
    doc = validate(path)
    assert [x["response"]["status"] for x in doc["log"]["entries"]] == [0, 200, 200]
    assert doc["log"]["_replay"]["written"]["unpaired_responses"] == 2
    assert doc["log"]["_replay"]["written"]["no_response"] == 1


def test_entries_follow_request_order(tmp_path):
    msgs = [_req(0, 0, T0, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"),
            _req(1, 0, T0 + MS, b"GET /fast HTTP/1.1\r\nHost: a\r\n\r\n"),
            _resp(1, 0, T0 + 2 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            _resp(0, 0, T0 + 9 * MS, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]
    path = tmp_path / "o.har"
    _write(path, msgs)
    doc = validate(path)
    assert [x["request"]["url"] for x in doc["log"]["entries"]] == ["http://a/slow", "http://a/fast"]


def test_filter_writes_har(sample_files, tmp_path):
    out = tmp_path / "y.har"
    replay("filter", sample_files / "s.rlog", "-o", out, "--method", "GET", "-q", check=True)
    doc = validate(out)
    assert doc["log"]["entries"] and all(e["request"]["method"] == "GET"
                                         for e in doc["log"]["entries"])
    assert doc["log"]["_replay"]["meta"]["command"] == "filter"


# -- reading --------------------------------------------------------------------------------------


def test_sniff(tmp_path):
    assert har.sniff(CHROME) and har.sniff(FIREFOX)
    p = tmp_path / "a.har"
    p.write_bytes(b"\xef\xbb\xbf \n\t{ \"log\" : {\"version\": \"1.2\"")
    assert har.sniff(p)
    p.write_bytes(b'{"_comment": "x", "log": {')
    assert har.sniff(p)
    for other in (b'{"logs": {}}', b'["log", {}]', b"", b'{"x": 1}'):
        p.write_bytes(other)
        assert not har.sniff(p)
    assert not har.sniff(SAMPLE)
    assert not har.sniff(tmp_path / "missing.har")


def test_chrome_export():
    r = har.open_reader(str(CHROME))
    msgs = list(r)
    assert r.meta["creator"] == {"name": "WebInspector", "version": "537.36"}
    assert r.meta["pages"] == 1 and r.meta["entries"] == 6
    assert [m.ts_first for m in msgs] == sorted(m.ts_first for m in msgs)
    ex = exchanges(msgs)
    # connection "91234" carries the document, the stylesheet and the POST, in time order
    assert [ex[(0, i)][0].uri for i in range(3)] == ["/?ref=home&q=a%20b", "/s.css", "/api/cart"]
    q, r0 = ex[(0, 0)]
    # started 10:15:30.123 + blocked, dns and connect
    assert q.ts_first == 1709288130_123_000_000 + round(32.704 * MS)
    assert r0.ts_first == q.ts_last + round(80.4 * MS)
    assert b"Content-Encoding" not in r0.data              # Chrome's text is decoded
    assert r0.flags & F_CHUNKED and payload(r0).startswith(b"<!doctype html>")
    q, r1 = ex[(0, 2)]
    assert q.data.endswith(b"\r\n\r\n" + b'{"sku":"A-1","qty":2}')
    assert b"Content-Length: 21\r\n" in q.data                  # made true
    q, r2 = ex[(1, 0)]
    assert payload(r2).startswith(b"\x89PNG")
    q, font = ex[(2, 0)]                                         # HTTP/2, body left out
    assert q.data.startswith(b"GET /f.woff2 HTTP/1.1\r\nHost: cdn.example.net\r\naccept: */*")
    assert b":authority" not in q.data
    assert font.flags & (F_INCOMPLETE | F_TRUNCATED) == F_INCOMPLETE | F_TRUNCATED
    assert font.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert font.server == ("198.51.100.7", 443)
    q, none = ex[(3, 0)]                                         # aborted: no response
    assert none is None
    assert any("left out" in w for w in r.warnings)
    assert any("without a response" in w for w in r.warnings)


def test_firefox_export():
    r = har.open_reader(str(FIREFOX))
    msgs = list(r)
    assert r.meta["browser"]["name"] == "Firefox"
    assert not r.warnings
    ex = exchanges(msgs)
    assert len(ex) == 3 and {c for c, _ in ex} == {0}
    q, resp = ex[(0, 0)]
    assert q.ts_first == 1709288130_060_000_000              # 11:15:30.060+01:00
    assert q.uri == "/posts?page=2&tag="
    assert payload(resp).decode() == "<html><body><h1>Page 2 \u2013 caf\u00e9</h1></body></html>"
    assert b"Content-Length: 51\r\n" in resp.data
    q, resp = ex[(0, 1)]
    assert q.data.endswith(b"\r\n\r\npost=7&text=hi") and resp.status == 303


def test_mitmproxy_style_export(tmp_path):
    body = bytes(range(256))
    doc = {"log": {"version": "1.2", "creator": {"name": "mitmproxy", "version": "10.2.2",
                                                 "comment": "mitmproxy version"},
                   "pages": [], "entries": [{
                       "startedDateTime": "2024-03-01T10:15:30.123456+00:00", "time": 5.5,
                       "request": {"method": "GET", "url": "http://api.example.com:8081/bin",
                                   "httpVersion": "HTTP/1.1", "cookies": [],
                                   "headers": [{"name": "Host", "value": "api.example.com:8081"}],
                                   "queryString": [], "headersSize": 50, "bodySize": 0},
                       "response": {"status": 200, "statusText": "OK", "httpVersion": "HTTP/1.1",
                                    "cookies": [], "headers": [{"name": "Content-Length", "value": "256"}],
                                    "content": {"size": 256, "compression": 0,
                                                "mimeType": "application/octet-stream",
                                                "text": base64.b64encode(body).decode(),
                                                "encoding": "base64"},
                                    "redirectURL": "", "headersSize": 40, "bodySize": 256},
                       "cache": {}, "timings": {"send": 0.5, "receive": 1.0, "wait": 4.0,
                                                "connect": -1, "ssl": -1},
                       "serverIPAddress": "192.0.2.9"}]}}
    p = tmp_path / "m.har"
    p.write_text(json.dumps(doc))
    (q, r), = exchanges(list(open_input(str(p)))).values()
    assert q.ts_first == 1709288130_123_456_000
    assert q.server == ("192.0.2.9", 8081)
    assert payload(r) == body and r.ts_last == q.ts_first + round(5.5 * MS)


@pytest.mark.parametrize("path", [CHROME, FIREFOX], ids=["chrome", "firefox"])
def test_play_a_browser_export_against_the_sink(tmp_path, path):
    rep = tmp_path / "r.json"
    p = replay("play", path, "--sink", "--speed", "max", "--report", rep, "-q")
    assert p.returncode == 0, p.stderr
    r = json.loads(rep.read_text())
    n = sum(1 for m in open_input(str(path)) if m.kind == KIND_REQUEST)
    assert r["sent"] == r["answered"] == n


def test_browser_export_to_rlog_and_back_validates(tmp_path):
    replay("convert", CHROME, "-o", tmp_path / "c.rlog", "-q", check=True)
    replay("convert", tmp_path / "c.rlog", "-o", tmp_path / "c.har", "-q", check=True)
    doc = validate(tmp_path / "c.har")
    assert len(doc["log"]["entries"]) == 6
    assert doc["log"]["_replay"]["meta"]["source_meta"]["source_meta"]["creator"]["name"] == "WebInspector"


def _damaged(tmp_path):
    doc = json.loads(FIREFOX.read_text())
    del doc["log"]["entries"][1]["request"]["url"]
    p = tmp_path / "bad.har"
    p.write_text(json.dumps(doc))
    return p


def test_damage_names_the_json_path_after_the_entries_before(tmp_path):
    r = har.open_reader(str(_damaged(tmp_path)))
    got = []
    with pytest.raises(InputError, match=r"log\.entries\[1\]\.request\.url: missing"):
        for m in r:
            got.append(m)
    assert [m.kind for m in got] == [KIND_REQUEST, KIND_RESPONSE]   # entry 0


@pytest.mark.parametrize("change, where", [
    (lambda d: d["log"]["entries"][0]["request"].update(headers=[{"name": "X"}]),
     r"log\.entries\[0\]\.request\.headers\[0\]\.value: missing"),
    (lambda d: d["log"]["entries"][2]["response"].update(status="200"),
     r"log\.entries\[2\]\.response\.status: wrong type"),
    (lambda d: d["log"]["entries"][1].update(startedDateTime="yesterday"),
     r"log\.entries\[1\]\.startedDateTime: not an ISO 8601"),
    (lambda d: d["log"].pop("entries"), r"log\.entries: missing"),
])
def test_damage_kinds(tmp_path, change, where):
    doc = json.loads(FIREFOX.read_text())
    change(doc)
    p = tmp_path / "bad.har"
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=where):
        list(har.open_reader(str(p)))


def test_cli_damaged_har_is_one_line_and_exit_2(tmp_path):
    p = replay("convert", _damaged(tmp_path), "-o", tmp_path / "x.rlog")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "log.entries[1].request.url" in lines[0], p.stderr
    assert not (tmp_path / "x.rlog").exists()


def test_cli_truncated_har_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "cut.har"
    p.write_bytes(FIREFOX.read_bytes()[:700])
    r = replay("convert", p, "-o", tmp_path / "x.rlog")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad JSON at line" in lines[0], r.stderr


def test_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(har, "MAX_HAR_BYTES", 100)
    with pytest.raises(InputError, match="larger than"):
        har.open_reader(str(FIREFOX))


def test_only_input_error_escapes_on_mangled_exports(tmp_path):
    """Random leaves of real-shaped exports replaced by values of other types: the reader either
    reads the file or stops with one InputError (h11's fuzz invariant)."""
    import random

    rng = random.Random(1234)
    junk = [None, 0, -1, 1e308, float("nan"), 10**30, "", "x", "\ud800", [], {}, True,
            "2024-13-45T99:99:99Z", "!!!not base64", "base64"]
    docs = [json.loads(CHROME.read_text()), json.loads(FIREFOX.read_text())]

    def leaves(o, path=()):
        if isinstance(o, dict):
            for k, v in o.items():
                yield from leaves(v, path + (k,))
        elif isinstance(o, list):
            for i, v in enumerate(o):
                yield from leaves(v, path + (i,))
        yield path

    p = tmp_path / "m.har"
    for n in range(int(os.environ.get("HAR_MANGLE_ROUNDS", "300"))):
        doc = json.loads(json.dumps(rng.choice(docs)))
        paths = [x for x in leaves(doc) if x]
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            parent = doc
            try:
                for k in path[:-1]:
                    parent = parent[k]
                parent[path[-1]] = rng.choice(junk)
            except (KeyError, IndexError, TypeError):
                continue
        p.write_text(json.dumps(doc), encoding="utf-8", errors="surrogatepass")
        try:
            for m in har.open_reader(str(p)):
                assert isinstance(m.data, bytes)
        except InputError:
            pass


def test_info_on_a_har_file():
    p = replay("info", FIREFOX, "--json", check=True)
    info = json.loads(p.stdout)
    assert info["format"] == "har" and info["requests"] == 3 and info["responses"] == 3
    assert info["meta"]["creator"]["name"] == "Firefox"
