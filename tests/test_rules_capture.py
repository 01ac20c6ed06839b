"""Rules in ``replay capture``: filters, rewrites and --limit on live traffic in a network namespace,
checked against the test server's own log (helpers from test_capture.py). Needs root."""

from __future__ import annotations

import pytest

from tests.test_capture import PORT, Capture, Server, curl, netns_available, read_log, run_client
from tests.test_capture import ns  # noqa: F401  (fixture)

from replay.events import KIND_REQUEST

_ok, _why = netns_available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"needs network namespaces: {_why}")


def test_capture_with_filters_and_rewrites(ns, tmp_path):  # noqa: F811
    server = Server(ns, tmp_path)
    out = tmp_path / "cap.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--path-exclude", r"^/n/\d*[13579]$",
                  "--status", "2xx", "--set-header", "X-Captured: 1", "--redact")
    curl(ns, "-H", "Authorization: Bearer s3cret", f"http://127.0.0.1:{PORT}/n/auth")
    sent = run_client(ns, tmp_path, "127.0.0.1", "40")
    rc, err = cap.stop()
    assert rc == 0, err
    assert "rules: kept" in err
    msgs, reader = read_log(out)
    reqs = [m for m in msgs if m.kind == KIND_REQUEST]
    want = ["/n/auth"] + [u for u in sent if int(u.rsplit("/", 1)[1]) % 2 == 0]
    assert sorted(m.uri for m in reqs) == sorted(want)
    assert len(server.entries()) == 41            # the server saw everything
    assert all(b"\r\nX-Captured: 1\r\n" in m.data for m in reqs)
    auth = [m for m in reqs if m.uri == "/n/auth"][0]
    assert b"s3cret" not in auth.data and b"Authorization: Bearer redacted-" in auth.data
    assert {(m.conn, m.index) for m in msgs if m.kind != KIND_REQUEST} == {(m.conn, m.index) for m in reqs}
    meta = reader.meta
    assert meta["rules"]["path-exclude"] == [r"^/n/\d*[13579]$"] and meta["rules_stats"]["kept"] == len(msgs)


def test_capture_stops_at_the_limit(ns, tmp_path):  # noqa: F811
    Server(ns, tmp_path)
    out = tmp_path / "cap.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--limit", "5", "--method", "GET")
    run_client(ns, tmp_path, "127.0.0.1", "20")
    rc, err = cap.wait(30)
    assert rc == 0, err
    assert "stopped (limit)" in err
    msgs, _ = read_log(out)
    assert [m.uri for m in msgs if m.kind == KIND_REQUEST] == [f"/n/{i}" for i in range(5)]


def test_capture_through_a_middleware_and_a_plugin(ns, tmp_path):  # noqa: F811
    from tests.test_filter_cli import HOOKS, MIDDLEWARE

    Server(ns, tmp_path)
    (tmp_path / "mw.py").write_text(MIDDLEWARE)
    (tmp_path / "hooks.py").write_text(HOOKS)
    out = tmp_path / "cap.rlog"
    cap = Capture(ns, "-i", "lo", "--port", PORT, "-o", out, "--set-header", "X-Rule: 1",
                  "--middleware", f"python3 {tmp_path / 'mw.py'}", "--plugin", f"{tmp_path / 'hooks.py'}:tag")
    sent = run_client(ns, tmp_path, "127.0.0.1", "10")
    rc, err = cap.stop()
    assert rc == 0, err
    msgs, reader = read_log(out)
    reqs = [m for m in msgs if m.kind == KIND_REQUEST]
    assert sorted(m.uri for m in reqs) == sorted(sent)
    assert all(m.data.endswith(b"\r\nX-Rule: 1\r\nX-Middleware: saw-rule\r\nX-Plugin: saw-mw\r\n\r\n")
               for m in reqs)
    assert len(msgs) == 2 * len(sent) and reader.meta["rules_stats"]["middleware"]["sent"] == len(msgs)
