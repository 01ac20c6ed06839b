"""One replay run: a plan and its schedule through the sender, with its report, output log and
live status, on an event loop chosen for the timing asked. The CLI parses flags, opens the output
files (``replay.outputs``) and hands over; ``PlaySession.run()`` returns the ``Report``.

The parts, each replaceable on its own:
- *what* is sent: a ``Plan`` (``plan.py``; from a file by ``source.RecordedSource``);
- *when*: a ``Schedule`` (``scheduler.py``): recorded times divided by ``--speed``, ``--rate``, or
  no deadlines (``--speed max``);
- *how*: the sender (``sender.Player``) with its ``sender.Options``; this module adds only the
  event loop (``LoopOptions``) and the process settings a run needs;
- *where the exchanges go*: an optional ``ExchangeLog`` (``-o``), fed by the sender's
  ``on_exchange``: each replayed request (``ts_first`` its due time, ``ts_last`` its send) with
  the answer or a ``failed`` record naming the error's kind, then, after the run, the recorded
  exchanges of what was replayed;
- *what the user sees*: an optional status line (``StatusLine``: ``start``, ``update(report,
  now_ns)``, ``stop``), updated about 4 times a second.

Rules:
- nothing may make a request late: the status line and the output log do their work in the
  loop's background task only when no request is due within ``SLACK_NS`` (the log: within
  ``WRITE_SLACK_NS``, looked up every 16 messages); past ``MAX_QUEUED`` waiting messages, the log
  is written even if it makes requests late, so memory stays bounded;
- a timed run uses ``clock.new_event_loop(precise=True)`` (microsecond timers); ``--speed max``
  uvloop when installed; ``LoopOptions.event_loop`` overrides both;
- the garbage collector is run and its heap frozen before the run, so a collection does not
  pause a send; the writer's thread gets the GIL back every 0.5 ms;
- SIGINT and SIGTERM stop the run as Ctrl-C does (``Report.interrupted``, what is in flight stays
  in flight, the output log and the report are still written whole); a second signal raises
  ``KeyboardInterrupt`` (the report is still described); the handlers that were there before
  are restored; a caller may block the two before the run: they are unblocked from inside the
  running loop, and blocked again as it ends;
- an exception that escaped the sender (a bug, not a fault of the target) is raised after the
  loop is closed, and the output log is then left unfinished (the CLI discards it);
- the report's metadata describes the run (``About`` + the plan, schedule and options), and after
  the run the schedule's start in Unix ns (``schedule.start_unix_ns``, to compare with a capture
  at the target); the output log's metadata holds the same description and, at its end, the
  report.

For ``replay shadow`` (live capture -> the same sender; "now" instead of the log's schedule) and
later a streaming source, the seams are: the plan (a source of planned requests per connection),
the schedule (what ``deadline`` returns), ``ExchangeLog`` without ``recorded`` (production
exchanges are written as they are captured), the status callback, and ``make_sender``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass

from replay.events import KIND_RESPONSE
from replay.play.report import Report
from replay.play.scheduler import Lookahead, Pacer, Schedule, StreamLookahead
from replay.play.sender import Options, Player, Target

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Background work (the progress line, the output log) runs only when no request is due this soon,
# so that it does not make requests late. Handing a message to the LogWriter costs ~1 µs, but
# every 512th cuts a block, ~1 ms of table encoding in this thread (zstd runs in its worker).
SLACK_NS = 3_000_000
WRITE_SLACK_NS = 2_000_000
OUTPUT_BLOCK_RECORDS = 512
MAX_QUEUED = 200_000      # beyond this many messages waiting, write them even if it makes requests late
MAX_CONNECTIONS = 1000
BOUNDED_FROM = 1_000_000  # requests in a plan beyond which the report keeps histograms, not samples
MAX_CONNECTIONS_AT_MAX = 64
UNTIMED_GC_THRESHOLD = 20_000  # --speed max: a young collection after this many new objects
STATUS_INTERVAL = 0.25    # s between status updates (and output log drains)
QUIET_WAIT = 200          # at most this many 1 ms waits for a quiet moment before each update
FD_SPARE = 256            # descriptors beyond one per replay connection
PAIRING = ("conn and index are those of the recorded request (conn modulo conn_stride on "
           "--loop); flag 'replayed' marks what play sent and received, the recorded exchanges "
           "follow")


def default_connections(plan, schedule: Schedule) -> int:
    """Replay connections open at once when not given: 1000 when timed; at ``--speed max``
    the recorded connections, up to 64 (more would only queue at the target)."""
    if not schedule.timed:
        return max(1, min(plan.connection_count, MAX_CONNECTIONS_AT_MAX))
    return MAX_CONNECTIONS


def raise_fd_limit(connections: int) -> None:
    """One descriptor per replay connection: raise the soft limit up to the hard one."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, connections + FD_SPARE))
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass


