"""A plan read as the replay goes: a log of any size, replayed in memory that does not grow with it.

``build_plan`` (``plan.py``) holds every request of a file before the first is sent: fine for a
capture of minutes, not for a day of production. For a ``.rlog`` log, ``StreamingPlan`` instead:

1. reads the log's block tables once (no payload is decompressed: ~0.15 ms a block) for what
   the schedule and the status line need up front (``index_header``): how many requests, the
   first and last request times, the connection ids' bound, how many connections, and the last
   request of each connection (so its replay connection can close after it, as recorded);
2. then, in a thread of its own (``StreamReader``), reads the messages block by block through
   the rules and plans them with ``StreamPlanner`` (sans-IO): requests come out in recorded time
   order, each with the status of its recorded final response and the pipelining of
   ``build_plan``, into a bounded queue the sender takes from as their deadlines approach.

Rules (``StreamPlanner``), beyond those of ``plan.py``:
- a log is written in completion order, a request when its last byte was captured: a request is
  released once the log has gone ``REORDER_NS`` past its start (a request that took longer to
  arrive than that comes out late and is counted in ``reordered``), and once its final response
  is read or ``ANSWER_WAIT_NS`` have passed; an answer that ends later still gives the planned
  request its recorded status (if read within ``CONN_IDLE_NS``, ``MAX_LATE`` at most) and comes
  out as ``(None, None, final)`` for the output log; without it the next request on that
  connection is taken as not pipelined (it waits for the answer, as most clients do);
- at most ``MAX_PENDING`` requests wait; beyond that the oldest is released early;
- a recorded connection ends after its last request (from the index; the rules may drop its
  last requests, so also) after ``CONN_IDLE_NS`` of recorded time without a request: the core's
  own idle timeout. Its replay connection then closes once that request is answered;
- the recorded messages of each planned request (the request and its final response) come out
  with it, for the output log, so nothing is read twice.

Memory: the queue (``QUEUE_ITEMS``), the planner's window (a few seconds of recorded traffic),
one connection state per recorded connection seen in the last ``CONN_IDLE_NS``, and the index
header (16 bytes per recorded connection).
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from replay.events import F_CHUNKED, F_INTERIM, F_REPLAYED, KIND_REQUEST
from replay.httpmsg import body_length, set_content_length, set_host
from replay.play.plan import CUT, PlannedRequest, _head_length

NS = 1_000_000_000
REORDER_NS = NS              # log time past a request's start before it is released
ANSWER_WAIT_NS = 2 * NS      # ... and at most this long for its final response
CONN_IDLE_NS = 120 * NS      # recorded time after which a connection without requests is over
MAX_PENDING = 100_000        # requests waiting in the planner's window
MAX_EARLY = 10_000           # final responses read before their request (kept at most)
MAX_LATE = 100_000           # requests planned before their answer ended, whose status may come
QUEUE_ITEMS = 20_000         # planned requests read ahead of the sender


@dataclass
class StreamHeader:
    """What the index says of a log's requests (replayed messages left out)."""

    requests: int = 0
    t0: int = 0
    t_last: int = 0
    conn_stride: int = 0               # max conn + 1 over every message
    connections: int = 0
    conns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))     # sorted
    last_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def last_of(self, conn: int) -> int | None:
        """The index of the last recorded request of ``conn``, or None when unknown."""
        i = int(np.searchsorted(self.conns, np.uint64(conn)))
        if i < len(self.conns) and int(self.conns[i]) == conn:
            return int(self.last_index[i])
        return None


def index_header(reader) -> StreamHeader:
    """``StreamHeader`` from a ``LogReader``'s block tables alone."""
    h = StreamHeader()
    t0 = t1 = None
    max_conn = -1
    parts_c, parts_i = [], []
    for b in list(reader.blocks):
        t = reader._table(b)
        if t is None:
            continue
        c = t.cols
        mine = (c["flags"] & F_REPLAYED) == 0
        if not mine.any():
            continue
        conn = c["conn"][mine]
        max_conn = max(max_conn, int(conn.max()))
        req = c["kind"][mine] == KIND_REQUEST
        if not req.any():
            continue
        rc, ri, rt = conn[req], c["index"][mine][req], c["ts_first"][mine][req]
        h.requests += len(rc)
        lo, hi = int(rt.min()), int(rt.max())
        t0 = lo if t0 is None else min(t0, lo)
        t1 = hi if t1 is None else max(t1, hi)
        uc, last = _max_by(rc, ri)
        parts_c.append(uc)
        parts_i.append(last)
    if parts_c:
        h.conns, h.last_index = _max_by(np.concatenate(parts_c), np.concatenate(parts_i))
    h.t0, h.t_last = t0 or 0, t1 or 0
    h.conn_stride = max_conn + 1
    h.connections = len(h.conns)
    return h


