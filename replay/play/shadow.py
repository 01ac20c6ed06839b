"""``replay shadow``: live capture feeding the sender, each request sent to staging as it completes.

The capture is ``replay.capture.CaptureSession`` unchanged (the same reader, core, filter, rules,
``--count`` and ``--duration``), run on the calling thread; its output is a ``ShadowOutput`` that
hands each finished request to one ``sender.StreamPlayer`` per target, running on an event loop
in a thread of its own, and (``-o``) writes the capture and the targets' answers to a log. The
timing source is "now": a request is sent as soon as the core has its head and body, without
waiting for the production response.

Rules:
- isolation: the capture thread never waits for a target. Handing a request over is one
  ``call_soon_threadsafe``; each target has a bounded queue (``queue_requests`` requests and
  ``queue_bytes`` bytes, counted from hand-over until answered, failed or dropped); a request
  that does not fit is dropped for that target only and counted (``queue_full``). A hung target
  therefore holds at most its queue, plus one connection per stream for at most ``--timeout``;
  its latency and delay distributions are histograms of fixed size (``Report(bounded=True)``);
- streams: each production connection (core ``conn``) maps, per target and per copy, to a
  target connection of its own carrying its requests in production order (``StreamPlayer``). It
  opens on the first request and closes when the production connection ends (the core reports
  it: ``Engine(track_closed=True)``) once its requests are answered, after ``idle`` seconds
  without a request, after an answer that closes it, and at the end;
- mirror or split: every request goes to every target, or (``split``) each production
  connection to one target chosen by ``splitmix64(conn)`` (the hash of ``filter --sample``);
- amplification: ``amplify`` N sends ``floor(N)`` copies of every connection, and one more of a
  fraction ``N - floor(N)`` of them (chosen by another stable hash of ``conn``: 1.5 sends every
  other connection twice); each copy is a stream of its own; ``copy_header`` names a header set
  to the copy's number (1..) on each request;
- what is sent: the captured bytes, after the rules, with Host set to the target's (unless
  ``keep_host``); a request cut by the capture gets a true Content-Length as in ``play``, a cut
  chunked one is dropped (``cut``); responses are not sent;
- counts per target: ``sent`` (written to a connection), ``answered``, ``dropped`` by reason
  (never sent: ``queue_full``, ``cut``, ``refused``, ``timeout``/``connect`` when no connection
  could be opened, ``drain`` when the stop came first), ``errors`` by kind (sent, no complete
  answer: ``timeout``, ``reset``, ``closed``, ``interrupted``...), latency to the last byte of
  the answer, and delay: from the request's last packet in production (its capture timestamp)
  to its send;
- the output log (``-o``): the capture as ``replay capture`` writes it (requests and production
  responses after the rules), and each target's answers as ``replay play -o`` writes them (flag
  ``replayed``: the request as sent, ``ts_first`` its production completion, ``ts_last`` its
  send, then the answer or a ``failed`` record). A replayed message's ``conn`` is the production
  connection's plus ``slot * conn_stride``, ``slot = target * copies + copy`` (metadata:
  ``targets``, ``copies``, ``conn_stride``), so ``replay report --target`` pairs each target's
  answers with production's (a production conn id at or beyond ``conn_stride``, after 2**32 /
  slots connections, is sent but its answer not logged: counted in ``beyond_stride``). Answers
  are handed to the capture's thread through a bounded queue (``OUTPUT_QUEUE`` messages,
  ``OUTPUT_QUEUE_BYTES``; beyond it they are counted in ``output_dropped``, never held);
- stopping: when the capture stops (signal, ``--duration``, ``--count``) what it already has is
  handed over, then the targets get ``drain`` seconds for what is queued and in flight, then the
  answers are written and the log closed.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import deque
from dataclasses import dataclass

from replay.events import F_CHUNKED, KIND_REQUEST
from replay.httpmsg import body_length, set_content_length, set_header, set_host
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
OUTPUT_QUEUE = 100_000     # answers waiting for the capture's thread to write them
OUTPUT_QUEUE_BYTES = 256 << 20
AMPLIFY_SALT = 0x5EED_C0FF_EE00_D1CE   # the fraction of --amplify: not the connections --sample keeps
PAIRING = ("conn and index are those of the production request plus slot * conn_stride for the "
           "targets' answers (flag replayed; slot = target * copies + copy, targets in the order "
           "listed); the captured requests and responses have no replayed flag")


@dataclass(slots=True)
class ShadowOptions:
    split: bool = False
    keep_host: bool = False
    queue_requests: int = QUEUE_REQUESTS
    queue_bytes: int = QUEUE_BYTES
    idle: float = IDLE
    drain: float = DRAIN
    timeout: float = TIMEOUT
    connections: int = 1000     # target connections open at once, per target and copy
    amplify: float = 1.0        # copies of each production connection (fractional: some get one more)
    copy_header: str | None = None   # header carrying the copy's number (1..)

    @property
    def copies(self) -> int:
        """Copies at most of one production connection."""
        whole = int(self.amplify)
        return whole + (1 if self.amplify > whole else 0)


def copies_of(conn: int, amplify: float) -> int:
    """Copies of production connection ``conn``: ``floor(amplify)``, one more for a stable
    fraction ``amplify - floor(amplify)`` of the connections."""
    whole = int(amplify)
    frac = amplify - whole
    if frac > 0 and splitmix64(conn ^ AMPLIFY_SALT) < frac * 18446744073709551616.0:
        return whole + 1
    return whole


def conn_stride(slots: int) -> int:
    """The largest power of two ``s`` with ``slots * s <= 2**32``: a replayed answer's conn is
    the production one plus ``slot * s``, below 2**32 as ``replay report``'s keys need."""
    return 1 << (32 - max(0, (slots - 1).bit_length()))


