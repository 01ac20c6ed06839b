"""Captured traffic through Kafka: one record per message out (``producer``), a consumer group of
replayers in (``consumer``, ``replay.play.kafka``). Kafka is the engine; replay adds its record
encoding (``record``), the keys that keep a connection in one partition, and the accounting.

This module holds what both directions share: the ``kafka://BROKERS/TOPIC`` address, the client
import (``confluent-kafka``, librdkafka, optional: the ``kafka`` extra) and the settings handed
to librdkafka. Rules:

- an address is ``kafka://HOST:PORT[,HOST:PORT...]/TOPIC``; anything else is a ``UsageError``
  naming the part that is wrong;
- ``-X key=value`` (repeatable, as kcat) passes any librdkafka setting; ours are defaults it
  overrides. A key librdkafka does not know is a ``UsageError`` before anything connects;
- librdkafka's own log lines are silenced by default (``log_level`` 0): what goes wrong reaches
  the user through the error and delivery callbacks, worded as one line of ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from replay.errors import UsageError

SCHEME = "kafka://"
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")     # Kafka's own rule for topic names


def is_kafka_url(text) -> bool:
    return isinstance(text, str) and text[:len(SCHEME)].lower() == SCHEME


@dataclass(frozen=True)
class KafkaURL:
    brokers: str          # librdkafka's bootstrap.servers
    topic: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.brokers}/{self.topic}"


def parse_url(text: str) -> KafkaURL:
    """``kafka://HOST:PORT[,HOST:PORT...]/TOPIC``; a ``UsageError`` saying what is wrong."""
    if not is_kafka_url(text):
        raise UsageError(f"{text}: not a kafka:// address (kafka://HOST:PORT/TOPIC)")
    rest = text[len(SCHEME):]
    brokers, slash, topic = rest.partition("/")
    if not slash or not topic:
        raise UsageError(f"{text}: no topic (kafka://HOST:PORT/TOPIC)")
    if not _TOPIC.match(topic):
        raise UsageError(f"{text}: bad topic name {topic!r} (letters, digits, '.', '_', '-'; "
                         "at most 249)")
    if not brokers:
        raise UsageError(f"{text}: no broker (kafka://HOST:PORT/TOPIC)")
    for b in brokers.split(","):
        m = _HOST.match(b)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise UsageError(f"{text}: bad broker address {b!r} (HOST:PORT)")
    return KafkaURL(brokers, topic)


def parse_settings(pairs) -> dict:
    """``-X key=value`` options as a dict (the last of a repeated key wins)."""
    out = {}
    for p in pairs or ():
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"-X {p}: expected key=value (a librdkafka setting)")
        out[key.strip()] = value
    return out


def client():
    """The ``confluent_kafka`` module, or a ``UsageError`` saying how to get it."""
    try:
        import confluent_kafka
    except ImportError:
        raise UsageError("kafka:// needs the confluent-kafka package: "
                         "pip install 'replay[kafka]' (or pip install confluent-kafka)") from None
    return confluent_kafka


def config(url: KafkaURL, defaults: dict, settings: dict) -> dict:
    conf = {"bootstrap.servers": url.brokers, "log_level": 0, **defaults}
    conf.update(settings)
    return conf


def make(kind: str, url: KafkaURL, conf: dict):
    """A ``Producer`` or ``Consumer`` for ``conf``; a setting librdkafka refuses is a
    ``UsageError`` naming it."""
    ck = client()
    try:
        return getattr(ck, kind)(conf)
    except (ck.KafkaException, ValueError, TypeError) as e:
        text = str(e.args[0].str() if e.args and hasattr(e.args[0], "str") else e)
        raise UsageError(f"{url}: {text} (check the -X settings)") from None


def parse_time(text: str | None, what: str) -> int | None:
    """A time as the rules' --since/--until take it (ISO 8601, local time without a zone;
    @UNIX_SECONDS) or bare Unix seconds -> Unix ns; None stays None."""
    if text is None:
        return None
    import re

    from replay.rules.filters import absolute_time_ns

    t = str(text).strip()
    try:
        return absolute_time_ns("@" + t if re.fullmatch(r"\d+(?:\.\d*)?", t) else t)
    except ValueError:
        raise UsageError(f"{what}: not a time between 1970 and 2116: {text!r} "
                         "(2026-12-01T10:00:00Z, @1796000000 or Unix seconds)") from None