def _max_by(keys: np.ndarray, values: np.ndarray):
    """(sorted unique keys, the largest value of each)."""
    order = np.lexsort((values, keys))
    k, v = keys[order], values[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last], v[last].astype(np.int64)


class _Pending:
    __slots__ = ("msg", "final", "seq")

    def __init__(self, msg, seq):
        self.msg = msg
        self.final = None
        self.seq = seq


class _Conn:
    __slots__ = ("resp_end", "last_t")

    def __init__(self):
        self.resp_end = None     # ts_last of the previous planned request's final response
        self.last_t = 0


class StreamPlanner:
    """Recorded messages in (log order), planned requests out (recorded time order).

    ``push(msg)`` and ``finish()`` return a list of ``(PlannedRequest, request, final response or
    None)``, and ``(None, None, final)`` for a final response read after its request was planned; ``ended`` lists the recorded connections that are over since the last call (the
    caller takes and clears it)."""

    def __init__(self, host: str | None, keep_host: bool = False, header: StreamHeader | None = None):
        self.host = host
        self.keep_host = keep_host
        self.header = header
        self.heap: list = []
        self.waiting: dict = {}            # (conn, index) -> _Pending
        self.early: OrderedDict = OrderedDict()   # (conn, index) -> final response read first
        self.conns: OrderedDict = OrderedDict()   # conn -> _Conn, least recently planned first
        self.late: OrderedDict = OrderedDict()    # (conn, index) -> PlannedRequest planned unanswered
        self.ended: list = []
        self.now = None                    # the log's progress: the latest ts_last read
        self.n = 0
        self.seq = 0
        self.planned = 0
        self.pipelined = 0
        self.reordered = 0
        self.unknown_status = 0
        self.skipped: dict = {}
        self._last_t = None

    def push(self, m) -> list:
        if m.flags & F_REPLAYED:
            return []
        if self.now is None or m.ts_last > self.now:
            self.now = m.ts_last
        key = (m.conn, m.index)
        if m.kind == KIND_REQUEST:
            if key not in self.waiting:
                p = _Pending(m, self.n)
                self.n += 1
                p.final = self.early.pop(key, None)
                self.waiting[key] = p
                heapq.heappush(self.heap, (m.ts_first, m.conn, m.index, p.seq, p))
        elif m.index >= 0 and not m.flags & F_INTERIM:
            p = self.waiting.get(key)
            if p is not None:
                p.final = m
            else:
                req = self.late.pop(key, None)
                if req is not None:
                    # planned before its answer ended: its recorded status, now (the sender
                    # reads it when the request is tried, ahead of which this usually is)
                    req.recorded_status = m.status
                    self.unknown_status -= 1
                    out = self._release(False)
                    out.append((None, None, m))
                    return out
                self.early[key] = m
                if len(self.early) > MAX_EARLY:
                    self.early.popitem(last=False)
        return self._release(False)

    def finish(self) -> list:
        out = self._release(True)
        self.ended.extend(self.conns.keys())
        self.conns.clear()
        self.early.clear()
        return out

    def _release(self, everything: bool) -> list:
        out = []
        heap, now = self.heap, self.now
        while heap:
            t, _, _, _, p = heap[0]
            if not everything and len(heap) <= MAX_PENDING:
                age = now - t
                if age < REORDER_NS or (p.final is None and age < ANSWER_WAIT_NS):
                    break
            heapq.heappop(heap)
            del self.waiting[(p.msg.conn, p.msg.index)]
            got = self._plan(p)
            if got is not None:
                out.append(got)
        if now is not None:
            self._expire(now)
        return out

    def _plan(self, p: _Pending):
        m, final = p.msg, p.final
        st = self.conns.get(m.conn)
        if st is None:
            st = self.conns[m.conn] = _Conn()
        else:
            self.conns.move_to_end(m.conn)
        prev_end, st.resp_end = st.resp_end, (final.ts_last if final is not None else None)
        st.last_t = m.ts_first
        last = self.header.last_of(m.conn) if self.header is not None else None
        if last is not None and m.index >= last:
            del self.conns[m.conn]
            self.ended.append(m.conn)
        if self._last_t is not None and m.ts_first < self._last_t:
            self.reordered += 1
        else:
            self._last_t = m.ts_first
        data = m.data
        if m.flags & CUT:
            if m.flags & F_CHUNKED:
                self.skipped["cut_chunked_body"] = self.skipped.get("cut_chunked_body", 0) + 1
                return None
            data = set_content_length(data, m.head_length)
        if not self.keep_host and self.host is not None:
            data = set_host(data, _head_length(data, m.head_length, len(m.data)), self.host)
        pipe = prev_end is not None and m.ts_first < prev_end
        hl = _head_length(data, m.head_length, len(m.data))
        blen, chunked = body_length(data, hl)
        req = PlannedRequest(m.conn, m.index, m.ts_first, data, m.method or "GET", m.uri or "", hl,
                             final.status if final is not None else None, pipe, seq=self.seq,
                             body_length=blen, flags=F_CHUNKED if chunked else 0)
        self.seq += 1
        self.planned += 1
        self.pipelined += pipe
        if final is None:
            self.unknown_status += 1
            self.late[(m.conn, m.index)] = req
            if len(self.late) > MAX_LATE:
                self.late.popitem(last=False)
        return req, m, final

    def _expire(self, now: int) -> None:
        conns = self.conns
        limit = now - CONN_IDLE_NS
        late = self.late
        while late:
            key, req = next(iter(late.items()))
            if req.t >= limit:
                break
            del late[key]
        while conns:
            conn, st = next(iter(conns.items()))
            if st.last_t >= limit:
                break
            del conns[conn]
            self.ended.append(conn)


