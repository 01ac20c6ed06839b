"""The built-in sink: every request answered, bodies framed, pipelining, what it records."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
from play_helpers import SinkThread, env, replay_cmd

from replay import core
from replay.sink import start_sink_process, stop_sink_process


def exchange(port, data, methods, host="127.0.0.1", rest=b""):
    """Send ``data`` (then ``rest`` once a first answer came), return the framed answers."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    f = core.ResponseFramer()
    for m in methods:
        f.expect(m)
    out = []
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect((host, port))
        s.sendall(data)
        sent_rest = not rest
        while f.outstanding:
            chunk = s.recv(65536)
            if not chunk:
                out += f.eof(0)
                break
            out += f.feed(chunk, 0)
            if not sent_rest and out:
                s.sendall(rest)
                sent_rest = True
    return out


def test_bodies_pipelining_and_records():
    reqs = (b"POST /cl?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /ch HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"
            b"\r\n"                                             # a stray empty line between requests
            b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")
    with SinkThread() as sink:
        t = time.time()
        out = exchange(sink.port, reqs, ["POST", "POST", "HEAD", "GET"])    # all in one write
        assert [(m.status, m.method) for m in out] == [(200, "POST"), (200, "POST"), (200, "HEAD"), (200, "GET")]
        assert out[2].body_length == 0 and out[3].data.endswith(b"\r\n\r\nok\n")
        recs = [r for r, _ in sink.records]
    assert [(r["method"], r["uri"], r["body"]) for r in recs] == [
        ("POST", "/cl?x=1", 5), ("POST", "/ch", 7), ("HEAD", "/h", 0), ("GET", "/last", 0)]
    assert len({r["conn"] for r in recs}) == 1
    assert all(abs(r["ts"] - t) < 5 and r["version"] == "HTTP/1.1" for r in recs)
    raws = [raw for _, raw in sink.records]
    assert b"".join(raws) == reqs.replace(b"0\r\nX-Trailer: 1\r\n\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n")


def test_bytes_in_any_segmentation():
    req = (b"POST /ch HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    with SinkThread() as sink:
        with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
            for i in range(len(req)):
                s.sendall(req[i:i + 1])
                time.sleep(0.0002)
            f = core.ResponseFramer()
            f.expect("POST")
            f.expect("GET")
            out = []
            while f.outstanding:
                out += f.feed(s.recv(4096), 0)
        assert [m.status for m in out] == [200, 200]
        assert [raw for _, raw in sink.records] == [req[:req.index(b"GET")], req[req.index(b"GET"):]]


def test_expect_100_continue_and_connection_close():
    head = b"PUT /u HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    with SinkThread() as sink:
        out = exchange(sink.port, head, ["PUT"], rest=b"abc")
        assert [m.status for m in out] == [100, 200]
        with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in data
        assert sink.records[-1][0]["version"] == "HTTP/1.0"


def test_bad_request_gets_400_and_close():
    with SinkThread() as sink:
        with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as s:
            s.sendall(b"this is not http\r\n\r\n")
            data = s.recv(4096)
            assert data.startswith(b"HTTP/1.1 400 ")
            assert s.recv(4096) == b""
        assert sink.sink.bad_requests == 1 and sink.records == []


def test_ipv6():
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with SinkThread("::1") as sink:
        out = exchange(sink.port, b"GET /6 HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"], host="::1")
        assert out[0].status == 200
        assert sink.records[0][0]["client"].startswith("[::1]:")


def test_cli_records_jsonl_and_announces(tmp_path):
    rec = tmp_path / "rec.jsonl"
    p = subprocess.Popen(replay_cmd() + ["sink", "--port", "0", "--record", str(rec), "--announce"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        port = int(p.stdout.readline())
        out = exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
                       ["GET", "GET"])
        assert len(out) == 2
    finally:
        p.terminate()
        stdout, stderr = p.communicate(10)
    assert p.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "requests": 2, "connections": 1, "bytes": 56, "bad_requests": 0}
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert [x["uri"] for x in lines] == ["/a", "/b"]
    assert set(lines[0]) == {"ts", "conn", "client", "method", "uri", "version", "body", "bytes"}


def test_cli_plain_start_and_stop():
    proc, port = start_sink_process()
    assert exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ["GET"])[0].status == 200
    assert stop_sink_process(proc)["requests"] == 1
    p = subprocess.run(replay_cmd() + ["sink", "--port", "99999"], capture_output=True, text=True, env=env())
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
