"""``replay capture``: HTTP traffic from a live interface into .rlog logs (the live twin of convert)."""

from __future__ import annotations

import os
import sys
import time

import click

from replay.cli.kafkaopts import settings_option
from replay.cli.reassembly import engine_opts_from_kwargs, reassembly_options
from replay.cli.ruleopts import rule_input_files, rule_options, rules_from_kwargs
from replay.cli.stopping import StopSignals
from replay.cli.types import DURATION
from replay.errors import UsageError
from replay.limits import LOG_LEVEL
# the one duration and size parsers, used below
from replay.units import parse_seconds, parse_size  # noqa: F401


def _mb(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def status_text(session) -> str:
    st = session.source.stats()
    core = session.engine.stats()
    return (f"{session.elapsed():7.1f} s  {st['packets']:,} packets  {_mb(st['bytes'])}  "
            f"{session.requests:,} req  {session.responses:,} resp  "
            f"{core.get('open_connections', 0):,} open conns  "
            f"drops: kernel {st['kernel_drops']:,}, interface {st['interface_drops']:,}")


@click.command("capture")
@click.option("-i", "--interface", required=True, metavar="IFACE",
              help="Interface to capture on: a name (eth0), lo, or any (every interface).")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Server port whose HTTP traffic is captured (repeatable). The capture filter "
                   "becomes 'tcp port A or tcp port B', also matching 802.1Q-tagged frames.")
@click.option("-f", "--filter", "bpf", metavar="EXPR",
              help="A BPF expression (tcpdump syntax) that replaces the one made from --port.")
@click.option("-o", "-w", "--output", "output", required=True, metavar="FILE",
              help="The .rlog file to write, created with mode 0600; strftime patterns "
                   "(%Y%m%d-%H%M%S) are expanded when each file is opened. Or "
                   "kafka://BROKERS/TOPIC: one record per message (-X for librdkafka settings).")
@click.option("-s", "--snaplen", type=click.IntRange(0, 262144), default=262144, show_default=True,
              help="Bytes kept of each packet; 0 means the largest. The default keeps GRO/TSO "
                   "super-frames whole, so bodies are never cut.")
@click.option("-B", "--buffer-size", "buffer_size", default="64M", show_default=True,
              metavar="SIZE",
              help="Kernel capture buffer. A bare number is in KiB, as in tcpdump (-B 65536 is "
                   "64 MiB); or give a unit: 256M, 1G.")
@click.option("--promisc/--no-promisc", default=False, show_default=True,
              help="Put the interface in promiscuous mode (traffic not addressed to this host).")
@click.option("--immediate", is_flag=True,
              help="Hand every packet over at once instead of in blocks (lower latency, more CPU "
                   "per packet; without it a quiet capture waits up to 0.1 s).")
@click.option("--duration", metavar="TIME", help="Stop after this long (90, 30s, 15m, 2h).")
@click.option("--count", type=click.IntRange(1), help="Stop after writing this many messages.")
@click.option("--requests-only", is_flag=True,
              help="Write requests only (responses are kept by default).")
@click.option("-Z", "--user", metavar="USER",
              help="After opening the interface, drop root and run as USER, as tcpdump does; "
                   "output files are then created by USER, so their directory must be writable "
                   "by USER.")
@click.option("--rotate-size", metavar="SIZE",
              help="Start a new file after SIZE bytes of HTTP messages (100M, 1G; bare: bytes). "
                   "Counted before compression, so no file is larger than SIZE plus one message.")
@click.option("--rotate-interval", metavar="TIME",
              help="Start a new file every TIME (3600, 15m, 1h). Use a strftime pattern in -o "
                   "to name the files; otherwise .1, .2 ... are added.")
@click.option("--nice", type=click.IntRange(-20, 19), default=-10, show_default=True,
              help="CPU priority of the capture (as nice(1); needs root). Under full load the "
                   "capture then gets the CPU it needs to lose nothing before the traffic's own "
                   "processes do; 0 leaves the priority alone.")
@click.option("--flush-interval", type=DURATION, default="1", show_default=True,
              help="Time between flushes to disk: a killed capture loses at most this much.")
