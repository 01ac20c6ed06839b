"""When each request is due, and how to wait for that moment precisely. Sans-IO: the clock is injected.

Rules:
- every deadline is absolute: ``start + (t - t0) / speed`` for a recorded time ``t`` (``--speed``),
  or ``start + seq / rate`` for the request's position in recorded order (``--rate``); never "the
  gap since the previous request", so a late request does not delay the ones after it;
- ``--loop``: iteration ``k`` is shifted by ``k * period``, the period being the recorded span plus
  one mean gap between requests (so the last request of one pass and the first of the next do not
  coincide);
- ``--speed max`` has no deadlines (``deadline`` returns None): requests go as fast as the
  connection's order and the target allow;
- waiting is two-phase: a coarse ``clock.sleep`` until ``spin_ns`` before the deadline, then a
  short spin on ``clock.now()``. A sleeping thread that wakes is scheduled promptly even on a busy
  2-core machine, while a thread spinning for long is preempted (``../shared/REFERENCE.md``), so
  the spin is kept short;
- lateness (actual send - deadline) is measured by the caller for every request and returned by
  ``wait_until``; nothing here hides it.
"""

from __future__ import annotations

import bisect
from typing import Protocol

# How long before a deadline the coarse sleep ends and the spin starts. With a sleep that wakes
# within ~100 µs (see clock.PreciseSelector) 250 µs gave |lateness| p99 < 2 µs even with both
# cores busy; the spin blocks the event loop at most this long.
SPIN_NS = 250_000
NS = 1_000_000_000


class Clock(Protocol):
    def now(self) -> int:
        """Monotonic time, ns."""

    async def sleep(self, seconds: float) -> None:
        """Sleep about ``seconds`` (may overshoot; must not return early by much)."""


class Schedule:
    """Deadlines of planned requests for one run.

    ``speed``: a factor (> 0) or None for ``max``; ``rate``: requests per second (overrides
    ``speed``); ``t0``/``span_ns``/``requests``: from the plan.
    """

    def __init__(self, t0: int, span_ns: int, requests: int, speed: float | None = 1.0,
                 rate: float | None = None, start: int = 0):
        if speed is not None and speed <= 0:
            raise ValueError("speed must be > 0")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0")
        self.t0 = t0
        self.span_ns = span_ns
        self.requests = requests
        self.speed = speed
        self.rate = rate
        self.start = start
        gap = span_ns / (requests - 1) if requests > 1 else 0
        if rate is not None:
            self.period = requests / rate * NS          # wall ns per pass
        elif speed is not None:
            self.period = (span_ns + (gap if gap > 0 else NS)) / speed
        else:
            self.period = 0.0

    @property
    def timed(self) -> bool:
        return self.rate is not None or self.speed is not None

    def offset(self, t: int, seq: int, iteration: int = 0) -> int | None:
        """Wall ns from ``start`` at which a request is due (None: as soon as possible)."""
        if self.rate is not None:
            return int((seq + iteration * self.requests) * NS / self.rate)
        if self.speed is None:
            return None
        return int((t - self.t0) / self.speed + iteration * self.period)

    def deadline(self, t: int, seq: int, iteration: int = 0) -> int | None:
        off = self.offset(t, seq, iteration)
        return None if off is None else self.start + off

    def duration_ns(self, iterations: int = 1) -> int:
        """Expected wall time from the first deadline to the last (0 for ``max``)."""
        if self.rate is not None:
            return int(((self.requests * iterations) - 1) * NS / self.rate) if self.requests else 0
        if self.speed is None:
            return 0
        return int(self.span_ns / self.speed + (iterations - 1) * self.period)


class Lookahead:
    """The next deadline after a given time, from the sorted recorded times of one pass.

    Used to do background work (the progress line, the output log) only when no request is due
    for a while, so that it does not make requests late.
    """

    def __init__(self, schedule: Schedule, times_sorted: list):
        self.schedule = schedule
        # the i-th request in recorded order has seq i (what --rate uses)
        self.offsets = sorted(schedule.offset(t, i) or 0 for i, t in enumerate(times_sorted))

    def next_after(self, now: int) -> int | None:
        s = self.schedule
        if not s.timed or not self.offsets:
            return None
        rel = now - s.start
        if s.period > 0 and rel > 0:
            k = int(rel // s.period)
        else:
            k = 0
        for it in (k, k + 1):
            base = int(it * s.period)
            i = bisect.bisect_right(self.offsets, rel - base)
            if i < len(self.offsets):
                return s.start + base + self.offsets[i]
        return None


class Pacer:
    """Waits until absolute deadlines with ``clock``: coarse sleep, then a short spin."""

    def __init__(self, clock: Clock, spin_ns: int = SPIN_NS):
        self.clock = clock
        self.spin_ns = spin_ns

    async def sleep_until(self, deadline: int) -> None:
        """Coarse wait (no spin): for things that need not be exact, like opening a connection."""
        rem = deadline - self.clock.now()
        while rem > 0:
            await self.clock.sleep(rem / NS)
            rem = deadline - self.clock.now()

    async def wait_until(self, deadline: int) -> int:
        """Return at ``deadline`` or just after it; the lateness, ns (>= 0 unless the clock jumps)."""
        now = self.clock.now
        spin = self.spin_ns
        rem = deadline - now()
        while rem > spin:
            await self.clock.sleep((rem - spin) / NS)
            rem = deadline - now()
        t = now()
        while t < deadline:
            t = now()
        return t - deadline


class StreamLookahead:
    """``Lookahead`` for a streamed plan: the deadlines handed to connections, in the order they
    were (recorded time order), forgotten once past. Holds what the feeder is ahead of the clock.

    ``next_after`` finds the first deadline after ``now`` by bisection from the last one found,
    and drops those before it in one step once they are half of what is held: it runs between
    requests (the status line's, the output log's look for a quiet moment), and a look that
    stepped over every deadline gone by since the last one (5,000 a quarter-second at 20,000
    requests/s) held the sender for a millisecond each time. A deadline handed over out of order
    (a request the log held past the planner's window: ``reordered``) may be passed over; what
    this decides (when to look for a quiet moment) does not need it."""

    COMPACT_AT = 4096           # past deadlines kept before they are dropped (and half held)

    def __init__(self):
        self.due: list = []
        self.head = 0           # due[:head] are past

    def push(self, deadline: int) -> None:
        self.due.append(deadline)

    def next_after(self, now: int) -> int | None:
        due = self.due
        i = bisect.bisect_right(due, now, self.head)
        if i >= len(due):
            due.clear()
            self.head = 0
            return None
        if i >= self.COMPACT_AT and i >= len(due) >> 1:
            del due[:i]
            i = 0
        self.head = i
        return due[i]
