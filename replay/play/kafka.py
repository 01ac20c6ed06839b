"""Replay from a Kafka topic: the topic as a streamed plan, one member of a consumer group of
replayers.

The seam is the streaming play's (``stream.py``): ``KafkaPlan`` is a ``StreamingPlan`` whose
messages come from a ``replay.kafka.consumer.TopicReader`` instead of a log, read and planned
in the same forked process by the same ``StreamPlanner``; the sender does not know the
difference. What Kafka adds, and the rules kept here:

- no index: nothing is known before the read (``StreamHeader`` with no requests, no span); a
  recorded connection ends when its replay has seen ``CONN_IDLE_NS`` of recorded time without
  it, or at the end of a bounded read;
- the timeline agreed by N replayers (``AgreedSchedule``): each request is due at
  ``start + (t_recorded - t0) / speed``. ``--start-at`` (wall clock) and ``--t0`` (recorded
  time) pin them, the same on every host; a value not given is this replayer's own: ``t0`` the
  first request it reads, ``start`` now plus ``LIVE_MARGIN_NS`` when following (the time the
  planner needs to see a request's answer; see stream.py) and plus the usual 50 ms otherwise;
- at least once: each request the sender tried (answered or failed) is acknowledged to the
  reading process (``KafkaStreamReader.ack``, batched through a pipe), which commits the
  offsets (consumer.py's rules). After the run the reader waits for the last
  acknowledgements, commits, and leaves the group before it exits.
"""

from __future__ import annotations

import os
import time

from replay.play.plan import PlannedRequest
from replay.play.scheduler import Schedule
from replay.play.session import PlaySession
from replay.play.stream import END_CONN, StreamHeader, StreamingPlan, StreamReader

NS = 1_000_000_000
LIVE_MARGIN_NS = 3 * NS     # default start when following: room for the planner's answer wait
CONN_STRIDE = 1 << 40       # renumbered connections (consumer.py) never reach it
ACK_BATCH = 128            # (conn, index) pairs per message on the pipe: ~2 KiB
ACK_EVERY_S = 0.2
FINAL = "final"
CLOSE_S = 15.0              # at most this long for the last commit after the run


class AgreedSchedule(Schedule):
    """A ``Schedule`` whose ``start`` (Unix ns) and ``t0`` may be pinned: the sender and the
    reader set them as for a log, and a pinned value stays what was agreed."""

    def __init__(self, *args, start_unix_ns: int | None = None, t0_ns: int | None = None,
                 margin_ns: int = 0, **kwargs):
        self.start_unix_ns = start_unix_ns
        self.t0_ns = t0_ns
        self.margin_ns = margin_ns
        super().__init__(*args, **kwargs)

    @property
    def t0(self) -> int:
        return self._t0

    @t0.setter
    def t0(self, value: int) -> None:
        self._t0 = self.t0_ns if self.t0_ns is not None else value

    @property
    def start(self) -> int:
        return self._start

    @start.setter
    def start(self, value: int) -> None:
        if not value:
            self._start = value
        elif self.start_unix_ns is not None:   # the loop's clock is time.monotonic_ns
            self._start = self.start_unix_ns - (time.time_ns() - time.monotonic_ns())
        else:
            self._start = value + self.margin_ns


class KafkaPlan(StreamingPlan):
    """A topic as a ``StreamingPlan`` (see the module's rules)."""

    def __init__(self, url, settings: dict, *, group: str | None, start: int | None,
                 until: int | None, follow: bool, host, keep_host, rules=None):
        super().__init__(str(url), StreamHeader(conn_stride=CONN_STRIDE), self._messages, host,
                         keep_host, rules)
        self.url = url
        self.settings = settings
        self.group = group
        self.from_ns = start
        self.until_ns = until
        self.follow = follow
        self.topic = None          # the TopicReader, in the reading process
        self.kafka_stats: dict = {}   # what the reading process said of the topic (absorb)

    def absorb(self, stats: dict) -> None:
        super().absorb(stats)
        self.kafka_stats = dict(stats.get("kafka") or {})

    @property
    def warnings(self) -> list:
        return list(self.kafka_stats.get("warnings", ()))

    def check(self) -> None:
        """The brokers reachable and the topic there (before anything forks)."""
        from replay.kafka.consumer import TopicReader

        TopicReader(self.url, self.settings).open().close()

    def _messages(self, shard=None):
        from replay.kafka.consumer import TopicReader

        r = self.reader
        self.topic = TopicReader(self.url, self.settings, group=self.group, start=self.from_ns,
                                 until=self.until_ns, follow=self.follow,
                                 acks=r.child_acks if self.group else None, stop=r.child_stop,
                                 idle=r.child_idle)
        self.topic.open()
        rules = self.rules
        if rules is not None:
            return rules.apply(self.topic, shard=shard)
        return self.topic if shard is None else shard.keep(self.topic)

    def start(self, passes, hold=None, keep_recorded: bool = False) -> "KafkaStreamReader":
        self.reader = KafkaStreamReader(self, 1, hold, keep_recorded)
        self.reader.start()
        return self.reader


