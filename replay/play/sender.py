"""The network side of ``replay play``: connections to the target, sending on time, reading answers.

One asyncio task per recorded connection (a *replay connection*), started just before its first
request is due (streamed: as its first request is handed over, up to ``AHEAD_NS`` +
``FEED_SLACK_NS`` before, while a slot is free; it connects, and tries that request, from
``CONNECT_LEAD`` before) and holding one of ``--connections`` slots from then until it ends. Its
requests go out in recorded order, each at its deadline (``scheduler.Pacer``, or ``DueSends``
below); a request waits for the previous response unless the capture shows it pipelined. Across
connections nothing waits for anything: a slow target delays only the connection it is slow on, and
that delay shows as lateness.

Responses are framed by ``core.ResponseFramer`` (the capture's own framing rules, sans-IO) as
bytes arrive; each final response answers the oldest request outstanding on its connection.
On a kept-alive connection, the answer that empties a connection sends its next
request itself (``Player._pump``): at ``--speed max`` just after the read that brought it; in a
timed run at its deadline, from the run's ``DueSends`` (one loop timer for all connections, a
heap of deadlines), or at once when the answer came after it. The task only wakes when there
is something to decide (nothing queued, a lost or closed connection, the end of the run), so a
request costs no task switch.

Over plain http (on Linux) the connections live on one ``core.SendLoop``: one epoll set of
non-blocking sockets, connected, read and written by the send loop (in C when compiled), whose
descriptor the event loop watches; a read hands its bytes to the connection and what its answer
lets go at once (``--speed max``, or a timed request already due) is sent at the end of the same
call. TLS connections (and every connection where there is no epoll) are asyncio's.

Rules:
- a connection is opened ``CONNECT_LEAD`` before its first request is due (a recorded connection
  was open before its first request too), and again, if it was closed, before its next request;
- ``--no-keepalive``: each request on a connection of its own, closed after the answer;
- faults never end the run: each is counted against the request it hit (see ``report``), and the
  recorded connection's next request gets a new connection;
- a kept-alive connection the target closed while idle (servers do after their keep-alive
  timeout, without ``Connection: close``) is reopened before the next request, just before its
  deadline; and when a reused connection is lost after a send but before any byte of the answer,
  its unanswered requests go out again, in order, on a new connection if every one of them is
  idempotent (RFC 9110 §9.2.2), as browsers and HTTP clients do. Both count as ``reconnects``,
  never as errors; a request is sent again at most once (a new connection is not a reused one);
- a request is never sent before its deadline; a request sent late because the previous response
  came late is counted as ``held_by_response``;
- ``--limit`` counts requests tried; ``--duration`` stops sending requests due after it; both
  then wait up to ``--timeout`` for the answers outstanding.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import socket
import ssl
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from replay import core
from replay.errors import UsageError
from replay.events import (F_FAILED, F_INCOMPLETE, F_REPLAYED, KIND_REQUEST,
                           KIND_RESPONSE, Message)
from replay.play.plan import PlannedRequest
from replay.play.scheduler import NS, Pacer, Schedule

CONNECT_LEAD_NS = 20_000_000          # open a connection this long before its first request is due
CONNECT_LEAD_TLS_NS = 100_000_000     # a TLS handshake takes a few ms more
START_DELAY_NS = 50_000_000           # first deadline after the loop starts: room to connect
DEFAULT_PORTS = {"http": 80, "https": 443}
AHEAD_NS = 300_000_000                # a streamed request is handed to its connection this early
FEED_SLACK_NS = 20_000_000            # ... or up to this much earlier: one wait per 20 ms of them
FEED_SLICE_NS = 100_000               # timed: the feeder runs this long before the other tasks do
MAX_FED = 10_000                      # --speed max: streamed requests handed over, not yet taken
READ_AHEAD_NS = 1_000_000_000         # a timed stream is planned this far ahead of the schedule
PREFILL_S = 3.0                       # at most this long reading before the first deadline
PREFILL_MAX_ITEMS = 1024              # --speed max: requests read before the first is sent
POLL_S = 0.005                        # the stream launcher's wait for the reader (300 ms ahead)
SLOT_WAIT_S = 0.05                    # ... and, every slot taken, between looks for an idle one
MAX_LATE_ANSWERS = 100_000            # answers kept waiting for a recorded status read late
LONG_SLEEP_NS = 1_000_000             # DueSends: a longer wait is slept in two parts
# a request lost with its connection may be sent again only if its method is idempotent
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))   # RFC 9110 §9.2.2


@dataclass
class Target:
    url: str
    scheme: str
    host: str           # as given (name or address)
    port: int
    addr: str           # resolved address
    family: int
    host_header: str    # Host value sent: host[:port], port omitted when it is the scheme's default
    ssl: ssl.SSLContext | None = None

    @property
    def display(self) -> str:
        h = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{self.scheme}://{h}:{self.port}"


def parse_target(url: str, insecure: bool = False, resolve: bool = True) -> Target:
    """``http[s]://host[:port]`` (``host:port`` means http); IPv6 hosts in brackets."""
    given = url
    if "://" not in url:
        url = "http://" + url
    scheme_, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    if authority.count(":") >= 2 and not authority.startswith("["):
        # an IPv6 address: where would its port start?
        host, _, port_text = authority.rpartition(":")
        try:
            ipaddress.IPv6Address(host)
            if not port_text.isdigit():
                raise ValueError(port_text)
            hint = f"{scheme_}://[{host}]:{port_text}"
        except ValueError:
            hint = f"{scheme_}://[{authority}]"
        raise UsageError(f"--target {given}: an IPv6 address goes in brackets: {hint}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        what = "not a port (1 to 65535)" if "port" in str(e).lower() else str(e)
        raise UsageError(f"--target {given}: {what}") from None
    if port == 0:
        raise UsageError(f"--target {given}: not a port (1 to 65535)")
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UsageError(f"--target {url}: scheme must be http or https")
    host = parts.hostname
    if not host:
        raise UsageError(f"--target {url}: no host")
    if parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--target {url}: give scheme, host and port only (requests keep their "
                         "recorded paths)")
    if port is None:
        port = DEFAULT_PORTS[scheme]
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    hh = f"[{host}]" if is_v6 else host
    if port != DEFAULT_PORTS[scheme]:
        hh = f"{hh}:{port}"
    addr, family = host, socket.AF_INET6 if is_v6 else socket.AF_INET
    if resolve:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise UsageError(f"--target {url}: cannot resolve {host}: {e.strerror}") from None
        family, _, _, _, sa = info[0]
        addr = sa[0]
    ctx = None
    if scheme == "https":
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    return Target(url, scheme, host, port, addr, family, hh, ctx)


@dataclass(slots=True)
class Options:
    connections: int = 1000        # replay connections open at once
    keepalive: bool = True
    timeout: float = 10.0          # s: connect, and each answer
    limit: int = 0                 # requests to try (0: all)
    duration: float = 0.0          # s of schedule (0: all)
    loop: bool = False
    start_barrier: object = None   # ``workers.StartBarrier``: a timed run's start and t0, agreed
    send_loop: bool = True         # http: the connections on a ``core.SendLoop``
    timed_pump: bool = True        # timed: answers send what they let go at its time (``DueSends``)


Attempt = core.Attempt


class ReplayProtocol(core.PumpCore, asyncio.Protocol):
    """One replay connection (an asyncio protocol): writes requests, frames the responses, fails
    what is left on loss. Receiving, answering and sending what the answers let go are the
    core's ``PumpCore`` (compiled: no Python call per request at ``--speed max``); the rest is
    here."""

    def __init__(self, player: "Player"):
        self.init_core(player)
        self.timer = None           # wait_idle's, while armed
        self.local = ("", 0)
        self.peer = ("", 0)

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        # a SendLoop's transport runs what an answer lets go at the end of its reads
        self.soon = getattr(transport, "after_read", self.loop.call_soon)
        local = transport.get_extra_info("sockname") or ("", 0)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.local, self.peer = tuple(local[:2]), tuple(peer[:2])
        self.framer = core.ResponseFramer(self.local, self.peer)

    def eof_received(self):
        self.reusable = False
        return False            # close our side too

    def connection_lost(self, exc):
        self.closed = True
        self.reusable = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        now = self.now()
        msgs = self.framer.eof(now) if self.framer is not None else []
        cut = False
        if msgs:
            cut = any(m.flags & F_INCOMPLETE for m in msgs)
            self._answered([m for m in msgs if not m.flags & F_INCOMPLETE], now)
        if self.pending and self._may_retry():
            self.retry = list(self.pending)
            self.pending.clear()
        elif self.pending:
            self.fail_pending(self._kind(exc, cut))
        self.player.report.on_disconnect()
        self._wake(True)

    # -- helpers -----------------------------------------------------------------------------
    def _may_retry(self) -> bool:
        """Lost after a send on a reused connection, no byte of an answer read, all idempotent."""
        return (self.answers > 0 and self.rx == self.rx_answered and not self.garbage()
                and all(a.req.method.upper() in IDEMPOTENT for a in self.pending))

    def _kind(self, exc, cut=False):
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "reset"
        if isinstance(exc, ssl.SSLError):
            return "tls"
        if self.garbage():
            return "bad_response"
        if exc is None:
            return "closed"
        return "reset"

    def garbage(self) -> bool:
        """The target sent bytes that are not HTTP (the framer had to resynchronise)."""
        if self.framer is None:
            return False
        st = self.framer.stats()
        return bool(st.get("resyncs") or st.get("skipped_bytes") or st.get("non_http_streams"))

    def fail_pending(self, kind: str):
        skipped = self.framer.stats().get("skipped_bytes", 0) if self.framer is not None else 0
        if skipped:
            self.player.report.garbage_bytes += skipped
        while self.pending:
            self.player.failed(self.pending.popleft(), kind, True)

    async def wait_idle(self, timeout_ns: int) -> bool:
        """True once every request sent here is answered (or failed); False on timeout.

        One timer per connection, not per wait: armed for the oldest request's limit, it looks
        again when it fires and re-arms for the request then oldest (at ``--speed max`` a wait
        lasts one answer; a timer per wait cost more than the rest of it)."""
        while self.pending and not self.closed:
            rem = self.pending[0].sent_ns + timeout_ns - self.now()
            if rem <= 0:
                return False
            if self.timer is None:
                self.timer = self.loop.call_later(rem / NS, self._check, timeout_ns)
            fut = self.waiter = self.loop.create_future()
            try:
                if not await fut:
                    return False
            finally:
                self.waiter = None
        return True

    def _check(self, timeout_ns: int) -> None:
        """The connection's timer: the oldest request waited ``timeout_ns``, or re-arm for it."""
        self.timer = None
        w = self.waiter
        if w is None or w.done() or self.closed:
            return
        if not self.pending:
            w.set_result(True)
            return
        rem = self.pending[0].sent_ns + timeout_ns - self.now()
        if rem <= 0:
            w.set_result(False)
        else:
            self.timer = self.loop.call_later(rem / NS, self._check, timeout_ns)

    def abort(self, kind: str):
        """Give up on this connection: what is outstanding fails with ``kind``."""
        if self.pending:
            if kind == "timeout" and self.garbage():
                kind = "bad_response"
            self.fail_pending(kind)
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class DueSends:
    """A timed run's requests that answers let go before they are due (``PumpCore.send_due``),
    each sent at its deadline: one loop timer, armed ``spin_ns`` before the earliest deadline
    (a wait longer than ``LONG_SLEEP_NS`` in two sleeps, the first ending an eighth early);
    when it fires it waits out the rest on the clock (as ``Pacer.wait_until`` does), sends what
    is then due, and arms again for the earliest left. A request costs a heap entry, not a task
    step, a future and a timer of its own. An entry whose connection no longer holds it (its
    task took over) is dropped when it comes first. ``wake_all`` hands every request held back
    to its connection's task (``--limit`` reached). ``now`` is the loop's clock in ns
    (``time.monotonic_ns``); ``on_error(exc)`` is told of an exception a send raised (a bug)."""

    def __init__(self, loop, now, spin_ns: int, on_error):
        self.loop = loop
        self.now = now
        self.spin_ns = spin_ns
        self.on_error = on_error
        self.heap: list = []
        self.n = 0                  # entries made: their order among equal deadlines
        self.handle = None
        self.armed = None           # the deadline the timer is armed for

    def add(self, deadline: int, conn, req) -> None:
        """``conn`` (a ``PumpCore``, holding ``req`` in its ``due``) sends ``req`` at
        ``deadline``."""
        self.n += 1
        heapq.heappush(self.heap, (deadline, self.n, conn, req))
        if self.armed is None or deadline < self.armed:
            self._arm(deadline)

    def _disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.armed = None

    def _arm(self, deadline: int) -> None:
        self._disarm()
        self.armed = deadline
        wait = deadline - self.spin_ns - self.now()
        if wait > LONG_SLEEP_NS:
            # a longer sleep overshoots more (a few % of it on a virtual machine): wake a
            # little early, then sleep again for the rest
            wait -= wait >> 3
        self.handle = self.loop.call_later(wait / NS, self._fire)

    def _fire(self) -> None:
        self.handle = self.armed = None
        heap, now = self.heap, self.now
        while heap and heap[0][2].due is not heap[0][3]:
            heapq.heappop(heap)          # its connection's task took it over: no spin for it
        if not heap:
            return
        d = heap[0][0]
        t = now()
        if d - t <= self.spin_ns:
            while t < d:
                t = now()
            while heap and heap[0][0] <= t:
                d, _, conn, req = heapq.heappop(heap)
                try:
                    conn.send_due(req, d)
                except Exception as e:  # noqa: BLE001  (a bug: the run stops, raises it at its end)
                    self.on_error(e)
        # (a send may have added an entry, and armed for it, while one earlier waits)
        if heap and (self.armed is None or heap[0][0] < self.armed):
            self._arm(heap[0][0])

    def wake_all(self) -> None:
        """Every request held back goes to its connection's task (which then decides)."""
        got, self.heap = self.heap, []
        self._disarm()
        for _, _, conn, req in got:
            if conn.due is req:
                conn._wake(True)

    def close(self) -> None:
        self._disarm()
        self.heap.clear()


def _expire(fut):
    if not fut.done():
        fut.set_result(False)


class Player:
    """Runs a plan against a target on the current event loop; results go to ``report``.

    ``on_exchange(attempt, request_message, response_message)``, when given, sees every request
    tried with the bytes sent and the response received, or a ``failed`` record whose data is
    the error's kind (for ``--output``).

    ``core_counts``: ``_took``, ``_tried``, ``answered`` and ``_pump`` are as the compiled
    core's ``PumpCore`` does them itself on the way of a request (counting into the report's
    ``Tally``); a subclass that changes any of them sets it False.
    """

    core_counts = True

    def __init__(self, plan, schedule: Schedule, target: Target, options: Options, report,
                 clock, pacer: Pacer | None = None, on_exchange=None, wall_offset: int = 0):
        self.plan = plan
        self.schedule = schedule
        self.target = target
        self.opts = options
        self.report = report
        self.clock = clock
        self.pacer = pacer or Pacer(clock)
        self.on_exchange = on_exchange
        self.wall_offset = wall_offset
        self.first_kept = None       # recorded time of the first request planned (streamed)
        self.loop = None
        self.stopping = False
        self.end_ns = None
        self.budget = options.limit or None
        self.tasks: set = set()
        self.timeout_ns = int(options.timeout * NS)
        self.lead = CONNECT_LEAD_TLS_NS if target.ssl else CONNECT_LEAD_NS
        self.lookahead = None       # a StreamLookahead the stream launcher tells its deadlines
        self.reader_ended = None    # a stream's reader that ended on its own, joined after the run
        self.late_answers = None    # streamed: (conn id, index) -> status, recorded status unknown
        self.on_recorded = None     # (request, final) of each streamed request, for the output log
        self.fed = 0
        self.room = None
        self.room_at = MAX_FED // 2  # fed below this: the launcher may feed again
        self.slots = None
        self.crash = None           # an exception that escaped a connection task: a bug
        self.send_loop = None       # the core.SendLoop of an http run
        self.dues = None            # a timed run's DueSends (its clock the loop's)

    # -- results -----------------------------------------------------------------------------
    def answered(self, att: Attempt, m: Message, now: int, proto: ReplayProtocol):
        late = self.late_answers
        if att.unknown:
            self._status_came(att)
        if late is not None and att.req.recorded_status is None:
            late[(att.conn_id, att.req.index)] = m.status    # its recorded status may come
            if len(late) > MAX_LATE_ANSWERS:
                late.popitem(last=False)
        intended = att.deadline if att.deadline is not None else att.sent_ns
        self.report.on_answer(m.status, att.req.recorded_status, now - att.sent_ns,
                              now - intended, now)
        if self.on_exchange is not None:
            self.on_exchange(att, self._request_message(att, proto), self._response_message(att, m))

    def _status_came(self, att: Attempt):
        """A streamed request tried before its recorded answer ended: its status, if it came
        while the request was on its way, is counted now."""
        status = att.req.recorded_status
        if status is not None:
            att.unknown = False
            self.report.status_came(status)

    def failed(self, att: Attempt, kind: str, was_sent: bool):
        if att.unknown:
            self._status_came(att)
        self.report.on_error(kind, was_sent)
        self._failed_record(att, kind, was_sent)

    def _failed_record(self, att: Attempt, kind: str, was_sent: bool):
        """For ``on_exchange``: the request and a ``failed`` record naming ``kind``."""
        if self.on_exchange is not None:
            now = self.clock.now()
            req = self._request_message(att, None, att.sent_ns if was_sent and att.sent_ns else now)
            t = now + self.wall_offset
            r = att.req
            self.on_exchange(att, req, Message(
                KIND_RESPONSE, att.conn_id, r.index, t, t, req.client, req.server,
                F_REPLAYED | F_FAILED | F_INCOMPLETE, kind.encode("ascii"), r.method, r.uri, 0, 0, 0))

    def _request_message(self, att, proto, sent_ns=None):
        """The request as sent: ``ts_first`` when it was due (its deadline; the send itself for
        --speed max), ``ts_last`` when it was written."""
        r = att.req
        sent = (att.sent_ns if sent_ns is None else sent_ns) + self.wall_offset
        due = att.deadline + self.wall_offset if att.deadline is not None else sent
        local, peer = (proto.local, proto.peer) if proto is not None else \
            (("", 0), (self.target.addr, self.target.port))
        return Message(KIND_REQUEST, att.conn_id, r.index, min(due, sent), sent, local, peer,
                       F_REPLAYED | r.flags, r.data, r.method, r.uri, 0, r.body_length,
                       r.head_length)

    def _response_message(self, att, m):
        m.conn = att.conn_id
        m.index = att.req.index
        m.ts_first += self.wall_offset
        m.ts_last += self.wall_offset
        m.method = att.req.method
        m.uri = att.req.uri
        m.flags |= F_REPLAYED
        return m

    # -- running -----------------------------------------------------------------------------
    def stop(self):
        self.stopping = True
        if self.room is not None:
            self.room.set()

    def cancel(self):
        """Ctrl-C: stop at once; what is in flight stays in flight."""
        self.stopping = True
        self.report.interrupted = True
        for t in list(self.tasks):
            t.cancel()

    async def run(self):
        self.loop = asyncio.get_running_loop()
        self.slots = asyncio.Semaphore(max(1, self.opts.connections))
        if self.opts.send_loop and self.target.ssl is None and core.SendLoop is not None:
            self.send_loop = core.SendLoop(self.loop)
            self.send_loop.start()
        if self.schedule.timed and self.opts.timed_pump and self.clock.now is time.monotonic_ns:
            self.dues = DueSends(self.loop, self.clock.now, self.pacer.spin_ns, self._crashed)
        try:
            await self._run()
        finally:
            try:
                if self.dues is not None:
                    self.dues.close()
                if self.send_loop is not None:
                    self.send_loop.close()
            finally:
                if self.reader_ended is not None:
                    self.reader_ended.stop()

    async def _run(self):
        if self.plan.streaming:
            await self._prefill()
        barrier = self.opts.start_barrier if self.schedule.timed else None
        if barrier is not None:          # --workers: every worker ready, then one start and t0
            start, t0 = await barrier.wait(self.first_kept, START_DELAY_NS, lambda: self.stopping)
            if t0 is not None and self.schedule.speed is not None:
                self.schedule.t0 = t0
                if self.plan.streaming:
                    self.reader.t0_ns.value = t0
        now = self.clock.now()
        self.schedule.start = now + (START_DELAY_NS if self.schedule.timed else 0) \
            if barrier is None else start
        if self.plan.streaming:
            self.reader.start_ns.value = self.schedule.start
        self.report.started_ns = now
        if self.opts.duration:
            self.end_ns = self.schedule.start + int(self.opts.duration * NS)
            self.loop.call_later(self.opts.duration + (self.schedule.start - now) / NS, self.stop)
        launcher = asyncio.ensure_future(self._launch_stream() if self.plan.streaming
                                         else self._launch())
        self.tasks.add(launcher)
        try:
            await launcher
        except asyncio.CancelledError:
            pass
        self.tasks.discard(launcher)
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.report.ended_ns = self.clock.now()

    async def _launch(self):
        plan, sched = self.plan, self.schedule
        iterations = itertools.count() if self.opts.loop else range(1)
        stride = plan.conn_stride
        for it in iterations:
            for cp in plan.connections:
                if self.stopping or self.budget == 0:
                    return
                first = cp.requests[0]
                d0 = sched.deadline(first.t, first.seq, it)
                if d0 is not None:
                    if self.end_ns is not None and d0 >= self.end_ns:
                        return
                    await self.pacer.sleep_until(d0 - self.lead)
                await self.slots.acquire()
                if self.stopping:
                    self.slots.release()
                    return
                task = asyncio.ensure_future(self._connection(cp, it, cp.conn + it * stride))
                self.tasks.add(task)
                task.add_done_callback(self._task_done)
            if not plan.connections:
                return

    async def _launch_stream(self):
        """``_launch`` for a ``stream.StreamingPlan``: requests arrive from the reader's process
        in recorded time order; each recorded connection (per pass) gets a ``_Feed`` that its
        task reads, opened as its first request comes and ended after its last. The feeder
        keeps ``AHEAD_NS`` ahead of the schedule, waking once for all the requests due within
        ``FEED_SLACK_NS`` of each other (a timer per request would cost more than the rest of
        the feeding), and letting the other tasks run after ``FEED_SLICE_NS`` of feeding without
        a wait (a request costs it a few µs: at 20,000 requests/s, the 400 due within 20 ms would
        take 1.7 ms in one piece; in runs of 256 the sends and answers due meanwhile waited up to
        1 ms); ``--speed max``: at most ``MAX_FED`` requests fed and not yet taken."""
        from replay.play import stream as S

        plan, sched, pacer, now = self.plan, self.schedule, self.pacer, self.clock.now
        deadline = core.deadline
        ready = core.feed_ready if sched.timed else None     # (--speed max: room to wait for)
        due = self.lookahead.due if self.lookahead is not None else None
        reader = self.reader
        queued = reader.items    # what the reader sent, unpacked (``get`` takes more in)
        stride = plan.conn_stride
        self.late_answers = OrderedDict()
        feeds: OrderedDict = OrderedDict()   # (conn, pass) -> _Feed, least recently fed first
        late: OrderedDict = OrderedDict()   # (conn, index, pass) -> request, its status to come
        running: dict = {}       # (conn, pass) -> the task of its last feed, while it runs
        timed = sched.timed
        slice_end = 0            # timed: when the feeder lets the other tasks run
        self.fed = 0
        self.room = asyncio.Event()
        try:
            while not self.stopping and self.budget != 0:
                if ready is not None and queued:
                    # the common case, in the core: requests of connections already fed,
                    # due within AHEAD_NS (+ slack), until the slice ends; then one at a time
                    ready(queued, feeds, self, sched, due, self.on_recorded, slice_end,
                          AHEAD_NS + FEED_SLACK_NS)
                    if not queued:
                        continue
                got = queued.popleft() if queued else reader.get()
                if got is None:
                    if reader.done:
                        break
                    await asyncio.sleep(POLL_S)
                    continue
                it, item = got
                kind = item[0]
                if kind.__class__ is not PlannedRequest:       # the reader's marks
                    if kind == S.LATE:               # a recorded answer that ended late
                        conn, index, status, final = item[1]
                        r = late.pop((conn, index, it), None)
                        if r is not None:
                            r.recorded_status = status
                        got = self.late_answers.pop((conn + it * stride, index), None)
                        if got is not None:          # answered before its recorded status came
                            self.report.late_recorded(status, got)
                        if final is not None and self.on_recorded is not None:
                            self.on_recorded(None, final)
                        continue
                    if kind == S.STATS:              # taken in by the reader as it arrived
                        continue
                    if kind == S.END_CONN:
                        f = feeds.pop((item[1], it), None)
                        if f is not None:
                            f.end()
                        continue
                    if kind == S.END_PASS:
                        for k in [k for k in feeds if k[1] == it]:
                            feeds.pop(k).end()
                        continue
                    if kind == S.FAILED:             # reported after the run, as a crash is
                        if self.crash is None:
                            self.crash = item[1]
                        self.cancel()
                        break
                req, rec_req, rec_final = item
                if req.recorded_status is None:
                    late[(req.conn, req.index, it)] = req
                    if len(late) > MAX_LATE_ANSWERS // 10:    # (they hold their bodies)
                        late.popitem(last=False)
                d = deadline(sched, req.t, req.seq, it) if timed else None
                if d is not None:
                    if self.end_ns is not None and d >= self.end_ns:
                        break
                    t = now()
                    if d - AHEAD_NS > t + FEED_SLACK_NS:
                        # a wait, then every request due within FEED_SLACK_NS of it at once
                        await pacer.sleep_until(d - AHEAD_NS)
                        slice_end = now() + FEED_SLICE_NS
                    elif t >= slice_end:         # (a fast --speed: many in 20 ms)
                        await asyncio.sleep(0)
                        slice_end = now() + FEED_SLICE_NS
                else:
                    while self.fed >= MAX_FED and not self.stopping and self.budget != 0:
                        self.room.clear()
                        await self.room.wait()
                key = (req.conn, it)
                f = feeds.get(key)
                if f is None:
                    if d is not None and self.slots.locked():
                        # every slot taken: wait until this connection is needed (its task, made
                        # at once when a slot is free, waits itself to connect ``lead`` before
                        # its first request; the feeder keeps feeding meanwhile: at the start of
                        # a run, a wait here per connection left the whole of AHEAD_NS to feed
                        # while the first requests were due)
                        await pacer.sleep_until(d - self.lead)
                    while True:
                        if self.slots.locked():
                            # every slot taken: end the least recently fed connection that
                            # waits with nothing queued (its recorded end may be unknown: the
                            # rules may have dropped its last requests), rather than wait for
                            # its idle end; none waits yet: look again shortly
                            for k, g in feeds.items():
                                if not g.items and g.waiter is not None:
                                    feeds.pop(k).end()
                                    break
                        if not self.slots.locked():
                            await self.slots.acquire()       # (free: no waiting task and timer)
                            break
                        try:
                            await asyncio.wait_for(self.slots.acquire(), SLOT_WAIT_S)
                            break
                        except asyncio.TimeoutError:
                            pass
                    if self.stopping or self.budget == 0:
                        self.slots.release()
                        break
                    f = feeds[key] = _Feed(self)
                    task = asyncio.ensure_future(self._connection(
                        f, it, req.conn + it * stride, after=running.get(key)))
                    running[key] = task
                    task.add_done_callback(
                        lambda t, k=key: running.pop(k) if running.get(k) is t else None)
                    self.tasks.add(task)
                    task.add_done_callback(self._task_done)
                else:
                    feeds.move_to_end(key)       # most recently fed last
                f.put(req)
                if d is not None and self.lookahead is not None:
                    self.lookahead.push(d)
                if self.on_recorded is not None and it == 0:
                    self.on_recorded(rec_req, rec_final)
        finally:
            if reader.done and reader.finished:
                # it ended on its own: its process is joined after the run (``run``), not now,
                # which would hold the loop, and the sends due, while that process exits (4 ms)
                self.reader_ended = reader
            else:
                reader.stop()
            for f in feeds.values():
                f.end()

    async def _prefill(self):
        """Start the stream's reader before the schedule, and take what it plans until it has
        read the first ``READ_AHEAD_NS`` of the schedule (or ``stream.QUEUE_ITEMS``, or the
        whole log; at most ``PREFILL_S``): the reading that follows keeps ``READ_AHEAD_NS``
        ahead of the schedule, a little at a time, in its own process. ``--speed max`` starts
        after ``PREFILL_MAX_ITEMS``: the reader plans faster than the sender sends."""
        from replay.play import stream as S

        r = self.reader = self.plan.start(None if self.opts.loop else 1, _Hold(self.schedule),
                                          keep_recorded=self.on_recorded is not None)
        end = time.monotonic() + PREFILL_S
        # --speed max: a few batches, then the reader keeps ahead of the sender on its own
        enough = S.QUEUE_ITEMS if self.schedule.timed else PREFILL_MAX_ITEMS
        while time.monotonic() < end and not r.done and not r.holding and len(r.items) < enough:
            r.receive(0.005)
        while r.receive(0):          # what the reader sent before it began to wait
            pass
        # the schedule starts at the first request the rules kept, not the log's first (with
        # --workers: the first any worker kept, agreed in ``run``)
        first = self.first_kept = next((item[0].t for it, item in r.items
                                        if it == 0 and isinstance(item[0], PlannedRequest)), None)
        if first is not None and first > self.schedule.t0 and self.schedule.speed is not None \
                and self.opts.start_barrier is None:
            self.schedule.t0 = first
            r.t0_ns.value = first

    def _pump(self, proto: ReplayProtocol) -> bool:
        """``proto`` has every answer (or a pipelined request came): its ``pump_next`` sends the
        next request of its feed (now, or timed at its deadline), and those pipelined after it,
        as its task would; False when its task must decide (the feed is empty, the run stops,
        the connection cannot be reused)."""
        try:
            return proto.pump_next()
        except Exception as e:  # noqa: BLE001  (a bug: stop the run and raise it at the end)
            self._crashed(e)
            return False

    def _crashed(self, e: BaseException) -> None:
        if self.crash is None:
            self.crash = e
        self.cancel()

    def _tried(self, req) -> None:
        """``req`` is tried now: it counts against ``--limit`` and in the report."""
        if self.budget is not None:
            self.budget -= 1
            if self.budget == 0:
                self._spent()
        self.report.on_attempt(req.recorded_status)

    def _spent(self) -> None:
        """``--limit`` is reached: whoever waits to send is told (the stream launcher, which
        may wait for room; the connections holding a request for its deadline)."""
        if self.room is not None:
            self.room.set()
        if self.dues is not None:
            self.dues.wake_all()

    def _took(self):
        """A feed's request was taken by its connection."""
        self.fed -= 1
        if self.fed < self.room_at and self.room is not None:
            self.room.set()

    def _task_done(self, task):
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None and self.crash is None:
            # a bug, not a fault of the target: stop, and raise it at the end of the run
            self.crash = task.exception()
            self.cancel()

    async def _open(self):
        """A new connection to the target, or the kind of error that prevented it."""
        t = self.target
        r = self.report
        start = self.clock.now()
        try:
            if self.send_loop is not None:
                proto = await asyncio.wait_for(self._connect(), self.opts.timeout)
            else:
                _, proto = await asyncio.wait_for(self.loop.create_connection(
                    lambda: ReplayProtocol(self), t.addr, t.port, ssl=t.ssl,
                    server_hostname=t.host if t.ssl else None, family=t.family),
                    self.opts.timeout)
        except ConnectionRefusedError:
            return None, "refused"
        except (asyncio.TimeoutError, TimeoutError):
            return None, "timeout"
        except ssl.SSLError:
            return None, "tls"
        except OSError:
            return None, "connect"
        r.on_connect(self.clock.now() - start)
        return proto, None

    async def _connect(self) -> ReplayProtocol:
        """A connection on the run's ``SendLoop``, connected, read and written by it (with
        TCP_NODELAY, as asyncio's own TCP transports)."""
        t = self.target
        sock = socket.socket(t.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self.send_loop.connect(sock, (t.addr, t.port))
            proto = ReplayProtocol(self)
            self.send_loop.transport(sock, proto)
        except BaseException:
            self.send_loop.forget(sock)
            sock.close()
            raise
        return proto

    async def _reopen(self, proto: ReplayProtocol | None):
        """After ``proto`` was lost: a new connection carrying its requests to send again.

        None when there is nothing to send again or the new connection failed (those requests
        then fail with its error, counted as sent)."""
        if proto is None or not proto.retry:
            return None
        atts, proto.retry = proto.retry, []
        new, kind = await self._open()
        if new is None:
            for att in atts:
                self.failed(att, kind, True)
            return None
        self.report.on_reconnect(len(atts), sum(len(a.req.data) for a in atts))
        for att in atts:
            new.send(att)
        return new

    async def _settle(self, proto: ReplayProtocol) -> ReplayProtocol | None:
        """Wait for the answers outstanding on ``proto``, sending lost ones again; the connection
        they ended on (None if it timed out, or was lost with nothing to send again)."""
        while proto is not None:
            ok = await proto.wait_idle(self.timeout_ns)
            if not ok:
                proto.abort("timeout")
                return None
            if not proto.retry:
                return proto
            proto = await self._reopen(proto)
        return None

    async def _connection(self, cp, it: int, conn_id: int, after=None):
        sched, pacer, opts, report = self.schedule, self.pacer, self.opts, self.report
        now = self.clock.now
        proto = None
        if after is not None:
            # the same recorded connection's previous feed still runs: keep its order
            await asyncio.gather(after, return_exceptions=True)
        if not isinstance(cp, _Feed):           # planned whole: all its requests at once
            cp = _Feed.of(self, cp.requests)
        requests = cp
        # kept alive: between requests the connection waits for its answer *before* taking the
        # next request, and the answer's callback sends the next ones itself while it can
        # (``_pump``; timed, each at its deadline, from ``dues``): no task switch per request
        pump = None
        if opts.keepalive and (self.dues is not None or not sched.timed):
            pump = (cp, it, conn_id, self.dues if sched.timed else None)
        idle_lost = False
        try:
            while True:
                if pump is not None and proto is not None and proto.pending and \
                        not (cp.items and cp.items[0].pipelined):
                    held = proto
                    held.pump = pump
                    cp.pumping = held
                    try:
                        proto = await self._settle(proto)
                    finally:
                        held.pump = None
                        cp.pumping = None
                        waited, held.due = held.due, None
                    # the target closed it while idle, before that request was due: a reconnect
                    # (counted if it is made)
                    idle_lost = waited is not None and proto is not None and \
                        (proto.closed or not proto.reusable)
                try:
                    req = await requests.__anext__()
                except StopAsyncIteration:
                    break
                if self.stopping or self.budget == 0:
                    break
                deadline = core.deadline(sched, req.t, req.seq, it)
                if deadline is not None and self.end_ns is not None and deadline >= self.end_ns:
                    break
                if proto is None and deadline is not None:
                    # no connection yet (a streamed one's task is made as its first request is
                    # handed over, up to AHEAD_NS before it is due): the request is tried from
                    # ``lead`` before it, as a planned run's are, so that ``--limit`` and the
                    # counts of what was tried go in deadline order
                    await pacer.sleep_until(deadline - self.lead)
                    if self.stopping or self.budget == 0:
                        break
                self._tried(req)
                att = Attempt(req, it, deadline, conn_id)
                held = False
                if proto is not None and (not req.pipelined or not opts.keepalive):
                    proto = await self._settle(proto)
                    if proto is not None and (not opts.keepalive or not proto.reusable or proto.closed):
                        if not proto.closed:
                            proto.transport.close()
                        proto = None
                        if idle_lost:
                            report.on_reconnect(0)
                    idle_lost = False
                    if deadline is not None and now() > deadline:
                        held = True
                elif proto is not None and proto.closed:
                    proto = await self._reopen(proto)       # pipelined behind requests lost with it
                if proto is not None and deadline is not None and not proto.pending:
                    # idle until this request: the target may close the connection meanwhile
                    await pacer.sleep_until(deadline - self.lead)
                    if proto.closed or not proto.reusable:
                        self._drop(proto)
                        proto = None
                        report.on_reconnect(0)
                if proto is None or proto.closed:
                    if deadline is not None:
                        await pacer.sleep_until(deadline - self.lead)
                    proto, kind = await self._open()
                    if proto is None:
                        self.failed(att, kind, False)
                        continue
                if deadline is not None:
                    await pacer.wait_until(deadline)
                if proto.closed:
                    # lost in the last moments before the deadline: this request has not left
                    retry = proto.retry
                    proto = await self._reopen(proto) if retry else None
                    if proto is None or proto.closed:
                        proto, kind = await self._open()
                        if proto is None:
                            self.failed(att, kind, False)
                            continue
                        if not retry:
                            report.on_reconnect(0)
                t = proto.send(att)
                # lateness from the send itself, not from the end of the wait
                report.on_sent(len(req.data), None if deadline is None else t - deadline, held, t)
            if proto is not None:
                proto = await self._settle(proto)
                if proto is not None and not proto.closed:
                    proto.transport.close()
        except asyncio.CancelledError:
            if proto is not None and not proto.closed and proto.transport is not None:
                proto.pending.clear()
                proto.transport.abort()
            raise

    @staticmethod
    def _drop(proto: ReplayProtocol):
        if not proto.closed and proto.transport is not None:
            proto.transport.close()


class StreamPlayer(Player):
    """Requests handed over as they are captured (``replay shadow``), sent at once to one target.

    ``submit(key, req, conn_id, due)`` (on the loop's thread) queues a ``PlannedRequest`` for the
    stream ``key`` (a production connection, or one copy of it); one task per stream sends its
    requests in order on a target connection of its own, each after the previous answer (or its
    failure), opens that connection on the first request and closes it after ``close(key)`` (the
    production connection ended) once its queue is empty, after ``idle`` seconds without a
    request, or after an answer that closes it. ``conn_id`` is the connection id the request is
    reported under (``on_exchange``); ``due`` (loop clock ns) is when the request was complete
    in production, so the time it waited before being sent is measured as lateness.
    ``on_done(req)`` is called once per request that leaves the queue (answered, failed, or
    dropped when the run ends), so the caller can bound what is queued. ``drain(seconds)``
    stops taking requests and gives those queued or in flight that long.
    """

    core_counts = False      # its answered and failed do more (on_done)

    def __init__(self, target: Target, options: Options, report, clock, *, idle: float = 5.0,
                 on_done=None, on_exchange=None, wall_offset: int = 0):
        super().__init__(None, None, target, options, report, clock, on_exchange=on_exchange,
                         wall_offset=wall_offset)
        self.idle = idle
        self.on_done = on_done
        self.queues: dict = {}          # stream key -> _ConnQueue of attempts not yet sent
        self.drops: dict = {}           # reason -> requests never sent (not errors of the target)

    def answered(self, att, m, now, proto):
        super().answered(att, m, now, proto)
        if self.on_done is not None:
            self.on_done(att.req)

    def failed(self, att, kind, was_sent):
        super().failed(att, kind, was_sent)
        if self.on_done is not None:
            self.on_done(att.req)

    def drop(self, req, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if self.on_done is not None:
            self.on_done(req)

    def submit(self, key, req, conn_id: int = 0, due: int | None = None) -> None:
        if self.stopping:
            self.drop(req, "stopping")
            return
        q = self.queues.get(key)
        if q is None:
            q = self.queues[key] = _ConnQueue(self.loop)
            task = asyncio.ensure_future(self._stream(key, q))
            self.tasks.add(task)
            task.add_done_callback(self._stream_done)
        q.put(Attempt(req, 0, due, conn_id))

    def close(self, key) -> None:
        """The production connection of stream ``key`` ended: close its target connection once
        what is queued on it is sent and answered."""
        q = self.queues.get(key)
        if q is not None:
            q.closing = True
            q.wake()

    def start(self) -> None:
        """Bind to the running loop (call on it before the first ``submit``)."""
        self.loop = asyncio.get_running_loop()
        self.slots = asyncio.Semaphore(max(1, self.opts.connections))
        self.report.started_ns = self.clock.now()

    def _stream_done(self, task):
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.crash is None:
            self.crash = task.exception()

    async def drain(self, seconds: float) -> None:
        """No more requests; wait up to ``seconds`` for what is queued and in flight, then give
        up on the rest (queued: dropped ``drain``; sent: error ``interrupted``)."""
        self.stopping = True
        for q in self.queues.values():
            q.wake()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=max(0.0, seconds))
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.report.ended_ns = self.clock.now()

    async def _stream(self, key, q: "_ConnQueue") -> None:
        report = self.report
        proto = None
        att = None
        try:
            await self.slots.acquire()
        except asyncio.CancelledError:          # cancelled while waiting for a connection slot
            while q.items:
                self.drop(q.items.popleft().req, "drain")
            self._detach(key, q)
            raise
        try:
            while True:
                if not q.items:
                    if self.stopping or q.closing or not await q.wait(self.idle):
                        break
                    continue
                att = q.items.popleft()
                report.on_attempt(None)
                if proto is not None:
                    proto = await self._settle(proto)
                    if proto is not None and (not proto.reusable or proto.closed):
                        self._drop(proto)
                        proto = None
                if proto is None or proto.closed:
                    proto, kind = await self._open()
                    if proto is None:
                        # never sent: a drop of this target's, and in the log a failed record
                        self._failed_record(att, kind, False)
                        req, att = att.req, None
                        self.drop(req, kind)
                        continue
                req = att.req
                t = proto.send(att)
                late = None if att.deadline is None else max(0, t - att.deadline)
                att = None
                report.on_sent(len(req.data), late, False, t)
            self._detach(key, q)        # a request from now on starts a new task
            if proto is not None:
                proto = await self._settle(proto)
                if proto is not None:
                    self._drop(proto)
        except asyncio.CancelledError:
            if att is not None:
                self.drop(att.req, "drain")
            while q.items:
                self.drop(q.items.popleft().req, "drain")
            if proto is not None:
                while proto.pending:
                    self.failed(proto.pending.popleft(), "interrupted", True)
                retry, proto.retry = proto.retry, []
                for a in retry:                  # lost with their connection, not sent again
                    self.failed(a, "interrupted", True)
                if not proto.closed and proto.transport is not None:
                    proto.transport.abort()
            raise
        finally:
            self.slots.release()
            self._detach(key, q)

    def _detach(self, key, q: "_ConnQueue") -> None:
        if self.queues.get(key) is q:
            del self.queues[key]


class _ConnQueue:
    """The requests of one production connection waiting for their target connection."""

    __slots__ = ("items", "loop", "waiter", "closing")

    def __init__(self, loop):
        self.items: deque = deque()
        self.loop = loop
        self.waiter = None
        self.closing = False

    def put(self, req) -> None:
        self.items.append(req)
        self.wake()

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(True)

    async def wait(self, timeout: float) -> bool:
        """True when a request (or a wake-up) came within ``timeout`` seconds."""
        fut = self.waiter = self.loop.create_future()
        h = self.loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            h.cancel()
            self.waiter = None


class _Hold:
    """How long the stream's reader (in its process) waits before handing over a request: a
    timed run reads no further than ``READ_AHEAD_NS`` ahead of the schedule; before the start
    (``start_ns`` 0) the first ``READ_AHEAD_NS``, then it waits (None)."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.first = None          # offset of the first request seen before the start

    def offset(self, req, it):
        return self.schedule.offset(req.t, req.seq, it)

    def __call__(self, off: int, start_ns: int):
        if not start_ns:
            # the rules may drop the log's first seconds: prefill from the first request kept
            if self.first is None:
                self.first = off
            return 0.0 if off - self.first <= READ_AHEAD_NS else None
        return max(0.0, (off - self.released_until(start_ns)) / NS)

    def released_until(self, start_ns: int) -> int:
        """Started: every request due at this offset or before may go now (and later)."""
        return time.monotonic_ns() - start_ns + READ_AHEAD_NS


class _Feed:
    """The requests of one recorded connection, handed over as the stream's reader plans them
    (or all at once: ``of``); its connection task reads them with ``async for``, until
    ``end()``."""

    __slots__ = ("player", "items", "waiter", "ended", "pumping")

    def __init__(self, player):
        self.player = player
        self.items: deque = deque()
        self.waiter = None
        self.ended = False
        self.pumping = None          # the connection whose answers send these, while they do

    def put(self, req) -> None:
        self.items.append(req)
        self.player.fed += 1
        if self.pumping is not None and req.pipelined and len(self.items) == 1:
            # the connection waits for its answers: a pipelined request goes now, as its task
            # would have sent it
            self.player._pump(self.pumping)
        self._wake()

    @classmethod
    def of(cls, player, requests) -> "_Feed":
        """A feed handed all of ``requests`` (a connection of a plan held whole) and ended."""
        f = cls(player)
        f.items.extend(requests)
        player.fed += len(f.items)
        f.ended = True
        return f

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self.items:
            if self.ended:
                raise StopAsyncIteration
            self.waiter = self.player.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        self.player._took()
        return self.items.popleft()