class ShadowTarget:
    """One target: its sender, report and bounded queue."""

    def __init__(self, target: Target, opts: ShadowOptions, clock, *, on_exchange=None,
                 wall_offset: int = 0):
        self.target = target
        self.opts = opts
        self.report = Report({"target": target.display}, bounded=True)
        self.lock = threading.Lock()
        self.queued = 0
        self.queued_bytes = 0
        self.peak = 0
        self.drops: dict = {}           # reasons found on the capture's side
        self.player = StreamPlayer(target, Options(connections=opts.connections * opts.copies,
                                                   timeout=opts.timeout),
                                   self.report, clock, idle=opts.idle, on_done=self._done,
                                   on_exchange=on_exchange, wall_offset=wall_offset)

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
        for k, v in dict(self.player.drops).items():     # a copy: the sender's thread adds reasons
            d[k] = d.get(k, 0) + v
        return d

    def summary(self) -> dict:
        r = self.report
        return {"target": self.target.display, "sent": r.sent, "answered": r.answered,
                "dropped": self.dropped(), "errors": dict(r.errors),
                "latency_ms": percentiles(r.latency), "delay_ms": percentiles(r.lateness),
                "statuses": {str(k): v for k, v in sorted(r.statuses.items())},
                "queue_peak": self.peak}


class ShadowOutput:
    """Stands where ``CaptureSession`` writes its log: requests go to the targets, and with
    ``files`` (a ``capture.OutputFiles``) the capture and the targets' answers to the log."""

    def __init__(self, session: "ShadowSession", files=None):
        self.session = session
        self.files = files
        self.answers: deque = deque()     # from the sender's thread: appended there, written here
        self.answer_bytes = 0             # bytes of those (approximate: two threads count)
        self.dropped = 0
        self.closed = False

    @property
    def paths(self) -> list:
        return self.files.paths if self.files is not None else []

    # the sender's thread
    def on_exchange(self, att, req, resp) -> None:
        if att.conn_id < 0:
            return      # a production conn id beyond conn_stride: counted as beyond_stride
        if self.closed or len(self.answers) >= OUTPUT_QUEUE or \
                self.answer_bytes > OUTPUT_QUEUE_BYTES:
            self.dropped += 1
            return
        self.answer_bytes += len(req.data) + len(resp.data)
        self.answers.append(req)
        self.answers.append(resp)

    # the capture's thread
    def _write_answers(self) -> bool:
        full = False
        answers, write = self.answers, self.files.write
        while answers:
            m = answers.popleft()
            self.answer_bytes -= len(m.data)
            full = write(m) or full
        return full

    def connections_closed(self, conns) -> None:
        self.session.closed(conns)

    def write(self, msg) -> bool:
        if msg.kind == KIND_REQUEST:
            self.session.dispatch(msg)
        if self.files is None:
            return False
        full = self.files.write(msg)
        if self.answers:
            full = self._write_answers() or full
        return full

    def due(self) -> bool:
        if self.files is None:
            return False
        if self.answers:
            self._write_answers()
        return self.files.due()

    def flush(self, meta=None) -> None:
        if self.files is not None:
            self._write_answers()
            self.files.flush(self._meta(meta))

    def rotate(self, meta) -> None:
        if self.files is not None:
            self.files.rotate(self._meta(meta))

    def close(self, meta=None) -> None:
        """The capture is over: the targets drain, then their answers are written."""
        try:
            self.session.drain()
        finally:
            self.closed = True
            if self.files is not None:
                try:
                    self._write_answers()
                except BaseException:
                    self.files.abandon()
                    raise
                self.files.close(self._meta(meta))

    def abandon(self) -> None:
        self.closed = True
        if self.files is not None:
            self.files.abandon()

    def _meta(self, meta):
        if meta is None:
            return None
        return {**meta, "shadow": {"targets": self.session.summary(),
                                   "output_dropped": self.dropped,
                                   "beyond_stride": self.session.beyond_stride}}


