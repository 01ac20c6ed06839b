"""Runs: the output logs of ``replay play -o``, read as exchanges and joined by recorded request.

A run log holds, for each request the replay sent, the request as sent and the target's answer
(flag ``replayed``; a request that got no complete answer has a ``failed`` record whose data is
the error's kind), then, after the replay, the recorded requests and responses of the same
exchanges (no ``replayed`` flag). ``conn`` and ``index`` are those of the recorded request; with
``--loop``, pass ``k`` used ``conn + k * conn_stride`` (the ``conn_stride`` of the log's meta).

Timing of a replayed request: ``ts_first`` is when it was due by the schedule, ``ts_last`` when
its bytes were written (the same for ``--speed max``, and in logs of older releases). So, to the
last byte of the answer: service time = answer end - ts_last; latency from the intended send =
answer end - ts_first (what a client on the recorded schedule would have felt).

Theory of operation: every section of every log is read once, in written order, as exchanges
that complete as their messages arrive (``exchanges``). Sections are in nearly the same order —
the recorded one in capture order, the replayed ones in completion order, which differs from it
by what was in flight at once — so a join needs only a bounded window (``Window``): the
candidate's replayed exchanges drive; each other section is read ahead up to ``window`` exchanges
past the driver's position, and what was read more than ``window`` exchanges ago without being
asked for is dropped and counted (``unmatched``). Memory is bounded by the window, not by the
length of the logs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from replay.errors import InputError
from replay.events import F_FAILED, F_INTERIM, F_REPLAYED, KIND_REQUEST

WINDOW = 20_000


@dataclass(slots=True)
class Exchange:
    key: tuple                    # (recorded conn, index, pass) replayed; (conn, index) recorded
    request: object = None        # Message
    response: object = None       # the final response (Message), or None
    error: str | None = None      # replayed: the error kind when no complete answer came

    @property
    def complete(self) -> bool:
        return self.request is not None and (self.response is not None or self.error is not None)

    @property
    def status(self):
        """The final status (int), the error kind (str), or None when unanswered."""
        if self.error is not None:
            return self.error
        return self.response.status if self.response is not None else None

    @property
    def service_ns(self) -> int | None:
        """Replayed: answer end - send; recorded: answer end - request start."""
        if self.response is None or self.request is None:
            return None
        return self.response.ts_last - self.request.ts_last if self.replayed else \
            self.response.ts_last - self.request.ts_first

    @property
    def intended_ns(self) -> int | None:
        """Answer end - when the request was due (recorded: - request start)."""
        if self.response is None or self.request is None:
            return None
        return self.response.ts_last - self.request.ts_first

    @property
    def replayed(self) -> bool:
        return len(self.key) == 3


def exchanges(messages, stride: int | None, window: int = WINDOW):
    """Messages of one section -> exchanges, as they complete (or are pushed out of the window)."""
    open_: OrderedDict = OrderedDict()
    for m in messages:
        if stride:
            key = (m.conn % stride, m.index, m.conn // stride)
        else:
            key = (m.conn, m.index)
        ex = open_.get(key)
        if ex is None:
            ex = open_[key] = Exchange(key)
        if m.kind == KIND_REQUEST:
            if ex.request is None:
                ex.request = m
        elif m.flags & F_FAILED:
            ex.error = m.data.decode("ascii", "replace") or "error"
        elif not m.flags & F_INTERIM:
            ex.response = m
        if ex.complete:
            del open_[key]
            yield ex
        elif len(open_) > window:
            yield open_.popitem(last=False)[1]
    yield from open_.values()


class Window:
    """Exchanges of one section looked up by key, reading ahead at most ``window`` exchanges.

    ``get(key, pos)``: ``pos`` is the driver's position (exchanges it has handed out so far).
    ``keep``: entries stay after a lookup (a recorded exchange serves every ``--loop`` pass)."""

    def __init__(self, it, window: int = WINDOW, keep: bool = False, key=None):
        self.it = iter(it)
        self.window = window
        self.keep = keep
        self.key = key or (lambda ex: ex.key)
        self.buf: OrderedDict = OrderedDict()
        self.read = 0
        self.done = False
        self.unmatched = 0          # read, never asked for, and dropped
        self.used = 0

    def get(self, key, pos: int):
        while not self.done and self.read < pos + self.window:
            try:
                ex = next(self.it)
            except StopIteration:
                self.done = True
                break
            self.read += 1
            self.buf[self.key(ex)] = [self.read, ex, False]
        got = self.buf.get(key)
        if got is not None:
            if not got[2]:
                got[2] = True
                self.used += 1
            if not self.keep:
                del self.buf[key]
        horizon = pos - self.window
        buf = self.buf
        while buf:
            first = next(iter(buf.values()))
            if first[0] >= horizon:
                break
            _, (_, _, used) = buf.popitem(last=False)
            if not used:
                self.unmatched += 1
        return got[1] if got is not None else None

    def finish(self) -> None:
        """Count what was never asked for (the driver ended)."""
        for _ in self.it:
            self.unmatched += 1
        self.unmatched += sum(1 for e in self.buf.values() if not e[2])
        self.buf.clear()


class RunLog:
    """One output log of ``replay play -o``."""

    def __init__(self, path: str):
        from replay.log import LogReader, is_rlog

        if not is_rlog(path):
            from replay.sources.pcapfile import is_capture

            if is_capture(path):
                raise InputError(f"{path}: a capture, not a replay's output log (make one with "
                                 "replay play ... -o run.rlog)")
            LogReader(path)          # raises the clear error for missing or empty files
            raise InputError(f"{path}: not a .rlog log")
        self.path = path
        self._reader = LogReader(path)
        meta = self._reader.meta
        if meta.get("command") != "play":
            raise InputError(f"{path}: not the output of replay play (its command is "
                             f"{meta.get('command') or 'unknown'}): run replay play ... -o run.rlog")
        self.meta = meta
        self.stride = int(meta.get("conn_stride") or 0) or None
        self.t_min, self.t_max = self._reader.time_span()

    @property
    def warnings(self) -> list:
        return self._reader.warnings

    @property
    def target(self) -> str:
        return str(self.meta.get("target", "?"))

    def _section(self, replayed: bool):
        from replay.log import LogReader

        reader = LogReader(self.path)
        if replayed:
            msgs = reader.select(lambda c: (c["flags"] & F_REPLAYED) != 0)
        else:
            msgs = reader.select(lambda c: (c["flags"] & F_REPLAYED) == 0)
        return msgs, reader

    def replayed(self, window: int = WINDOW):
        msgs, reader = self._section(True)
        yield from exchanges(msgs, self.stride or (1 << 62), window)
        self._absorb(reader)

    def recorded(self, window: int = WINDOW):
        msgs, reader = self._section(False)
        yield from exchanges(msgs, None, window)
        self._absorb(reader)

    def _absorb(self, reader) -> None:
        for w in reader.warnings:
            if w not in self._reader.warnings:
                self._reader.warnings.append(w)
