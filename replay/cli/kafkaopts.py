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
                          "2026-12-01T11:00:00Z, or @UNIX_SECONDS).")(f)
    f = click.option("--from", "from_", metavar="TIME",
                     help="kafka:// input: only messages captured at or after TIME (ISO 8601 "
                          "or @UNIX_SECONDS); the read starts at the offsets of that time.")(f)
    return f



_PLAY_KEYS = ("kafka_settings", "group", "start_at", "t0", "from_", "follow")


def play_options(f):
    """``play``'s options for a kafka:// input, handed to the command as one dict ``kafka``."""
    import functools

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        kwargs["kafka"] = {k: kwargs.pop(k) for k in _PLAY_KEYS}
        return f(*args, **kwargs)

    for opt in reversed((
        click.option("--group", metavar="G",
                     help="kafka://: join consumer group G; the topic's partitions are shared by "
                          "the replayers of the group (without it: every partition, no commits)."),
        click.option("--start-at", "start_at", metavar="TIME",
                     help="kafka://: wall-clock time of t0's deadline (ISO 8601 or Unix seconds), "
                          "the same on every replayer. Default: now, plus 3 s when following."),
        click.option("--t0", "t0", metavar="TIME",
                     help="kafka://: the recorded time that --start-at stands for, the same on "
                          "every replayer. Default: the first request this replayer reads."),
        click.option("--follow/--no-follow", default=True, show_default=True,
                     help="kafka://: read on as records arrive (live), or stop at the end of the "
                          "topic (or --until)."),
        settings_option(),
    )):
        wrapper = opt(wrapper)
    # --until is the rules' own (play has it): for a topic it also ends the read
    return click.option("--from", "from_", metavar="TIME",
                        help="kafka://: only messages captured at or after TIME (ISO 8601 or "
                             "@UNIX_SECONDS); the read starts at the offsets of that time. "
                             "--until TIME also ends the read there.")(wrapper)
