"""The answer path of a replay connection (``PumpCore``, the base of ``ReplayProtocol``): both
cores alike, call for call. Each scenario drives a connection of each core with the same bytes,
cut at the same places, and compares everything the connection did: what it wrote, what it
told the player and the report, and its own state after each read.

``connection_closes`` (does a response end its connection?) is compared with
``replay.httpmsg.header_value``, which the sender used before, and between the cores.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import _fastparse_py as pure
from replay.httpmsg import header_value
from replay.play.plan import PlannedRequest

try:
    from replay import _fastparse as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

needs_compiled = pytest.mark.skipif(compiled is None, reason="replay._fastparse is not built")
CORES = [pure] + ([compiled] if compiled is not None else [])


def _closes_before(data: bytes, head_length: int) -> bool:
    """The sender's test before ``connection_closes``: the reference."""
    v = header_value(data, head_length, b"connection")
    return bool(v and "close" in v.lower() or data.startswith(b"HTTP/1.0")
                and not (v and "keep-alive" in v.lower()))


HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nconnection:CLOSE\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection:\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: \t \r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Connection: close\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection : close\r\n\r\n",
    b"HTTP/1.1 200 OK\nConnection: close\n\n",
    b"HTTP/1.1 200 OK\r\nConnection: clo\r\nse\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close",
    b"HTTP/1.1 200 OK\r\nA: b\r\nConnection: upgrade\r\nConnection: close\r\n\r\n",
    b"HTTP/1.0",
    b"HTTP/1.",
    b"",
    b"HTTP/1.1 200 OK\r\nConnection: \x0bclose\x0c\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: \xa0keep-alive\xa0\r\n\r\n",
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("cut", [0, 10, 1000])
def test_connection_closes_reads_as_header_value(head, cut):
    hl = min(cut, len(head))
    want = _closes_before(head, hl)
    for core in CORES:
        assert core.connection_closes(head, hl) is want, (core.__name__, head, hl)


@given(st.lists(st.sampled_from([b"HTTP/1.0 ", b"HTTP/1.1 ", b"\r\n", b"\n", b"Connection:",
                                 b"connection: ", b"CLOSE", b"close", b"keep-alive", b" ",
                                 b"\t", b"x", b"\x0b", b"\xa0", b":"]), max_size=14),
       st.integers(0, 80))
@settings(max_examples=400, deadline=None)
def test_connection_closes_random_heads(parts, hl):
    head = b"".join(parts)
    want = _closes_before(head, hl)
    for core in CORES:
        assert core.connection_closes(head, hl) is want, (core.__name__, head, hl)


# -- PumpCore, driven by a player, a loop and a transport that write down what they see ----------

class _Report:
    def __init__(self, log):
        self.log = log
        self.bytes_received = 0
        self.unsolicited = 0

    def on_sent(self, *a):
        self.log.append(("on_sent", a))


class _Feed:
    def __init__(self, reqs):
        from collections import deque

        self.items = deque(reqs)


class _Loop:
    def __init__(self):
        self.soon = []

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))

    def run(self):
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class _Clock:
    def __init__(self):
        self.t = 1_000

    def now(self):
        self.t += 7
        return self.t


class _Player:
    """The parts of ``sender.Player`` the core calls; each call written down."""

    def __init__(self, log, budget):
        self.log = log
        self.loop = _Loop()
        self.clock = _Clock()
        self.report = _Report(log)
        self.stopping = False
        self.budget = budget
        self.schedule = None
        self.end_ns = None

    def answered(self, att, m, now, proto):
        self.log.append(("answered", att.req.index, att.sent_ns, m.status, len(m.data), now,
                         m.flags))

    def _took(self):
        self.log.append(("took",))

    def _tried(self, req):
        self.log.append(("tried", req.index))
        if self.budget is not None:
            self.budget -= 1

    def _pump(self, proto):
        return proto.pump_next()


class _Schedule:
    """Deadlines ``base + t * step`` (``t`` a request's recorded time), each asked written down."""

    def __init__(self, log, base, step):
        self.log, self.base, self.step = log, base, step

    def deadline(self, t, seq, it):
        self.log.append(("deadline", t, seq, it))
        return self.base + t * self.step


