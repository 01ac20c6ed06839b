"""The spilled index of `replay report` (an external merge sort in a temporary file) answers as
the in-memory one does: unit cases with random messages, and whole reports compared."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report_units import _api_run

from replay.analysis import runs as R
from replay.analysis import spill as S


def _small(monkeypatch, run=300, page=8, batch=50):
    monkeypatch.setattr(S, "RUN", run)
    monkeypatch.setattr(S, "PAGE", page)
    monkeypatch.setattr(S, "MERGE_BATCH", batch)


class _Block:
    def __init__(self, first_row):
        self.first_row = first_row


def _build(msgs, block=97):
    """An index of ``msgs`` (conn, index, is request, is final) fed as the scan feeds them."""
    bd = R._Builder(True, None, 1 << 16)
    for at in range(0, len(msgs), block):
        part = msgs[at:at + block]
        c = {"conn": np.array([m[0] for m in part], dtype=np.uint64),
             "index": np.array([m[1] for m in part], dtype=np.int64)}
        req = np.array([m[2] for m in part], dtype=bool)
        sel = np.array([m[3] for m in part], dtype=bool)
        bd.add(_Block(at), c, req, sel)
    return bd.finish()


@pytest.mark.parametrize("seed", range(6))
def test_a_spilled_index_finds_the_rows_of_the_in_memory_one(monkeypatch, seed):
    rnd = np.random.default_rng(seed)
    n = int(rnd.integers(1, 4000))
    # exchanges of a few connections, messages in any order (a request may come after its
    # answer, an exchange may lack either, retried requests and interim answers repeat)
    msgs = [(int(rnd.integers(0, 40)), int(rnd.integers(0, 200)), bool(rnd.integers(0, 2)),
             bool(rnd.integers(0, 5))) for _ in range(n)]
    whole = _build(msgs)
    assert isinstance(whole, R.SectionIndex)
    _small(monkeypatch, run=int(rnd.integers(1, 400)), page=int(rnd.integers(1, 20)),
           batch=int(rnd.integers(1, 60)))
    spilled = _build(msgs)
    if n > S.RUN:
        assert isinstance(spilled, S.SpilledIndex)
    assert len(spilled) == len(whole)
    want = np.concatenate([whole.keys, R.key_of(rnd.integers(0, 45, 300), rnd.integers(-1, 210, 300)),
                           np.array([0, 2**64 - 1], dtype=np.uint64)])
    rnd.shuffle(want)
    for a, b in zip(whole.rows(want), spilled.rows(want)):
        assert a.tolist() == b.tolist()
    assert np.asarray(whole.in_order()).tolist() == np.asarray(spilled.in_order()[0:len(spilled)]).tolist()
    spilled.close()


def test_an_empty_section_spills_to_nothing(monkeypatch):
    _small(monkeypatch, run=1)
    ix = _build([(1, 0, False, False)] * 3)    # nothing final, nothing selected
    assert len(ix) == 0 and [a.tolist() for a in ix.rows(np.array([5], dtype=np.uint64))] == [[-1], [-1]]
    assert len(ix.in_order()) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_report_over_spilled_indexes_is_the_report_in_memory(tmp_path, monkeypatch, workers):
    import replay.analysis.compare as C

    monkeypatch.setattr(C, "CHUNK", 128)
    monkeypatch.setattr(C, "SEGMENT", 512)
    n = 2000
    cand = _api_run(tmp_path / "c.rlog", n, 1, slow=set(range(1, n, 3)), changed=set(range(0, n, 7)),
                    failing=set(range(2, n, 30)))
    base = _api_run(tmp_path / "b.rlog", n, 2)
    noise = _api_run(tmp_path / "n.rlog", n, 3)

    def report(**kw):
        return json.loads(json.dumps(C.Analysis(cand, **kw).run(workers), default=str))

    kinds = ({}, {"baseline": base}, {"baseline": base, "noise": noise})
    whole = [report(**kw) for kw in kinds]
    _small(monkeypatch, run=700, page=16, batch=100)
    made = []
    real = S.SpilledIndex.__init__

    def spilled(self, runs):
        made.append(len(runs.runs))
        real(self, runs)

    monkeypatch.setattr(S.SpilledIndex, "__init__", spilled)
    assert [report(**kw) for kw in kinds] == whole
    assert made and min(made) > 1


def test_no_room_for_the_spilled_index_is_one_line(tmp_path, monkeypatch):
    import errno
    import subprocess
    import sys

    from replay.errors import InputError

    spills = S.RUN // 2 + 1000                     # exchanges whose messages spill
    cand = _api_run(tmp_path / "c.rlog", 400, 1)
    _small(monkeypatch, run=100)

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S.os, "pwrite", full)
    from replay.analysis.compare import Analysis
    with pytest.raises(InputError, match="cannot write its temporary index in .*No space left on "
                                         "device.*set TMPDIR"):
        Analysis(cand).run(1)
    # and through the command: a tmpfs too small for it
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs (not root)")
    try:
        big = _api_run(tmp_path / "big.rlog", spills, 1)
        p = subprocess.run([sys.executable, "-m", "replay.cli.main", "report", big], capture_output=True,
                           text=True, env={**__import__("os").environ, "TMPDIR": str(tiny)},
                           timeout=300)
    finally:
        subprocess.run(["umount", str(tiny)], capture_output=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "temporary index" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_short_write_is_finished_or_said(monkeypatch):
    """A disk filling up writes short before it refuses: what was cut is written again, or
    the report stops with one line; the index never silently lacks entries."""
    import os

    from replay.errors import InputError

    real = os.pwrite
    room = [10**9]

    def short(fd, data, off):                     # at most 1000 bytes a call, until no room
        n = min(len(data), 1000, room[0])
        room[0] -= n
        return real(fd, bytes(data[:n]), off)

    monkeypatch.setattr(S.os, "pwrite", short)
    msgs = [(c, i, True, True) for c in range(30) for i in range(40)] + \
           [(c, i, False, True) for c in range(30) for i in range(40)]
    whole = _build(msgs)
    _small(monkeypatch, run=500)
    spilled = _build(msgs)
    assert isinstance(spilled, S.SpilledIndex)
    assert [a.tolist() for a in spilled.rows(whole.keys)] == [whole.req.tolist(), whole.fin.tolist()]
    room[0] = 5000
    with pytest.raises(InputError, match="cannot write its temporary index"):
        _build(msgs)
