"""``replay shadow``: live HTTP traffic copied to staging target(s) as each request completes."""

from __future__ import annotations

import re
import sys

import click

from replay.cli.kafkaopts import settings_option
from replay.cli.reassembly import engine_opts_from_kwargs, reassembly_options
from replay.cli.ruleopts import rule_input_files, rule_options, rules_from_kwargs
from replay.cli.stopping import StopSignals
from replay.cli.types import DURATION
from replay.errors import UsageError
from replay.limits import LOG_LEVEL

# filters on production's answer would hold each request until the answer: not in shadow
SHADOW_EXCLUDED_RULES = ("status", "status-exclude")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def is_local(addr: str, family: int) -> bool:
    """Is ``addr`` an address of this host (in this network namespace)?"""
    import socket

    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def check_loop(target, ports) -> None:
    """A target that is the captured server itself would shadow its own copies, forever."""
    if target.port in ports and is_local(target.addr, target.family):
        raise UsageError(f"--target {target.url}: this is the captured server ({target.addr} port "
                         f"{target.port}): its copies would be captured and sent again, in a loop")


def _ms(p) -> str:
    return "-" if p is None else f"{p:.2f} ms"


def summary_lines(session, interface: str, reason: str) -> list[str]:
    cap = session.capture
    st = cap.source.stats()
    lines = [f"replay: shadow on {interface} stopped ({reason}) after {cap.elapsed():.1f} s: "
             f"{session.requests:,} requests captured; drops: kernel {st['kernel_drops']:,}, "
             f"interface {st['interface_drops']:,}"]
    if session.echo is not None:
        lines.append(f"  dry run: {session.would_send:,} requests would have been sent")
        return lines
    for t in session.summary():
        lat, delay = t["latency_ms"], t["delay_ms"]
        dropped = sum(t["dropped"].values())
        errors = sum(t["errors"].values())
        why = lambda d: (" (" + ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) + ")") if d else ""
        lines.append(f"  {t['target']}: sent {t['sent']:,}, answered {t['answered']:,}, "
                     f"dropped {dropped:,}{why(t['dropped'])}, errors {errors:,}{why(t['errors'])}; "
                     f"latency p50 {_ms(lat['p50'])}, p99 {_ms(lat['p99'])}; "
                     f"delay p50 {_ms(delay['p50'])}, p99 {_ms(delay['p99'])}; "
                     f"queue peak {t['queue_peak']:,}")
    rules = cap.rules
    if rules is not None:
        rs = rules.stats
        lines.append(f"  rules: kept {rs['kept']:,} of {rs['read']:,} messages"
                     + (f", rewrote {rs['rewritten']:,}" if rs["rewritten"] else ""))
    paths = cap.outputs.paths
    if paths:
        where = paths[0] if len(paths) == 1 else f"{len(paths)} files: {paths[0]} .. {paths[-1]}"
        lines.append(f"  log: {where}" + (f" ({session.output.dropped:,} answers not written: "
                                          "the writer fell behind)" if session.output.dropped else ""))
        if session.beyond_stride:
            lines.append(f"  {session.beyond_stride:,} requests of connections numbered beyond "
                         "the log's conn_stride were sent but their answers not logged")
    return lines


def report_dict(session, interface: str, reason: str) -> dict:
    """``--report``: the shadow's summary as JSON."""
    cap = session.capture
    st = cap.source.stats()
    return {"command": "shadow", "interface": interface, "stopped": reason,
            "seconds": round(cap.elapsed(), 3), "requests_captured": session.requests,
            "drops": {"kernel": st["kernel_drops"], "interface": st["interface_drops"]},
            "amplify": session.opts.amplify, "split": session.opts.split,
            "targets": session.summary(), "log": list(cap.outputs.paths),
            "answers_not_logged": {"writer_behind": session.output.dropped,
                                   "beyond_stride": session.beyond_stride},
            "rules_stats": dict(cap.rules.stats) if cap.rules is not None else None}