class ShadowSession:
    """Live capture -> targets until a stop; ``run()`` returns the capture's stop reason.

    ``files``: a ``capture.OutputFiles`` for ``-o`` (its metadata gets ``log_meta()``);
    ``echo``: dry run, each request that would be sent is passed to ``echo(msg, data, target,
    copy)`` and nothing is sent."""

    def __init__(self, source, engine, targets: list[Target], opts: ShadowOptions, *,
                 count: int | None = None, duration: float | None = None, rules=None,
                 files=None, echo=None):
        from replay.capture import CaptureSession
        from replay.play import clock as clk

        self.opts = opts
        self.clock = clk.LoopClock()
        self.wall_offset = clk.wall_offset()
        self.echo = echo
        self.output = ShadowOutput(self, files)
        on_exchange = self.output.on_exchange if files is not None else None
        self.targets = [ShadowTarget(t, opts, self.clock, on_exchange=on_exchange,
                                     wall_offset=self.wall_offset) for t in targets]
        self.copies = opts.copies
        self.stride = conn_stride(len(self.targets) * self.copies)
        if files is not None:
            files.base_meta.update(self.log_meta())      # before the CLI opens the first file
        self.capture = CaptureSession(source, engine, self.output, requests_only=files is None,
                                      count=count, duration=duration, flush_interval=1.0,
                                      rules=rules, count_requests=True)
        self.loop = None
        self.thread = None
        self.requests = 0
        self.would_send = 0
        self.beyond_stride = 0     # requests of connections whose id does not fit the log's keys
        self._drained = False

    def log_meta(self) -> dict:
        """What the output log's metadata says about the shadow (beside the capture's)."""
        return {"command": "shadow", "targets": [t.target.display for t in self.targets],
                "split": self.opts.split, "amplify": self.opts.amplify, "copies": self.copies,
                "copy_header": self.opts.copy_header, "conn_stride": self.stride,
                "pairing": PAIRING}

    # -- on the capture's thread -------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self.capture.request_stop(reason)

    def _targets_of(self, conn: int):
        if self.opts.split:
            i = splitmix64(conn) % len(self.targets)
            return ((i, self.targets[i]),)
        return tuple(enumerate(self.targets))

    def dispatch(self, m) -> None:
        self.requests += 1
        conn = m.conn
        targets = self._targets_of(conn)
        data = m.data
        if m.flags & CUT:
            if m.flags & F_CHUNKED:
                for _, st in targets:
                    st.drops["cut"] = st.drops.get("cut", 0) + 1
                return
            data = set_content_length(data, m.head_length)
        copies = copies_of(conn, self.opts.amplify) if self.opts.amplify != 1 else 1
        if not copies:
            return
        hl = _head_length(data, m.head_length, len(m.data))
        due = m.ts_last - self.wall_offset
        stride = self.stride
        if conn >= stride:
            self.beyond_stride += 1
        header = self.opts.copy_header
        call = self.loop.call_soon_threadsafe if self.loop is not None else None
        for t, st in targets:
            sent = data if self.opts.keep_host else set_host(data, hl, st.target.host_header)
            shl = _head_length(sent, m.head_length, len(m.data))
            for k in range(copies):
                out = sent
                if header:
                    out = set_header(sent, shl, header.encode("latin-1"), str(k + 1).encode())
                ohl = _head_length(out, m.head_length, len(m.data))
                if self.echo is not None:
                    self.would_send += 1
                    self.echo(m, out, st.target, k)
                    continue
                if not st.admit(len(out)):
                    continue
                blen, chunked = body_length(out, ohl)
                req = PlannedRequest(conn, m.index, m.ts_first, out, m.method or "GET",
                                     m.uri or "", ohl, body_length=blen,
                                     flags=F_CHUNKED if chunked else 0)
                slot = t * self.copies + k
                call(st.player.submit, (conn, k), req,
                     conn + slot * stride if conn < stride else -1, due)

    def closed(self, conns) -> None:
        """Production connections ``conns`` ended: their target connections close once done."""
        if self.loop is None or not conns:
            return
        self.loop.call_soon_threadsafe(self._close_streams, list(conns))

    def _close_streams(self, conns) -> None:
        for st in self.targets:
            player = st.player
            for conn in conns:
                for k in range(self.copies):
                    player.close((conn, k))

    def run(self, on_tick=None, tick: float = 0.5) -> str:
        from replay.play import clock as clk

        if self.echo is not None:          # dry run: nothing is sent, no loop
            return self.capture.run(on_tick=on_tick, tick=tick)
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
                self.drain()
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

    def drain(self) -> None:
        """Once: the targets get ``drain`` seconds for what is queued and in flight."""
        if self._drained or self.loop is None:
            return
        self._drained = True

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
        if self.echo is not None:
            parts.append(f"{self.would_send:,} would be sent (dry run)")
        for t in self.targets if self.echo is None else ():
            r = t.report
            parts.append(f"{t.target.display}: sent {r.sent:,} ok {r.answered:,} "
                         f"dropped {sum(t.dropped().values()):,} errors {r.error_total:,} "
                         f"queued {t.queued:,}")
        return "  |  ".join(parts)

    def summary(self) -> list[dict]:
        return [st.summary() for st in self.targets]