@dataclass(slots=True)
class LoopOptions:
    event_loop: str = "auto"       # auto | asyncio | uvloop
    spin_us: int | None = None     # busy-wait before each deadline (None: scheduler.SPIN_NS)

    def new_loop(self, schedule: Schedule) -> asyncio.AbstractEventLoop:
        """Microsecond timers when timed; uvloop (when installed) at ``--speed max``."""
        from replay.play import clock as clk

        use_uvloop = self.event_loop == "uvloop" or (self.event_loop == "auto" and not schedule.timed)
        return clk.new_event_loop(precise=schedule.timed and self.event_loop != "asyncio",
                                  use_uvloop=use_uvloop)


@dataclass(slots=True)
class About:
    """What the report and the output log say about a run beyond its plan, schedule and options."""
    input: str                     # what was replayed (the output log keeps its base name)
    target: str                    # the target as shown
    rules: dict | None = None      # ``Rules.describe()``
    command: str = "play"


class _Recorded:
    """A recorded message in the output queue (the target's answers are rewritten there)."""

    __slots__ = ("msg",)

    def __init__(self, msg):
        self.msg = msg


class ExchangeLog:
    """The output log of a run (``-o``): what was sent and received, then the recorded exchanges.

    ``file`` is an opened ``replay.outputs.AtomicFile``; ``rewrite`` (the rules' rewrites) is
    applied to every answer of the target (``--redact``: its Set-Cookie too); ``recorded(keys)``
    yields the recorded messages of the replayed ``(conn, index)`` keys, written after the run.
    Messages wait in a queue until ``drain`` hands them to the ``LogWriter``.
    """

    def __init__(self, file, *, rewrite=None, recorded=None):
        self.file = file
        self.rewrite = rewrite
        self.recorded = recorded
        self.writer = None
        self.queue: list = []
        self.keys: set = set()      # (recorded conn, index) of every request tried
        self.stride = 1

    def open(self, meta: dict, conn_stride: int) -> None:
        from replay.log import LogWriter

        self.writer = LogWriter(self.file.path, fd=self.file.detach(),
                                block_records=OUTPUT_BLOCK_RECORDS, meta=meta)
        sys.setswitchinterval(0.0005)   # the writer's thread must not hold the GIL for long
        self.stride = max(1, conn_stride)

    def on_exchange(self, att, req, resp) -> None:
        """The sender's ``on_exchange``: a request as sent and its answer (or failure record)."""
        self.queue.append(req)
        self.queue.append(resp)
        if self.recorded is not None:
            self.keys.add((att.conn_id % self.stride, req.index))

    def on_recorded(self, req, final) -> None:
        """A streamed plan's recorded request and final response, written as it is handed to
        its connection (instead of ``recorded`` after the run)."""
        if req is not None:
            self.queue.append(_Recorded(req))     # already through the rules, as planned
        if final is not None:
            self.queue.append(_Recorded(final))

    def drain(self, due_soon=None) -> None:
        """Hand the queued messages to the writer; stop early when ``due_soon()`` (asked every
        16 messages) says a request is due, unless more than ``MAX_QUEUED`` are waiting."""
        queue = self.queue
        if not queue:
            return
        if len(queue) >= MAX_QUEUED:
            due_soon = None
        write, rewrite = self.writer.write, self.rewrite
        i = 0
        while i < len(queue):
            if due_soon is not None and i % 16 == 0 and due_soon():
                break
            m = queue[i]
            if type(m) is _Recorded:
                m = m.msg
            elif rewrite is not None and m.kind == KIND_RESPONSE:
                m = rewrite(m)
            write(m)
            i += 1
        del queue[:i]

    def close(self, report: Report) -> None:
        """Write what is queued, the recorded exchanges (flags without ``replayed``), the report
        into the metadata, and the index."""
        self.drain()
        if self.recorded is not None:
            write = self.writer.write
            for m in self.recorded(self.keys):
                write(m)
        self.writer.update_meta({"report": report.to_dict()})
        self.writer.close()


