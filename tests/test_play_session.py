"""``replay.play.session``: one replay run in process, without the CLI (as ``replay shadow`` and
other commands will run it): the plan through the sender to a sink, the output log, the status
callback, a stop as Ctrl-C, and the output log's drain that yields to due requests."""

from __future__ import annotations

from play_helpers import SinkThread, spread_capture

from replay.events import F_REPLAYED, KIND_REQUEST, KIND_RESPONSE
from replay.log import LogReader
from replay.outputs import LOG_MODE, Outputs
from replay.play import session as ps
from replay.play.scheduler import Schedule
from replay.play.sender import Options, parse_target
from replay.play.source import RecordedSource


class Status:
    def __init__(self, on_update=None):
        self.calls = []
        self.on_update = on_update

    def start(self):
        self.calls.append("start")

    def update(self, report, now):
        self.calls.append("update")
        if self.on_update is not None:
            self.on_update()

    def stop(self):
        self.calls.append("stop")


def _session(tmp_path, url, n=11, speed=10.0, status=None, out=None):
    src = RecordedSource(str(spread_capture(tmp_path / "in.pcap", n=n)))
    tgt = parse_target(url)
    plan = src.plan(tgt.host_header)
    sched = Schedule(plan.t0, plan.span_ns, plan.requests, speed=speed)
    output = ps.ExchangeLog(out, recorded=src.recorded) if out is not None else None
    return ps.PlaySession(plan, sched, tgt, Options(connections=ps.default_connections(plan, sched)),
                          ps.About(src.path, tgt.display), output=output, status=status)


def test_session_runs_plan_writes_log_and_reports(tmp_path):
    outputs = Outputs()
    out = outputs.atomic(tmp_path / "out.rlog", "-o", mode=LOG_MODE)
    outputs.open()
    status = Status()
    with SinkThread() as sink:
        s = _session(tmp_path, sink.url, n=11, speed=2.0, status=status, out=out)
        report = s.run()
    outputs.commit()
    assert (report.attempted, report.answered, report.error_total) == (11, 11, 0)
    assert not report.interrupted
    d = report.to_dict()
    assert list(d)[:9] == ["input", "target", "speed", "rate", "loop", "connections_cap",
                           "keepalive", "plan", "started_unix"]
    assert d["schedule"]["t0_ns"] == s.plan.t0
    assert status.calls[0] == "start" and status.calls[-1] == "stop" and "update" in status.calls
    r = LogReader(str(tmp_path / "out.rlog"))
    msgs = list(r)
    replayed = [m for m in msgs if m.flags & F_REPLAYED]
    recorded = [m for m in msgs if not m.flags & F_REPLAYED]
    assert len(replayed) == 22 and len(recorded) == 22
    assert msgs[:22] == replayed        # the recorded exchanges follow what was replayed
    sent = [m for m in replayed if m.kind == KIND_REQUEST]
    assert all(m.ts_first <= m.ts_last for m in sent)
    assert {(m.conn, m.index) for m in sent} == {(m.conn, m.index) for m in recorded}
    assert r.meta["command"] == "play" and r.meta["report"]["answered"] == 11


def test_cancel_stops_like_ctrl_c(tmp_path):
    box = []
    status = Status(on_update=lambda: box[0].cancel())
    with SinkThread() as sink:
        s = _session(tmp_path, sink.url, n=5, speed=0.05, status=status)   # 80 s recorded span
        box.append(s)
        report = s.run()
    assert report.interrupted
    assert report.attempted < 5
    assert status.calls[-1] == "stop"


class _Writer:
    def __init__(self):
        self.written = []

    def write(self, m):
        self.written.append(m)


class _Msg:
    kind = KIND_RESPONSE

    def __init__(self, i):
        self.i = i


def test_drain_yields_every_16_messages_unless_too_many_wait(monkeypatch):
    log = ps.ExchangeLog(None, rewrite=lambda m: ("rewritten", m.i))
    log.writer = _Writer()
    log.queue = [_Msg(i) for i in range(40)]
    asked = []

    def due_soon():
        asked.append(len(log.writer.written))
        return len(asked) == 3

    log.drain(due_soon)
    assert asked == [0, 16, 32] and len(log.writer.written) == 32 and len(log.queue) == 8
    assert log.writer.written[0] == ("rewritten", 0)
    monkeypatch.setattr(ps, "MAX_QUEUED", 8)
    log.drain(lambda: True)
    assert not log.queue and len(log.writer.written) == 40
