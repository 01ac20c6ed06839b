"""Messages in from a Kafka topic, in capture time order: what ``play``, ``convert``, ``ls`` and
``info`` read for a ``kafka://`` input.

``TopicReader`` is an iterable of ``replay.events.Message`` (as a log reader is) with
``warnings`` and ``meta``. Rules:

- with ``group`` it joins that consumer group (Kafka splits the partitions among its members);
  without, it reads every partition itself and commits nothing;
- order: one connection's messages share a key, so a partition holds them in order. Across
  partitions, records wait in a heap (keyed by capture time) until every assigned partition has
  read past them or is at its end (``enable.partition.eof``): a bounded merge. A partition
  silent for ``STALL_S`` (neither records nor its end) stops holding the others back, and past
  ``MAX_BUFFER`` records or ``MAX_BUFFER_BYTES`` of messages the oldest goes anyway;
- connection ids: each record's key is (capture run, connection); they are renumbered here in
  order of first appearance, so captures from several hosts never share an id;
- ``start``/``until`` (Unix ns of capture time): the read starts at the offsets of ``start``
  (``offsets_for_times``; a group's committed offsets win) and every record is also filtered by
  its capture time, so a broker that answers the offset lookup badly costs time, never results.
  A partition is over once a message captured ``UNTIL_SLACK_NS`` past ``until`` is read
  (then paused); the read ends once every assigned partition is over, or at its end with
  ``until + UNTIL_SLACK_NS`` past on the wall clock, followed or not;
- ``follow`` (live) reads on as records arrive; without it the read ends once every assigned
  partition is at its end (or past ``until``). Following, once every partition has been at
  its end for ``IDLE_S``, ``idle(t)`` is told the capture time it must be by now (the last
  record's, plus the wall time since): the planner can release what it held for later traffic;
- commits (group only, ``acks`` on): offsets are committed only for what was replayed. The
  replayer reports each request once it was sent (``ack``); a partition's committed offset is
  that of its oldest request not yet sent, or past its last record read when none waits.
  Messages the rules or the planner leave out are taken as done once what was handed on to them
  has gone ``DROP_NS`` of capture time past them without their being planned (``handed``). A replayer that
  dies is replaced by the group from those offsets: at least once, never lost;
- a partition taken away by a rebalance: what was done is committed, what was read and not yet
  planned is forgotten (its new owner reads it), what was planned and not yet sent is still
  sent here, and counted as possibly sent twice (``revoked_in_flight``);
- a record that is not ours stops the read with one ``InputError`` naming topic, partition,
  offset and reason; brokers unreachable for ``DOWN_S`` (not when following) likewise.
"""

from __future__ import annotations

import heapq
import time
from collections import deque

from replay.errors import InputError
from replay.events import KIND_REQUEST
from replay.kafka import KafkaURL, client, config, make, parse_time, parse_url
from replay.kafka import record as R

NS = 1_000_000_000
MAX_BUFFER = 100_000        # records held for the cross-partition merge at most
MAX_BUFFER_BYTES = 256 << 20  # ... and bytes of their messages
STALL_S = 2.0               # a partition silent this long no longer holds the merge back
UNTIL_SLACK_NS = 5 * NS     # capture time past --until after which a partition is over
DROP_NS = 10 * NS           # capture time after which an unplanned request counts as left out
COMMIT_S = 1.0              # between commits
DOWN_S = 30.0               # brokers unreachable this long end a bounded read
METADATA_S = 10.0           # for the first look at the topic
ASSIGN_S = 60.0             # a bounded group read waits this long for its partitions
CONSUME_BATCH = 1000
IDLE_S = 0.25               # following, every partition at its end this long: time moves on

DEFAULTS = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": True,
    "fetch.wait.max.ms": 100,
}


class _Entry:
    __slots__ = ("offset", "key", "state", "t")

    def __init__(self, offset, key, t):
        self.offset = offset
        self.key = key
        self.state = 0          # 0 read (in the merge heap), 3 handed on to the planner,
        #                         1 planned (handed to the sender), 2 done
        self.t = t


