"""``replay filter`` as a user runs it: real processes, files, exit codes, stderr; middleware and
plugins wired after the filters and rewrites, in filter and in play."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from replay.events import KIND_REQUEST
from replay.log import LogReader
from replay.pipeline import open_input
from tests.conftest import ROOT

SAMPLE = ROOT / "captures" / "sample.pcap"


def replay(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                       capture_output=True, text=True, timeout=120, cwd=cwd,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    return p


def test_filter_writes_a_log_with_its_provenance(tmp_path):
    out = tmp_path / "checkout.rlog"
    p = replay("filter", SAMPLE, "-o", out, "--path-include", "^/api/", "--method", "POST",
               "--set-header", "X-Test: 1")
    assert p.returncode == 0, p.stderr
    line, = p.stderr.strip().splitlines()
    assert line.startswith(f"{SAMPLE}: 75 messages, kept 11, dropped 64; 5 rewritten -> {out}: "
                           "11 messages (5 requests, 6 responses) in "), line
    r = LogReader(out)
    assert not r.warnings and r.indexed and oct(out.stat().st_mode & 0o777) == "0o600"
    meta = r.meta
    assert meta["command"] == "filter" and meta["source"] == "sample.pcap"
    assert meta["rules"] == {"method": ["POST"], "path-include": ["^/api/"], "set-header": ["X-Test: 1"]}
    assert meta["counts"] == {"read": 75, "kept": 11, "dropped": 64, "rewritten": 5, "written": 11,
                              "requests": 5, "responses": 6}
    msgs = list(r)
    assert all(m.method == "POST" and m.uri.startswith("/api/") for m in msgs)
    assert all(b"\r\nX-Test: 1\r\n" in m.data for m in msgs if m.kind == KIND_REQUEST)
    # a log filtered again: the source's metadata travels along
    again = tmp_path / "again.rlog"
    assert replay("filter", out, "-o", again, "--status", "200").returncode == 0
    assert LogReader(again).meta["source_meta"]["rules"]["method"] == ["POST"]


def test_dry_run_counts_and_writes_nothing(tmp_path):
    p = replay("filter", SAMPLE, "--dry-run", "--status", "4xx")
    assert p.returncode == 0 and p.stdout == ""
    assert "kept 4, dropped 71" in p.stderr and "(dry run, nothing written)" in p.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expect", [
    (["--path-include", "(["], "replay: --path-include '([': invalid regex: "),
    (["--header", "Accept"], "replay: --header Accept: expected 'Name: regex'"),
    (["--sample", "10 percent"], "replay: --sample '10 percent': not a percentage"),
    (["--status", "20x"], "replay: --status 20x: not a status"),
    (["--until", "tomorrow"], "replay: --until tomorrow: not a time"),
    (["--set-header", "X-A"], "replay: --set-header X-A: expected 'Name: value'"),
    (["--rewrite-body", "x"], "replay: --rewrite-body x: expected 'REGEX:REPLACEMENT'"),
    (["--middleware-on-error", "skip"], "without --middleware"),
    (["--plugin", "no_such_module_xyz:fn"], "no_such_module_xyz"),
])
def test_bad_rules_exit_2_with_one_line(tmp_path, args, expect):
    p = replay("filter", SAMPLE, "-o", tmp_path / "o.rlog", *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], p.stderr
    assert not (tmp_path / "o.rlog").exists()


def test_usage_errors(tmp_path):
    p = replay("filter", SAMPLE, "--method", "GET")
    assert p.returncode == 2 and "give the output log" in p.stderr
    log = tmp_path / "s.rlog"
    assert replay("convert", SAMPLE, "-o", log, "-q").returncode == 0
    p = replay("filter", log, "-o", log, "--method", "GET")
    assert p.returncode != 0 and "would overwrite the input" in p.stderr
    p = replay("filter", tmp_path / "missing.rlog", "-o", tmp_path / "o.rlog")
    assert p.returncode == 2 and p.stderr.count("\n") == 1


# -- middleware and plugins, after filters and rewrites ------------------------------------------

MIDDLEWARE = textwrap.dedent(r'''
    import binascii, sys
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        raw = binascii.unhexlify(line)
        meta, _, payload = raw.partition(b"\n")
        if meta.split(b" ")[0] == b"1":
            target = payload.split(b" ", 2)[1]
            if target.startswith(b"/static/"):
                continue                                   # dropped
            mark = b"saw-rule" if b"\r\nX-Rule: 1\r\n" in payload else b"no-rule"
            payload = payload.replace(b"\r\n\r\n", b"\r\nX-Middleware: " + mark + b"\r\n\r\n", 1)
        sys.stdout.write(binascii.hexlify(meta + b"\n" + payload).decode() + "\n")
        sys.stdout.flush()
''')

HOOKS = textwrap.dedent(r'''
    def tag(msg):
        if msg.kind == 0:
            mark = b"saw-mw" if b"X-Middleware: saw-rule" in msg.data else b"no-mw"
            return msg.data.replace(b"\r\n\r\n", b"\r\nX-Plugin: " + mark + b"\r\n\r\n", 1)
        return msg

    def no_delete(msg):
        return None if msg.method == "DELETE" else msg
''')


def test_middleware_and_plugins_run_after_filters_and_rewrites(tmp_path):
    (tmp_path / "mw.py").write_text(MIDDLEWARE)
    (tmp_path / "hooks.py").write_text(HOOKS)
    out = tmp_path / "o.rlog"
    p = replay("filter", SAMPLE, "-o", out, "--method", "GET", "--method", "DELETE",
               "--set-header", "X-Rule: 1", "--middleware", f"{sys.executable} mw.py",
               "--plugin", "hooks:tag", "--plugin", "hooks.py:no_delete", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    msgs = list(LogReader(out))
    reqs = [m for m in msgs if m.kind == KIND_REQUEST]
    recorded = [m for m in open_input(str(SAMPLE)) if m.kind == KIND_REQUEST and m.method == "GET"]
    assert len(reqs) == len([m for m in recorded if not m.uri.startswith("/static/")]) > 5
    for m in reqs:
        assert m.method == "GET"
        assert m.data.endswith(b"\r\nX-Rule: 1\r\nX-Middleware: saw-rule\r\nX-Plugin: saw-mw\r\n\r\n")
    # the middleware dropped requests only; their recorded responses came back
    assert any(m.uri.startswith("/static/") for m in msgs if m.kind != KIND_REQUEST)
    st = LogReader(out).meta["counts"]
    assert st["middleware"]["dropped"] > 0


def test_middleware_in_another_language(tmp_path):
    out = tmp_path / "o.rlog"
    # awk drops every recorded response (hex "32" is TYPE 2) and echoes the rest unchanged
    p = replay("filter", SAMPLE, "-o", out, "--middleware", "awk '!/^32/ { print; fflush() }'")
    assert p.returncode == 0, p.stderr
    got = [m.data for m in LogReader(out)]
    assert got == [m.data for m in open_input(str(SAMPLE)) if m.kind == KIND_REQUEST]


def test_middleware_gets_the_users_environment(tmp_path):
    """replay runs numpy's OpenBLAS on one thread (``OPENBLAS_NUM_THREADS=1``, set by itself);
    the middleware it starts for the user gets the environment as the user gave it."""
    seen = tmp_path / "env.txt"
    (tmp_path / "mw.py").write_text(
        "import os, sys\n"
        f"open({str(seen)!r}, 'w').write(os.environ.get('OPENBLAS_NUM_THREADS', '-'))\n"
        "for line in sys.stdin:\n    sys.stdout.write(line); sys.stdout.flush()\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for given, expected in ((None, "-"), ("3", "3")):
        if given is not None:
            env["OPENBLAS_NUM_THREADS"] = given
        p = subprocess.run([sys.executable, "-m", "replay.cli.main", "filter", str(SAMPLE), "-o",
                            str(tmp_path / "o.rlog"), "--middleware", f"{sys.executable} mw.py"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env=dict(env, PYTHONPATH=str(ROOT)))
        assert p.returncode == 0, p.stderr
        assert seen.read_text() == expected


def test_middleware_failure_stop_or_skip(tmp_path):
    crash = f"{sys.executable} -c \"import sys; sys.stderr.write('mw: cannot go on\\n'); sys.exit(3)\""
    p = replay("filter", SAMPLE, "-o", tmp_path / "a.rlog", "--middleware", crash)
    assert p.returncode != 0 and "mw: cannot go on" in p.stderr, p.stderr
    assert len([x for x in p.stderr.splitlines() if x.startswith("replay:")]) >= 1
    p = replay("filter", SAMPLE, "-o", tmp_path / "b.rlog", "--middleware", crash,
               "--middleware-on-error", "skip", "--method", "GET")
    assert p.returncode == 0, p.stderr
    got = [m.data for m in LogReader(tmp_path / "b.rlog")]
    assert got == [m.data for m in open_input(str(SAMPLE)) if m.method == "GET"]


def test_play_with_middleware_and_rules(tmp_path):
    from play_helpers import SinkThread

    (tmp_path / "mw.py").write_text(MIDDLEWARE)
    with SinkThread() as sink:
        p = replay("play", SAMPLE, "--target", sink.url, "--speed", "max", "-q",
                   "--set-header", "X-Rule: 1", "--middleware", f"{sys.executable} mw.py",
                   "--report", tmp_path / "r.json", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        got = [raw for _, raw in sink.records]
    recorded = [m for m in open_input(str(SAMPLE)) if m.kind == KIND_REQUEST]
    assert len(got) == len([m for m in recorded if not m.uri.startswith("/static/")])
    assert all(b"\r\nX-Rule: 1\r\nX-Middleware: saw-rule\r\n\r\n" in raw for raw in got)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rules"]["middleware"].endswith("mw.py")


def test_play_filters_before_scheduling(tmp_path):
    p = replay("play", SAMPLE, "--sink", "--dry-run", "--method", "POST", "--status", "2xx")
    assert p.returncode == 0, p.stderr
    assert "5 requests on 4 connections" in p.stdout and "rules: kept 11 of 75" in p.stderr
    p = replay("play", SAMPLE, "--sink", "--dry-run", "--path-include", "^/nothing")
    assert p.returncode == 1 and "no requests to replay (the rules kept none)" in p.stderr


def test_help_lists_the_rule_options():
    for cmd in ("filter", "play", "capture"):
        text = replay(cmd, "--help").stdout
        assert "--path-include" in text and "--middleware" in text and "--rules" in text
    assert "--sample" in replay("play", "--help").stdout


@pytest.mark.parametrize("n", [1, 7, 300])
def test_a_bare_limit_reads_only_the_start_of_a_log(tmp_path, n):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_filter import synth

    from replay.rules.ruleset import Rules, settings_from_values

    log = tmp_path / "api.rlog"
    synth(str(log), 20_000)
    every = list(LogReader(str(log)))
    firsts = list(dict.fromkeys((m.conn, m.index) for m in every if m.index >= 0))[:n]
    want = [m for m in every if (m.conn, m.index) in set(firsts)]
    rules = Rules(settings_from_values({"limit": n}))
    got = list(rules.apply(LogReader(str(log))))
    assert got == want
    assert rules.stats["limit_reached"] and rules.stats["read"] < len(every) // 4
    # with another filter the index path decides: the same exchanges as the streaming one
    both = Rules(settings_from_values({"limit": n, "method": ["GET", "POST", "PUT", "DELETE"]}))
    assert list(both.apply(LogReader(str(log)))) == want
