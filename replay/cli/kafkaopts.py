"""The options of the commands that read or write ``kafka://BROKERS/TOPIC``."""

from __future__ import annotations

import click


def settings_option():
    """``-X key=value``, repeatable: any librdkafka setting, as kcat takes them."""
    return click.option(
        "-X", "kafka_settings", multiple=True, metavar="KEY=VALUE",
        help="For kafka:// inputs and outputs: a librdkafka setting (repeatable, as kcat: "
             "security.protocol=SASL_SSL, sasl.mechanisms=PLAIN, message.timeout.ms=30000...).")


def range_options(f):
    """``--from`` / ``--until``: the part of a topic to read, by capture time."""
    f = click.option("--until", "until", metavar="TIME",
                     help="kafka:// input: only messages captured before TIME (ISO 8601, "
                          "2026-12-01T11:00:00Z, or Unix seconds).")(f)
    f = click.option("--from", "from_", metavar="TIME",
                     help="kafka:// input: only messages captured at or after TIME (ISO 8601 "
                          "or Unix seconds); the read starts at the offsets of that time.")(f)
    return f


from replay.kafka import parse_time  # noqa: E402,F401  (the flags' parser, defined below the CLI)
