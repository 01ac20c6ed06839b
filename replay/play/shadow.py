"""``replay shadow``: live capture feeding the sender, each request sent to staging as it completes.

The capture is ``replay.capture.CaptureSession`` unchanged (the same reader, core, filter, rules,
``--count`` and ``--duration``), run on the calling thread; instead of log files its output is a
``ShadowOutput`` that hands each finished request to one ``sender.StreamPlayer`` per target,
running on an event loop in a thread of its own. The timing source is "now": a request is sent
as soon as the core has its head and body, without waiting for the production response.

Rules:
- isolation: the capture thread never waits for a target. Handing a request over is one
  ``call_soon_threadsafe``; each target has a bounded queue (``queue_requests`` requests and
  ``queue_bytes`` bytes, counted from hand-over until answered, failed or dropped); a request
  that does not fit is dropped for that target only and counted (``queue_full``). A hung target
  therefore holds at most its queue, plus one connection per production connection for at most
  ``--timeout``;
- connections: each production connection (core ``conn``) maps, per target, to a target
  connection of its own carrying its requests in production order (``StreamPlayer``). It opens
  on the first request and closes after ``idle`` seconds without one (the core does not yet
  report a production connection's end), after an answer that closes it, and at the end;
- mirror or split: every request goes to every target, or (``split``) each production
  connection to one target chosen by ``splitmix64(conn)`` (the hash of ``filter --sample``);
- what is sent: the captured bytes with Host set to the target's (unless ``keep_host``); a
  request cut by the capture gets a true Content-Length as in ``play``, a cut chunked one is
  dropped (``cut``); responses are not sent;
- counts per target: ``sent`` (written to a connection), ``answered``, ``dropped`` by reason
  (never sent: ``queue_full``, ``cut``, ``refused``, ``timeout``/``connect`` when no connection
  could be opened, ``drain`` when the stop came first), ``errors`` by kind (sent, no complete
  answer: ``timeout``, ``reset``, ``closed``, ``interrupted``...), latency to the last byte of
  the answer;
- stopping: when the capture stops (signal, ``--duration``, ``--count``) what it already has is
  handed over, then the targets get ``drain`` seconds for what is queued and in flight.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass

from replay.events import F_CHUNKED, KIND_REQUEST
from replay.httpmsg import body_length, set_content_length, set_host
from replay.play.plan import CUT, PlannedRequest, _head_length
from replay.play.report import Report, percentiles
from replay.play.sender import Options, StreamPlayer, Target
from replay.rules.filters import splitmix64

QUEUE_REQUESTS = 1000
QUEUE_BYTES = 64 << 20
IDLE = 5.0          # s without a request before a target connection is closed
DRAIN = 2.0
TIMEOUT = 5.0       # s: connect, and each answer
SWITCH_INTERVAL = 0.0005   # s: GIL hand-over between the capture's thread and the sender's


@dataclass(slots=True)
class ShadowOptions:
    split: bool = False
    keep_host: bool = False
    queue_requests: int = QUEUE_REQUESTS
    queue_bytes: int = QUEUE_BYTES
    idle: float = IDLE
    drain: float = DRAIN
    timeout: float = TIMEOUT
    connections: int = 1000     # target connections open at once, per target


class ShadowTarget:
    """One target: its sender, report and bounded queue."""

    def __init__(self, target: Target, opts: ShadowOptions, clock):
        self.target = target
        self.opts = opts
        self.report = Report({"target": target.display})
        self.lock = threading.Lock()
        self.queued = 0
        self.queued_bytes = 0
        self.peak = 0
        self.drops: dict = {}           # reasons found on the capture's side
        self.player = StreamPlayer(target, Options(connections=opts.connections,
                                                   timeout=opts.timeout),
                                   self.report, clock, idle=opts.idle, on_done=self._done)

    def admit(self, nbytes: int) -> bool:
        """On the capture's thread: room in the queue for a request of ``nbytes``?"""
        with self.lock:
            if self.queued >= self.opts.queue_requests or \
                    self.queued_bytes + nbytes > self.opts.queue_bytes:
                self.drops["queue_full"] = self.drops.get("queue_full", 0) + 1
                return False
            self.queued += 1
            self.queued_bytes += nbytes
            if self.queued > self.peak:
                self.peak = self.queued
            return True

    def _done(self, req) -> None:
        with self.lock:
            self.queued -= 1
            self.queued_bytes -= len(req.data)

    def dropped(self) -> dict:
        d = dict(self.drops)
        for k, v in self.player.drops.items():
            d[k] = d.get(k, 0) + v
        return d

    def summary(self) -> dict:
        r = self.report
        lat = percentiles(r.latency)
        return {"target": self.target.display, "sent": r.sent, "answered": r.answered,
                "dropped": self.dropped(), "errors": dict(r.errors), "latency_ms": lat,
                "queue_peak": self.peak}