# items of the reader's queue
END_CONN, END_PASS, FAILED = "end_conn", "end_pass", "failed"


class StreamingPlan:
    """What ``Player`` replays from a ``.rlog`` log without holding it (see the module's rules).

    The attributes of ``plan.Plan`` that the schedule and the reports read come from the index
    (``requests``, ``t0``, ``t_last``, ``span_ns``, ``conn_stride``, ``connection_count``);
    ``pipelined`` and ``skipped`` are counted as the replay goes."""

    streaming = True

    def __init__(self, path: str, header: StreamHeader, open_messages, host, keep_host):
        self.path = path
        self.header = header
        self.open_messages = open_messages     # () -> iterable of messages (after the rules)
        self.host = host
        self.keep_host = keep_host
        self.requests = header.requests
        self.t0 = header.t0
        self.t_last = header.t_last
        self.conn_stride = header.conn_stride
        self.connection_count = header.connections
        self.pipelined = 0
        self.skipped: dict = {}
        self.reordered = 0
        self.unknown_status = 0
        self.reader: StreamReader | None = None

    @property
    def span_ns(self) -> int:
        return self.t_last - self.t0

    def start(self, passes: int | None) -> "StreamReader":
        """Start reading (``passes`` times; None: until ``stop``)."""
        self.reader = StreamReader(self, passes)
        self.reader.start()
        return self.reader

    def absorb(self, planner: StreamPlanner) -> None:
        self.pipelined += planner.pipelined
        for k, v in planner.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        self.reordered += planner.reordered
        self.unknown_status += planner.unknown_status


class StreamReader:
    """The thread that reads and plans: ``get()`` (non-blocking, on the loop's thread) returns
    ``(iteration, item)``: ``item`` a ``(PlannedRequest, request, final)`` tuple, ``(END_CONN,
    conn)``, ``(END_PASS, None)``, or ``(FAILED, exception)`` (then nothing follows); None when
    nothing is ready (``done`` says whether more can come)."""

    def __init__(self, plan: StreamingPlan, passes: int | None):
        self.plan = plan
        self.passes = passes
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self.stopping = False
        self.done = False
        self.thread = threading.Thread(target=self._run, name="replay-plan", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True

    def get(self):
        try:
            item = self.q.get_nowait()
        except queue.Empty:
            return None
        if item is None:
            self.done = True
        return item

    def _put(self, item) -> bool:
        while not self.stopping:
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        plan = self.plan
        it = 0
        try:
            while not self.stopping and (self.passes is None or it < self.passes):
                planner = StreamPlanner(plan.host, plan.keep_host, plan.header)
                try:
                    for m in plan.open_messages():
                        for item in planner.push(m):
                            if not self._put((it, item)):
                                return
                        if planner.ended:
                            ended, planner.ended = planner.ended, []
                            for c in ended:
                                if not self._put((it, (END_CONN, c))):
                                    return
                        if self.stopping:
                            return
                    for item in planner.finish():
                        if not self._put((it, item)):
                            return
                    for c in planner.ended:
                        if not self._put((it, (END_CONN, c))):
                            return
                    if not self._put((it, (END_PASS, None))):
                        return
                finally:
                    if it == 0:
                        plan.absorb(planner)
                if planner.planned == 0:
                    break
                it += 1
        except BaseException as e:  # noqa: BLE001  (handed to the sender's thread)
            self._put((it, (FAILED, e)))
        finally:
            self._put(None)
