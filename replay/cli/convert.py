"""``replay convert``: a capture (pcap/pcapng) or a log of another format in, a log out.

The input's format is found from its content (``replay.pipeline.open_input``: pcap, pcapng,
.rlog, and the formats of ``replay.formats``); the output's from -o's extension (``.rlog`` and
anything unknown: a log; ``.gor``, ``.gor.gz``, ``.har``, ``.pcap``, ``.pcapng``)."""

from __future__ import annotations

import os
import time

import click

from replay.cli.kafkaopts import range_options, settings_option
from replay.cli.reassembly import engine_opts_from_kwargs, reassembly_options
from replay.cli.stopping import Interrupts
from replay.cli.types import PORT
from replay.limits import LOG_LEVEL


@click.command("convert")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("-o", "-w", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="The file to write, its format from its extension: .rlog (and any other), "
                   ".gor, .gor.gz, .har, .pcap, .pcapng (created with mode 0600; an existing file "
                   "is replaced once the new one is complete); or kafka://BROKERS/TOPIC, one "
                   "record per message.")
@click.option("--port", "ports", type=PORT, multiple=True,
              help="Only connections to or from these ports (repeatable). Default: every TCP port.")
@reassembly_options()
@click.option("--level", type=click.IntRange(-7, 22), default=LOG_LEVEL, show_default=True,
              help="zstd compression level of the log's blocks.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@settings_option()
@range_options
def command(capture, output, ports, level, quiet, kafka_settings, from_, until, **kwargs):
    """Reassemble the HTTP/1.x messages of CAPTURE and write them to a log; or convert a log
    (.rlog, GoReplay .gor/.gor.gz, HAR) to another format.

    \b
      replay convert prod.pcap -o prod.rlog
      replay convert requests.gor -o requests.rlog
      replay convert prod.rlog -o prod.pcapng       # for Wireshark / tshark
      replay convert prod.rlog -o prod.har
      replay convert prod.pcap -o kafka://broker1:9092/prod-http
      replay convert kafka://broker1:9092/prod-http --from 2026-12-01T10:00:00Z \
          --until 2026-12-01T11:00:00Z -o hour.rlog
    """
    from replay import __version__, core, formats
    from replay.core import PROBLEM_COUNTERS
    from replay.outputs import LOG_MODE, Outputs
    from replay.pipeline import CaptureReader, fewer_collections, open_input

    from replay.kafka import is_kafka_url, parse_settings

    settings = parse_settings(kafka_settings)
    to_kafka = is_kafka_url(output)
    if to_kafka and is_kafka_url(capture):
        from replay.errors import UsageError
        from replay.kafka import parse_url

        a, b = parse_url(capture), parse_url(output)
        if a.topic == b.topic and set(a.brokers.split(",")) & set(b.brokers.split(",")):
            raise UsageError(f"-o {output}: the topic read is the one written (it would grow "
                             "as it is read)")
    outputs = Outputs({} if is_kafka_url(capture) else {"the input": capture})
    out = None if to_kafka else outputs.atomic(output, "-o", mode=LOG_MODE)
    if is_kafka_url(capture):
        from replay.kafka.consumer import open_topic

        reader = open_topic(capture, settings, from_, until)
    else:
        if from_ or until:
            from replay.errors import UsageError

            raise UsageError("--from/--until are for a kafka:// input")
        reader = open_input(capture, ports=ports, **engine_opts_from_kwargs(kwargs))
    t0 = time.perf_counter()
    is_capture = isinstance(reader, CaptureReader)
    meta = {
        "tool": f"replay {__version__}",
        "command": "convert",
        "source": os.path.basename(capture),
        "core": core.IMPLEMENTATION,
        "ports": list(ports),
    }
    if is_capture:
        meta["linktype"] = reader.linktype
    elif getattr(reader, "meta", None):
        meta["source_meta"] = reader.meta
    requests = responses = 0
    interrupted = False
    with outputs.open():
        if to_kafka:
            from replay.kafka.producer import KafkaWriter

            writer = KafkaWriter(output, settings, meta)
        else:
            from replay.log.writer import DIRECT_FROM_INPUT, WORKERS

            writer = formats.open_writer(out.path, out.detach(), meta, level=level,
                                         workers=WORKERS,
                                         direct=_input_size(capture) >= DIRECT_FROM_INPUT)
        try:
            with Interrupts() as stop:     # a signal stops between batches: counts = log
                try:
                    write_many = getattr(writer, "write_many", None)
                    write_rows = getattr(writer, "write_rows", None)
                    if is_capture and write_rows is not None:   # rows: no Message objects at all
                        fewer_collections()
                        reader.keep_rows()
                        write_rows(reader.engine.rows)   # the writer holds them from now on
                        try:
                            for rows in stop.between(reader.row_buffers()):
                                write_rows(rows)
                        finally:
                            st = reader.stats or reader.engine.stats()
                            requests, responses = st["requests"], st["responses"]
                    elif is_capture and write_many is not None:   # whole lists, from the core
                        fewer_collections()
                        for msgs in stop.between(reader.lists()):
                            write_many(msgs)
                            n = sum([m.kind for m in msgs])     # kinds 0 and 1 only, from the core
                            requests += len(msgs) - n
                            responses += n
                    else:
                        if is_kafka_url(capture):   # a topic: it ends its wait for records
                            reader.stop = stop.asked
                        for msg in stop.between(reader):
                            if is_capture or not ports or msg.server[1] in ports \
                                    or msg.client[1] in ports:
                                writer.write(msg)
                                if msg.kind == 0:
                                    requests += 1
                                else:
                                    responses += 1
                except KeyboardInterrupt:       # Ctrl-C or SIGTERM: keep what was converted
                    interrupted = True
                    if is_capture:
                        reader.stats = reader.engine.stats()
            end = {"interrupted": interrupted, "warnings": list(getattr(reader, "warnings", ()))}
            if is_capture:
                end.update({"stats": reader.stats, "packets_read": reader.source.packets_read})
            writer.update_meta(end)
        except BaseException:
            if to_kafka:
                writer.abandon()
                for w in writer.warnings:
                    click.echo(f"replay: warning: {w}", err=True)
            raise
        finally:
            writer.close(fsync=False)
    dt = time.perf_counter() - t0
    for w in [*reader.warnings, *getattr(writer, "warnings", ())]:   # a writer's: what it left out
        click.echo(f"replay: warning: {w}", err=True)
    if not quiet:
        st = reader.stats if is_capture else {}
        size = writer.sent if to_kafka else os.path.getsize(output)
        what = (f"{st.get('packets', 0)} packets, {st.get('connections', 0)} connections"
                if is_capture else "a log")
        click.echo(
            f"{capture}: {what} -> {output}: {requests} requests, {responses} responses, "
            + (f"{size} records delivered" if to_kafka else f"{size} bytes")
            + f" in {dt:.2f} s" + (" (interrupted)" if interrupted else ""), err=True)
        problems = {k: st[k] for k in PROBLEM_COUNTERS if st.get(k)}
        if problems:
            click.echo("  " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in problems.items()),
                       err=True)
    if interrupted:
        raise KeyboardInterrupt


def _input_size(path) -> int:
    """Bytes of the input file (0: not a regular file, or a topic)."""
    import stat

    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
