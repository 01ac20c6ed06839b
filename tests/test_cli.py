"""The command line as a user meets it: real processes, real files, exit codes and stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replay.cli.main import COMMANDS
from tests.conftest import ROOT

SAMPLE = ROOT / "captures" / "sample.pcap"


def replay(*args, check=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def no_traceback(p):
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help(cmd):
    p = replay(*([cmd] if cmd else []), "--help", check=True)
    assert "Usage:" in p.stdout


def test_ls_jsonl_fields_on_a_capture():
    p = replay("ls", SAMPLE, "--format", "jsonl", check=True)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    reqs = [r for r in rows if r["kind"] == "request"]
    resps = [r for r in rows if r["kind"] == "response"]
    assert len(reqs) == 37 and len(resps) == 38  # one 100 Continue
    for r in rows:
        for key in ("kind", "ts", "conn", "client", "server", "method", "uri", "host", "status",
                    "length", "flags"):
            assert key in r
    assert {r["method"] for r in reqs} >= {"GET", "POST", "HEAD"}
    by_id = {(r["conn"], r["index"]): r for r in reqs}
    for r in resps:
        q = by_id[(r["conn"], r["index"])]
        assert (r["method"], r["uri"]) == (q["method"], q["uri"])
        assert isinstance(r["status"], int)
    assert all(r["status"] is None for r in reqs)
    heads = [r for r in resps if r["method"] == "HEAD"]
    assert heads and all(r["length"] == 0 for r in heads)


def test_ls_table_and_info_on_a_capture():
    p = replay("ls", SAMPLE, check=True)
    assert len(p.stdout.splitlines()) == 1 + 37 + 38
    p = replay("info", SAMPLE, check=True)
    assert "37 requests" in p.stdout and "14" in p.stdout


def test_ls_into_a_closed_pipe():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(f"{sys.executable} -m replay.cli.main ls {SAMPLE} | head -n 2",
                       shell=True, capture_output=True, text=True, env=env, timeout=60)
    assert len(p.stdout.splitlines()) == 2
    no_traceback(p)


def bad_inputs(tmp: Path):
    data = SAMPLE.read_bytes()
    (tmp / "empty.pcap").write_bytes(b"")
    (tmp / "text.pcap").write_text("this is not a capture\n" * 20)
    (tmp / "header-only.pcap").write_bytes(data[:10])
    # an unsupported link type (DLT_IEEE802_11 = 105) in an otherwise valid pcap
    (tmp / "wifi.pcap").write_bytes(data[:20] + (105).to_bytes(4, "little") + data[24:])
    return {
        "empty.pcap": "empty",
        "text.pcap": "not a pcap",
        "header-only.pcap": "cut short",
        "wifi.pcap": "unsupported link type 105",
        "missing.pcap": "no such file",
    }


@pytest.mark.parametrize("cmd", ["ls", "info", "convert"])
def test_bad_input_gets_one_clear_line(tmp_path, cmd):
    for name, words in bad_inputs(tmp_path).items():
        args = [cmd, tmp_path / name] + (["-o", tmp_path / "out.rlog"] if cmd == "convert" else [])
        p = replay(*args)
        no_traceback(p)
        assert p.returncode != 0, (name, p.stdout)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (name, p.stderr)
        assert name in lines[0] and words in lines[0], (name, lines[0])


def test_truncated_capture_keeps_every_message_before_the_cut(tmp_path):
    data = SAMPLE.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:len(data) // 2 + 7])
    full = [json.loads(x) for x in replay("ls", SAMPLE, "--format", "jsonl", check=True).stdout.splitlines()]
    p = replay("ls", cut, "--format", "jsonl")
    no_traceback(p)
    assert p.returncode == 0
    assert "cut short" in p.stderr and str(cut) in p.stderr
    part = [json.loads(x) for x in p.stdout.splitlines()]
    complete = [r for r in part if "incomplete" not in r["flags"]]
    assert len(complete) > 10
    key = lambda r: (r["kind"], r["conn"], r["index"], r["ts"])  # noqa: E731
    assert {key(r) for r in complete} <= {key(r) for r in full}


def test_wrong_flag():
    p = replay("ls", SAMPLE, "--format", "xml")
    no_traceback(p)
    assert p.returncode == 2 and "xml" in p.stderr


def test_logs_and_captures_can_come_from_a_pipe(tmp_path):
    log = tmp_path / "s.rlog"
    replay("convert", SAMPLE, "-o", log, "-q", check=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    want = replay("ls", SAMPLE, check=True).stdout
    for src in (SAMPLE, log):
        for cmd in ("ls /dev/stdin", "info /dev/stdin", "play /dev/stdin --sink --speed max -q"):
            p = subprocess.run(f"cat {src} | {sys.executable} -m replay.cli.main {cmd}", shell=True,
                               capture_output=True, text=True, env=env, timeout=120)
            no_traceback(p)
            assert p.returncode == 0, (src, cmd, p.stderr)
            if cmd.startswith("ls"):
                assert p.stdout == want
            if cmd.startswith("info"):
                assert "37 requests" in p.stdout and not re.search(r"[ (]0 bytes", p.stdout)
    p = subprocess.run(f"printf 'not a log' | {sys.executable} -m replay.cli.main ls /dev/stdin",
                       shell=True, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == "replay: /dev/stdin: not a pcap, pcapng, .rlog, .gor or HAR file"


@pytest.mark.parametrize("target,words", [
    ("::1:8080", "http://[::1]:8080"), ("https://::1:8443", "https://[::1]:8443"),
    ("http://127.0.0.1:0", "1 to 65535"), ("http://127.0.0.1:70000", "1 to 65535"),
])
def test_bad_targets_say_what_to_write(target, words):
    p = replay("play", SAMPLE, "--dry-run", "--target", target)
    no_traceback(p)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and words in lines[0] and "--target" in lines[0], p.stderr


def test_the_collector_is_tuned_only_when_the_program_starts():
    """Started as the program, the command's modules load with hardly a collection and are
    then frozen out of later ones; imported by other code (a test), the collector is left as
    it was."""
    probe = ("import gc, sys\n"
             "import replay.cli.main as m\n"
             "print(gc.get_threshold(), gc.get_freeze_count() > 0)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == f"{(700, 10, 10)} False"
    probe = ("import gc, runpy, sys\n"
             "sys.argv = ['replay', 'info', sys.argv[1]]\n"
             "try:\n"
             "    runpy.run_module('replay.cli.main', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print(e.code, gc.get_threshold(), gc.get_freeze_count() > 0)\n")
    r = subprocess.run([sys.executable, "-c", probe, str(ROOT / "captures" / "sample.pcap")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().split("\n")[-1] == f"0 {(700, 10, 10)} True"
