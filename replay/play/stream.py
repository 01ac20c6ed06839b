"""A plan read as the replay goes: a log of any size, replayed in memory that does not grow with it.

``build_plan`` (``plan.py``) holds every request of a file before the first is sent: fine for a
capture of minutes, not for a day of production. For a ``.rlog`` log, ``StreamingPlan`` instead:

1. reads the log's block tables once (no payload is decompressed: ~0.15 ms a block) for what
   the schedule and the status line need up front (``index_header``): how many requests, the
   first and last request times, the connection ids' bound, how many connections, and the last
   request of each connection (so its replay connection can close after it, as recorded);
2. then, in a process of its own (``StreamReader``, forked), reads the messages block by block
   through the rules and plans them with the core's ``StreamPlanner`` (sans-IO; compiled, with
   its pure twin in ``replay._fastparse_py``): requests come out in recorded time order, each
   with the status of its recorded final response and the pipelining of ``build_plan``, in
   batches through a pipe (``PipeWriter`` to ``PipeReader``; the requests packed by the core's
   ``pack_planned``: no pickling a request), a timed run's no further than ``READ_AHEAD_NS``
   ahead of the schedule; the sender takes them as their deadlines approach. With
   ``--workers``, each worker's reader picks its share's rows from each block's table
   (``Shard.keep``) before any message is made.

Rules (``StreamPlanner``; the window's bounds are in ``replay.limits``), beyond those of
``plan.py``:
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

Memory: what is read ahead (``QUEUE_ITEMS`` before the start; then the pipe and what the sender
holds ahead of the schedule), the planner's window (a few seconds of recorded traffic),
one connection state per recorded connection seen in the last ``CONN_IDLE_NS``, and the index
header (16 bytes per recorded connection).
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from replay.core import StreamPlanner, deadline, pack_planned, unpack_planned
from replay.errors import InputError, ReplayError
from replay.events import F_REPLAYED, KIND_REQUEST, PlannedRequest

NS = 1_000_000_000
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


def index_header(reader, summary: bool = True) -> StreamHeader:
    """``StreamHeader`` from a ``LogReader``: its summary block when it has one it can trust
    (2.1: a few ms whatever the log's size), else every block's table (~1 ms a block)."""
    h = StreamHeader()
    got = reader.summary() if summary else None
    if got is not None:
        requests, first, last, max_conn, conns, last_index = got
        h.requests, h.t0, h.t_last = requests, first, last
        h.conns, h.last_index = conns, last_index
        h.conn_stride = max_conn + 1
        h.connections = len(conns)
        return h
    t0 = t1 = None
    max_conn = -1
    parts_c, parts_i = [], []
    for b in list(reader.blocks):
        t = reader.columns(b, ("kind", "flags", "conn", "index", "ts_first"))
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


# items of the reader's queue
END_CONN, END_PASS, FAILED, LATE, STATS = "end_conn", "end_pass", "failed", "late", "stats"
BATCH = 64                   # items per message on the reader's pipe (packed: pack_planned)
READER_NICE = 10             # the reader, ahead of the schedule, gives way to the sender
HOLD_SLACK_S = 0.02          # timed: a reader that waited lets this much more come due first
PIPE_SIZE = 1 << 20          # the pipe's capacity asked for (Linux; 64 KiB otherwise)
READ_MAX = 1 << 20           # bytes the sender reads from the pipe at once, at most
_FRAME = struct.Struct("<qI")    # a batch's header: the length of its packed requests (-1: the
                                 # end mark), then that of its pickled extras


class StreamingPlan:
    """What ``Player`` replays from a ``.rlog`` log without holding it (see the module's rules).

    The attributes of ``plan.Plan`` that the schedule and the reports read come from the index
    (``requests``, ``t0``, ``t_last``, ``span_ns``, ``conn_stride``, ``connection_count``);
    ``pipelined`` and ``skipped`` are counted as the replay goes."""

    streaming = True

    def __init__(self, path: str, header: StreamHeader, open_messages, host, keep_host,
                 rules=None):
        self.path = path
        self.rules = rules
        self.header = header
        # (shard) -> the messages after the rules, only those of ``shard`` (a ``Shard`` or
        # None), taken before them
        self.open_messages = open_messages
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
        self.refused_rewrites = 0
        self.reader: StreamReader | None = None
        self.shard: Shard | None = None         # --workers: this worker's share
        self.reading = None        # the reader of the pass under way (in the reading process)
        self.read_warnings: list = []           # what the first pass's reader warned of

    def messages(self):
        """The messages to plan: ``open_messages(shard)`` (``--workers``: this worker's share,
        taken before the rules, which then see only its messages)."""
        return self.open_messages(self.shard)

    @property
    def span_ns(self) -> int:
        return self.t_last - self.t0

    def start(self, passes: int | None, hold=None, keep_recorded: bool = False) -> "StreamReader":
        """Start reading (``passes`` times; None: until ``stop``); see ``StreamReader``."""
        self.reader = StreamReader(self, passes, hold, keep_recorded)
        self.reader.start()
        return self.reader

    def absorb(self, stats: dict) -> None:
        """The counts of the first pass, from the reader."""
        self.pipelined = stats["pipelined"]
        self.skipped = dict(stats["skipped"])
        self.reordered = stats["reordered"]
        self.unknown_status = stats["unknown_status"]
        self.read_warnings = list(stats.get("warnings", ()))
        if stats.get("rules") is not None and self.rules is not None:
            self.rules.stats.update(stats["rules"])
            self.refused_rewrites = stats.get("refused_rewrites", 0)


class PipeWriter:
    """The reader's end of its pipe to the sender: ``send((blob, others))`` writes one batch
    (``pack_planned``'s packed requests, and the few other items pickled), ``send(None)`` the
    end mark. Blocking: the reader waits while the sender has a full pipe to take in.

    A plain pipe with a 12-byte frame header, rather than a ``multiprocessing`` connection:
    taking a batch in costs the sender one ``read`` for many batches, where the connection's
    ``poll`` built a selector on each call and its ``recv`` read each batch in three system
    calls (about 9 % of the sender's time at ``--speed max``)."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, batch) -> None:
        if batch is None:
            parts = [_FRAME.pack(-1, 0)]
        else:
            blob, others = batch
            extra = pickle.dumps(others, protocol=pickle.HIGHEST_PROTOCOL) if others else b""
            parts = [_FRAME.pack(len(blob), len(extra)), blob, extra]
        data = memoryview(b"".join(parts))
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class PipeReader:
    """The sender's end of the reader's pipe (non-blocking). ``next()`` returns the next batch
    (``(blob, pickled extras)``, or None for the end mark) or ``NOTHING`` when none is complete
    yet; it reads the pipe only when the batches already read are used up, and then takes in
    all that is there (``READ_MAX`` at most) with one ``read``, keeping the batches as bytes
    until asked for: the sender unpacks one batch at a time, as its deadlines need them, not a
    second of them at once. EOFError: the reader's end closed without its end mark (once what
    it held is taken). ``wait(seconds)``: whether there is something to read."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.frames: deque = deque()
        self.eof = False
        os.set_blocking(fd, False)
        self._poll = None
        if hasattr(select, "poll"):          # (select() cannot watch a descriptor past 1023)
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)

    def wait(self, seconds: float) -> bool:
        if self.frames:
            return True
        if self._poll is not None:
            return bool(self._poll.poll(max(0.0, seconds) * 1000))
        return bool(select.select([self.fd], [], [], max(0.0, seconds))[0])

    def next(self):
        if not self.frames and not self.eof:
            self._read()
        if self.frames:
            return self.frames.popleft()
        if self.eof:
            raise EOFError("the reader's pipe closed")
        return NOTHING

    def _read(self) -> None:
        try:
            chunk = os.read(self.fd, READ_MAX)
        except BlockingIOError:
            return
        if not chunk:
            self.eof = True
            return
        buf = self.buf
        buf += chunk
        pos, n = 0, len(buf)
        while n - pos >= _FRAME.size:
            size, extra = _FRAME.unpack_from(buf, pos)
            if size < 0:
                self.frames.append(None)
                pos += _FRAME.size
                break
            end = pos + _FRAME.size + size + extra
            if end > n:
                break
            start = pos + _FRAME.size
            self.frames.append((bytes(buf[start:start + size]), bytes(buf[start + size:end])))
            pos = end
        del buf[:pos]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._poll = None
            os.close(fd)


NOTHING = object()       # PipeReader.next: no complete batch yet


def _pipe() -> tuple:
    r, w = os.pipe()
    try:
        import fcntl

        setsize = getattr(fcntl, "F_SETPIPE_SZ", None)      # (Linux)
        if setsize is not None:
            fcntl.fcntl(w, setsize, PIPE_SIZE)
    except (ImportError, OSError):
        pass           # (a smaller pipe: more, smaller reads)
    return PipeReader(r), PipeWriter(w)


class StreamReader:
    """The process that reads and plans (forked: the log's decompression and the planning never
    hold the sender's GIL; a thread did, and made requests late by tens of milliseconds).

    In the parent, on the loop's thread: ``get()`` (non-blocking) returns ``(iteration, item)``:
    ``item`` a ``(PlannedRequest, request, final)`` tuple (the two recorded messages only when
    ``keep_recorded``), ``(LATE, (conn, index, status, final))``, ``(END_CONN, conn)``,
    ``(END_PASS, None)``, ``(STATS, dict)``, or ``(FAILED, exception)``; None when nothing is
    ready (``done`` says whether more can come). Batches of ``BATCH`` items cross a pipe.

    ``hold(offset_ns)`` -> seconds to wait before handing over a request due ``offset_ns`` after
    the schedule's start, in the child, given ``start_ns`` (0: not started: prefill).

    A reader that has read everything stays, idle, until ``stop()`` (``LINGER``): its exit
    tears down a forked copy of the sender's memory, 4 ms of a CPU the sender may share, which
    made the requests due then late when it came in the middle of a fast run (10x of 2,000
    requests/s: the reader is done 20 ms in). Meanwhile it takes no CPU; its memory is held
    until the run ends."""

    LINGER = True

    def __init__(self, plan: StreamingPlan, passes: int | None, hold=None,
                 keep_recorded: bool = False):
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.plan = plan
        self.passes = passes
        self.hold = hold
        self.keep_recorded = keep_recorded
        self.rx, self._tx = _pipe()
        self.start_ns = ctx.Value("q", 0, lock=False)      # the schedule's start, 0 before
        self.t0_ns = ctx.Value("q", plan.t0, lock=False)   # the first kept request's time
        self._stop = ctx.Value("b", 0, lock=False)
        self._state = ctx.Value("b", 0, lock=False)        # 0 reading, 1 holding, 2 finished
        self.items: deque = deque()
        self.done = False
        self.parent = os.getpid()
        self.proc = ctx.Process(target=self._child, name="replay-plan", daemon=True)
        self.planner = None      # the child's StreamPlanner of the pass being read
        self._linger = None      # (read end, write end): the child lingers until it is closed

    # -- parent --------------------------------------------------------------------------------
    def start(self) -> None:
        linger = None
        if self.LINGER and hasattr(os, "pipe2"):
            linger = self._linger = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc.start()
        except BaseException:
            self._let_go()
            raise
        finally:
            if linger is not None:
                os.close(linger[0])       # (the child's end)
        self._tx.close()

    @property
    def holding(self) -> bool:
        return self._state.value == 1

    @property
    def finished(self) -> bool:
        return self._state.value == 2

    def receive(self, block: float = 0.0) -> bool:
        """Take the next batch from the pipe, if one is there (waiting up to ``block`` s for
        it): True when it took one (or the reader's failure)."""
        if self.done:
            return False
        rx = self.rx
        try:
            batch = rx.next()
            if batch is NOTHING and block > 0 and rx.wait(block):
                batch = rx.next()
            if batch is NOTHING and not self.proc.is_alive():
                # what it wrote before it ended (a pipe's worth at most), then the end of file
                for _ in range(PIPE_SIZE // READ_MAX + 64):
                    batch = rx.next()
                    if batch is not NOTHING:
                        break
                else:
                    return self._lost()
        except (EOFError, OSError):
            return self._lost()
        if batch is NOTHING:
            return False
        if batch is None:
            self.done = True
            return False
        try:
            blob, extra = batch
            others = pickle.loads(extra) if extra else []
            got = unpack_planned(blob, others)
            for _, (_, item) in others:        # (the reader's marks are never packed)
                if item[0].__class__ is str and item[0] == STATS:
                    self.plan.absorb(item[1])
        except Exception as e:  # noqa: BLE001  (what the child sent cannot be read back)
            return self._unreadable(e)
        self.items.extend(got)
        return True

    def _unreadable(self, e: Exception) -> bool:
        self.done = True
        self.items.append((0, (FAILED, InputError(f"{self.plan.path}: the plan's reader sent "
                                                  f"what cannot be read back ({e})"))))
        return True

    def _lost(self) -> bool:
        """The child ended without its end mark (killed: the OOM killer, a signal): True when
        that is an error for the parent (queued as a FAILED item)."""
        self.done = True
        if self._stop.value:
            return False
        self.proc.join(1)
        self.items.append((0, (FAILED, ReplayError(
            f"{self.plan.path}: the process reading the log ended unexpectedly "
            f"(exit {self.proc.exitcode}); the replay stopped there"))))
        return True

    def stop_reading(self) -> None:
        """Tell the child to stop, and take what it sends until its end mark (at most 1 s)."""
        self._stop.value = 1
        end = time.monotonic() + 1.0
        while not self.done and time.monotonic() < end:
            self.items.clear()
            self.receive(0.05)

    def get(self):
        if not self.items and not self.receive():
            return None
        return self.items.popleft() if self.items else None

    def stop(self) -> None:
        """Stop the child; the counts it sends as it stops (rules, pipelining) are kept."""
        self.stop_reading()
        try:
            self.rx.close()
        except OSError:
            pass
        self._let_go()
        self.proc.join(1)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)

    def _let_go(self) -> None:
        """A lingering child may exit now: a byte on the pipe it waits on, which is closed (the
        byte wakes it even where a process forked since holds this end too)."""
        linger, self._linger = self._linger, None
        if linger is not None:
            try:
                os.write(linger[1], b"\0")
            except OSError:
                pass
            try:
                os.close(linger[1])
            except OSError:
                pass

    # -- child ---------------------------------------------------------------------------------
    def _child(self) -> None:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides when to stop
        try:        # --realtime: one step below the sender, which then always goes first;
            # otherwise a lower priority: it reads ahead (a second when timed, a pipe's worth at
            # --speed max), while the sender's work is now. At --speed max on 2 cores shared
            # with the target, the sender then waits less for the CPU: 21.6-23.4k requests/s
            # against 19.4-20.4k at the same priority (benchmarks/bench_play_scale.py's log)
            if os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR):
                prio = os.sched_getparam(0).sched_priority
                os.sched_setscheduler(0, os.sched_getscheduler(0),
                                      os.sched_param(max(1, prio - 1)))
            else:
                os.nice(READER_NICE)
        except (AttributeError, OSError):
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent()
        self.rx.close()
        if self._linger is not None:
            os.close(self._linger[1])     # (the parent's end: EOF when the parent closes its own)
        self.batch: list = []
        self._released = getattr(self.hold, "released_until", None)
        self._until = None        # offsets let go, once started (``_wait_for``)
        # --speed max: nothing to wait for (the sender bounds what it takes)
        self.timed = self.hold is not None and self.hold.schedule.timed
        try:
            self._run()
        finally:
            try:
                self._flush()
                self._tx.send(None)
            except (OSError, ValueError):
                pass
            self._tx.close()
            self._wait_to_exit()

    def _wait_to_exit(self) -> None:
        """Until the parent lets go (``stop()``), stops it, or is gone (checked every second: a
        process forked later may hold the pipe's other end too)."""
        if self._linger is None:
            return
        try:
            poll = select.poll()
            poll.register(self._linger[0], select.POLLIN)
            while not self._stop.value and os.getppid() == self.parent:
                if poll.poll(1000):
                    break
        except (OSError, ValueError, AttributeError):
            pass

    def _flush(self) -> None:
        if self.batch:
            b, self.batch = self.batch, []
            self._tx.send(pack_planned(b))

    def _wait_for(self, req, it) -> bool:
        """Until ``hold`` lets ``req`` of pass ``it`` go; False when stopping.

        Once the schedule has started, what ``hold`` let go is let go until a later time
        (``hold.released_until``, when the hold has it): a request due before that goes at
        once, its offset computed by the core (``deadline``), without the hold's calls."""
        until = self._until
        if until is not None:
            sched = self.hold.schedule
            d = deadline(sched, req.t, req.seq, it)
            if d is not None and d - sched.start <= until:
                return True
        while not self._stop.value:
            self.hold.schedule.t0 = self.t0_ns.value     # the parent may move the start
            off = self.hold.offset(req, it)
            if off is None:
                return True
            start = self.start_ns.value
            wait = self.hold(off, start)
            if wait is not None and wait <= 0:
                self._state.value = 0
                if start and self._released is not None:
                    self._until = self._released(start)
                return True
            if os.getppid() != self.parent:             # (only before a wait: a system call)
                break
            self._flush()
            self._state.value = 1
            # a little past its time: what comes due meanwhile then goes in full batches, not
            # one request to a batch (a message on the pipe each for the sender to take in)
            time.sleep(0.05 if wait is None else min(wait + HOLD_SLACK_S, 0.05))
        return False

    def _put(self, it, item) -> bool:
        if self._stop.value:
            return False
        head = item[0]
        if head.__class__ is PlannedRequest:
            if self.timed and not self._wait_for(head, it):
                return False
            if not self.keep_recorded:
                item = (head, None, None)
        elif head is None:                # a final response read after its request was planned
            f = item[2]
            item = (LATE, (f.conn, f.index, f.status, f if self.keep_recorded else None))
        self.batch.append((it, item))
        if len(self.batch) >= BATCH:
            self._flush()
        return True

    def _stats(self, planner) -> dict:
        rules = self.plan.rules
        return {"pipelined": planner.pipelined, "skipped": dict(planner.skipped),
                "reordered": planner.reordered, "unknown_status": planner.unknown_status,
                "rules": dict(rules.stats) if rules is not None else None,
                "refused_rewrites": rules.refused_rewrites if rules is not None else 0,
                "warnings": list(getattr(self.plan.reading, "warnings", ()))}

    def _run(self) -> None:
        plan = self.plan
        it = 0
        planner = None
        try:
            while not self._stop.value and (self.passes is None or it < self.passes):
                planner = self.planner = StreamPlanner(plan.host, plan.keep_host, plan.header)
                for m in plan.messages():
                    for item in planner.push(m):
                        if not self._put(it, item):
                            return
                    if planner.ended:
                        ended, planner.ended = planner.ended, []
                        for c in ended:
                            if not self._put(it, (END_CONN, c)):
                                return
                for item in planner.finish():
                    if not self._put(it, item):
                        return
                for c in planner.ended:
                    if not self._put(it, (END_CONN, c)):
                        return
                if it == 0:
                    self._put(it, (STATS, self._stats(planner)))
                    first, planner = planner, None
                if not self._put(it, (END_PASS, None)):
                    return
                if (planner or first).planned == 0:
                    break
                it += 1
        except BaseException as e:  # noqa: BLE001  (handed to the parent)
            import pickle

            from replay.errors import InputError

            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                e = InputError(f"{plan.path}: {e}")
            self.batch.append((it, (FAILED, e)))
        finally:
            if it == 0 and planner is not None:       # stopped in the first pass: its counts
                self.batch.append((it, (STATS, self._stats(planner))))
            self._state.value = 2


def shard_assignment(conns: np.ndarray, last_index: np.ndarray, n: int) -> np.ndarray:
    """Which of ``n`` workers replays each recorded connection of ``conns`` (a log header's):
    the connections in decreasing order of their requests (``last_index`` + 1; the smaller id
    first among equals), dealt out 0, 1, .., n-1, n-1, .., 0, 0, 1, ..: every worker gets as
    many connections as another, give or take one, and about as many requests. The same log
    gives the same shares."""
    m = len(conns)
    load = np.maximum(np.asarray(last_index, dtype=np.int64), 0) + 1
    order = np.lexsort((np.asarray(conns, dtype=np.uint64), -load))
    k = np.arange(m) % (2 * n)
    out = np.empty(m, dtype=np.int64)
    out[order] = np.where(k < n, k, 2 * n - 1 - k)
    return out


class Shard:
    """Share ``i`` of ``n`` of a log's recorded connections: those ``assign`` (``shard_assignment``
    of the header's sorted ``conns``) gives to ``i``; a connection the header does not list (a
    log that grew after its summary, or read without one) goes by its id modulo ``n``, so that
    every connection is still replayed by exactly one worker."""

    CACHE = 1_000_000        # connection ids whose share is remembered (then forgotten, recounted)

    def __init__(self, i: int, n: int, conns: np.ndarray, assign: np.ndarray):
        self.i, self.n = i, n
        self.conns = conns
        self.assign = assign

    def owns(self, conn: int) -> bool:
        return bool(self.mask(np.array([conn], dtype=np.uint64))[0])

    def mask(self, conns: np.ndarray) -> np.ndarray:
        """``owns`` of each of ``conns`` (an array of connection ids)."""
        conns = np.asarray(conns, dtype=np.uint64)
        ids = self.conns
        if not len(ids):
            return conns % np.uint64(self.n) == self.i
        j = np.minimum(ids.searchsorted(conns), len(ids) - 1)
        listed = ids[j] == conns
        return np.where(listed, self.assign[j] == self.i, conns % np.uint64(self.n) == self.i)

    def keep(self, msgs, first=None):
        """The messages of ``msgs`` on this share's connections; ``first(ts_first)`` is told
        the time of the first message of ``msgs``, this share's or not. From a ``LogReader``
        (and no ``first``), the rows are picked from each block's table before any message is
        made."""
        from replay.log.reader import LogReader

        if first is None and isinstance(msgs, LogReader):
            return msgs.select(lambda cols: self.mask(cols["conn"]))
        return self._keep(msgs, first)

    def _keep(self, msgs, first):
        mine: dict = {}
        owns = self.owns
        for m in msgs:
            if first is not None:
                first(m.ts_first)
                first = None
            c = m.conn
            got = mine.get(c)
            if got is None:
                if len(mine) >= self.CACHE:
                    mine.clear()
                got = mine[c] = owns(c)
            if got:
                yield m


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (PR_SET_PDEATHSIG)."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
