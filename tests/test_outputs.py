"""Outputs are never destroyed by accident: every command that writes a file refuses its own
inputs, fails at once on a path it cannot write or that another replay process is writing, and
replaces a file only with a complete new one (``replay.outputs``). Real processes, real files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from play_helpers import SAMPLE, SinkThread

from replay.errors import OutputBusyError, OutputError, UsageError
from replay.log import LogReader
from replay.outputs import AtomicFile, LiveFile, Outputs
from tests.conftest import ROOT


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")


def cmd(*args):
    return [sys.executable, "-m", "replay.cli.main", *map(str, args)]


def replay(*args, timeout=120):
    return subprocess.run(cmd(*args), capture_output=True, text=True, env=env(), timeout=timeout)


def one_line(p) -> str:
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("replay"), lines[0]
    return lines[0]


def names(d: Path) -> set:
    return {p.name for p in d.iterdir()}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """The sample capture's packets 300 times over, 10 s apart (72 MB, ~22,000 messages): long
    enough to convert that a test can act while the conversion runs."""
    data = SAMPLE.read_bytes()
    head, body = data[:24], data[24:]
    assert head[:4] == b"\xd4\xc3\xb2\xa1"
    recs = []
    pos = 0
    while pos + 16 <= len(body):
        sec, usec, incl, orig = struct.unpack_from("<IIII", body, pos)
        recs.append((sec, usec, body[pos + 16:pos + 16 + incl], orig))
        pos += 16 + incl
    out = [head]
    for k in range(300):
        for sec, usec, pkt, orig in recs:
            out.append(struct.pack("<IIII", sec + 10 * k, usec, len(pkt), orig) + pkt)
    path = tmp_path_factory.mktemp("big") / "big.pcap"
    path.write_bytes(b"".join(out))
    return path


@pytest.fixture(scope="module")
def sample_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("log") / "sample.rlog"
    p = replay("convert", SAMPLE, "-o", path, "-q")
    assert p.returncode == 0, p.stderr
    return path


def wait_until_writing(d: Path, out: Path, before: bytes | None, proc, timeout=60.0):
    """Until the convert into ``d`` has started writing: its temporary file exists (or, for a
    writer that writes ``out`` in place, ``out`` changed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(n.endswith(".replay-tmp") for n in names(d)):
            return
        if out.exists() and (before is None or out.read_bytes()[:64] != before[:64]
                             or out.stat().st_size != len(before)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("the convert did not start writing")


def _temp_size(d: Path) -> int:
    for n in names(d):
        if n.endswith(".replay-tmp"):
            try:
                return (d / n).stat().st_size
            except FileNotFoundError:     # renamed into place meanwhile
                return 1 << 62
    return 0


def count_messages(path: Path) -> int:
    return sum(1 for _ in LogReader(str(path)))


# -- play --report and -o -------------------------------------------------------------------------

def test_report_over_the_input_is_refused_and_the_input_kept(sample_log, tmp_path):
    log = tmp_path / "s.rlog"
    log.write_bytes(sample_log.read_bytes())
    before = log.read_bytes()
    p = replay("play", log, "--sink", "-q", "--speed", "max", "--report", log)
    line = one_line(p)
    assert p.returncode == 2 and "--report" in line and str(log) in line
    assert log.read_bytes() == before
    # the same file under another name (a hard link), and the capture itself
    link = tmp_path / "link.json"
    os.link(log, link)
    p = replay("play", log, "--sink", "-q", "--speed", "max", "--report", link)
    assert p.returncode == 2 and "--report" in one_line(p)
    assert log.read_bytes() == before
    pcap = tmp_path / "s.pcap"
    pcap.write_bytes(SAMPLE.read_bytes())
    p = replay("play", pcap, "--sink", "-q", "--speed", "max", "--report", pcap)
    assert p.returncode == 2 and pcap.read_bytes() == SAMPLE.read_bytes()
    assert names(tmp_path) == {"s.rlog", "link.json", "s.pcap"}


def test_report_and_output_log_on_one_file_are_refused(sample_log, tmp_path):
    both = tmp_path / "both"
    p = replay("play", sample_log, "--sink", "-q", "--speed", "max", "-o", both, "--report",
               tmp_path / "." / "both")
    line = one_line(p)
    assert p.returncode == 2 and "--report" in line and "-o" in line
    assert not both.exists() and names(tmp_path) == set()


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file", "a-directory"])
def test_bad_report_path_fails_before_anything_is_sent(sample_log, tmp_path, where):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    path = {"missing-dir": tmp_path / "no" / "such" / "r.json",
            "under-a-file": tmp_path / "file" / "r.json",
            "a-directory": tmp_path / "dir"}[where]
    with SinkThread() as sink:
        p = replay("play", sample_log, "--target", sink.url, "-q", "--speed", "max",
                   "--report", path, "-o", tmp_path / "out.rlog")
        line = one_line(p)
        assert p.returncode != 0 and str(path) in line
        assert sink.records == []
    assert names(tmp_path) == {"file", "dir"}


def test_report_and_log_are_written_whole(sample_log, tmp_path):
    report, out = tmp_path / "r.json", tmp_path / "out.rlog"
    report.write_text("old")
    os.chmod(report, 0o640)
    p = replay("play", sample_log, "--sink", "-q", "--speed", "max", "--report", report, "-o", out)
    assert p.returncode == 0, p.stderr
    assert json.loads(report.read_text())["sent"] == 37
    assert os.stat(report).st_mode & 0o777 == 0o640     # the mode of the file it replaced
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert count_messages(out) > 37
    assert names(tmp_path) == {"r.json", "out.rlog"}


# -- convert --------------------------------------------------------------------------------------

def test_two_converts_to_one_path_one_wins_and_the_log_is_whole(big, tmp_path):
    out = tmp_path / "same.rlog"
    first = subprocess.Popen(cmd("convert", big, "-o", out), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_until_writing(tmp_path, out, None, first)
        # hold the first writer where it is, so the second surely runs while it writes
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = replay("convert", big, "-o", out)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, err1 = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err1
    line = one_line(second)
    assert second.returncode != 0
    assert "being written by another replay process" in line and f"pid {first.pid}" in line
    assert str(out) in line
    # the winner's summary: "... -> same.rlog: N requests, M responses, ..."
    tail = err1.split("->", 1)[1]
    n = int(tail.split(" requests")[0].split()[-1]) + int(tail.split(" responses")[0].split()[-1])
    assert n > 20000
    assert count_messages(out) == n
    assert names(tmp_path) == {"same.rlog"}


@pytest.fixture(scope="module")
def big_log(tmp_path_factory) -> Path:
    """The sample capture's messages 4,000 times over (300,000 messages, new connections and
    times each round): a log that ``filter`` and ``convert`` take long enough to read."""
    from replay.log import LogWriter
    from replay.pipeline import open_input

    msgs = list(open_input(str(SAMPLE)))
    conns = max(m.conn for m in msgs) + 1
    path = tmp_path_factory.mktemp("biglog") / "big.rlog"
    w = LogWriter(str(path), {"source": "sample x4000"})
    for k in range(4000):
        shift = k * 10 * 10**9
        for m in msgs:
            w.write(dataclasses.replace(m, conn=m.conn + k * conns, ts_first=m.ts_first + shift,
                                        ts_last=m.ts_last + shift))
    w.close()
    return path


def _interrupt(args, out: Path, tmp_path: Path, sig) -> str:
    """Run ``replay ARGS``, signal it once its first block is out, and return its stderr once
    it exited with 130, leaving one whole log marked interrupted and nothing else."""
    before = out.read_bytes() if out.exists() else None
    p = subprocess.Popen(cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env())
    try:
        wait_until_writing(tmp_path, out, before, p)
        # until a first block is out: the command is under way, not still starting
        end = time.monotonic() + 60
        while time.monotonic() < end and p.poll() is None and _temp_size(tmp_path) <= 4096:
            time.sleep(0.002)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "(interrupted)" in err
    r = LogReader(str(out))
    assert r.meta["interrupted"] is True and not r.warnings
    assert names(tmp_path) == {out.name}, err
    return err


def _summary_counts(err: str) -> tuple:
    m = re.search(r"-> .*?([\d,]+) requests, ([\d,]+) responses", err)
    assert m, err
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def _kinds(path: Path) -> tuple:
    kinds = [m.kind for m in LogReader(str(path))]
    return kinds.count(0), len(kinds) - kinds.count(0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_convert_keeps_what_it_converted(big, sample_log, tmp_path, sig):
    """Like tcpdump -w: an interrupted convert keeps its work, a whole log marked interrupted,
    renamed over the path as a finished one would be; no temporary or lock file is left."""
    out = tmp_path / "out.rlog"
    out.write_bytes(sample_log.read_bytes())
    err = _interrupt(["convert", big, "-o", out], out, tmp_path, sig)
    # every message the summary counts is in the log (those finished when the signal came too)
    requests, responses = _summary_counts(err)
    assert requests > 0 and _kinds(out) == (requests, responses), err


@pytest.mark.parametrize("command", ["convert", "filter"])
def test_interrupted_log_to_log_counts_what_it_wrote(big_log, tmp_path, command):
    """A log read to another log (convert, filter) and stopped by a signal: its summary counts
    exactly the messages in what it wrote, however the signal fell between them."""
    out = tmp_path / "out.rlog"
    args = [command, big_log, "-o", out] + (["--method", "GET"] if command == "filter" else [])
    err = _interrupt(args, out, tmp_path, signal.SIGINT)
    requests, responses = _summary_counts(err)
    assert 0 < requests + responses < 300_000, err
    assert _kinds(out) == (requests, responses), err


def test_a_second_signal_interrupts_at_once():
    """``Interrupts``: the first signal is noted for the command to stop at its next safe point;
    a second raises KeyboardInterrupt where it lands; the previous handlers come back."""
    from replay.cli.stopping import Interrupts

    before = signal.getsignal(signal.SIGINT)
    with Interrupts() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested == "SIGTERM" and stop.asked()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        with pytest.raises(KeyboardInterrupt):
            list(stop.between([1, 2]))
    assert signal.getsignal(signal.SIGINT) is before
    with Interrupts() as stop:
        seen = []
        with pytest.raises(KeyboardInterrupt):
            for x in stop.between(iter([1, 2, 3])):
                seen.append(x)
                if x == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
        assert seen == [1, 2]     # stopped after the item in hand was handled, not before


def test_convert_of_a_missing_capture_leaves_the_output_alone(tmp_path):
    out = tmp_path / "existing.rlog"
    out.write_bytes(b"previous content")
    p = replay("convert", tmp_path / "missing.pcap", "-o", out)
    line = one_line(p)
    assert p.returncode == 2 and "missing.pcap" in line and "no such file" in line
    assert out.read_bytes() == b"previous content"
    assert names(tmp_path) == {"existing.rlog"}


def test_convert_and_filter_refuse_to_overwrite_their_input(sample_log, tmp_path):
    pcap = tmp_path / "in.pcap"
    pcap.write_bytes(SAMPLE.read_bytes())
    os.symlink(pcap, tmp_path / "alias.rlog")
    p = replay("convert", pcap, "-o", tmp_path / "alias.rlog")
    assert p.returncode == 2 and "would overwrite" in one_line(p)
    log = tmp_path / "in.rlog"
    log.write_bytes(sample_log.read_bytes())
    rules = tmp_path / "rules.toml"
    rules.write_text("method = ['GET']\n")
    for args in (["-o", log], ["-o", rules, "--rules", rules]):
        p = replay("filter", log, *args)
        assert p.returncode == 2 and "would overwrite" in one_line(p)
    assert log.read_bytes() == sample_log.read_bytes()
    assert pcap.read_bytes() == SAMPLE.read_bytes()
    assert rules.read_text() == "method = ['GET']\n"


def test_filter_output_replaces_a_log_only_when_complete(sample_log, tmp_path):
    out = tmp_path / "out.rlog"
    out.write_bytes(b"old")
    # a middleware that dies half-way: the run fails, the old file stays
    mw = tmp_path / "mw.py"
    mw.write_text("import sys\nfor i, line in enumerate(sys.stdin):\n"
                  "    if i == 10: sys.exit(3)\n    sys.stdout.write(line); sys.stdout.flush()\n")
    p = replay("filter", sample_log, "-o", out, "--middleware", f"{sys.executable} {mw}")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert out.read_bytes() == b"old"
    assert names(tmp_path) == {"out.rlog", "mw.py"}
    p = replay("filter", sample_log, "-o", out, "--method", "GET")
    assert p.returncode == 0, p.stderr
    assert count_messages(out) == 52


# -- sink --record --------------------------------------------------------------------------------

def get(port: int, n: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i in range(n):
            s.sendall(b"GET /r/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            got = b""
            while not got.endswith(b"ok\n"):
                chunk = s.recv(4096)
                assert chunk
                got += chunk


def test_sink_records_are_in_the_file_while_it_runs_and_after_a_kill(tmp_path):
    rec = tmp_path / "rec.jsonl"
    p = subprocess.Popen(cmd("sink", "--port", "0", "--record", rec, "--announce"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        port = int(p.stdout.readline())
        get(port, 25)
        lines = rec.read_text().splitlines()          # the sink still runs
        assert [json.loads(x)["uri"] for x in lines] == [f"/r/{i}" for i in range(25)]
        # a second writer of the same file fails at once; the first goes on
        q = replay("sink", "--port", "0", "--record", rec, timeout=30)
        line = one_line(q)
        assert q.returncode != 0 and "being written by another replay process" in line
        assert f"pid {p.pid}" in line
        get(port, 15)
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = rec.read_text().splitlines()
    assert len(lines) == 40 and all(json.loads(x)["method"] == "GET" for x in lines)


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file"])
def test_sink_record_to_a_bad_path_names_the_file(tmp_path, where):
    (tmp_path / "file").write_text("x")
    path = tmp_path / ("no/such/x.jsonl" if where == "missing-dir" else "file/x.jsonl")
    p = replay("sink", "--port", "0", "--record", path, timeout=30)
    line = one_line(p)
    assert p.returncode != 0 and str(path) in line and "listen" not in line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_sink_stops_when_a_record_cannot_be_written(tmp_path):
    p = subprocess.Popen(cmd("sink", "--port", "0", "--record", "/dev/full", "--announce"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        port = int(p.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = s.recv(4096)
            except ConnectionResetError:
                answer = b""
        assert answer == b""                      # not answered: it is not recorded
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [x for x in err.splitlines() if x.strip()]
    assert p.returncode != 0 and len(lines) == 1, err
    assert "/dev/full: cannot write: no space left on device" in lines[0]


# -- the module itself ----------------------------------------------------------------------------

def test_atomic_file_commit_discard_and_lock(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("before")
    a = AtomicFile(path, "--report").open()
    with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
        AtomicFile(path, "--report").open()
    a.write_text("after")
    assert path.read_text() == "before"
    a.discard()
    assert path.read_text() == "before" and names(tmp_path) == {"a.json"}
    with AtomicFile(path, "--report") as b:
        b.write_text("after")
    assert path.read_text() == "after" and names(tmp_path) == {"a.json"}


def test_atomic_file_follows_symlinks_and_writes_devices_directly(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("x")
    link = tmp_path / "link.json"
    os.symlink(target, link)
    with AtomicFile(link) as f:
        f.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"
    with AtomicFile("/dev/null") as f:
        f.write_text("gone")
    assert names(tmp_path) == {"real.json", "link.json"}


def test_stale_temporary_files_of_a_dead_writer_are_removed(tmp_path):
    path = tmp_path / "x.rlog"
    stale = tmp_path / ".x.rlog.12345-0123abcd.replay-tmp"
    other = tmp_path / ".x.rlog.b.12345-0123abcd.replay-tmp"   # another file's: kept
    stale.write_text("half")
    other.write_text("half")
    with AtomicFile(path, mode=0o600) as f:
        f.write_text("whole")
    assert names(tmp_path) == {"x.rlog", other.name}
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_outputs_group_checks_inputs_and_each_other(tmp_path):
    inp = tmp_path / "in.rlog"
    inp.write_text("in")
    outs = Outputs({"the input": inp})
    with pytest.raises(UsageError, match="would overwrite the input"):
        outs.atomic(tmp_path / "sub" / ".." / "in.rlog", "-o")
    outs.atomic(tmp_path / "a", "-o")
    with pytest.raises(UsageError, match="name the same file"):
        outs.atomic(tmp_path / "a", "--report")
    group = Outputs()
    group.atomic(tmp_path / "b").open()
    with pytest.raises(RuntimeError):
        with group:
            raise RuntimeError
    assert not (tmp_path / "b").exists() and names(tmp_path) == {"in.rlog"}


def test_live_file_is_locked_and_written_in_place(tmp_path):
    path = tmp_path / "cap.rlog"
    f = LiveFile(path, "-o", mode=0o600).open()
    with pytest.raises(OutputBusyError):
        LiveFile(path, "-o").open()
    f.write(b"abc")
    assert path.read_bytes() == b"abc" and os.stat(path).st_mode & 0o777 == 0o600
    f.close()
    assert names(tmp_path) == {"cap.rlog"}
    with pytest.raises(OutputError, match="does not exist"):
        LiveFile(tmp_path / "no" / "x", "-o").open()


def test_capture_files_take_the_lock(tmp_path):
    from replay.capture import OutputFiles

    pattern = str(tmp_path / "cap-%Y.rlog")
    first = OutputFiles(pattern, {"command": "capture"})
    first.open()
    try:
        second = OutputFiles(pattern, {"command": "capture"})
        with pytest.raises(OutputBusyError, match="being written by another replay process"):
            second.open()
    finally:
        first.close({})
    assert len(names(tmp_path)) == 1
    assert count_messages(Path(first.path)) == 0
