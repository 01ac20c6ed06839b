"""The scheduler with an injected clock: absolute deadlines, lateness that never accumulates."""

from __future__ import annotations

import asyncio
import time

import pytest

from replay.play.scheduler import NS, SPIN_NS, Lookahead, Pacer, Schedule, StreamLookahead

MS = 1_000_000


class FakeClock:
    """Time moves only when asked: each ``now()`` costs ``tick`` ns (so a spin ends), each
    ``sleep`` overshoots by ``overshoot`` ns (a busy machine wakes sleepers late)."""

    def __init__(self, t=10**12, tick=1_000, overshoot=0):
        self.t = t
        self.tick = tick
        self.overshoot = overshoot
        self.sleeps = []

    def now(self):
        self.t += self.tick
        return self.t

    async def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.t += int(seconds * NS) + self.overshoot


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_deadlines_are_absolute_at_every_speed():
    t0 = 5 * NS
    for speed, expect in ((1.0, 300 * MS), (10.0, 30 * MS), (0.5, 600 * MS)):
        s = Schedule(t0, 1 * NS, 11, speed=speed, start=1000)
        assert s.deadline(t0, 0) == 1000
        assert s.deadline(t0 + 300 * MS, 3) == 1000 + expect
        # a later pass of --loop is shifted by whole periods of the same schedule
        assert s.deadline(t0 + 300 * MS, 3, 2) == 1000 + expect + int(2 * s.period)
    assert Schedule(t0, NS, 11, speed=1.0).period == 1.1 * NS   # span + one mean gap


def test_rate_ignores_recorded_gaps_and_max_has_no_deadlines():
    s = Schedule(0, 10 * NS, 5, rate=100.0, start=7)
    assert [s.deadline(999 * i, i) for i in range(5)] == [7 + i * 10 * MS for i in range(5)]
    assert s.deadline(0, 0, 1) == 7 + 50 * MS                # next pass continues the count
    assert s.duration_ns() == 40 * MS
    m = Schedule(0, 10 * NS, 5, speed=None)
    assert m.deadline(123, 0) is None and not m.timed and m.duration_ns() == 0
    with pytest.raises(ValueError):
        Schedule(0, 1, 2, speed=0)


def test_lateness_does_not_accumulate():
    """Every sleep wakes 2 ms late (beyond the spin window): each request is about 2 ms late,
    the thousandth no later than the first. Relative sleeps would end ~2 s late."""
    clock = FakeClock(overshoot=2 * MS)
    pacer = Pacer(clock)
    s = Schedule(0, 999 * 10 * MS, 1000, speed=1.0, start=clock.now() + 10 * MS)

    async def go():
        out = []
        for i in range(1000):
            out.append(await pacer.wait_until(s.deadline(i * 10 * MS, i)))
        return out

    late = run(go())
    assert max(late) < 2 * MS - SPIN_NS + 50_000
    assert late[-1] <= late[0] + 10_000
    assert clock.t - s.start < 999 * 10 * MS + 3 * MS


def test_short_overshoot_is_absorbed_by_the_spin():
    """Sleeps that wake up to 200 µs late (less than the spin window) give ~zero lateness."""
    clock = FakeClock(overshoot=200_000)
    pacer = Pacer(clock)

    async def go():
        out = []
        for i in range(200):
            out.append(await pacer.wait_until(clock.t + 5 * MS + i))
        return out

    late = run(go())
    assert max(late) <= clock.tick
    # the coarse sleep stops SPIN_NS before the deadline: it is the spin that ends the wait
    assert all(abs(x * NS - (5 * MS - SPIN_NS)) < 10_000 for x in clock.sleeps[:10])


def test_a_past_deadline_returns_at_once_with_its_lateness():
    clock = FakeClock()
    late = run(Pacer(clock).wait_until(clock.t - 3 * MS))
    assert 3 * MS <= late < 3 * MS + 10_000
    assert clock.sleeps == []


def test_lookahead_finds_the_next_deadline_across_passes():
    s = Schedule(0, 100 * MS, 3, speed=1.0, start=1_000 * MS)
    look = Lookahead(s, [0, 40 * MS, 100 * MS])
    assert look.next_after(1_000 * MS) == 1_040 * MS
    assert look.next_after(1_050 * MS) == 1_100 * MS
    # after the last request of pass 0 comes the first of pass 1
    assert look.next_after(1_100 * MS) == 1_000 * MS + int(s.period)
    assert Lookahead(Schedule(0, 1, 2, speed=None), [0, 1]).next_after(5) is None