@click.option("--queue-size", default="256M", show_default=True, metavar="SIZE",
              help="Packet batches that may wait for the parser in memory (bare number: MiB); "
                   "beyond it the kernel buffer takes the burst.")
@reassembly_options()
@click.option("--level", type=click.IntRange(-7, 22), default=LOG_LEVEL, show_default=True,
              help="zstd compression level of the log's blocks.")
@click.option("-q", "--quiet", is_flag=True, help="No status line and no summary.")
@settings_option()
@rule_options()
def command(interface, ports, bpf, output, snaplen, buffer_size, promisc, immediate, duration,
            count, requests_only, user, rotate_size, rotate_interval, nice, flush_interval, queue_size,
            level, quiet, kafka_settings, **rule_kwargs):
    """Capture the HTTP/1.x traffic of a live interface and write it to a log.

    \b
      sudo replay capture -i eth0 --port 80 -o captures/prod-%Y%m%d-%H%M.rlog --rotate-interval 1h
      sudo replay capture -i any --port 8080 --port 8443 --duration 60 -o captures/x.rlog
      sudo replay capture -i eth0 --port 80 -o kafka://broker1:9092,broker2:9092/prod-http

    Stop with Ctrl-C (or SIGTERM): what was captured is written, the file closed and a summary
    printed. Kernel drops are reported in the summary and stored in the log (replay info).

    Filters, rewrites, --middleware and --plugin (the options of `replay filter`) apply to each
    message before it is written; --limit stops the capture once that many exchanges are kept.
    """
    # everything is imported before -Z drops root: the new user may not read the install
    import replay.log.writer  # noqa: F401
    from replay import __version__, core
    from replay.capture import (CaptureSession, OutputFiles, check_output, expand_name,
                                keeps_rows, raise_priority)
    from replay.errors import CaptureError, OutputError
    from replay.outputs import check_distinct
    from replay.pipeline import fewer_collections, tune_allocator
    from replay.sources.live import LiveCapture, drop_privileges

    show_status = not quiet and sys.stderr.isatty()
    if show_status:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

    if not ports and not bpf:
        raise UsageError("give the server port(s) to capture (--port 80) or a filter (-f EXPR)")
    buf_bytes = parse_size(buffer_size, 1 << 10, "-B/--buffer-size")
    queue_bytes = parse_size(queue_size, 1 << 20, "--queue-size")
    dur = parse_seconds(duration, "--duration") if duration else None
    rsize = parse_size(rotate_size, 1, "--rotate-size") if rotate_size else None
    rint = parse_seconds(rotate_interval, "--rotate-interval") if rotate_interval else None
    from replay.kafka import is_kafka_url, parse_settings, parse_url

    to_kafka = is_kafka_url(output)
    settings = parse_settings(kafka_settings)
    engine_opts = engine_opts_from_kwargs(rule_kwargs)
    inputs = rule_input_files(rule_kwargs)
    if to_kafka:
        parse_url(output)
        if rsize or rint:
            raise UsageError("--rotate-size/--rotate-interval: a kafka:// output is not rotated")
    else:
        first = expand_name(output, time.time(), set())
        check_output(first)
        check_distinct(first, "-o", inputs)
    rules = rules_from_kwargs(rule_kwargs)   # bad rules fail before the interface opens

    # Signals first: a Ctrl-C while the interface opens must not leave a traceback.
    stop = StopSignals()
    try:
        tune_allocator()
        fewer_collections()
        source = LiveCapture(interface, ports=ports, bpf=bpf, snaplen=snaplen,
                             buffer_size=buf_bytes, promisc=promisc, immediate=immediate,
                             queue_bytes=queue_bytes)
        try:
            priority = raise_priority(nice)  # before any thread starts: threads inherit it
            if user:
                drop_privileges(user)
            rows = keeps_rows(rules=rules, requests_only=requests_only, count=count,
                              rotate_size=rsize, outputs="kafka" if to_kafka else "files")
            engine = core.Engine(source.linktype, ports=tuple(ports), rows=rows, **engine_opts)
            meta = {
                "tool": f"replay {__version__}",
                "command": "capture",
                "source": f"{interface} (live)",
                "interface": interface,
                "filter": source.filter,
                "ports": list(ports),
                "linktype": source.linktype,
                "snaplen": source.snaplen,
                "buffer_size": buf_bytes,
                "promisc": promisc,
                "immediate": immediate,
                "requests_only": requests_only,
                "priority": priority,
                "core": core.IMPLEMENTATION,
                "host": os.uname().nodename,
            }
            if rules is not None:
                meta["rules"] = rules.describe()
            if to_kafka:
                from replay.kafka.producer import KafkaOutputs

                outputs = KafkaOutputs(output, settings, meta)
            else:
                outputs = OutputFiles(output, meta, rotate_size=rsize, rotate_interval=rint,
                                      level=level, inputs=inputs)
            try:
                outputs.open()
            except OutputError as e:
                if user:
                    raise OutputError(f"{e} (as user {user}: -Z opens output files after "
                                      "dropping root)") from None
                raise
        except BaseException:
            source.close()
            raise
        session = CaptureSession(source, engine, outputs, requests_only=requests_only,
                                 count=count, duration=dur, flush_interval=flush_interval,
                                 rules=rules)
        stop.attach(session)
        for w in source.warnings:
            click.echo(f"replay: warning: {w}", err=True)
        if not quiet:
            click.echo(f"replay: capturing on {interface} (link type {source.linktype}, filter "
                       f"'{source.filter}', snaplen {source.snaplen}, buffer {_mb(buf_bytes)}) "
                       f"-> {outputs.path}", err=True)
        live = None
        tick = None
        if show_status:
            live = Live(Text(""), console=Console(stderr=True), auto_refresh=False,
                        transient=True)
            live.start()

            def tick(s):
                live.update(Text(status_text(s)), refresh=True)
        error = None
        try:
            session.run(on_tick=tick)
        except (OutputError, CaptureError) as e:
            error = e
        finally:
            if live is not None:
                live.stop()
        if not quiet:
            summary(session, interface)
        if error is not None:
            raise error
    finally:
        stop.restore()


