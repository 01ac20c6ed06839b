"""GoReplay-compatible middleware: an external process that sees every message and may change or drop it.

Theory of operation
-------------------
The middleware is one long-running process, started once from a command line (split with shlex, no
shell, as GoReplay splits on spaces). For every message one line goes to its stdin::

    hex(META + b"\\n" + PAYLOAD) + b"\\n"        META = b"TYPE ID TIMESTAMP LATENCY"

- TYPE: ``1`` request, ``2`` recorded response, ``3`` replayed response (``F_REPLAYED``); a request
  sent by ``replay play`` is still ``1``.
- ID: 24 hex digits, ``conn`` in 16 and ``index`` in 8, so a request and its responses share it
  and it reads back as (conn, index). GoReplay 1.x ids have the same shape: 12 bytes, the flow
  (ports and client IP) in 8 and the request's TCP ack in 4 (its docs still show the 40-digit sha1
  ids of 0.x). A response whose request was not captured (index -1) gets a unique id whose index
  digits are ``ffffffff``.
- TIMESTAMP: ``ts_first`` in Unix nanoseconds.
- LATENCY: for a response, its ``ts_first`` minus that of its request when the request went through
  this middleware before it (recorded with recorded, replayed with replayed), else ``-1``. For a
  request, ``-1``. GoReplay is not consistent here: its ``payloadHeader`` leaves the field out when
  it is -1 (HTTP input, its own tests), 0.x raw input wrote response end minus request start, 1.x
  raw input writes each message's own transfer time, and some 1.x outputs swap timestamp and
  latency of replayed responses. We always write four fields, so a middleware that reads
  ``meta[3]`` works, and ``-1`` where GoReplay means "none". Middleware in the wild (the ``gor``
  package, GoReplay's examples) reads only TYPE and ID.

Answers come back on its stdout in the same encoding, one line per message it keeps, in any order.
They are matched to what was sent by (TYPE, ID); the payload is the new message (the original
object when byte-identical, else ``httpmsg.with_data``); TIMESTAMP and LATENCY of an answer are
ignored. Blank lines are skipped. A line that is not hex, or whose meta does not start with a
TYPE of 1-3 and an ID, is a protocol error. A well-formed answer that matches nothing in flight
(an invented or duplicated ID) is counted in ``stats["unmatched"]`` and warned about once.

A message never echoed is dropped. We know it when
  (a) the middleware's stdout ends after its stdin was closed at the end of input (offline runs);
  (b) a message sent after it was answered more than ``idle_timeout`` seconds ago (streaming: a
      middleware that reorders does so within that time);
  (c) the messages waiting for an answer fill half the in-flight window and one sent after it was
      already answered (no time condition: high drop rates never stall the stream);
  (d) they fill half the window and nothing at all came back for ``idle_timeout``: those sent more
      than ``idle_timeout`` ago (a middleware that drops everything);
  (e) the input ended, its stdin was closed, and nothing came back for ``idle_timeout + grace``
      seconds: everything still unanswered (a middleware that neither answers nor exits cannot
      hold a run forever; ``close`` then ends it).
An answer that arrives after its message was counted dropped is still delivered (``stats["late"]``)
while the message is among the last 1024 dropped.

Concurrency: the input iterable is consumed by a writer thread that feeds stdin; a reader thread
decodes stdout; the caller's thread only yields results, so a middleware that answers slowly or a
payload of many megabytes cannot deadlock the two pipes. The writer does not flush each line: a
flusher thread flushes ``FLUSH_DELAY`` after a write, so a burst shares one write (twice the
messages/s of a flush per line) and a lone message still leaves within a millisecond. In flight (sent and not yet yielded,
answered or not) are at most ``max_in_flight`` messages and ``max_in_flight_bytes`` of payload; the
writer waits beyond that (backpressure reaches the input). The middleware's stderr goes through to
ours, each line prefixed ``replay: middleware:``; its last 20 lines are kept for error messages.
Python middlewares run with ``PYTHONUNBUFFERED=1``, so one that forgets to flush still answers
message by message.

Failures: a middleware that cannot start, exits or closes its stdout before the end of input,
exits non-zero at the end, stops reading, or writes garbage. With ``on_error="stop"`` the caller
gets ``MiddlewareError``: one line with the reason and the last lines of its stderr. With
``"skip"`` one warning goes to stderr and every message, those in flight included, passes through
unchanged from then on.
"""