class ShadowOutput:
    """Stands where ``CaptureSession`` writes its log: requests go to the targets instead."""

    paths: list = []

    def __init__(self, session: "ShadowSession"):
        self.session = session

    def write(self, msg) -> bool:
        if msg.kind == KIND_REQUEST:
            self.session.dispatch(msg)
        return False

    def due(self) -> bool:
        return False

    def flush(self, meta=None) -> None:
        pass

    def rotate(self, meta) -> None:
        pass

    def close(self, meta=None) -> None:
        pass

    def abandon(self) -> None:
        pass


class ShadowSession:
    """Live capture -> targets until a stop; ``run()`` returns the capture's stop reason."""

    def __init__(self, source, engine, targets: list[Target], opts: ShadowOptions, *,
                 count: int | None = None, duration: float | None = None, rules=None):
        from replay.capture import CaptureSession
        from replay.play import clock as clk

        self.opts = opts
        self.clock = clk.LoopClock()
        self.targets = [ShadowTarget(t, opts, self.clock) for t in targets]
        self.capture = CaptureSession(source, engine, ShadowOutput(self), requests_only=True,
                                      count=count, duration=duration, flush_interval=0,
                                      rules=rules)
        self.loop = None
        self.thread = None
        self.requests = 0

    # -- on the capture's thread -------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self.capture.request_stop(reason)

    def dispatch(self, m) -> None:
        self.requests += 1
        targets = self.targets
        if self.opts.split:
            targets = (targets[splitmix64(m.conn) % len(targets)],)
        data = m.data
        if m.flags & CUT:
            if m.flags & F_CHUNKED:
                for st in targets:
                    st.drops["cut"] = st.drops.get("cut", 0) + 1
                return
            data = set_content_length(data, m.head_length)
        call = self.loop.call_soon_threadsafe
        for st in targets:
            sent = data
            if not self.opts.keep_host:
                sent = set_host(data, _head_length(data, m.head_length, len(m.data)),
                                st.target.host_header)
            if not st.admit(len(sent)):
                continue
            hl = _head_length(sent, m.head_length, len(m.data))
            blen, chunked = body_length(sent, hl)
            req = PlannedRequest(m.conn, m.index, m.ts_first, sent, m.method or "GET", m.uri or "",
                                 hl, body_length=blen, flags=F_CHUNKED if chunked else 0)
            call(st.player.submit, m.conn, req)

    def run(self, on_tick=None, tick: float = 0.5) -> str:
        from replay.play import clock as clk

        # the sender's thread must not wait the default 5 ms for the GIL the capture holds
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.loop = clk.new_event_loop(precise=False, use_uvloop=True)
        self.thread = threading.Thread(target=self._loop_main, name="replay-shadow", daemon=True)
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
            try:
                reason = self.capture.run(on_tick=on_tick, tick=tick)
            finally:
                self._drain()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()
        for st in self.targets:
            if st.player.crash is not None:
                raise st.player.crash
        return reason

    def _loop_main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        for st in self.targets:
            st.player.start()

    def _drain(self) -> None:
        async def drain():
            await asyncio.gather(*(st.player.drain(self.opts.drain) for st in self.targets))

        fut = asyncio.run_coroutine_threadsafe(drain(), self.loop)
        fut.result(self.opts.drain + self.opts.timeout + 10)

    # -- views -------------------------------------------------------------------------------
    def status_text(self) -> str:
        cap = self.capture
        st = cap.source.stats()
        parts = [f"{cap.elapsed():7.1f} s  {self.requests:,} req captured  "
                 f"drops: kernel {st['kernel_drops']:,}"]
        for t in self.targets:
            r = t.report
            parts.append(f"{t.target.display}: sent {r.sent:,} ok {r.answered:,} "
                         f"dropped {sum(t.dropped().values()):,} errors {r.error_total:,} "
                         f"queued {t.queued:,}")
        return "  |  ".join(parts)

    def summary(self) -> list[dict]:
        return [st.summary() for st in self.targets]
