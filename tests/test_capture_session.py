"""CaptureSession without a network: a capture file's packet batches stand in for the kernel's.

What ``replay capture`` writes when the core hands its rows to the log (``keeps_rows``) must be
what it writes message by message: the same messages, in order, across rotated files, with the
counts the session reports; an error in the middle keeps what was finished before it.
"""

from __future__ import annotations

import pytest

from replay import core
from replay.capture import CaptureSession, OutputFiles, keeps_rows
from replay.errors import CaptureError
from replay.log import LogReader
from replay.pipeline import CaptureReader
from replay.sources.pcapfile import PcapFile
from tests.conftest import DATA, ROOT

CAPTURES = sorted(DATA.glob("*.pcap")) + [ROOT / "captures" / "sample.pcap"]


class FileSource:
    """The parts of ``LiveCapture`` a session uses, reading a capture file's batches; it fails
    with ``fail`` after ``fail_after`` batches when given."""

    def __init__(self, path, fail_after=None, fail=None):
        self._batches = iter(PcapFile(str(path), batch_size=16).batches())
        self.linktype = PcapFile(str(path)).linktype
        self.warnings: list = []
        self.done = False
        self._left = fail_after
        self._fail = fail

    def start(self):
        return self

    def get(self, timeout=None):
        if self._left is not None:
            if self._left == 0:
                raise self._fail
            self._left -= 1
        item = next(self._batches, None)
        self.done = item is None
        return item

    def stats(self):
        return {"kernel_drops": 0, "interface_drops": 0, "packets": 0, "bytes": 0,
                "pcap_received": 0, "queue_peak": 0, "queue_waits": 0}

    def stop(self):
        pass

    def abort(self):
        pass

    def close(self):
        pass


class Ticks:
    """A clock that moves one second each time it is read: rotation by interval comes often."""

    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        self.t += 1.0
        return self.t


def run_session(path, tmp_path, rows: bool, **kw):
    source = FileSource(path, **kw)
    engine = core.Engine(source.linktype, rows=rows)
    clock = Ticks()
    outputs = OutputFiles(str(tmp_path / ("rows" if rows else "msgs") / "part.rlog"), {},
                          rotate_interval=5, clock=clock)
    (tmp_path / ("rows" if rows else "msgs")).mkdir()
    outputs.open()
    session = CaptureSession(source, engine, outputs, flush_interval=3, clock=clock)
    return session, outputs


def read_all(paths) -> list:
    out = []
    for p in paths:
        with LogReader(p) as r:
            assert r.warnings == [] and r.indexed
            out += list(r)
    return out


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_rows_write_what_messages_write(path, tmp_path):
    want = list(CaptureReader(str(path)))
    results = []
    for rows in (True, False):
        session, outputs = run_session(path, tmp_path, rows)
        assert session.run() == "end of capture"
        got = read_all(outputs.paths)
        assert got == want
        assert session.requests == sum(m.kind == 0 for m in want)
        assert session.written == len(want)
        results.append(len(outputs.paths))
    assert results[0] == results[1]         # rotated alike


@pytest.mark.parametrize("fail", [CaptureError("the interface went away"),
                                  KeyboardInterrupt()], ids=["capture error", "interrupt"])
def test_an_error_keeps_what_was_finished(tmp_path, fail):
    path = ROOT / "captures" / "sample.pcap"
    session, outputs = run_session(path, tmp_path, True, fail_after=3, fail=fail)
    with pytest.raises(type(fail)):
        session.run()
    got = read_all(outputs.paths)
    assert len(got) == session.written > 0
    assert got == list(CaptureReader(str(path)))[:len(got)]


def test_rows_only_where_no_message_is_looked_at():
    assert keeps_rows()
    assert not keeps_rows(rules=object())
    assert not keeps_rows(requests_only=True)
    assert not keeps_rows(count=10)
    assert not keeps_rows(rotate_size=1 << 20)
    assert not keeps_rows(outputs="kafka")