from __future__ import annotations

import binascii
import errno
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque

import replay
from replay.errors import MiddlewareError, UsageError
from replay.events import F_REPLAYED, KIND_REQUEST
from replay.httpmsg import with_data

MAX_IN_FLIGHT = 10_000
MAX_IN_FLIGHT_BYTES = 256 << 20
IDLE_TIMEOUT = 1.0          # s; see rules (b) and (d) above
CLOSE_GRACE = 2.0           # s a middleware gets to exit after its stdin closed, before SIGTERM
STDERR_TAIL = 20            # lines of the middleware's stderr kept for error messages
ERROR_TAIL = 8              # of which the error line quotes the last non-empty ones
LATE_KEEP = 1024            # dropped messages kept so that a late answer still finds its message
LATE_KEEP_BYTES = 64 << 20
REQUEST_TS_KEEP = 100_000   # request timestamps kept to compute the latency of their responses
FLUSH_DELAY = 0.0005        # s a written message may wait for others to share its write to stdin
PIPE_BUFFER = 1 << 16       # our buffers on its stdin and stdout, the size of a Linux pipe

UNPAIRED_INDEX = 0xFFFFFFFF
TYPES = (b"1", b"2", b"3")
_MASK64 = (1 << 64) - 1

_MSG, _END, _FAIL = "msg", "end", "fail"


def message_type(m) -> bytes:
    """GoReplay's payload type of a message: 1 request, 2 recorded response, 3 replayed response."""
    if m.kind == KIND_REQUEST:
        return b"1"
    return b"3" if m.flags & F_REPLAYED else b"2"


def message_id(conn: int, index: int) -> bytes:
    """The 24-hex-digit id shared by request ``index`` of connection ``conn`` and its responses."""
    return b"%016x%08x" % (conn & _MASK64, index & UNPAIRED_INDEX)


def decode_answer(line: bytes, nline: int = 1):
    """``((TYPE, ID), payload)`` of one line the middleware wrote, None for a blank line;
    ``MiddlewareError`` saying what is wrong with any other line (``nline`` numbers it)."""
    s = line.strip()
    if not s:
        return None
    try:
        raw = binascii.unhexlify(s)
    except (binascii.Error, ValueError):
        raise MiddlewareError(f"wrote a line that is not hex on its stdout (line {nline}: {_preview(line)}); "
                              f"only answers go there, logs go to stderr") from None
    nl = raw.find(b"\n")
    parts = raw[:nl].split(b" ") if nl >= 0 else []
    if len(parts) < 2 or parts[0] not in TYPES or not parts[1]:
        what = "no meta line" if nl < 0 else f"a bad meta line {_preview(raw[:nl])}"
        raise MiddlewareError(f"wrote an answer with {what} on its stdout (line {nline}); "
                              f"expected 'TYPE ID TIMESTAMP LATENCY', TYPE 1, 2 or 3")
    return (parts[0], parts[1]), raw[nl + 1:]


class _Entry:
    __slots__ = ("seq", "key", "msg", "size", "t")

    def __init__(self, seq, key, msg, size, t):
        self.seq, self.key, self.msg, self.size, self.t = seq, key, msg, size, t


def _preview(line: bytes, n: int = 60) -> str:
    s = line.rstrip(b"\r\n")
    text = s[:n].decode("utf-8", "replace")
    return repr(text + ("..." if len(s) > n else ""))


