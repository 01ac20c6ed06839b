"""``replay play --workers N``: one replay in N processes, for a target faster than one process
can drive (``--speed max``, or a timed replay faster than one process keeps to time).

Rules:
- the parent deals the log's recorded connections out once (``stream.shard_assignment``: from
  the log's header, as many connections to each worker and about as many requests); a
  connection the header does not list goes by its id modulo N (``stream.Shard``), so each is
  replayed by one worker, its requests in order on that worker's connections;
- a timed replay (``--speed``, not ``--rate``, whose order is one across every connection):
  the workers agree on one start and one t0 once they are all ready (``StartBarrier``), so each
  request is due when a lone replay would have it due, whichever worker sends it;
- each worker is a fork of the command once its options, target and plan's header are ready; it
  reads the log (in its own reading process) and keeps only its share *before* the rules, so
  the filters, rewrites and middleware see each message once in all: their counts add up;
- ``--limit`` is shared out in proportion to the requests of each worker's share (largest
  remainders, so the shares add up to it exactly); a limit of the rules (``filter --limit``) the
  same way; ``--connections`` in proportion to the recorded connections of each share, at least
  one each (a worker with fewer replay connections than recorded connections it keeps busy at
  once would close and reopen them all the time), never more than asked in all: fewer
  connections than workers is refused; a log with fewer recorded connections than N workers
  runs that many;
- signals: the workers are in a process group of their own and start with SIGINT and SIGTERM
  blocked; their run unblocks them from inside its running loop, so one that came early is
  taken then. The parent forwards SIGINT and SIGTERM: it sets a shared level (1 for the first,
  2 for the second), then sends each worker a SIGINT, and the worker does what the level says
  (signals merge or double on their way; the level does not): 1 stops it as Ctrl-C stops a
  lone replay, 2 makes it give up what is in flight and report at once. The third stops the
  parent without a report (the workers die with it). A signal sent to a worker itself (a
  process manager's SIGTERM to the whole cgroup) stops it as the first one does;
- the parent waits on every worker at once: a report, an error or a death is seen when it
  happens; a worker that fails, or dies without a report, stops the others (level 1; 2 after
  ``--timeout`` + ``GRACE_S``, then killed), and its error is the command's;
- the report is ``report.merge_reports`` of the workers' reports (counts and histograms added
  exactly, requests/s of the whole window), with the description of the first that ran (input,
  target, speed), the plan's counts added up and ``workers``;
- the workers' status lines are off (``-q`` or not): the command says once that it started them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np

from replay.errors import ReplayError, UsageError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a timed replay's workers wait at most this long for each other (each is ready within
# sender.PREFILL_S of its start, unless it hangs); then those there start together without it
BARRIER_WAIT_S = 30.0


class StartBarrier:
    """Where a timed replay's workers agree on their start and their ``t0``: each arrives once
    ready (its first second of schedule read and planned) with the recorded time of the first
    request it kept; the last to arrive sets ``t0`` (the least of them: the first request any
    worker kept, as a lone replay's) and the start (``CLOCK_MONOTONIC``, one clock for every
    process). After ``BARRIER_WAIT_S`` those there agree without the missing ones (a late one
    takes what they agreed, and its lateness shows it); a worker being stopped leaves at once."""

    NONE = (1 << 63) - 1

    def __init__(self, ctx, parties: int):
        self.parties = parties
        self.arrived = ctx.Value("i", 0)
        self.firsts = ctx.Array("q", max(1, parties), lock=False)
        self.start = ctx.Value("q", 0, lock=False)
        self.t0 = ctx.Value("q", self.NONE, lock=False)

    def _publish(self, count: int, delay_ns: int) -> None:
        """Under the lock: t0 and the start, from the ``count`` workers arrived (once)."""
        import time

        if self.start.value:
            return
        self.t0.value = min(self.firsts[:count], default=self.NONE)
        self.start.value = time.monotonic_ns() + delay_ns       # published last

    async def wait(self, first, delay_ns: int, stopping) -> tuple[int, int | None]:
        """``(start, t0)``: the agreed start (monotonic ns) and t0 (None: none agreed)."""
        import asyncio
        import time

        lock = self.arrived.get_lock()
        with lock:
            k = self.arrived.value
            self.arrived.value = k + 1
            if k < self.parties:
                self.firsts[k] = self.NONE if first is None else first
                if k + 1 == self.parties:
                    self._publish(self.parties, delay_ns)
        end = time.monotonic() + BARRIER_WAIT_S
        while not self.start.value and not stopping():
            if time.monotonic() >= end:
                with lock:
                    self._publish(min(self.arrived.value, self.parties), delay_ns)
                break
            await asyncio.sleep(0.001)
        if not self.start.value:                  # stopped before the others came
            return time.monotonic_ns() + delay_ns, first
        with lock:                                # both as published
            start, t0 = self.start.value, self.t0.value
        return start, None if t0 == self.NONE else t0


def apportion(total: int, weights, minimum: int = 0) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders, in exact integers: the
    parts add up to ``total``), each part at least ``minimum`` (taken first). Equal weights when
    they are all zero."""
    w = [max(0, int(x)) for x in weights]
    k = len(w)
    if k == 0:
        return []
    rest = total - minimum * k
    if rest <= 0:
        return [minimum] * k
    if sum(w) == 0:
        w = [1] * k
    whole = sum(w)
    parts = [rest * x // whole for x in w]
    left = rest - sum(parts)
    by_remainder = sorted(range(k), key=lambda j: (-(rest * w[j] % whole), j))
    for j in by_remainder[:left]:
        parts[j] += 1
    return [minimum + p for p in parts]


class Share:
    """One worker's share: its recorded connections and requests, its replay connections and
    its part of the limits."""

    def __init__(self, i: int, conns: int, requests: int):
        self.i = i
        self.recorded_connections = conns
        self.requests = requests
        self.connections = 0
        self.limit = 0
        self.rules_limit: int | None = None


def plan_shares(n: int, plan, opts) -> tuple[list[Share], np.ndarray]:
    """The shares of ``n`` workers (fewer when the log has fewer recorded connections) and the
    assignment of the header's connections (``shard_assignment``); UsageError when ``opts``
    cannot be shared."""
    from replay.play.stream import shard_assignment

    h = plan.header
    m = len(h.conns)
    asked = n
    n = max(1, min(n, m)) if m else n
    assign = shard_assignment(h.conns, h.last_index, n)
    counts = np.bincount(assign, minlength=n)
    loads = np.zeros(n, dtype=np.int64)
    np.add.at(loads, assign, np.maximum(h.last_index, 0) + 1)
    shares = [Share(i, int(counts[i]), int(loads[i])) for i in range(n)]
    cap = opts.connections
    if cap < n:
        raise UsageError(f"--workers {asked}: needs at least {n} connections (--connections "
                         f"{cap})")
    if cap >= m:
        conns = [max(1, s.recorded_connections) for s in shares]
    else:
        conns = apportion(cap, [s.recorded_connections for s in shares], minimum=1)
    for s, c in zip(shares, conns):
        s.connections = c
    if opts.limit:
        for s, lim in zip(shares, apportion(opts.limit, [s.requests for s in shares])):
            s.limit = lim
    rules = plan.rules
    limit = getattr(getattr(rules, "filters", None), "limit", None)
    if limit is not None:
        for s, lim in zip(shares, apportion(limit, [s.requests for s in shares])):
            s.rules_limit = lim
    return shares, assign


class MergedReport:
    """What ``play``'s command reads of a ``Report``, for the report of several workers."""

    def __init__(self, d: dict):
        self.d = d
        self.attempted = d["attempted"]
        self.error_total = d["error_total"]
        self.interrupted = d["interrupted"]

    def to_dict(self, histograms: bool = False) -> dict:
        if histograms:
            return dict(self.d)
        return {k: v for k, v in self.d.items() if k != "histograms"}

    def summary_text(self) -> str:
        from replay.play.report import summary_text

        return summary_text(self.d)


def _worker(share: Share, n: int, plan, assign, opts, make_session, level, tx) -> None:
    """In the forked worker: replay ``share``; send back the report or the error."""
    from dataclasses import replace

    from replay.play.stream import Shard, _die_with_parent

    _die_with_parent()
    os.setpgid(0, 0)                   # Ctrl-C at a terminal reaches the parent only, which forwards
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may still write to the tty
    for s in _SIGNALS:                 # still blocked: taken by the session's run
        signal.signal(s, signal.default_int_handler)
    session = None
    try:
        try:
            plan.shard = Shard(share.i, n, plan.header.conns, assign)
            if share.rules_limit is not None:
                plan.rules.filters.limit = share.rules_limit
            mine = replace(opts, connections=share.connections, limit=share.limit)
            session = make_session(mine)
            session.stop_level = lambda: max(1, level.value)
            if opts.limit and not mine.limit:
                report = session.report         # no share of --limit: nothing to send
            else:
                report = session.run()          # takes the blocked signals once it can
        except KeyboardInterrupt:               # told to give up: report what was done
            if session is None:
                raise
            report = session.report             # described by the run as it gave up
            report.interrupted = True
        rules = plan.rules
        tx.send(("report", report.to_dict(histograms=True),
                 dict(rules.stats) if rules is not None else None,
                 plan.refused_rewrites, plan.read_warnings))
    except ReplayError as e:
        tx.send(("error", e))
    except KeyboardInterrupt:
        tx.send(("error", ReplayError("interrupted before it started")))
    except BaseException as e:  # noqa: BLE001  (a bug: said by the command, not lost)
        import traceback

        tx.send(("crash", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        tx.close()


def run_workers(n: int, plan, opts, make_session, started=None, timed: bool = False
                ) -> MergedReport:
    """Run the replay in ``n`` forked workers (see the module's rules); their merged report.
    ``started(k)`` is told how many run, before they start; ``timed``: they agree on their
    start (``StartBarrier``)."""
    from dataclasses import replace
    from multiprocessing.connection import wait

    shares, assign = plan_shares(n, plan, opts)
    n = len(shares)
    if started is not None:
        started(n)
    ctx = multiprocessing.get_context("fork")
    if timed:
        runs = sum(1 for s in shares if not opts.limit or s.limit)     # those that reach run()
        opts = replace(opts, start_barrier=StartBarrier(ctx, runs))
    procs: list = []
    pipes: list = []
    level = ctx.Value("i", 0, lock=False)      # 1: stop as Ctrl-C does; 2: give up at once
    signals = [0]

    def forward(signum, frame):
        signals[0] += 1
        if signals[0] > 2:
            raise KeyboardInterrupt
        _tell(procs, level, signals[0])

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)   # the workers inherit it
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    try:
        for s in _SIGNALS:
            signal.signal(s, forward)
        try:
            for share in shares:
                rx, tx = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, name=f"replay-worker-{share.i}",
                                args=(share, n, plan, assign, opts, make_session, level, tx))
                p.start()
                tx.close()
                try:
                    os.setpgid(p.pid, p.pid)    # as the worker does: whichever comes first
                except OSError:
                    pass
                procs.append(p)
                pipes.append(rx)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        got, first_failure = _collect(procs, pipes, wait, level, opts.timeout + GRACE_S)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    if first_failure is not None:            # the first to fail, not those stopped after it
        first = got[first_failure]
        if first[0] == "error":
            raise first[1]
        raise RuntimeError(f"a replay worker failed: {first[1]}\n{first[2]}")
    return _merged(got, plan)


GRACE_S = 5.0      # after a worker failed: the others' time to stop, beyond --timeout


def _tell(procs, level, to: int) -> None:
    """Ask the workers to stop (``to`` 1) or give up (2): the level first, then a SIGINT."""
    if level.value < to:
        level.value = to
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass


def _collect(procs, pipes, wait, level, grace: float) -> tuple[list, int | None]:
    """Each worker's message (report, error or crash), waiting on them all at once, and which
    worker failed first (None: none did); the first failure (or a worker's death without a
    word) stops the others; those still there ``grace`` seconds later are told to give up, and
    killed ``GRACE_S`` after that."""
    import time

    got: list = [None] * len(procs)
    pending = set(range(len(procs)))
    deadline = None
    first_failure = None
    while pending:
        watch = {}
        for i in pending:
            watch[pipes[i]] = i
            watch[procs[i].sentinel] = i
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(list(watch), timeout)
        if not ready:                      # past the deadline: give up, then be killed
            if level.value < 2:
                _tell([procs[i] for i in pending], level, 2)
            else:
                for i in pending:
                    procs[i].kill()
            deadline = time.monotonic() + GRACE_S
            continue
        for obj in ready:
            i = watch[obj]
            if i not in pending:
                continue
            rx, p = pipes[i], procs[i]
            msg = None
            if rx.poll():
                try:
                    msg = rx.recv()
                except EOFError:
                    msg = None
            elif obj is rx:
                continue
            if msg is None:
                p.join()
                code = p.exitcode
                how = f"was killed by signal {-code}" if code is not None and code < 0 \
                    else f"exited with status {code}"
                msg = ("error", ReplayError(f"replay worker {i} {how} without a report"))
            got[i] = msg
            pending.discard(i)
            if msg[0] != "report" and first_failure is None:
                first_failure = i
                deadline = time.monotonic() + grace
                _tell([procs[j] for j in pending], level, 1)
    return got, first_failure


_PLAN_SUMMED = ("pipelined", "reordered", "status_not_recorded")


def _merged(got: list, plan) -> MergedReport:
    """The workers' reports as one (see the module's rules); the plan's rule counts added up."""
    from replay.play.report import merge_reports

    reports = [m[1] for m in got]
    n = len(reports)
    ran = [r for r in reports if r.get("tool")] or reports
    d = dict(ran[0])                              # the description: input, target, speed...
    d.pop("answer_window_unix", None)
    if "schedule" not in d:                       # one that gave up before its schedule began
        d.update({"schedule": r["schedule"] for r in reports if "schedule" in r})
    d.update(merge_reports(reports, [f"worker {i}" for i in range(n)]))
    starts = [r["started_unix"] for r in reports if r.get("started_unix")]
    if starts:
        d["started_unix"] = min(starts)
    d["workers"] = n
    d["connections_cap"] = sum(r.get("connections_cap", 0) for r in reports)
    plans = [r.get("plan") or {} for r in reports]
    d["plan"] = dict(ran[0].get("plan") or {})
    for key in _PLAN_SUMMED:
        if any(key in p for p in plans):
            d["plan"][key] = sum(p.get(key, 0) for p in plans)
    if any(p.get("streamed") for p in plans):
        d["plan"]["streamed"] = True
    d["plan"]["skipped"] = _summed([p.get("skipped") or {} for p in plans])
    if plan.rules is not None:
        stats = [m[2] for m in got if m[2]]
        if stats:
            plan.rules.stats = _summed(stats)
    plan.refused_rewrites = sum(m[3] for m in got)
    plan.read_warnings = list(dict.fromkeys(w for m in got for w in m[4]))   # each read the log
    return MergedReport(d)


def _summed(dicts: list) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = _summed([out.get(k, {}), v])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out.setdefault(k, v)
    return out
