"""The stream feeder's common step (``core.feed_ready``): both cores alike, and alike with the
feeder's own steps (``_Feed.put``, the lookahead, the output log's recorded messages) for the
requests it hands over; the first it may not hand over stays where it was.

Each scenario is a queue of what a stream's reader sends (planned requests of a few recorded
connections and passes, some with their recorded status unknown, some pipelined, and the
reader's marks between them), some connections already fed (some of them sending their own
requests, ``pumping``), a clock that ticks with every reading, and a slice's end, a run's end
and a horizon that stop the step at different places."""

from __future__ import annotations

import copy
import random
from collections import OrderedDict, deque

import pytest

from replay import _fastparse_py as pure
from replay.events import PlannedRequest
from replay.play.scheduler import Schedule
from replay.play.sender import _Feed

try:
    from replay import _fastparse as compiled
except ImportError:         # pragma: no cover - the pure run
    compiled = None

CORES = [pure] + ([compiled] if compiled is not None else [])


class _Clock:
    def __init__(self, t, step):
        self.t, self.step = t, step

    def now(self):
        self.t += self.step
        return self.t


class _Waiter:
    def __init__(self, done):
        self.is_done, self.result = done, "unset"

    def done(self):
        return self.is_done

    def set_result(self, v):
        assert not self.is_done
        self.is_done, self.result = True, v


class _Player:
    def __init__(self, rng):
        self.clock = _Clock(rng.choice([0, 10_000, 90_000]), rng.choice([1, 7, 300]))
        self.end_ns = rng.choice([None, None, 60_000, 200_000])
        self.fed = rng.randint(0, 5)


def _scenario(seed):
    rng = random.Random(seed)
    player = _Player(rng)
    base = rng.choice([0, 1_795_471_418_243_554_000])     # recorded times: from the epoch
    if rng.random() < 0.3:
        sched = Schedule(base, 10**6, 1000, rate=rng.choice([1e5, 3e4]),
                         start=rng.choice([0, 5_000]))
    else:
        sched = Schedule(base, 10**6, 1000, speed=rng.choice([1.0, 10.0, 0.5]),
                         start=rng.choice([0, 5_000]))
    queued = deque()
    t = base
    for i in range(rng.randint(0, 40)):
        if rng.random() < 0.08:
            queued.append((rng.randint(0, 1), ("mark", i)))
            continue
        t += rng.choice([0, 100, 2_000, 9_000])
        req = PlannedRequest(conn=rng.randint(0, 5), index=i, t=t, data=b"GET / HTTP/1.1\r\n\r\n",
                             method="GET", uri=f"/{i}", head_length=18, seq=i,
                             recorded_status=None if rng.random() < 0.05 else 200,
                             pipelined=rng.random() < 0.2)
        queued.append((rng.choice([0, 0, 0, 1]), (req, f"request {i}", f"response {i}")))
    feeds = OrderedDict()
    for conn in range(6):
        for it in (0, 1):
            if rng.random() < 0.7:
                f = _Feed(player)
                f.items.extend(f"old {k}" for k in range(rng.randint(0, 2)))
                f.waiter = rng.choice([None, _Waiter(False), _Waiter(True)])
                f.pumping = "its connection" if rng.random() < 0.2 else None
                feeds[(conn, it)] = f
    keys = list(feeds)
    rng.shuffle(keys)
    feeds = OrderedDict((k, feeds[k]) for k in keys)
    due = rng.choice([None, [], [1, 2]])
    recorded = rng.choice([None, []])
    slice_end = rng.choice([10**18, player.clock.t + 60, player.clock.t + 3_000])
    ahead = rng.choice([0, 20_000, 10**9])
    return queued, feeds, player, sched, due, recorded, slice_end, ahead


def _run(core, seed):
    queued, feeds, player, sched, due, recorded, slice_end, ahead = copy.deepcopy(_scenario(seed))
    on_recorded = None if recorded is None else (lambda r, f: recorded.append((r, f)))
    n = core.feed_ready(queued, feeds, player, sched, due, on_recorded, slice_end, ahead)
    return (n, list(queued), [(k, list(f.items), f.waiter and (f.waiter.is_done, f.waiter.result))
                             for k, f in feeds.items()],
            player.fed, player.clock.t, due, recorded)


@pytest.mark.skipif(compiled is None, reason="replay._fastparse is not built")
@pytest.mark.parametrize("seed", range(400))
def test_feed_ready_alike(seed):
    assert _run(compiled, seed) == _run(pure, seed)


@pytest.mark.parametrize("core", CORES, ids=lambda c: c.__name__.rsplit(".", 1)[1])
@pytest.mark.parametrize("seed", range(150))
def test_feed_ready_is_the_feeders_own_steps(core, seed):
    """What it hands over is what the feeder's steps for those requests would have done, one
    by one (``_Feed.put``, the lookahead's push, the recorded messages), and it stops at the
    first request those steps would have made wait or decide."""
    queued, feeds, player, sched, due, recorded, slice_end, ahead = copy.deepcopy(_scenario(seed))
    want = copy.deepcopy((queued, feeds, player, due, recorded))
    got_n = core.feed_ready(queued, feeds, player, sched, due,
                            None if recorded is None else (lambda r, f: recorded.append((r, f))),
                            slice_end, ahead)
    w_queued, w_feeds, w_player, w_due, w_recorded = want
    clock = copy.deepcopy(w_player.clock)
    n = 0
    while w_queued:
        t = clock.now()
        it, item = w_queued[0]
        req = item[0]
        if t >= slice_end or not isinstance(req, PlannedRequest) or req.recorded_status is None:
            break
        d = sched.deadline(req.t, req.seq, it)
        f = w_feeds.get((req.conn, it))
        if (w_player.end_ns is not None and d >= w_player.end_ns) or d - ahead > t or f is None \
                or (f.pumping is not None and req.pipelined):
            break
        w_queued.popleft()
        w_feeds.move_to_end((req.conn, it))
        f.put(req)                   # (its pipelined request to a pumping connection: not here)
        if w_due is not None:
            w_due.append(d)
        if w_recorded is not None and it == 0:
            w_recorded.append((item[1], item[2]))
        n += 1
    assert got_n == n
    assert list(queued) == list(w_queued) and due == w_due and recorded == w_recorded
    assert player.fed == w_player.fed
    assert [(k, list(f.items), f.waiter and f.waiter.is_done) for k, f in feeds.items()] == \
        [(k, list(f.items), f.waiter and f.waiter.is_done) for k, f in w_feeds.items()]
