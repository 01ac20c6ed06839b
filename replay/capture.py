"""Wiring of the live path: a ``LiveCapture`` through the core into one or more .rlog files.

The offline twin is ``replay.pipeline.CaptureReader``; this one runs until told to stop.

Rules:
- three threads share the work: the source's reader thread only moves packet batches out of the
  kernel; the thread that calls ``CaptureSession.run`` (the main thread) runs the core and cuts
  log blocks; the ``LogWriter``'s worker compresses and writes. zstd and libpcap release the GIL,
  so under load the core has one CPU and the rest share the other;
- every ``flush_interval`` seconds the open file is flushed (partial block written, fsync), so a
  SIGKILL loses at most that interval plus the read timeout of the kernel ring. The metadata
  (core counters, kernel drops) is rewritten when the drop counters change, every
  ``META_INTERVAL`` seconds, at each rotation and at the end;
- ``-o`` is a strftime pattern, expanded (local time) when each file is opened; with rotation a
  name already used in this run gets ``.1``, ``.2`` ... before its extension. ``rotate_size``
  counts the message bytes written to a file (before compression, so the file stays smaller; a
  message is never split); ``rotate_interval`` the seconds since it was opened. Each file is a
  complete log: its own metadata (``part``, the settings, counters at its close) and its index.
  Connection ids continue across files, so a request and its response may sit in two files;
- a stop (signal, ``--duration``) delivers what the kernel already captured, then closes open
  connections in the core (their unfinished messages come out flagged incomplete). ``--count``
  stops at that many messages written, without draining;
- a write failure (disk full, unwritable path) ends the capture with ``OutputError``; what was
  written before stays readable (the writer cuts the file back to its last complete block);
- each file is written in place (a temporary file renamed at the end would lose everything to a
  SIGKILL) but locked while open (``replay.outputs.LiveFile``): a second process writing the same
  name fails at once; a name that is one of the run's input files is refused;
- without rules, ``--requests-only``, ``--count``, a rotation by size or a Kafka output
  (``keeps_rows``), the core keeps finished messages as table rows (``Engine(rows=True)``) and
  the log writer takes them a block at a time: no Python object is made per message, as in
  ``convert``;
- with rules (``replay.rules``: filters, rewrites, middleware, plugins) every message the core
  finishes goes through their push-based stream before it is written; messages a filter holds
  (waiting for a response's status) are released by capture time, which a quiet capture advances
  with the clock; a --limit that is reached stops the capture as a signal would (reason
  ``limit``). ``requests``/``responses`` count what was written.
"""

from __future__ import annotations

import os
import time

from replay.errors import CaptureError, OutputError
from replay.events import KIND_REQUEST
from replay.limits import LOG_LEVEL

META_INTERVAL = 30.0
DEFAULT_NICE = -10


def raise_priority(nice: int) -> str:
    """Give this process (and the threads it starts afterwards) CPU priority ``nice``.

    Under full CPU load the scheduler shares the CPUs between the capture and the processes
    whose traffic it records (nginx and wrk in the benchmark); with the default share the
    capture's core and log writer fall behind and the kernel ring overflows. Linux threads
    inherit the nice value of the thread that creates them, so this runs before any thread
    starts. With autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) CPU is
    shared between sessions first, so the session's autogroup is reniced too, but only when
    this process leads its own session (sudo with ``use_pty``, a service, ``setsid``): a
    shell's session is left alone. Needs root or CAP_SYS_NICE; without them nothing changes.
    Returns what was done, for the log's metadata."""
    if not nice:
        return "unchanged"
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except (OSError, AttributeError) as e:
        return f"unchanged ({getattr(e, 'strerror', None) or e})"
    done = f"nice {nice}"
    try:
        if os.getsid(0) == os.getpid():
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
            done += ", autogroup"
    except OSError:
        pass
    return done


def expand_name(pattern: str, when: float, used: set) -> str:
    """The file name for a file opened at ``when`` (seconds since the epoch)."""
    name = time.strftime(pattern, time.localtime(when)) if "%" in pattern else pattern
    if name not in used:
        return name
    root, ext = os.path.splitext(name)
    if not ext or len(ext) > 6:
        root, ext = name, ""
    k = 1
    while f"{root}.{k}{ext}" in used:
        k += 1
    return f"{root}.{k}{ext}"