class TopicReader:
    def __init__(self, url: KafkaURL | str, settings: dict | None = None, *, group: str | None = None,
                 start: int | None = None, until: int | None = None, follow: bool = False,
                 acks=None, stop=None, idle=None):
        self.url = parse_url(url) if isinstance(url, str) else url
        self.path = str(self.url)
        self.settings = dict(settings or {})
        self.group = group
        self.start = start
        self.until = until
        self.follow = follow
        self.acks = acks               # () -> list of (conn, index) sent since the last call
        self.stop = stop               # () -> True when the reader must end (its replayer stops)
        self.idle = idle               # (capture ns) -> None: following, every record read
        self.warnings: list[str] = []
        self.meta = {"source": self.path}
        self.records = 0
        self.revoked_in_flight = 0
        self.complete = False          # the read reached the end of every partition
        self._closing = False
        self.consumer = None
        self._down_since = None
        self._last_error = None
        self._fatal = None
        self._conns: dict = {}
        self._pending: dict = {}       # (conn, index) -> _Entry, requests not yet done
        self._track: dict = {}         # partition -> deque of _Entry (requests, offset order)
        self._hi: dict = {}            # partition -> next offset to commit when nothing waits
        self._committed: dict = {}
        self._heap: list = []
        self._heap_bytes = 0
        self._seq = 0
        self._assigned: set = set()
        self._assign_known = group is None
        self._eof: set = set()
        self._over: set = set()        # past --until
        self._heard: dict = {}         # partition -> monotonic time of its last news
        self._last_t: dict = {}        # partition -> capture time of its last record
        self._horizon = None           # the latest capture time handed on

    # -- the client --------------------------------------------------------------------------
    def _error(self, err) -> None:
        ck = client()
        self._last_error = err.str()
        if err.code() == ck.KafkaError._ALL_BROKERS_DOWN:
            if self._down_since is None:
                self._down_since = time.monotonic()
        elif err.fatal():
            self._fatal = err.str()

    def open(self) -> "TopicReader":
        ck = client()
        conf = config(self.url, {**DEFAULTS, "group.id": self.group or "replay-reader"},
                      self.settings)
        conf["error_cb"] = self._error
        c = self.consumer = make("Consumer", self.url, conf)
        try:
            md = c.list_topics(self.url.topic, METADATA_S)
        except ck.KafkaException as e:
            c.close()
            raise InputError(f"{self.path}: cannot reach the brokers "
                             f"({self._last_error or e.args[0].str()})") from None
        t = md.topics.get(self.url.topic)
        if t is None or t.error is not None or not t.partitions:
            c.close()
            why = t.error.str() if t is not None and t.error is not None else "no partitions"
            raise InputError(f"{self.path}: no such topic ({why})")
        self.meta["partitions"] = len(t.partitions)
        if self.group is not None:
            c.subscribe([self.url.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                        on_lost=self._on_revoke)
        else:
            tps = [ck.TopicPartition(self.url.topic, p, ck.OFFSET_BEGINNING)
                   for p in sorted(t.partitions)]
            c.assign(self._seek(tps))
            self._add(p.partition for p in tps)
        return self

    def _seek(self, tps: list) -> list:
        """``tps`` with the offsets of ``start`` (unchanged when unknown)."""
        if self.start is None:
            return tps
        ck = client()
        ms = max(0, self.start // 1_000_000)
        try:
            found = self.consumer.offsets_for_times(
                [ck.TopicPartition(tp.topic, tp.partition, ms) for tp in tps], METADATA_S)
        except ck.KafkaException:
            return tps
        by = {f.partition: f.offset for f in found if f.error is None and f.offset >= 0}
        for tp in tps:
            if tp.partition in by:
                tp.offset = by[tp.partition]
        return tps

    def _add(self, parts) -> None:
        now = time.monotonic()
        for p in parts:
            self._assigned.add(p)
            self._heard[p] = now
            self._track.setdefault(p, deque())

    def _on_assign(self, consumer, tps) -> None:
        ck = client()
        try:
            committed = {c.partition: c.offset for c in consumer.committed(tps, METADATA_S)}
        except ck.KafkaException:
            committed = {}
        fresh = [tp for tp in tps if committed.get(tp.partition, -1) < 0]
        self._seek(fresh)
        consumer.assign(tps)
        self._assign_known = True
        self._add(tp.partition for tp in tps)

    def _on_revoke(self, consumer, tps) -> None:
        if self._closing:          # our own leaving: finish() has committed
            return
        gone = {tp.partition for tp in tps}
        self._commit(sync=True, only=gone)
        for p in gone:
            for e in self._track.pop(p, ()):
                self._pending.pop(e.key, None)
                if e.state == 1:
                    self.revoked_in_flight += 1
            self._assigned.discard(p)
            for d in (self._hi, self._heard, self._last_t, self._committed):
                d.pop(p, None)
            self._eof.discard(p)
            self._over.discard(p)
        self._heap[:] = [x for x in self._heap if x[2] not in gone]   # in place: the reader holds it
        heapq.heapify(self._heap)
        self._heap_bytes = sum(len(x[3].data) for x in self._heap)
        try:
            consumer.unassign()
        except client().KafkaException:
            pass
        self._assign_known = False

    # -- commits -----------------------------------------------------------------------------
    def ack(self, keys) -> None:
        pending = self._pending
        for k in keys:
            e = pending.pop(tuple(k), None)
            if e is not None:
                e.state = 2

    def handed(self, key) -> None:
        """The planner planned this request: it is done once ``ack``ed."""
        e = self._pending.get(key)
        if e is not None:
            e.state = 1

    def _positions(self, only=None, every: bool = False) -> dict:
        """partition -> offset to commit (``every``: also those committed already, asynchronous
        commits being confirmed by nobody)."""
        out = {}
        horizon = None if self._horizon is None else self._horizon - DROP_NS
        for p, q in self._track.items():
            if only is not None and p not in only:
                continue
            while q:
                e = q[0]
                # handed on to the planner DROP_NS before what was handed on since, and never
                # planned: the rules or the planner left it out (still in the heap: wait)
                if e.state == 2 or (e.state == 3 and horizon is not None and e.t < horizon):
                    q.popleft()
                    self._pending.pop(e.key, None)
                else:
                    break
            pos = q[0].offset if q else self._hi.get(p)
            if pos is not None and (every or pos != self._committed.get(p)):
                out[p] = pos
        return out

    def _commit(self, sync: bool = False, only=None, every: bool = False) -> None:
        if self.group is None or self.acks is None or self.consumer is None:
            return
        if self.acks is not None:
            self.ack(self.acks())
        pos = self._positions(only, every)
        if not pos:
            return
        ck = client()
        try:
            self.consumer.commit(offsets=[ck.TopicPartition(self.url.topic, p, o)
                                          for p, o in pos.items()], asynchronous=not sync)
        except ck.KafkaException as e:
            self._last_error = e.args[0].str()
            return
        self._committed.update(pos)

    def finish(self, acks=()) -> None:
        """The last acknowledgements, a synchronous commit, and leave the group."""
        if self.consumer is None:
            return
        self.ack(acks)
        # a read that reached its end was planned whole: what was not planned was left out;
        # a read that was stopped: what was not planned was not replayed, and stays
        horizon, self._horizon = self._horizon, (1 << 62) + DROP_NS if self.complete else None
        try:
            self._commit(sync=True, every=True)
        finally:
            self._horizon = horizon
            self.close()

    def close(self) -> None:
        self._closing = True
        c, self.consumer = self.consumer, None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001  (closing after a broker went away)
                pass

    # -- reading -----------------------------------------------------------------------------
    def _conn(self, k) -> int:
        got = self._conns.get(k)
        if got is None:
            got = self._conns[k] = len(self._conns)
        return got

    def _watermark(self, now: float):
        """Capture time up to which the heap may be released (None: hold)."""
        w = None
        for p in self._assigned:
            if p in self._eof or p in self._over or now - self._heard.get(p, 0) > STALL_S:
                continue
            t = self._last_t.get(p)
            if t is None:
                return None
            w = t if w is None else min(w, t)
        return float("inf") if w is None else w

    def _caught_up(self) -> bool:
        return bool(self._assigned) and all(p in self._eof or p in self._over
                                            for p in self._assigned)

    def _ended(self) -> bool:
        if not self._assign_known:
            return False
        if self.until is not None and self._assigned and all(
                p in self._over or p in self._eof and time.time_ns() > self.until + UNTIL_SLACK_NS
                for p in self._assigned):
            # past --until everywhere (or at the end, and --until is past on the wall clock):
            # nothing more is wanted, followed or not
            return True
        if self.follow:
            return False
        return all(p in self._eof or p in self._over for p in self._assigned)

    def __iter__(self):
        if self.consumer is None:
            self.open()
        ck = client()
        EOF = ck.KafkaError._PARTITION_EOF
        c = self.consumer
        topic = self.url.topic
        start, until = self.start, self.until
        heap = self._heap
        opened = last_commit = last_read = time.monotonic()
        try:
            while self.stop is None or not self.stop():
                if self._fatal:
                    raise InputError(f"{self.path}: {self._fatal}")
                batch = c.consume(CONSUME_BATCH, 0.1)
                now = time.monotonic()
                for rec in batch:
                    err = rec.error()
                    p = rec.partition()
                    if err is not None:
                        if err.code() == EOF:
                            if p in self._assigned:
                                self._eof.add(p)
                                self._heard[p] = now
                                self._hi.setdefault(p, rec.offset())
                            continue
                        if err.fatal() or err.code() in (ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                         ck.KafkaError.TOPIC_AUTHORIZATION_FAILED):
                            raise InputError(f"{self.path}: partition {p}: {err.str()}")
                        self._last_error = err.str()
                        continue
                    if p not in self._assigned:
                        continue
                    self._down_since = None
                    last_read = now
                    off = rec.offset()
                    try:
                        m = R.decode(rec.value() or b"")
                        run, conn = R.split_key(rec.key())
                    except R.RecordError as e:
                        raise InputError(f"{self.path}: partition {p} offset {off}: {e}") from None
                    self.records += 1
                    self._eof.discard(p)
                    self._heard[p] = now
                    t = m.ts_first
                    if until is not None and t >= until:
                        if t > until + UNTIL_SLACK_NS:
                            self._over.add(p)
                            try:
                                c.pause([ck.TopicPartition(topic, p)])
                            except ck.KafkaException:
                                pass
                        continue
                    self._hi[p] = off + 1
                    if start is not None and t < start:
                        continue
                    m.conn = self._conn((run, conn))
                    if m.kind == KIND_REQUEST and self.group is not None and self.acks is not None:
                        e = _Entry(off, (m.conn, m.index), t)
                        self._track[p].append(e)
                        self._pending[e.key] = e
                    self._last_t[p] = m.ts_last
                    heapq.heappush(heap, (m.ts_last, self._seq, p, m))
                    self._heap_bytes += len(m.data)
                    self._seq += 1
                w = self._watermark(now)
                while heap and ((w is not None and heap[0][0] <= w) or len(heap) > MAX_BUFFER
                                or self._heap_bytes > MAX_BUFFER_BYTES):
                    m = heapq.heappop(heap)[3]
                    self._heap_bytes -= len(m.data)
                    if self._horizon is None or m.ts_last > self._horizon:
                        self._horizon = m.ts_last     # what was handed on, not what waits here
                    if m.kind == KIND_REQUEST:
                        e = self._pending.get((m.conn, m.index))
                        if e is not None and e.state == 0:
                            e.state = 3
                    yield m
                if now - last_commit >= COMMIT_S:
                    last_commit = now
                    self._commit()
                if not heap and self._ended():
                    self.complete = True
                    return
                if self.idle is not None and not heap and self._horizon is not None and \
                        self.follow and now - last_read > IDLE_S and self._caught_up():
                    # live: the capture's clock has gone on without traffic; as far as this
                    # read knows, it is now at least that far past the last record
                    self.idle(self._horizon + int((now - last_read) * NS))
                if not self.follow:
                    if self._down_since is not None and now - self._down_since > DOWN_S:
                        raise InputError(f"{self.path}: the brokers went away ({self._last_error})")
                    if not self._assign_known and now - opened > ASSIGN_S:
                        raise InputError(f"{self.path}: no partitions assigned to group "
                                         f"{self.group} within {ASSIGN_S:.0f} s")
        finally:
            if self.revoked_in_flight:
                self.warnings.append(
                    f"{self.path}: {self.revoked_in_flight:,} requests were planned here before "
                    "their partition went to another replayer: they may be replayed twice")


def open_topic(url: str, settings: dict | None, from_: str | None, until: str | None):
    """A bounded read of a whole topic (no group): ``convert``, ``ls``, ``info``."""
    r = TopicReader(url, settings, start=parse_time(from_, "--from"),
                    until=parse_time(until, "--until"), follow=False)
    return r.open()
