"""Messages out to a Kafka topic: the writer every log-writing command uses for ``-o kafka://``.

``KafkaWriter`` has the ``LogWriter`` protocol (``write``, ``update_meta``, ``flush``, ``close``).
Rules:
- one record per message (``record.encode``), keyed by the run and connection (``record.key``),
  timestamped with the message's capture time (milliseconds): ``--from``/``--until`` can seek;
- batching and zstd compression are librdkafka's (``DEFAULTS``; ``-X`` overrides any);
- nothing is lost silently: a record librdkafka could not deliver (after its own retries, for at
  most ``message.timeout.ms``) is counted with its reason; the buffer in memory is bounded
  (``queue.buffering.max.kbytes``/``.messages``): when it is full, ``write`` waits for room up to
  ``block`` seconds, then counts the message as not delivered ("local queue full") and goes on;
- ``close`` waits for what is in flight (at most ``message.timeout.ms`` and a little more) and,
  when anything was not delivered, raises one ``OutputError``: how many, of how many, and why.
"""

from __future__ import annotations

import os
import time
from collections import Counter

from replay.errors import OutputError
from replay.kafka import KafkaURL, config, make, parse_url
from replay.kafka import record as R

DEFAULTS = {
    "compression.type": "zstd",
    "linger.ms": 20,                        # batches of ~20 ms: one request per partition, not per message
    "batch.size": 1 << 20,
    "queue.buffering.max.kbytes": 256 << 10,   # 256 MiB waiting for the brokers at most (capture's --queue-size)
    "queue.buffering.max.messages": 1_000_000,
    "message.timeout.ms": 60_000,           # a broker away longer than this: its records are counted lost
    "enable.idempotence": True,             # retries keep the order within a partition, no duplicates
    "delivery.report.only.error": True,     # one Python callback per failure, not per record
}
POLL_EVERY = 1024                           # writes between serving librdkafka's callbacks


class KafkaWriter:
    def __init__(self, url: KafkaURL | str, settings: dict | None = None, meta: dict | None = None,
                 block: float = 30.0):
        self.url = parse_url(url) if isinstance(url, str) else url
        self.path = str(self.url)
        self.meta = dict(meta or {})
        self.block = block
        self.run = os.urandom(8)
        self.host = str(self.meta.get("host") or os.uname().nodename).encode("utf-8", "replace")
        self.sent = 0
        self.failed = 0
        self.reasons: Counter = Counter()
        self.last_error = None
        self.warnings: list[str] = []
        self._n = 0
        self._full = False         # a wait for room ran out, and nothing fitted since
        # built once: the client converts a list of headers faster than it gets a new one
        self._headers = tuple([(R.H_HOST, self.host), (R.H_KIND, k)] for k in R.KIND_BYTES)
        conf = config(self.url, DEFAULTS, settings or {})
        conf["on_delivery"] = self._delivered
        conf["error_cb"] = self._error
        self.timeout = float(conf.get("message.timeout.ms", 300_000)) / 1000
        self.producer = make("Producer", self.url, conf)
        self._closed = False

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failed += 1
            self.reasons[err.str()] += 1

    def _error(self, err) -> None:
        self.last_error = err.str()

    def write(self, m) -> None:
        value = R.encode(m)
        headers = self._headers[m.kind]
        k = R.key(self.run, m.conn)
        p = self.producer
        deadline = None
        while True:
            try:
                p.produce(self.url.topic, value, k, headers=headers,
                          timestamp=max(0, m.ts_first // 1_000_000))
                break
            except BufferError:
                now = time.monotonic()
                if self._full or (deadline is not None and now >= deadline):
                    # once a wait ran out, the queue is full until a message fits again:
                    # the messages meanwhile are counted at once, not each after a wait
                    self._full = True
                    self.sent += 1
                    self.failed += 1
                    self.reasons["local queue full"] += 1
                    p.poll(0)
                    return
                if deadline is None:
                    deadline = now + self.block
                p.poll(0.05)
        self._full = False
        self.sent += 1
        self._n += 1
        if self._n >= POLL_EVERY:
            self._n = 0
            p.poll(0)

    def update_meta(self, meta: dict) -> None:
        """A topic has no metadata block: kept for the command's own summary only."""
        self.meta.update(meta)

    def flush(self, fsync: bool = False) -> None:
        self.producer.poll(0)

    @property
    def pending(self) -> int:
        return len(self.producer)

    def undelivered_text(self) -> str | None:
        if not self.failed:
            return None
        why = "; ".join(f"{r}: {n:,}" for r, n in self.reasons.most_common(3))
        return (f"{self.path}: {self.failed:,} of {self.sent:,} messages not delivered ({why})"
                + (f"; last broker error: {self.last_error}" if self.last_error else ""))

    def close(self, fsync: bool = False) -> None:
        """Deliver what is in flight; ``OutputError`` when anything was not delivered."""
        if self._closed:
            return
        self._closed = True
        left = self.producer.flush(self.timeout + 5)
        if left:
            self.failed += left
            self.reasons["still queued at exit"] += left
        text = self.undelivered_text()
        if text:
            raise OutputError(text)

    def abandon(self) -> None:
        """Close after another error: deliver what can be (briefly), raise nothing; a warning
        says what the topic now holds of the output (``warnings``)."""
        if not self._closed:
            self._closed = True
            left = self.producer.flush(min(self.timeout, 5))
            self.failed += left
            done = self.sent - self.failed
            text = (f"{self.path}: stopped by the error below; {done:,} messages written before "
                    f"it stay in the topic")
            if self.failed:
                text += f", {self.failed:,} not delivered"
            self.warnings.append(text)


def open_writer(url: str, settings: dict | None, meta: dict, **_options) -> KafkaWriter:
    return KafkaWriter(url, settings, meta)


class KafkaOutputs:
    """``replay.capture.OutputFiles`` for ``-o kafka://``: what ``capture`` and ``shadow`` write
    to, with the same methods. A topic is not rotated; ``write`` waits at most ``CAPTURE_BLOCK``
    seconds for room (a capture must not stall: beyond the bounded buffer, messages are counted
    as not delivered and reported at the end)."""

    CAPTURE_BLOCK = 0.5

    def __init__(self, url: str, settings: dict | None, meta: dict):
        self.url = parse_url(url)
        self.settings = dict(settings or {})
        self.base_meta = dict(meta)
        self.paths: list[str] = []
        self.writer: KafkaWriter | None = None
        self.rotate_size = self.rotate_interval = None

    @property
    def path(self) -> str | None:
        return self.paths[-1] if self.paths else None

    def open(self) -> None:
        self.writer = KafkaWriter(self.url, self.settings, self.base_meta, block=self.CAPTURE_BLOCK)
        self.paths.append(str(self.url))

    def write(self, msg) -> bool:
        self.writer.write(msg)
        return False

    def due(self) -> bool:
        return False

    def flush(self, meta: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.flush()

    def rotate(self, meta: dict) -> None:
        pass

    def close(self, meta: dict | None = None) -> None:
        w, self.writer = self.writer, None
        if w is not None:
            w.close()

    def abandon(self) -> None:
        w, self.writer = self.writer, None
        if w is not None:
            w.abandon()
