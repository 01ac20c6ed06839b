"""``replay play`` against nginx on loopback: what a real server saw, connection by connection."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time

import pytest
from play_helpers import SAMPLE, env, free_port, replay_cmd

from replay.events import KIND_REQUEST
from replay.pipeline import open_input

pytestmark = pytest.mark.skipif(not shutil.which("nginx"), reason="nginx not installed")


@pytest.fixture
def nginx(tmp_path):
    root = tmp_path / "www"
    (root / "static" / "css").mkdir(parents=True)
    (root / "index.html").write_text("<h1>hi</h1>\n" * 50)
    (root / "static" / "css" / "site.css").write_text("body{}\n")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        daemon off;
        master_process off;
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            log_format conn '$connection $connection_requests "$request" $status $request_length';
            access_log {tmp_path}/access.log conn;
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fastcgi;
            uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            keepalive_requests 10000;
            server {{
                listen 127.0.0.1:{port};
                root {root};
            }}
        }}
        """))
    p = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if p.poll() is not None:
                pytest.skip(f"nginx did not start: {p.stderr.read().decode(errors='replace')[-300:]}")
            time.sleep(0.02)
    else:
        p.kill()
        pytest.skip("nginx did not start in 10 s")
    yield port, tmp_path / "access.log"
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def test_sample_against_nginx(nginx, tmp_path):
    port, access = nginx
    rep_path = tmp_path / "r.json"
    p = subprocess.run(replay_cmd() + ["play", str(SAMPLE), "--target", f"http://127.0.0.1:{port}",
                                       "--speed", "10", "--report", str(rep_path), "-q"],
                       capture_output=True, text=True, env=env(), timeout=60)
    assert p.returncode == 0, p.stderr
    rep = json.loads(rep_path.read_text())
    assert rep["sent"] == rep["answered"] == 37 and rep["error_total"] == 0, rep["errors"]
    assert rep["statuses"].get("200", 0) >= 4       # the files that exist
    time.sleep(0.1)                                  # nginx writes its log line after answering
    lines = access.read_text().splitlines()
    assert len(lines) == 37
    seen = {}
    for line in lines:
        conn, nreq, rest = line.split(" ", 2)
        seen.setdefault(int(conn), []).append((int(nreq), rest.split('"')[1].split(" ")[1]))
    recorded = {}
    for m in open_input(str(SAMPLE)):
        if m.kind == KIND_REQUEST:
            recorded.setdefault(m.conn, []).append((m.index, m.uri))
    # nginx saw one connection per recorded connection, with the recorded requests in order
    assert len(seen) == 14
    assert sorted([u for _, u in sorted(v)] for v in seen.values()) == \
        sorted([u for _, u in sorted(v)] for v in recorded.values())
    for v in seen.values():
        assert [n for n, _ in v] == list(range(1, len(v) + 1))