class TerminalStatus:
    """A status line on stderr (rich), replaced in place, gone at the end."""

    def __init__(self, text=None):
        self.text = text or (lambda report, now: report.progress_text(now))
        self.live = None

    def start(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._Text = Text
        self.live = Live(Text(""), console=Console(stderr=True), auto_refresh=False, transient=True)
        self.live.start()

    def update(self, report: Report, now: int) -> None:
        self.live.update(self._Text(self.text(report, now)), refresh=True)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


class PlaySession:
    """A plan sent on its schedule to a target; ``run()`` returns the ``Report``."""

    def __init__(self, plan, schedule: Schedule, target: Target, options: Options, about: About,
                 *, output: ExchangeLog | None = None, status=None,
                 loop: LoopOptions | None = None):
        self.plan = plan
        self.schedule = schedule
        self.target = target
        self.options = options
        self.about = about
        self.output = output
        self.status = status
        self.loop_options = loop or LoopOptions()
        # past a million requests, or looping, latency and lateness go into fixed-size histograms
        self.report = Report(self._report_meta(),
                             bounded=plan.requests > BOUNDED_FROM or options.loop)
        self.player = None
        self.interrupted = False
        self.stop_level = None       # () -> 1 stop, 2 give up (``play --workers``' workers)
        self._gave_up = False

    # -- descriptions ------------------------------------------------------------------------
    def _report_meta(self) -> dict:
        plan, s, o = self.plan, self.schedule, self.options
        meta = {
            "input": self.about.input,
            "target": self.about.target,
            "speed": "max" if s.speed is None and s.rate is None else s.speed,
            "rate": s.rate,
            "loop": o.loop,
            "connections_cap": o.connections,
            "keepalive": o.keepalive,
            "plan": {"requests": plan.requests, "connections": plan.connection_count,
                     "recorded_span_s": plan.span_ns / 1e9, "pipelined": plan.pipelined,
                     "skipped": plan.skipped},
        }
        if self.about.rules is not None:
            meta["rules"] = self.about.rules
        return meta

    def _log_meta(self) -> dict:
        import os

        meta = self.report.meta
        return {"command": self.about.command, "source": os.path.basename(self.about.input),
                "target": meta["target"], "speed": meta["speed"],
                **({"rules": meta["rules"]} if "rules" in meta else {}),
                "rate": self.schedule.rate, "conn_stride": self.plan.conn_stride,
                "pairing": PAIRING}

    # -- running -----------------------------------------------------------------------------
    def make_sender(self, clock, on_exchange, wall_offset: int):
        spin_us = self.loop_options.spin_us
        pacer = Pacer(clock) if spin_us is None else Pacer(clock, spin_us * 1000)
        return Player(self.plan, self.schedule, self.target, self.options, self.report, clock,
                      pacer, on_exchange, wall_offset)

    def cancel(self) -> None:
        """Stop as Ctrl-C does (a second call raises ``KeyboardInterrupt``: give up at once); on
        the loop's thread. With ``stop_level`` (a callable), that says which of the two to do:
        2 or more gives up, else a stop (signals may merge or double on their way)."""
        if self._gave_up:
            return                   # giving up already: let it finish
        if self.stop_level is not None:
            give_up = self.stop_level() >= 2
        else:
            give_up = self.interrupted
        if give_up:
            self._gave_up = True
            raise KeyboardInterrupt
        if self.interrupted:
            return
        self.interrupted = True
        if self.player is not None:
            self.player.cancel()

    def _describe_run(self, started_wall: float, offset: int) -> None:
        """The report's description of the run, once it ran (or gave up)."""
        from replay import __version__

        report, schedule = self.report, self.schedule
        report.meta["started_unix"] = round(started_wall, 6)
        if schedule.start:
            report.meta["schedule"] = {"start_unix_ns": schedule.start + offset,
                                       "t0_ns": schedule.t0, "period_ns": int(schedule.period)}
        report.meta["tool"] = f"replay {__version__}"
        if self.plan.streaming:          # counted as the plan was read
            p = self.plan
            report.meta["plan"].update({"pipelined": p.pipelined, "skipped": dict(p.skipped),
                                        "streamed": True, "reordered": p.reordered,
                                        "status_not_recorded": p.unknown_status})
        if not report.ended_ns and report.started_ns:
            report.ended_ns = time.monotonic_ns()

    def run(self) -> Report:
        import gc

        from replay.play import clock as clk

        raise_fd_limit(self.options.connections)
        report, schedule, output, status = self.report, self.schedule, self.output, self.status
        clock = clk.LoopClock()
        offset = clk.wall_offset()
        report.wall_offset_ns = offset
        if output is not None:
            output.open(self._log_meta(), self.plan.conn_stride)
        player = self.player = self.make_sender(
            clock, output.on_exchange if output is not None else None, offset)
        if self.plan.streaming:
            look = player.lookahead = StreamLookahead()
            if output is not None:
                player.on_recorded = output.on_recorded     # before the reader starts
        else:
            look = Lookahead(schedule, self.plan.deadlines_sorted())
        now = clock.now

        def due_soon():
            nxt = look.next_after(now())
            return nxt is not None and nxt - now() < WRITE_SLACK_NS

        write_check = due_soon if schedule.timed else None

        async def background(done: asyncio.Event):
            while not done.is_set():
                try:
                    await asyncio.wait_for(done.wait(), STATUS_INTERVAL)
                    break
                except asyncio.TimeoutError:
                    pass
                waited = 0
                while waited < QUIET_WAIT:           # wait for a quiet moment, not for long
                    nxt = look.next_after(now())
                    if nxt is None or nxt - now() > SLACK_NS:
                        break
                    await asyncio.sleep(0.001)
                    waited += 1
                if status is not None:
                    status.update(report, now())
                if output is not None:
                    output.drain(write_check)

        mask = []

        async def main():
            # a caller that held the signals back (``play --workers``' worker) gets them now,
            # from inside the running loop (uvloop takes a pending one only there), until the
            # loop ends
            mask.append(signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS))
            done = asyncio.Event()
            bg = asyncio.ensure_future(background(done))
            try:
                await player.run()
            finally:
                done.set()
                await bg

        ev = self.loop_options.new_loop(schedule)
        if status is not None:
            status.start()
        asyncio.set_event_loop(ev)
        ev.add_signal_handler(signal.SIGINT, self.cancel)
        term = signal.getsignal(signal.SIGTERM)
        ev.add_signal_handler(signal.SIGTERM, self.cancel)
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        if not schedule.timed:
            # --speed max allocates a few objects per request, nearly all freed by reference
            # counting: a young collection every 700 of those that outlive their request (the
            # default) would take a tenth of the sender's time
            gc.set_threshold(UNTIMED_GC_THRESHOLD, 10, 10)
        started_wall = time.time()
        try:
            try:
                ev.run_until_complete(main())
            except KeyboardInterrupt:        # a second signal: give up what is left, at once
                _cancel_all(ev)
                self._describe_run(started_wall, offset)
                raise
        finally:
            if mask:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask[0])
            ev.remove_signal_handler(signal.SIGINT)
            ev.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, term)
            ev.close()
            asyncio.set_event_loop(None)
            gc.unfreeze()
            gc.set_threshold(*thresholds)
            report.fold()
            if status is not None:
                status.stop()
        if player.crash is not None:
            raise player.crash
        self._describe_run(started_wall, offset)
        if output is not None:
            output.close(report)
        return report


def _cancel_all(ev, timeout: float = 1.0) -> None:
    """Cancel the tasks of ``ev`` and let them unwind (``finally`` blocks run on an open loop),
    for at most ``timeout`` seconds."""
    tasks = asyncio.all_tasks(ev)
    for t in tasks:
        t.cancel()
    if tasks:
        try:
            ev.run_until_complete(asyncio.wait(tasks, timeout=timeout))
        except BaseException:  # noqa: BLE001  (leaving anyway)
            pass