class KafkaStreamReader(StreamReader):
    """``StreamReader`` with a way back: the sender's acknowledgements (parent -> child). Its
    process ends with its last commit (``close`` waits for that), without lingering."""

    LINGER = False

    def __init__(self, plan: KafkaPlan, passes, hold=None, keep_recorded: bool = False):
        import multiprocessing as mp

        super().__init__(plan, passes, hold, keep_recorded)
        self._ack_rx, self._ack_tx = mp.get_context("fork").Pipe(duplex=False)
        self._acks: list = []
        self._acks_at = time.monotonic()
        self._final = False
        self._closed = False

    # -- parent --------------------------------------------------------------------------------
    def start(self) -> None:
        super().start()
        self._ack_rx.close()

    def ack(self, key) -> None:
        self._acks.append(key)
        now = time.monotonic()
        if len(self._acks) >= ACK_BATCH or now - self._acks_at >= ACK_EVERY_S:
            self._send_acks(now)

    def _send_acks(self, now=None, block: bool = False) -> None:
        """Hand the acknowledgements over, ``ACK_BATCH`` at a time (a few KiB: one fits the
        pipe's free space whenever it is writable). Never blocks unless ``block``: the reading
        process may itself be waiting for this one to take planned requests."""
        import select

        self._acks_at = time.monotonic() if now is None else now
        acks = self._acks
        try:
            while acks:
                if not block and not select.select([], [self._ack_tx], [], 0)[1]:
                    return
                self._ack_tx.send(acks[:ACK_BATCH])
                del acks[:ACK_BATCH]
        except (OSError, ValueError):
            acks.clear()

    def stop(self) -> None:
        """Stop reading; the process lives on until ``close`` for the last commit."""
        self.stop_reading()

    def close(self, timeout: float = CLOSE_S) -> None:
        """The last acknowledgements to the reading process; wait for its commit."""
        if self._closed:
            return
        self._closed = True
        self._stop.value = 1
        self._send_acks(block=True)
        try:
            self._ack_tx.send(FINAL)
        except (OSError, ValueError):
            pass
        end = time.monotonic() + timeout
        while self.proc.is_alive() and time.monotonic() < end:
            if not self.done:
                self.items.clear()
                self.receive(0.05)
            else:
                self.proc.join(0.05)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(2)
        for c in (self.rx, self._ack_tx):
            try:
                c.close()
            except OSError:
                pass

    # -- child ---------------------------------------------------------------------------------
    def child_stop(self) -> bool:
        return bool(self._stop.value) or os.getppid() != self.parent

    def child_acks(self) -> list:
        out: list = []
        rx = self._ack_rx
        try:
            while not self._final and rx.poll(0):
                got = rx.recv()
                if got == FINAL:
                    self._final = True
                else:
                    out.extend(got)
        except (EOFError, OSError):
            self._final = True
        return out

    def child_idle(self, now_ns: int) -> None:
        """The topic is quiet and read to its end: the planner's clock moves on to ``now_ns``
        (see consumer.py), so that what it held waiting for later traffic goes out."""
        p = self.planner
        if p is None:
            return
        for item in p.advance(now_ns):
            if not self._put(0, item):
                return
        ended, p.ended = p.ended, []
        for c in ended:
            if not self._put(0, (END_CONN, c)):
                return
        self._flush()

    def _stats(self, planner) -> dict:
        st = super()._stats(planner)
        t = self.plan.topic
        if t is not None:
            warnings = list(t.warnings)
            if t.revoked_in_flight and not warnings:
                warnings.append(f"{t.path}: {t.revoked_in_flight:,} requests were planned here "
                                "before their partition went to another replayer: they may be "
                                "replayed twice")
            st["kafka"] = {"records": t.records, "revoked_in_flight": t.revoked_in_flight,
                           "connections": len(t._conns), "warnings": warnings}
        return st

    def _put(self, it, item) -> bool:
        head = item[0]
        if isinstance(head, PlannedRequest) and self.plan.topic is not None:
            self.plan.topic.handed((head.conn, head.index))
        return super()._put(it, item)

    def _run(self) -> None:
        self._ack_tx.close()
        try:
            super()._run()
        finally:
            try:
                self._flush()
                self._tx.send(None)       # the plan is complete: the parent stops waiting
            except (OSError, ValueError):
                pass
            self._settle()

    def _settle(self) -> None:
        """Until the parent's last acknowledgement: commit as they come, then leave the group."""
        topic = self.plan.topic
        if topic is None:
            return
        acks: list = []
        try:
            if self.plan.group:
                last = time.monotonic()
                while not self._final and os.getppid() == self.parent:
                    self._ack_rx.poll(0.1)
                    acks.extend(self.child_acks())
                    if time.monotonic() - last >= 1.0 and acks:
                        topic.ack(acks)
                        acks = []
                        topic._commit()
                        last = time.monotonic()
        finally:
            topic.finish(acks)


class KafkaPlaySession(PlaySession):
    """``PlaySession`` for a ``KafkaPlan``: every tried request acknowledged, the reading
    process closed (last commit) after the run, the report's histograms bounded (a topic has
    no end known in advance)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from replay.play.report import Report

        self.report = Report(self._report_meta(), bounded=True)
        self.report.meta["kafka"] = {"group": self.plan.group, "follow": self.plan.follow}

    def make_sender(self, clock, on_exchange, wall_offset: int):
        plan = self.plan

        def exchanged(att, req, resp):
            plan.reader.ack((att.req.conn, att.req.index))
            if on_exchange is not None:
                on_exchange(att, req, resp)

        return super().make_sender(clock, exchanged, wall_offset)

    def run(self):
        try:
            report = super().run()
        finally:
            if self.plan.reader is not None:
                self.plan.reader.close()
        report.meta["kafka"].update({k: v for k, v in self.plan.kafka_stats.items()
                                     if k != "warnings"})
        return report