def summary(session, interface: str) -> None:
    from replay.core import PROBLEM_COUNTERS

    st = session.source.stats()
    core = session.engine.stats()
    paths = session.outputs.paths
    sizes = []
    for p in paths:
        try:
            sizes.append(os.path.getsize(p))
        except OSError:
            sizes.append(0)
    from replay.kafka import is_kafka_url

    where = (f"{paths[0]}" if paths and is_kafka_url(paths[0])
             else f"{paths[0]} ({sizes[0]:,} bytes)" if len(paths) == 1
             else f"{len(paths)} files, {sum(sizes):,} bytes: {paths[0]} .. {paths[-1]}")
    reason = session.stop_reason or "?"
    click.echo(
        f"replay: capture on {interface} stopped ({reason}) after {session.elapsed():.1f} s: "
        f"{st['packets']:,} packets ({_mb(st['bytes'])}), {core.get('connections', 0):,} "
        f"connections; {session.requests:,} requests, {session.responses:,} responses"
        f"{' (responses not written)' if session.requests_only else ''} -> {where}", err=True)
    click.echo(f"  drops: kernel {st['kernel_drops']:,}, interface {st['interface_drops']:,}; "
               f"queue peak {_mb(st['queue_peak'])}", err=True)
    if session.rules is not None:
        rs = session.rules.stats
        click.echo(f"  rules: kept {rs['kept']:,} of {rs['read']:,} messages"
                   + (f", rewrote {rs['rewritten']:,}" if rs["rewritten"] else "")
                   + (f", {rs['out']:,} after middleware and plugins" if rs["out"] != rs["kept"] else ""),
                   err=True)
    problems = {k: core[k] for k in PROBLEM_COUNTERS if core.get(k)}
    if problems:
        click.echo("  " + ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in problems.items()),
                   err=True)
    if st["kernel_drops"] or st["interface_drops"]:
        click.echo(f"replay: warning: {st['kernel_drops'] + st['interface_drops']:,} packets were "
                   "dropped before replay saw them: some messages are missing or incomplete "
                   "(a bigger -B, a narrower filter, or --requests-only may help)", err=True)