class Middleware:
    """One middleware process; ``map`` sends messages through it. See the module's docstring."""

    def __init__(self, command: str, on_error: str = "stop", *, idle_timeout: float = IDLE_TIMEOUT,
                 max_in_flight: int = MAX_IN_FLIGHT, max_in_flight_bytes: int = MAX_IN_FLIGHT_BYTES,
                 grace: float = CLOSE_GRACE, stderr=None):
        if on_error not in ("stop", "skip"):
            raise UsageError(f"middleware on-error must be 'stop' or 'skip', not {on_error!r}")
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise UsageError(f"middleware {command!r}: {e}") from None
        if not argv:
            raise UsageError("middleware: the command is empty")
        self.command = command
        self.argv = argv
        self.on_error = on_error
        self.idle_timeout = float(idle_timeout)
        self.max_in_flight = max(1, int(max_in_flight))
        self.max_in_flight_bytes = max(1, int(max_in_flight_bytes))
        self.grace = grace
        self.stats = dict(sent=0, returned=0, dropped=0, changed=0, late=0, unmatched=0, passed=0)
        self._stderr = stderr            # None: sys.stderr at the time of writing
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._tick = max(0.005, min(0.1, self.idle_timeout / 4))

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wlock = threading.Lock()   # held while writing to stdin; close() takes it to close stdin
        self._dirty = False              # stdin holds bytes not flushed yet
        self._dirty_cond = threading.Condition(threading.Lock())
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: OrderedDict[int, _Entry] = OrderedDict()   # by seq: send order
        self._by_key: dict[tuple, list[_Entry]] = {}
        self._pending_b = 0
        self._late: OrderedDict[tuple, _Entry] = OrderedDict()
        self._late_b = 0
        self._inflight_n = 0
        self._inflight_b = 0
        self._seq = 0
        self._max_answered = -1          # highest seq answered so far
        self._marks: deque = deque()     # (time, seq): when _max_answered rose
        self._evidence = -1              # every pending seq below it counts dropped (rule b)
        self._last_answer = time.monotonic()
        self._last_expire = 0.0
        self._req_ts: OrderedDict = OrderedDict()
        self._unpaired = 0
        self._warned_unmatched = False

        self._failed: str | None = None
        self._bypass = False
        self._input_done = False
        self._input_error: BaseException | None = None
        self._stdin_closed = False       # by us, at the end of input or in close(), or broken
        self._eof_sent = False           # stdin closed because the input ended
        self._eof_time = 0.0
        self._ended = False              # END posted
        self._stopping = False
        self._closed = False
        self._used = False
        self._threads: list[threading.Thread] = []
        self._reader: threading.Thread | None = None
        self._stderr_thread: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None
        self.exit_status: int | None = None   # its own exit status; None while running or when killed
        self._start()

    # -- process -----------------------------------------------------------------------------
    def _start(self):
        env = {k: v for k, v in os.environ.items() if k not in replay.ENV_SET}
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, start_new_session=True,
                                         bufsize=PIPE_BUFFER)
        except FileNotFoundError:
            reason = f"no such command: {self.argv[0]}"
        except PermissionError:
            reason = (f"permission denied running {self.argv[0]} (make it executable, or run it "
                      f"through its interpreter, e.g. 'python3 {self.argv[0]}')")
        except OSError as e:
            reason = f"{self.argv[0]}: {e.strerror or e}"
            if e.errno == errno.ENOEXEC:
                reason += f" (no '#!' line? run it through its interpreter, e.g. 'python3 {self.argv[0]}')"
        else:
            t = threading.Thread(target=self._stderr_loop, name="middleware-stderr", daemon=True)
            t.start()
            self._threads.append(t)
            self._stderr_thread = t
            return
        text = f"cannot start middleware {self.command!r}: {reason}"
        if self.on_error == "stop":
            raise MiddlewareError(text)
        self._warn(f"{text}; going on without it")
        self._bypass = True
        self._closed = True

    def _warn(self, text: str):
        out = self._stderr or sys.stderr
        try:
            out.write(f"replay: warning: {text}\n")
            out.flush()
        except (OSError, ValueError):
            pass

    def _stderr_loop(self):
        err = self.proc.stderr
        try:
            for raw in err:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self._tail.append(line)
                out = self._stderr or sys.stderr
                try:
                    out.write(f"replay: middleware: {line}\n")
                    out.flush()
                except (OSError, ValueError):
                    pass
        except (OSError, ValueError):
            pass

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the middleware wrote on its stderr."""
        return list(self._tail)

    def _exit_text(self, rc) -> str:
        if rc is None:
            return "closed its stdout but is still running"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = "?"
            return f"was killed by signal {-rc} ({name})"
        return f"exited with status {rc}"

    def _exit_reason(self, rc, when: str) -> str:
        return (f"{self._exit_text(rc)} {when}, after answering {self.stats['returned']} of "
                f"{self.stats['sent']} messages")

    def _wait_exit(self, timeout: float):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    # -- the caller's side -------------------------------------------------------------------
    def map(self, messages):
        """Send ``messages`` through the middleware; yield what it returns, in the order it does."""
        if self._used:
            raise RuntimeError("Middleware.map() runs once: the middleware's input ends with it")
        self._used = True
        if self._bypass:
            for m in messages:
                self.stats["passed"] += 1
                yield m
            return
        self._last_answer = time.monotonic()
        writer = threading.Thread(target=self._write_loop, args=(messages,), name="middleware-writer",
                                  daemon=True)
        reader = self._reader = threading.Thread(target=self._read_loop, name="middleware-reader", daemon=True)
        flusher = threading.Thread(target=self._flush_loop, name="middleware-flusher", daemon=True)
        for t in (writer, reader, flusher):
            t.start()
            self._threads.append(t)
        get = self._out.get
        try:
            while True:
                try:
                    item = get(timeout=self._tick)
                except queue.Empty:
                    self._expire_now()
                    continue
                tag = item[0]
                if tag is _MSG:
                    self._release(item[2])
                    yield item[1]
                    now = time.monotonic()
                    if now - self._last_expire > self._tick:
                        self._expire_now(now)
                elif tag is _END:
                    break
                else:
                    text = self._failure_text()
                    if self.on_error == "stop":
                        self.close()
                        raise MiddlewareError(text)
                    yield from self._go_without(text)
            self.close()
            if self._input_error is not None:
                raise self._input_error
            rc = self.exit_status
            if rc not in (None, 0) and self._failed is None:
                # every answer came before it failed: nothing to pass through, but say so
                self._failed = self._exit_reason(rc, "at the end of its input")
                text = self._failure_text()
                if self.on_error == "stop":
                    raise MiddlewareError(text)
                self._warn(text)
        finally:
            self.close()

    def _failure_text(self) -> str:
        # stop it now (garbage on stdout, stdin not read) so that its stderr is complete
        self._kill()
        if self._stderr_thread is not None:
            self._stderr_thread.join(0.5)
        # Python's 3.11+ tracebacks underline the failing expression: markers, not words
        lines = [line.strip() for line in self._tail if line.strip().strip("~^")][-ERROR_TAIL:]
        tail = ""
        if lines:
            joined = " | ".join(lines)
            if len(joined) > 600:
                joined = "..." + joined[-600:]
            tail = f"; its stderr ended with: {joined}"
        return f"middleware {self.command!r} {self._failed}{tail}"

    def _go_without(self, text: str):
        self._warn(f"{text}; going on without it")
        self._kill()
        with self._cond:
            self._bypass = True
            self._cond.notify_all()
            flush = list(self._pending.values())
            self._pending.clear()
            self._by_key.clear()
            self._pending_b = 0
            done = self._input_done
            self.stats["passed"] += len(flush)
        for e in flush:
            self._release(e.size)
            yield e.msg
        if done:
            with self._lock:
                self._end()

    def _release(self, size: int):
        with self._cond:
            self._inflight_n -= 1
            self._inflight_b -= size
            self._cond.notify_all()

    # -- writer thread -----------------------------------------------------------------------
    def _encode(self, m) -> tuple[tuple, bytes]:
        typ = message_type(m)
        replayed = bool(m.flags & F_REPLAYED)
        latency = -1
        if m.index >= 0:
            mid = message_id(m.conn, m.index)
            k = (m.conn, m.index, replayed)
            if typ == b"1":
                ts = self._req_ts
                ts[k] = m.ts_first
                if len(ts) > REQUEST_TS_KEEP:
                    ts.popitem(last=False)
            else:
                t0 = self._req_ts.get(k)
                if t0 is not None:
                    latency = max(0, m.ts_first - t0)
        else:
            self._unpaired += 1
            mid = message_id(self._unpaired, UNPAIRED_INDEX)
        meta = b"%s %s %d %d\n" % (typ, mid, m.ts_first, latency)
        return (typ, mid), binascii.hexlify(meta) + binascii.hexlify(m.data) + b"\n"

    def _acquire(self, size: int) -> bool:
        with self._cond:
            while True:
                if self._stopping:
                    return False
                n = self._inflight_n
                if n == 0 or (n < self.max_in_flight and self._inflight_b + size <= self.max_in_flight_bytes):
                    self._inflight_n += 1
                    self._inflight_b += size
                    return True
                self._expire(time.monotonic())
                if self._inflight_n < n:
                    continue
                self._cond.wait(self._tick)

    def _write_loop(self, messages):
        stdin = self.proc.stdin
        try:
            for m in messages:
                if self._stopping:
                    break
                key, line = self._encode(m)
                size = len(m.data)
                if not self._acquire(size):
                    break
                with self._lock:
                    while self._failed is not None and not self._bypass and not self._stopping:
                        self._cond.wait()       # stdin broke: hold the input until map() chose
                    if self._bypass:
                        self.stats["passed"] += 1
                        self._out.put((_MSG, m, size))
                        continue
                    e = _Entry(self._seq, key, m, size, time.monotonic())
                    self._seq += 1
                    self._pending[e.seq] = e
                    self._by_key.setdefault(key, []).append(e)
                    self._pending_b += size
                    self.stats["sent"] += 1
                broke = False
                with self._wlock:
                    if self._stdin_closed:
                        continue
                    try:
                        stdin.write(line)
                    except (OSError, ValueError):
                        self._stdin_closed = broke = True
                if broke:
                    self._write_failed()
                elif not self._dirty:
                    with self._dirty_cond:
                        self._dirty = True
                        self._dirty_cond.notify()
        except BaseException as exc:  # noqa: BLE001 - the caller's iterable failed: re-raised in map()
            self._input_error = exc
        finally:
            with self._lock:
                self._input_done = True
                if self._bypass:
                    self._end()
            broke = False
            with self._wlock:
                if not self._stdin_closed:
                    self._stdin_closed = True
                    try:
                        stdin.flush()
                    except (OSError, ValueError):
                        broke = True
                    self._eof_sent = not broke      # before it can see the end of its input
                    self._eof_time = time.monotonic()
                    try:
                        stdin.close()
                    except (OSError, ValueError):
                        pass
            if broke:
                self._write_failed()
            else:
                with self._lock:
                    self._end_if_settled()

    def _flush_loop(self):
        """Flush stdin soon after writes: a burst goes out in few writes, a lone message still goes now."""
        stdin = self.proc.stdin
        cond = self._dirty_cond
        while True:
            with cond:
                while not self._dirty:
                    if self._stdin_closed or self._stopping:
                        return
                    cond.wait(0.5)
            time.sleep(FLUSH_DELAY)
            broke = False
            with self._wlock:
                self._dirty = False
                if self._stdin_closed:
                    return
                try:
                    stdin.flush()
                except (OSError, ValueError):
                    self._stdin_closed = broke = True
            if broke:
                self._write_failed()
                return

    def _write_failed(self):
        """stdin broke: the reader usually reports the exit; if the process lives on, say so here."""
        rc = self._wait_exit(1.0)
        if rc is None:
            self._fail("stopped reading its stdin")
        else:
            # give the reader, which sees the end of stdout, the chance to report with the full story
            time.sleep(0.2)
            self._fail(self._exit_reason(rc, "before the end of input"))

    def _end(self):
        """Under the lock: no more results will come (posted once)."""
        if not self._ended:
            self._ended = True
            self._out.put((_END,))

    def _end_if_settled(self):
        """Under the lock: input ended and every message was answered or counted dropped: done,
        without waiting for a middleware that lingers after the end of its input (when messages
        were counted dropped, a late answer gets ``idle_timeout`` more)."""
        if self._eof_sent and not self._pending and self._failed is None and not self._bypass:
            if not self._late or time.monotonic() - self._last_answer > self.idle_timeout:
                self._end()

    def _fail(self, reason: str):
        with self._cond:
            if self._failed is not None or self._bypass or self._stopping:
                return
            self._failed = reason
            self._out.put((_FAIL,))
            self._cond.notify_all()

    # -- reader thread -----------------------------------------------------------------------
    def _read_loop(self):
        out = self.proc.stdout
        nline = 0
        try:
            for line in out:
                nline += 1
                try:
                    answer = decode_answer(line, nline)
                except MiddlewareError as e:
                    self._fail(str(e))
                    return
                if answer is None:
                    continue
                key, payload = answer
                if not self._answer(key, payload):
                    # stopping (or gone without it): keep its stdout flowing so that it can
                    # reach the end of its input and exit
                    for _ in out:
                        pass
                    return
        except (OSError, ValueError):
            return
        self._on_eof()

    def _answer(self, key, payload) -> bool:
        now = time.monotonic()
        with self._cond:
            if self._failed is not None or self._bypass or self._stopping:
                return False
            e = self._take(self._by_key, key, payload)
            warn = False
            if e is not None:
                del self._pending[e.seq]
                self._pending_b -= e.size
                if e.seq > self._max_answered:
                    self._max_answered = e.seq
                    self._marks.append((now, e.seq))
            else:
                e = self._late.pop(key, None)
                if e is None:
                    self.stats["unmatched"] += 1
                    warn = not self._warned_unmatched
                    self._warned_unmatched = True
                else:
                    self._late_b -= e.size
                    self.stats["late"] += 1
                    self.stats["dropped"] -= 1
                    self._inflight_n += 1
                    self._inflight_b += e.size
            if e is not None:
                self._last_answer = now
                self.stats["returned"] += 1
                same = payload == e.msg.data
                if not same:
                    self.stats["changed"] += 1
        if e is None:
            if warn:
                self._warn(f"middleware {self.command!r} answered with type {key[0].decode()} and id "
                           f"{key[1].decode('latin-1')!r}, which matches no message in flight; such answers are "
                           f"ignored (counted in stats['unmatched'])")
            return True
        self._out.put((_MSG, e.msg if same else with_data(e.msg, payload), e.size))
        if self._eof_sent and not self._pending:
            with self._lock:
                self._end_if_settled()
        return True

    @staticmethod
    def _take(index, key, payload):
        lst = index.get(key)
        if not lst:
            return None
        if len(lst) == 1:
            del index[key]
            return lst[0]
        # several in flight under one key (interim and final responses, a replay loop): prefer
        # the one the payload equals, else the oldest
        for i, e in enumerate(lst):
            if e.msg.data == payload:
                return lst.pop(i)
        return lst.pop(0)

    def _on_eof(self):
        rc = self._wait_exit(self.grace)
        with self._cond:
            if self._failed is not None or self._bypass or self._stopping or self._ended:
                return
            done = self._eof_sent
        if not done:
            self._fail(self._exit_reason(rc, "before the end of input"))
            return
        if rc not in (0, None):
            self._fail(self._exit_reason(rc, "at the end of its input"))
            return
        with self._cond:
            if self._failed is not None or self._bypass or self._stopping:
                return
            for e in list(self._pending.values()):
                self._drop(e, keep=False)
            self._end()

    # -- when unanswered messages count as dropped (rules a-d) --------------------------------
    def _drop(self, e: _Entry, keep: bool = True):
        """Under the lock."""
        del self._pending[e.seq]
        self._pending_b -= e.size
        lst = self._by_key.get(e.key)
        if lst is not None:
            lst.remove(e)
            if not lst:
                del self._by_key[e.key]
        self.stats["dropped"] += 1
        self._inflight_n -= 1
        self._inflight_b -= e.size
        self._cond.notify_all()
        if keep:
            old = self._late.pop(e.key, None)
            if old is not None:
                self._late_b -= old.size
            self._late[e.key] = e
            self._late_b += e.size
            while len(self._late) > LATE_KEEP or self._late_b > LATE_KEEP_BYTES:
                _, old = self._late.popitem(last=False)
                self._late_b -= old.size

    def _expire_now(self, now: float | None = None):
        with self._cond:
            self._expire(time.monotonic() if now is None else now)

    def _expire(self, now: float):
        """Under the lock: count as dropped what rules (b), (c) and (d) say was dropped."""
        self._last_expire = now
        if self._failed is not None or self._bypass:
            return
        pending = self._pending
        cutoff = now - self.idle_timeout
        marks = self._marks
        while marks and marks[0][0] <= cutoff:
            self._evidence = max(self._evidence, marks.popleft()[1])
        while pending:
            e = next(iter(pending.values()))
            if e.seq >= self._evidence:
                break
            self._drop(e)

        def heavy():
            return (len(pending) > self.max_in_flight // 2
                    or self._pending_b > self.max_in_flight_bytes // 2)

        while pending and heavy():
            e = next(iter(pending.values()))
            if e.seq < self._max_answered or (self._last_answer <= cutoff and e.t <= cutoff):
                self._drop(e)
            else:
                break
        if self._eof_sent and pending:
            quiet_since = max(self._last_answer, self._eof_time)
            if now - quiet_since > self.idle_timeout + self.grace:
                while pending:
                    self._drop(next(iter(pending.values())))
        self._end_if_settled()

    # -- ending --------------------------------------------------------------------------------
    def _signal(self, sig):
        """Signal the middleware's process group (its own session): a shell's children go too."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(sig)
                except OSError:
                    pass

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._wait_exit(1.0)

    def close(self):
        """End the middleware: close its stdin, give it ``grace`` seconds to exit, then kill it."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        proc = self.proc
        if self._wlock.acquire(timeout=0.2):
            try:
                if not self._stdin_closed:
                    self._stdin_closed = True
                    try:
                        proc.stdin.close()
                    except (OSError, ValueError):
                        pass
            finally:
                self._wlock.release()
            rc = self._wait_exit(self.grace)
        else:
            rc = None       # a write is stuck: the middleware stopped reading
        self.exit_status = rc
        if rc is None and proc.poll() is None:
            self._signal(signal.SIGTERM)
            if self._wait_exit(1.0) is None:
                self._kill()
        # what it left running in its process group would hold the pipes open
        self._signal(signal.SIGKILL)
        for t in self._threads:
            # the writer may be waiting on the caller's input (a live source): not worth waiting for
            if t is not threading.current_thread():
                t.join(0.2 if t.name == "middleware-writer" else 1.0)
        for t, f in ((self._reader, proc.stdout), (self._stderr_thread, proc.stderr)):
            if t is None or not t.is_alive():
                try:
                    f.close()
                except (OSError, ValueError):
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Middleware({self.command!r}, on_error={self.on_error!r})"