def test_stream_lookahead_the_next_deadline_handed_over_and_what_it_holds():
    """The first deadline after ``now`` of those the feeder handed over, whichever were asked
    before; past ones are forgotten: what it holds stays within a few thousand past the clock,
    in a run of any length, looked at seldom or often."""
    import random

    look = StreamLookahead()
    assert look.next_after(0) is None
    rng = random.Random(3)
    pushed: list = []
    now = 0
    held = 0
    for step in range(2_000):
        for _ in range(rng.randint(0, 60)):
            pushed.append((pushed[-1] if pushed else 0) + rng.choice([0, 1, 50, 400]))
            look.push(pushed[-1])
        now += rng.choice([0, 10, 300, 9_000, 40_000])
        want = next((d for d in pushed if d > now), None)
        assert look.next_after(now) == want
        assert look.next_after(now) == want          # asked again: the same
        pushed = [d for d in pushed if d > now]
        held = max(held, len(look.due))
    assert held < 2 * StreamLookahead.COMPACT_AT + 200


# -- DueSends: the timed pump's requests, each at its deadline ------------------------------------

class _Core:
    """A connection holding requests for their deadlines, as ``PumpCore`` does (``due``)."""

    def __init__(self, name, sent, then=None):
        self.name, self.sent, self.then = name, sent, then
        self.due = None
        self.woken = 0

    def send_due(self, req, deadline):
        assert self.due is req
        self.due = None
        self.sent.append((req, deadline, time.monotonic_ns()))
        if self.then is not None:          # holds its next request, from inside the firing
            nxt, d = self.then
            self.then = None
            self.due = nxt
            self.dues.add(d, self, nxt)

    def _wake(self, value):
        self.woken += 1


def test_due_sends_in_deadline_order_never_early():
    """Each request at or after its deadline, in deadline order, also when a send holds the
    connection's next request (armed for it) while an earlier one of another connection waits;
    a request its connection no longer holds is never sent; ``wake_all`` hands what is held to
    the tasks."""
    from replay.play.clock import new_event_loop
    from replay.play.sender import DueSends

    loop = new_event_loop(precise=True)
    sent, errors = [], []
    dues = DueSends(loop, time.monotonic_ns, 250_000, errors.append)
    now = time.monotonic_ns()
    ms = 1_000_000
    a = _Core("a", sent, then=("a2", now + 600 * ms))
    b, c, e = _Core("b", sent), _Core("c", sent), _Core("e", sent)
    for core in (a, b, c, e):
        core.dues = dues
    for core, req, d in ((a, "a1", now + 20 * ms), (b, "b1", now + 60 * ms),
                         (c, "c1", now + 40 * ms), (e, "e1", now + 60_000 * ms)):
        core.due = req
        dues.add(d, core, req)
    c.due = None                          # c's task took its request over
    loop.run_until_complete(asyncio.sleep(0.8))
    assert [r for r, _, _ in sent] == ["a1", "b1", "a2"] and not errors
    assert all(t >= d for _, d, t in sent)
    assert sent[1][2] < now + 500 * ms    # b1 did not wait for a2's timer
    assert c.woken == 0 and e.woken == 0 and len(dues.heap) == 1 and dues.n == 5
    dues.wake_all()
    assert e.woken == 1 and not dues.heap and dues.handle is None
    dues.close()
    loop.close()


def test_due_sends_many_deadlines_and_a_failing_send():
    """Hundreds of requests on many connections, deadlines in random order and some equal:
    each sent once, at or after its deadline, in deadline order (equal ones in the order they
    were added); a send that raises is told to ``on_error`` and the others still go."""
    import random

    from replay.play.clock import new_event_loop
    from replay.play.sender import DueSends

    loop = new_event_loop(precise=True)
    sent, errors = [], []
    dues = DueSends(loop, time.monotonic_ns, 100_000, errors.append)

    class Bad(_Core):
        def send_due(self, req, deadline):
            self.due = None
            raise RuntimeError("a bug in a send")

    rnd = random.Random(7)
    now = time.monotonic_ns() + 20_000_000
    cores, order = [], []
    for i in range(400):
        core = (Bad if i == 17 else _Core)(f"c{i}", sent)
        core.dues = dues
        core.due = f"r{i}"
        d = now + rnd.randrange(0, 200) * 1_000_000 // 4       # many equal deadlines
        dues.add(d, core, core.due)
        cores.append(core)
        order.append((d, i))
    loop.run_until_complete(asyncio.sleep(0.3))
    want = [f"r{i}" for d, i in sorted(order) if i != 17]
    assert [r for r, _, _ in sent] == want
    assert all(t >= d for _, d, t in sent) and not dues.heap
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    dues.close()
    loop.close()