def dry_run_echo(m, data, target, copy) -> None:
    """``--dry-run``: one line per request that would be sent."""
    import time

    t = time.strftime("%H:%M:%S", time.localtime(m.ts_last / 1e9)) + f".{m.ts_last % 10**9 // 1000:06d}"
    click.echo(f"{t} conn {m.conn} #{m.index} copy {copy + 1} -> {target.display}  "
               f"{m.method or '?'} {m.uri or '?'}  {len(data):,} bytes")


@click.command("shadow")
@click.option("-i", "--interface", required=True, metavar="IFACE",
              help="Interface to capture on: a name (eth0), lo, or any.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, required=True,
              help="Production server port whose requests are shadowed (repeatable).")
@click.option("-t", "--target", "targets", multiple=True, metavar="URL",
              help="Staging target, http[s]://host:port (repeatable: every request goes to "
                   "each, or with --split each connection to one).")
@click.option("-k", "--insecure", is_flag=True, help="https: do not verify the targets' certificates.")
@click.option("--split", is_flag=True,
              help="Send each production connection to one target (a stable hash of the "
                   "connection), instead of mirroring to all.")
@click.option("--amplify", type=click.FloatRange(1, 100), default=1, show_default=True,
              metavar="N",
              help="Send N copies of each production connection, each on a connection of its "
                   "own; fractional N sends some connections once more (1.5: every other "
                   "connection twice, chosen by a stable hash).")
@click.option("--copy-header", metavar="NAME",
              help="Mark each copy with this header, its value the copy's number (1, 2 ...).")
@click.option("--keep-host", is_flag=True, help="Send the captured Host header instead of the target's.")
@click.option("--dry-run", is_flag=True,
              help="Capture and print each request that would be sent (time, connection, copy, "
                   "target, method, URI, bytes); send nothing.")
@click.option("-o", "--output", metavar="FILE",
              help="Write the captured requests, the production responses and each target's "
                   "answers (flag replayed) to this .rlog, for replay report; strftime patterns "
                   "are expanded as in capture. Or kafka://BROKERS/TOPIC (-X settings).")
@click.option("--rotate-size", metavar="SIZE", help="With -o: start a new file after SIZE bytes "
              "of HTTP messages (100M, 1G; bare: bytes).")
@click.option("--rotate-interval", metavar="TIME", help="With -o: start a new file every TIME.")
@click.option("--level", type=click.IntRange(-7, 22), default=LOG_LEVEL, show_default=True,
              help="zstd compression level of the log's blocks.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the summary (per target: counts, drops, errors, latency and delay "
                   "percentiles) as JSON to this file.")
@click.option("--duration", type=DURATION, help="Stop after this long (90, 30s, 15m, 2h).")
@click.option("--count", type=click.IntRange(1), help="Stop after this many requests captured.")
@click.option("--drain", type=DURATION, default="2", show_default=True,
              help="At a stop, time given to the requests queued and in flight.")
@click.option("--timeout", type=DURATION, default="5", show_default=True,
              help="Connect, and each answer of a target.")
@click.option("--idle", type=DURATION, default="5", show_default=True,
              help="Close a target connection after this long without a request on its "
                   "production connection (when the production one ends, it closes as soon as "
                   "its requests are answered).")
@click.option("--queue", "queue_requests", type=click.IntRange(1), default=1000, show_default=True,
              help="Requests per target waiting or in flight; beyond it requests for that target "
                   "are dropped (counted), never held back in the capture.")
@click.option("--queue-bytes", default="64M", show_default=True, metavar="SIZE",
              help="Bytes of requests per target waiting or in flight (bare number: MiB).")
@click.option("-s", "--snaplen", type=click.IntRange(0, 262144), default=262144, show_default=True,
              help="Bytes kept of each packet; 0 means the largest.")
@click.option("-B", "--buffer-size", "buffer_size", default="64M", show_default=True, metavar="SIZE",
              help="Kernel capture buffer (bare number: KiB, as in tcpdump).")