def check_output(path: str) -> None:
    """Fail early, in one line, on a path a log cannot be created at."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OutputError(f"{path}: cannot create: directory {d} does not exist")
    if os.path.exists(path) and not os.path.isfile(path):
        # never a device or a directory: the writer truncates and chmods what it opens
        raise OutputError(f"{path}: not a regular file")


def keeps_rows(*, rules=None, requests_only: bool = False, count: int | None = None,
               rotate_size: int | None = None, outputs: str = "files") -> bool:
    """Whether a capture with these settings hands the core's rows to the log as they are
    (``Engine(rows=True)``): only when no message is looked at one by one on its way, by rules,
    ``--requests-only``, ``--count`` or a rotation by size, and the output is log files."""
    return rules is None and not requests_only and not count and not rotate_size \
        and outputs == "files"


class OutputFiles:
    """The log files of one capture: opened from a pattern, rotated by size and/or time."""

    def __init__(self, pattern: str, meta: dict, rotate_size: int | None = None,
                 rotate_interval: float | None = None, level: int = LOG_LEVEL, clock=time.time,
                 inputs: dict | None = None):
        self.pattern = pattern
        self.inputs = dict(inputs or {})   # label -> path of files the run reads
        self.base_meta = dict(meta)
        self.rotate_size = rotate_size or None
        self.rotate_interval = rotate_interval or None
        self.level = level
        self.clock = clock
        self.paths: list[str] = []
        self.writer = None
        self.rows = None       # the core's RowBuffer, once write_rows gave it
        self._file = None      # the LiveFile (lock) of the open log
        self.opened_at = 0.0
        self.file_messages = 0
        self.file_bytes = 0

    @property
    def path(self) -> str | None:
        return self.paths[-1] if self.paths else None

    def open(self) -> None:
        from replay.log import LogWriter
        from replay.outputs import LOG_MODE, LiveFile, check_distinct

        now = self.clock()
        path = expand_name(self.pattern, now, set(self.paths))
        check_output(path)
        check_distinct(path, "-o", self.inputs)
        meta = dict(self.base_meta)
        meta["part"] = len(self.paths) + 1
        if self.paths:
            meta["previous_file"] = os.path.basename(self.paths[-1])
        f = LiveFile(path, "-o", mode=LOG_MODE).open()
        try:
            self.writer = LogWriter(path, fd=f.detach(), meta=meta, level=self.level)
        except BaseException:
            f.close()
            raise
        self._file = f
        if self.rows is not None:
            self.writer.write_rows(self.rows)
        self.paths.append(path)
        self.opened_at = now
        self.file_messages = 0
        self.file_bytes = 0   # message bytes, before compression: the file is never larger

    def write(self, msg) -> bool:
        """Write one message; True when the file has reached ``rotate_size``."""
        self.writer.write(msg)
        self.file_messages += 1
        self.file_bytes += len(msg.data)
        return self.rotate_size is not None and self.file_bytes >= self.rotate_size

    def write_rows(self, rows) -> None:
        """The messages the core holds as rows (``LogWriter.write_rows``); each file opened
        after this holds them from its start, so that what a failure leaves there is written."""
        self.rows = rows
        self.writer.write_rows(rows)

    def due(self) -> bool:
        """True when the open file has been open for ``rotate_interval``."""
        return bool(self.rotate_interval) and self.clock() - self.opened_at >= self.rotate_interval

    def flush(self, meta: dict | None = None) -> None:
        if meta:
            self.writer.update_meta(meta)
        self.writer.flush(fsync=True)

    def rotate(self, meta: dict) -> None:
        self.close(meta)
        self.open()

    def close(self, meta: dict | None = None) -> None:
        w, self.writer = self.writer, None
        if w is None:
            return
        try:
            if meta:
                w.update_meta(meta)
        finally:
            try:
                w.close(fsync=True)
            finally:
                self._unlock()

    def _unlock(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def abandon(self) -> None:
        """Close after a write failure: keep what is on disk, raise nothing more."""
        w, self.writer = self.writer, None
        if w is not None:
            try:
                w.close(fsync=False)
            except Exception:  # noqa: BLE001  (the first error is the one reported)
                pass
        self._unlock()


class CaptureSession:
    """Source -> core -> files until a stop. ``run()`` returns the reason it stopped."""

    def __init__(self, source, engine, outputs: OutputFiles, *, requests_only: bool = False,
                 count: int | None = None, duration: float | None = None,
                 flush_interval: float = 1.0, clock=time.monotonic, rules=None,
                 count_requests: bool = False):
        self.source = source
        self.rules = rules.stream() if rules is not None else None
        self.engine = engine
        self.outputs = outputs
        self.requests_only = requests_only
        self.count = count or None
        self.count_requests = count_requests    # --count counts requests, not messages
        self.duration = duration or None
        self.flush_interval = flush_interval if flush_interval and flush_interval > 0 else None
        self.clock = clock
        self.requests = 0
        self.responses = 0
        self.stop_reason: str | None = None   # set by request_stop (signal handlers may call it)
        self.hard_stop = False
        self.error: Exception | None = None
        self.started = 0.0
        self.ended = 0.0
        self._last_drops = None
        self._last_meta = 0.0
        self._stopping = False

    # called from signal handlers: only plain assignments here
    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        else:
            self.hard_stop = True  # a second signal: stop without draining

    @property
    def written(self) -> int:
        """Messages written so far: every request and response counted is written."""
        return self.requests + self.responses

    def elapsed(self) -> float:
        end = self.ended or self.clock()
        return end - self.started if self.started else 0.0

    def run(self, on_tick=None, tick: float = 0.5) -> str:
        src, engine, clock = self.source, self.engine, self.clock
        self.started = now = clock()
        deadline = now + self.duration if self.duration else None
        next_flush = now + self.flush_interval if self.flush_interval else None
        next_tick = now
        # an output that follows connections (shadow) hears of each one's end after its messages
        ended = getattr(self.outputs, "connections_closed", None)
        rows = engine.rows          # a RowBuffer when the core keeps rows (keeps_rows)
        if rows is not None:
            self.outputs.write_rows(rows)   # held by the writer from now on
        src.start()
        try:
            while True:
                try:
                    item = src.get(0.05)
                except CaptureError as e:
                    self.error = e
                    self.stop_reason = self.stop_reason or "capture error"
                    break
                if item is not None:
                    out = engine.feed_batch(item[0], item[1])
                    if rows is not None:
                        self._write_rows(rows)
                    elif out:
                        self._write(out)
                    if ended is not None:
                        closed = engine.take_closed()
                        if closed:
                            ended(closed)
                elif src.done:
                    break
                elif self.rules is not None:
                    self._emit(self.rules.advance(time.time_ns()))
                now = clock()
                if deadline is not None and now >= deadline and self.stop_reason is None:
                    self.stop_reason = "duration"
                if self.stop_reason is not None:
                    if self.hard_stop or self.stop_reason == "count":
                        src.abort()
                        break
                    if not self._stopping:
                        self._stopping = True
                        src.stop()
                if next_flush is not None and now >= next_flush:
                    self._flush(now)
                    next_flush = now + self.flush_interval
                if self.outputs.due():
                    self.outputs.rotate(self.meta())
                    self._last_meta = now
                if on_tick is not None and now >= next_tick:
                    on_tick(self)
                    next_tick = now + tick
            if self.stop_reason != "count" and not self.hard_stop:
                out = engine.finish()
                if rows is not None:
                    self._write_rows(rows)
                elif out:
                    self._write(out)
                if ended is not None:
                    ended(engine.take_closed())
                if self.rules is not None and self.stop_reason != "count":
                    self._emit(self.rules.finish())
        except BaseException as e:
            if self.rules is not None:
                self.rules.close()
            if isinstance(e, OutputError):
                self.stop_reason = "write error"
            src.abort()
            self.ended = clock()
            self.outputs.abandon()
            src.close()
            raise
        self.ended = clock()
        src.close()
        if self.rules is not None:
            self.rules.close()
        self.outputs.close(self.meta())
        if self.stop_reason is None:
            self.stop_reason = "end of capture"
        if self.error is not None:
            raise self.error
        return self.stop_reason

    def _write(self, msgs) -> None:
        rules = self.rules
        if rules is not None:
            out = []
            for m in msgs:
                out += rules.push(m)
            msgs = out
            if rules.exhausted and self.stop_reason is None:
                self.stop_reason = "limit"
        self._emit(msgs)

    def _write_rows(self, rows) -> None:
        self.outputs.write_rows(rows)
        # every message the core finished is written (what is held goes at the next flush)
        self.requests = self.engine.st_requests
        self.responses = self.engine.st_responses

    def _emit(self, msgs) -> None:
        if self.stop_reason == "count":
            return
        outputs = self.outputs
        for m in msgs:
            if m.kind == KIND_REQUEST:
                self.requests += 1
            else:
                if self.requests_only:
                    continue
                self.responses += 1
            full = outputs.write(m)
            if self.count is not None and \
                    (self.requests if self.count_requests else self.written) >= self.count:
                self.stop_reason = "count"
                return
            if full:
                outputs.rotate(self.meta())

    def _flush(self, now: float) -> None:
        st = self.source.stats()
        drops = (st["kernel_drops"], st["interface_drops"])
        meta = None
        if drops != self._last_drops or now - self._last_meta >= META_INTERVAL:
            meta = self.meta()
            self._last_drops = drops
            self._last_meta = now
        self.outputs.flush(meta)

    def meta(self) -> dict:
        """What the log's metadata says about the capture so far."""
        st = self.source.stats()
        return {
            "stats": self.engine.stats(),
            "drops": {"kernel": st["kernel_drops"], "interface": st["interface_drops"]},
            "capture": {
                "packets": st["packets"], "bytes": st["bytes"],
                "pcap_received": st["pcap_received"],
                "queue_peak": st["queue_peak"], "queue_waits": st["queue_waits"],
                "seconds": round(self.elapsed(), 3),
                "messages_written": self.written,
                "stopped": self.stop_reason,
            },
            "warnings": list(self.source.warnings),
            **({"rules_stats": dict(self.rules.stats)} if self.rules is not None else {}),
        }