class _Dues:
    """A ``DueSends`` that writes down what it is given, and sends it when the test says."""

    def __init__(self, log):
        self.log = log
        self.entries = []

    def add(self, d, core, req):
        self.log.append(("due", d, req.index))
        self.entries.append((d, core, req))

    def fire(self, rng):
        got, self.entries = self.entries, []
        for d, core, req in got:
            if rng.random() < 0.1:
                core.send_due(_request(99, "GET", False), d)   # an entry its task took over
            core.send_due(req, d)
            self.log.append(("fired", d, req.index, core.due is None))


class _Transport:
    def __init__(self, log):
        self.log = log

    def write(self, data):
        self.log.append(("write", data))

    def close(self):
        self.log.append(("close",))


class _Waiter:
    def __init__(self, log):
        self.log = log
        self.set = False

    def done(self):
        return self.set

    def set_result(self, v):
        self.set = True
        self.log.append(("woken", v))


def _request(i, method, pipelined, base=0):
    data = f"{method} /r/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    return PlannedRequest(t=base + i, seq=i, conn=1, index=i, method=method, uri=f"/r/{i}",
                          data=data,
                          head_length=len(data), pipelined=pipelined,
                          recorded_status=200 if i % 3 else None)


def _response(rng, method, i):
    status = rng.choice([200, 200, 204, 304, 404, 500])
    extra = rng.choice([b"", b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n"])
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" if rng.random() < 0.1 else b""
    body = b"" if method == "HEAD" or status in (204, 304) else b"x" * rng.randint(0, 300)
    if rng.random() < 0.3 and body:
        framed = (b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body
                  + b"\r\n0\r\n\r\n")
    else:
        framed = f"Content-Length: {len(body)}\r\n\r\n".encode() + (body if method != "HEAD"
                                                                   else b"")
    if method == "HEAD":
        framed = f"Content-Length: {rng.randint(0, 99)}\r\n\r\n".encode()
    return interim + f"HTTP/1.1 {status} S{i}\r\n".encode() + extra + framed


class _Room:
    def __init__(self, log):
        self.log = log

    def set(self):
        self.log.append(("room",))


class _CountingPlayer(_Player):
    """A player whose counting is ``sender.Player``'s own, with a real ``Report``: the compiled
    core counts in its place (``core_counts``, into the report's ``Tally``), the pure twin calls
    these methods."""

    from replay.play.sender import Player as _P

    core_counts = True
    _took, _tried, _spent, answered, _status_came, _pump, _crashed = (
        _P._took, _P._tried, _P._spent, _P.answered, _P._status_came, _P._pump, _P._crashed)
    dues = None

    def __init__(self, log, budget, rng, core=None):
        from replay.play.report import Report

        super().__init__(log, budget)
        self.report = Report()
        if core is not None:     # the tally of the core under test (replay.core may pick another)
            self.report.tally = core.Tally(self.report)
        self.on_exchange = None
        self.late_answers = None
        self.crash = None
        self.fed = rng.randint(0, 12)
        self.room_at = rng.randint(0, 12)
        self.room = _Room(log) if rng.random() < 0.8 else None

    def cancel(self):
        self.log.append(("cancel",))


def _received(report) -> int:
    """The bytes received so far: the report's, and what the compiled core counted in its
    tally and not yet folded in."""
    tally = getattr(report, "tally", None)
    return report.bytes_received + (tally.bytes_received if tally is not None else 0)


def _connection(core, player, log):
    """A connection of ``core`` for ``player``, whose transport and waiter write to ``log``."""

    class Conn(core.PumpCore):
        pass

    c = Conn()
    c.init_core(player)
    c.transport = _Transport(log)
    c.framer = core.ResponseFramer(("127.0.0.1", 40000), ("127.0.0.1", 80))
    c.waiter = _Waiter(log)
    return c


EPOCH = 1_795_471_418_243_554_000     # a recorded time: ns of the Unix epoch (the sample capture's)


def _real_schedule(rng, base):
    """A ``Schedule`` of the sender's own (the compiled core computes its deadlines itself),
    whose deadlines fall before, among and after the test clock's readings; recorded times
    from ``base``."""
    from replay.play.scheduler import Schedule

    start = rng.choice([0, 1_000, 1_050])
    if rng.random() < 0.3:
        return Schedule(base, 11, 12, rate=rng.choice([1e8, 2.5e7, 3e7, 1.1e8]), start=start)
    return Schedule(base + rng.choice([0, 2]), 11, 12,
                    speed=rng.choice([10.0, 0.1, 0.025, 1 / 9]), start=start)


def _run(core, seed, counting=False, before_fold=None, timed=False, real=False):
    rng = random.Random(seed)
    log: list = []
    n = rng.randint(1, 12)
    base = rng.choice([0, EPOCH]) if real else 0
    reqs = [_request(i, rng.choice(["GET", "GET", "HEAD", "POST"]), i > 0 and rng.random() < 0.3,
                     base) for i in range(n)]
    budget = rng.choice([None, None, rng.randint(1, n)])
    player = _CountingPlayer(log, budget, rng, core) if counting else _Player(log, budget)
    c = _connection(core, player, log)
    feed = _Feed(reqs)
    dues = None
    if timed:
        # deadlines before, among and after the clock's readings; some past --duration's end
        player.schedule = _real_schedule(rng, base) if real else \
            _Schedule(log, rng.choice([0, 1_000, 1_050]), rng.choice([0, 9, 40]))
        player.end_ns = rng.choice([None, None, 1_200])
        dues = _Dues(log)
    c.pump = (feed, 0, 7, dues)
    if rng.random() < 0.1:
        c.retry = [object()]
    sent = []
    log.append(("first", c.pump_next()))
    wire = b""
    answered = 0
    for _ in range(4 * n + 4):
        # answer what was written and not yet answered, cut at random places
        writes = [e[1] for e in log if e[0] == "write"]
        while len(sent) < len(writes):
            sent.append(writes[len(sent)])
        while answered < len(sent):
            method = sent[answered].split(b" ", 1)[0].decode()
            wire += _response(rng, method, answered)
            answered += 1
        if not wire and dues is not None and dues.entries:
            dues.fire(rng)
            continue
        if not wire:
            break
        k = rng.randint(1, max(1, len(wire)))
        chunk, wire = wire[:k], wire[k:]
        if rng.random() < 0.05:
            chunk = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + chunk    # unsolicited
        c.data_received(chunk)
        player.loop.run()
        if dues is not None:
            if rng.random() < 0.05:
                player.stopping = True
            dues.fire(rng)
        log.append(("state", len(c.pending), c.reusable, c.closed, c.answers, c.rx,
                    c.rx_answered, c.framer.tunnel, len(feed.items), player.budget,
                    _received(player.report), player.report.unsolicited))
    if counting:
        r = player.report
        if before_fold is not None:
            before_fold(r)
        d = r.to_dict()          # (the tally the compiled core counted into is added here)
        log.append(("report", d, sorted(r.latency), sorted(r.latency_intended),
                    r.first_send_ns, r.last_answer_ns, player.fed, sorted(r.lateness),
                    sorted(r.lateness_free), sorted(r.recent_lateness), r.held_by_response))
    return log


@needs_compiled
@pytest.mark.parametrize("seed", range(300))
def test_pump_core_alike(seed):
    assert _run(compiled, seed) == _run(pure, seed)


@needs_compiled
@pytest.mark.parametrize("seed", range(200))
def test_pump_core_counts_alike(seed):
    """The compiled core counts into a real ``Report`` itself; the twin calls the player's and
    the report's methods: the same report, to the sample."""
    assert _run(compiled, seed, counting=True) == _run(pure, seed, counting=True)


@needs_compiled
@pytest.mark.parametrize("seed", range(200))
def test_pump_core_timed_alike(seed):
    """Timed: the requests that answers let go, each sent at once when its deadline is past or
    held for its deadline (``dues``) until then; what the run's end, a stop, or a stale
    entry does with them."""
    assert _run(compiled, seed, timed=True) == _run(pure, seed, timed=True)


@needs_compiled
@pytest.mark.parametrize("seed", range(100))
def test_pump_core_timed_counts_alike(seed):
    assert _run(compiled, seed, counting=True, timed=True) == \
        _run(pure, seed, counting=True, timed=True)


@needs_compiled
@pytest.mark.parametrize("seed", range(100))
def test_pump_core_timed_by_the_senders_schedule_alike(seed):
    """With the sender's own ``Schedule``, whose deadlines the compiled core computes itself
    (``deadline``), and its lateness counted into the tally: the same sends, and the same
    report, lateness and requests held by an answer included."""
    assert _run(compiled, seed, timed=True, real=True) == _run(pure, seed, timed=True, real=True)
    assert _run(compiled, seed, counting=True, timed=True, real=True) == \
        _run(pure, seed, counting=True, timed=True, real=True)


def _schedules():
    ints = st.integers(-(1 << 64), 1 << 64)
    near = st.integers(-(1 << 54), 1 << 54)
    epoch = st.integers(EPOCH - (1 << 50), EPOCH + (1 << 50))
    speed = st.one_of(st.floats(1e-6, 1e6), st.sampled_from([1.0, 10.0, 0.5, 1 / 3, 2]))
    rate = st.one_of(st.none(), st.floats(1e-3, 1e9), st.sampled_from([1234.5, 500, 10**6]))
    return st.tuples(st.one_of(epoch, near, ints), st.integers(0, 1 << 62),
                     st.one_of(st.integers(1, 10**9), st.integers(1, 1 << 62)), speed, rate,
                     st.one_of(near, st.integers(0, 1 << 62)), st.one_of(epoch, near, ints),
                     st.one_of(st.integers(0, 10**7), near),
                     st.one_of(st.integers(0, 10**5), st.integers(0, 1 << 60)))


@needs_compiled
@settings(max_examples=3000, deadline=None)
@given(_schedules())
def test_deadline_is_the_schedules(case):
    """The compiled ``deadline`` of a ``Schedule`` is ``Schedule.deadline``'s value, whether
    computed in C (float speed or rate, numbers within 2**53) or asked of the schedule (an int
    speed or rate, numbers beyond), including the errors the schedule raises."""
    from replay.play.scheduler import Schedule

    t0, span, requests, speed, rate, start, t, seq, it = case
    sched = Schedule(t0, span, requests, speed=speed, rate=rate, start=start)
    try:
        want = sched.deadline(t, seq, it)
    except OverflowError as e:
        with pytest.raises(type(e)):
            compiled.deadline(sched, t, seq, it)
        return
    assert compiled.deadline(sched, t, seq, it) == want == pure.deadline(sched, t, seq, it)


@needs_compiled
def test_deadline_of_recorded_times_is_computed_in_c(monkeypatch):
    """The deadlines of a run (recorded times of the Unix epoch, a monotonic start, float speed
    or rate, passes of ``--loop``) are computed in C, without asking the schedule, to the
    schedule's own value; an int speed is asked."""
    from replay.play.scheduler import Schedule

    asked = []
    own = Schedule.deadline
    monkeypatch.setattr(Schedule, "deadline",
                        lambda self, *a: asked.append(a) or own(self, *a))
    rng = random.Random(7)
    for _ in range(3000):
        t0 = EPOCH + rng.randint(-10**12, 10**12)
        start = rng.choice([10**9, 10**12 + 7, 1 << 60])
        if rng.random() < 0.3:
            s = Schedule(t0, 10**12, 10**5, rate=rng.choice([500.0, 2000.0, 1234.5]), start=start)
        else:
            s = Schedule(t0, 10**12, 10**6, speed=rng.choice([1.0, 10.0, 0.5, 1 / 3, 1.1]),
                         start=start)
        t = t0 + rng.randint(0, 10**13)
        seq, it = rng.randint(0, 10**6), rng.choice([0, 0, 1, 5, 9435])
        assert compiled.deadline(s, t, seq, it) == own(s, t, seq, it)
    assert asked == []
    s = Schedule(EPOCH, 10**9, 10, speed=2, start=5)
    assert compiled.deadline(s, EPOCH + 10, 0, 0) == own(s, EPOCH + 10, 0, 0) and len(asked) == 1


def test_pump_core_timed_sends_at_the_deadline():
    """Each twin: an answer that comes before the next request's deadline holds it for
    ``dues``; sent when it comes, late by what the clock says, not held by the answer; an
    answer that comes after it sends it at once, counted as held by that answer."""
    for core in CORES:
        log: list = []
        player = _Player(log, None)
        player.schedule = _Schedule(log, 1_000, 100)
        c = _connection(core, player, log)
        dues = _Dues(log)
        reqs = [_request(i, "GET", False) for i in range(3)]       # due 1000, 1100, 1200
        c.pump = (_Feed(reqs), 0, 7, dues)
        player.clock.t = 990
        assert c.pump_next() and c.due is reqs[0] and dues.entries[0][0] == 1_000
        assert c.pump_next() and len(dues.entries) == 1           # held already: nothing more
        player.clock.t = 1_003
        dues.fire(random.Random(5))
        sent = [e for e in log if e[0] == "on_sent"]
        assert sent == [("on_sent", (len(reqs[0].data), 1_017 - 1_000, False, 1_017))]
        c.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")   # before 1100
        player.loop.run()
        assert c.due is reqs[1] and dues.entries[0][0] == 1_100
        dues.entries.clear()          # (lost: the next answer comes after 1200)
        c.due = None
        c.pending.clear()
        player.clock.t = 1_300
        assert c.pump_next()
        sent = [e for e in log if e[0] == "on_sent"]
        assert sent[-1] == ("on_sent", (len(reqs[1].data), 1_314 - 1_100, True, 1_314)), core
        # a pipelined request that came late, answers outstanding: late, but held by none
        piped = _request(3, "GET", True)           # due 1300
        c.pump[0].items.append(piped)
        assert c.pending and c.pump_next()
        sent = [e for e in log if e[0] == "on_sent"]
        assert sent[-1] == ("on_sent", (len(piped.data), 1_342 - 1_300, False, 1_342)), core


@needs_compiled
def test_pump_core_counts_answers():
    """The compiled core counted into the tally, not through the methods (which would give the
    same report): before the fold the report itself holds no request tried or sent, no byte
    received, and only the answers whose recorded status was unknown (those go through
    ``Player.answered``)."""
    tallied = []

    def look(r):
        assert r.attempted == r.sent == r.bytes_received == 0 and r.answered == r.unrecorded
        tallied.append((r.tally.attempted, r.tally.answered, r.answered, r.tally.bytes_received))

    reports = [_run(compiled, seed, counting=True, before_fold=look)[-1][1] for seed in range(40)]
    assert sum(t[0] for t in tallied) == sum(r["attempted"] for r in reports) > 0
    assert sum(t[1] + t[2] for t in tallied) == sum(r["answered"] for r in reports)
    assert sum(t[1] for t in tallied) > 0
    assert sum(t[3] for t in tallied) == sum(r["bytes"]["received"] for r in reports) > 0
    assert sum(r["answered"] for r in reports) > 50
    compared = [r["status_comparison"] for r in reports]
    assert sum(c["same"] for c in compared) > 0 and sum(c["different"] for c in compared) > 0


@needs_compiled
@pytest.mark.parametrize("recorded", [200, None])
def test_attempt_alike(recorded):
    req = _request(3, "GET", False)
    req.recorded_status = recorded
    for core in (pure, compiled):
        a = core.Attempt(req, 2, None, 9)
        assert (a.req, a.iteration, a.deadline, a.sent_ns, a.conn_id, a.unknown) == \
            (req, 2, None, 0, 9, recorded is None)
        a.sent_ns = 5
        a.unknown = False
        a.deadline = 12
        assert (a.sent_ns, a.unknown, a.deadline) == (5, False, 12)


@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_tally_folds_into_any_report_and_on_its_own(bounded, timed):
    """A report of fixed-size histograms (a long or looping run) takes the tally's latencies as
    an exact one does, and a tally never read folds itself every 65,536 answers (timed: and
    every 65,536 sends, with their lateness)."""
    from replay.play.report import Report
    from replay.play.scheduler import Schedule

    if compiled is None:
        pytest.skip("the compiled core counts into the tally")
    r = Report(bounded=bounded)
    r.tally = compiled.Tally(r)
    n = 70_000
    player = _CountingPlayer([], None, random.Random(1))
    player.report = r
    player.fed = 10**9

    class Conn(compiled.PumpCore):
        pass

    c = Conn()
    c.init_core(player)
    c.transport = _Transport([])
    c.framer = compiled.ResponseFramer(("127.0.0.1", 40000), ("127.0.0.1", 80))
    reqs = [_request(3, "GET", False) for _ in range(n)]
    for q in reqs:
        q.recorded_status = 200
    dues = None
    if timed:     # every deadline long past: each request sent as its answer lets it go
        player.schedule = Schedule(0, 1, 2, speed=1e9, start=0)
        dues = object()
    c.pump = (_Feed(reqs), 0, 7, dues)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert c.pump_next()
    for _ in range(n - 1):
        c.data_received(answer)
        player.loop.run()
    # folded once on its own, the rest still in the tally (timed: at the 65,536th send, which
    # the 65,535th answer let go)
    assert r.answered == (65_535 if timed else 65_536)
    if timed:
        assert r.sent == len(r.lateness) == 65_536
    c.data_received(answer)
    d = r.to_dict()
    assert d["answered"] == d["attempted"] == n and d["statuses"] == {"200": n}
    assert len(r.latency) == n and d["latency_ms"]["max"] is not None
    if timed:
        assert len(r.lateness) == n and r.held_by_response == n and len(r.lateness_free) == 0
        assert len(r.recent_lateness) == 5000 and d["lateness_ms"]["max"] is not None