@click.option("--promisc/--no-promisc", default=False, show_default=True,
              help="Put the interface in promiscuous mode.")
@click.option("--immediate/--no-immediate", default=True, show_default=True,
              help="Hand every packet over at once (without it a quiet capture waits up to 0.1 s).")
@click.option("--nice", type=click.IntRange(-20, 19), default=-10, show_default=True,
              help="CPU priority of the process (as nice(1); needs root).")
@reassembly_options()
@click.option("-q", "--quiet", is_flag=True, help="No status line and no summary.")
@settings_option()
@rule_options(exclude=SHADOW_EXCLUDED_RULES)
def command(interface, ports, targets, insecure, split, amplify, copy_header, keep_host, dry_run, output,
            rotate_size, rotate_interval, level, report_path, duration, count, drain, timeout, idle,
            queue_requests, queue_bytes, snaplen, buffer_size, promisc, immediate, nice, quiet,
            kafka_settings, **kwargs):
    """Copy live production requests to staging as each one completes.

    \b
      sudo replay shadow -i eth0 --port 80 --target http://staging:8080
      sudo replay shadow -i eth0 --port 80 --target http://v2:8080 --target http://v3:8080
      sudo replay shadow -i eth0 --port 80 -t http://a:8080 -t http://b:8080 --split
      sudo replay shadow -i eth0 --port 80 -t http://staging:8080 --amplify 3 -o shadow.rlog
      sudo replay shadow -i eth0 --port 80 -t http://staging:8080 --sample 10% --method GET,HEAD

    Each request is sent as soon as its head and body are captured, on a connection of its own
    per production connection (and copy), in production order; production responses are not
    waited for. A slow or hung target never slows the capture: its requests beyond --queue are
    dropped and counted. Filters and rewrites (the options of `replay filter`; not --status,
    which would wait for production's answer) choose and change what is sent. With -o the log
    holds production's exchanges and each target's answers: `replay report shadow.rlog`
    compares them per endpoint. Stop with Ctrl-C (or SIGTERM): the targets get --drain seconds,
    then a summary per target (sent, answered, dropped by reason, errors, latency and delay
    p50/p99).
    """
    import json
    import os
    import time

    from replay import __version__, core
    from replay.capture import (OutputFiles, check_output, expand_name, raise_priority)
    from replay.errors import CaptureError, OutputError
    from replay.outputs import Outputs, check_distinct
    from replay.pipeline import tune_allocator
    from replay.play.sender import parse_target
    from replay.play.shadow import ShadowOptions, ShadowSession
    from replay.sources.live import LiveCapture
    from replay.units import parse_seconds, parse_size

    if not targets:
        raise UsageError("give a staging target: --target http://host:port (repeatable)")
    parsed = []
    for url in targets:
        t = parse_target(url, insecure)
        check_loop(t, ports)
        if any((p.scheme, p.host, p.port) == (t.scheme, t.host, t.port) for p in parsed):
            raise UsageError(f"--target {url}: given twice")
        parsed.append(t)
    if split and len(parsed) < 2:
        raise UsageError("--split needs two targets or more")
    if copy_header is not None and not _TOKEN.fullmatch(copy_header):
        raise UsageError(f"--copy-header {copy_header!r}: not a header name")
    if (rotate_size or rotate_interval) and not output:
        raise UsageError("--rotate-size/--rotate-interval rotate the -o log: give -o FILE")
    if dry_run and (output or report_path):
        raise UsageError("--dry-run sends nothing: -o and --report would have nothing to hold")
    opts = ShadowOptions(split=split, keep_host=keep_host, queue_requests=queue_requests,
                         queue_bytes=parse_size(queue_bytes, 1 << 20, "--queue-bytes"),
                         idle=idle, drain=drain, timeout=timeout, amplify=float(amplify),
                         copy_header=copy_header)
    buf_bytes = parse_size(buffer_size, 1 << 10, "-B/--buffer-size")
    rsize = parse_size(rotate_size, 1, "--rotate-size") if rotate_size else None
    rint = parse_seconds(rotate_interval, "--rotate-interval") if rotate_interval else None
    engine_opts = engine_opts_from_kwargs(kwargs)
    inputs = rule_input_files(kwargs)
    rules = rules_from_kwargs(kwargs)
    if rules is not None:
        from replay.rules.filters import StatusFilter

        if any(isinstance(f, StatusFilter) for f in rules.filters.filters):
            raise UsageError("shadow: status and status-exclude (here from the rules file) filter "
                             "on production's answer, which shadow does not wait for: leave them "
                             "out")
    outputs = Outputs(inputs)
    out_report = outputs.atomic(report_path, "--report") if report_path else None
    from replay.kafka import is_kafka_url, parse_settings, parse_url

    to_kafka = bool(output) and is_kafka_url(output)
    settings = parse_settings(kafka_settings)
    if to_kafka:
        parse_url(output)
        if rotate_size or rotate_interval:
            raise UsageError("--rotate-size/--rotate-interval: a kafka:// output is not rotated")
    elif output:
        first = expand_name(output, time.time(), set())
        check_output(first)
        check_distinct(first, "-o", inputs, {"--report": report_path})
    show_status = not quiet and sys.stderr.isatty()

    stop = StopSignals()
    files = None
    try:
        outputs.open()
        tune_allocator()
        source = LiveCapture(interface, ports=ports, snaplen=snaplen, buffer_size=buf_bytes,
                             promisc=promisc, immediate=immediate)
        try:
            raise_priority(nice)
            engine = core.Engine(source.linktype, ports=tuple(ports), track_closed=True,
                                 **engine_opts)
            if output:
                meta = {"tool": f"replay {__version__}", "source": f"{interface} (live)",
                        "interface": interface, "filter": source.filter, "ports": list(ports),
                        "linktype": source.linktype, "snaplen": source.snaplen,
                        "core": core.IMPLEMENTATION, "host": os.uname().nodename}
                if rules is not None:
                    meta["rules"] = rules.describe()
                if to_kafka:
                    from replay.kafka.producer import KafkaOutputs

                    files = KafkaOutputs(output, settings, meta)
                else:
                    files = OutputFiles(output, meta, rotate_size=rsize, rotate_interval=rint,
                                        level=level, inputs=inputs)
            session = ShadowSession(source, engine, parsed, opts, count=count,
                                    duration=duration or None, rules=rules, files=files,
                                    echo=dry_run_echo if dry_run else None)
            if files is not None:
                files.open()
        except BaseException:
            source.close()
            raise
        stop.attach(session)
        for w in source.warnings:
            click.echo(f"replay: warning: {w}", err=True)
        if not quiet:
            click.echo(f"replay: shadowing {interface} (filter '{source.filter}') -> "
                       + ", ".join(t.display for t in parsed)
                       + (" (split)" if split else "")
                       + (f", {amplify:g} copies" if amplify != 1 else "")
                       + (" (dry run: nothing is sent)" if dry_run else "")
                       + (f"; log {files.path}" if files is not None else ""), err=True)
        live = tick = None
        if show_status:
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            live = Live(Text(""), console=Console(stderr=True), auto_refresh=False, transient=True)
            live.start()

            def tick(s):
                live.update(Text(session.status_text()), refresh=True)
        error = None
        try:
            reason = session.run(on_tick=tick)
        except (CaptureError, OutputError) as e:
            error, reason = e, "capture error" if isinstance(e, CaptureError) else "write error"
        finally:
            if live is not None:
                live.stop()
        if not quiet:
            for line in summary_lines(session, interface, reason):
                click.echo(line, err=True)
        if out_report is not None:
            out_report.write_text(json.dumps(report_dict(session, interface, reason), indent=2)
                                  + "\n")
        outputs.commit()
        if error is not None:
            raise error
    finally:
        stop.restore()
        outputs.discard()
