"""``replay filter``: cut a log or capture down to what a test needs, and change it on the way."""

from __future__ import annotations

import os
import time

import click

from replay.cli.kafkaopts import settings_option
from replay.cli.ruleopts import rule_input_files, rule_options, rules_from_kwargs
from replay.cli.stopping import Interrupts
from replay.limits import LOG_LEVEL


@click.command("filter")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-o", "-w", "--output", "output", type=click.Path(dir_okay=False),
              help="The .rlog file to write (created with mode 0600; an existing file is replaced "
                   "once the new one is complete); or kafka://BROKERS/TOPIC.")
@click.option("--dry-run", is_flag=True, help="Count what would be kept; write nothing.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="For a capture file: only these server ports (repeatable).")
@click.option("--level", type=click.IntRange(-7, 22), default=LOG_LEVEL, show_default=True,
              help="zstd compression level of the output's blocks.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@settings_option()
@rule_options()
def command(path, output, dry_run, ports, level, quiet, kafka_settings, **kwargs):
    """Keep the exchanges of PATH (a .rlog log or a pcap/pcapng capture) that the filters select,
    change them as the rewrites say, and write them to a new log.

    \b
      replay filter prod.rlog -o checkout.rlog --path-include '^/api/checkout' --method POST
      replay filter prod.rlog -o sample.rlog --sample 10% --redact
      replay filter prod.rlog --status 5xx --since +60s --dry-run

    A request and its responses stay or go together. Filters all have to pass; rewrites run in
    the order listed below, then --middleware, then each --plugin.
    """
    from replay import __version__
    from replay.errors import UsageError
    from replay.events import KIND_REQUEST
    from replay import formats
    from replay.outputs import LOG_MODE, Outputs
    from replay.pipeline import open_input

    if not output and not dry_run:
        raise UsageError("give the output log (-o FILE.rlog), or --dry-run to count only")
    if output and dry_run:
        raise UsageError("--dry-run writes nothing: leave out -o")
    from replay.kafka import is_kafka_url, parse_settings

    to_kafka = bool(output) and is_kafka_url(output)
    settings = parse_settings(kafka_settings)
    outputs = Outputs({"the input": path, **rule_input_files(kwargs)})
    out = outputs.atomic(output, "-o", mode=LOG_MODE) if output and not to_kafka else None
    rules = rules_from_kwargs(kwargs)
    t0 = time.perf_counter()
    src = open_input(path, ports=ports)
    if rules is None:
        from replay.rules.ruleset import Rules

        rules = Rules()
    counts = {"requests": 0, "responses": 0}
    interrupted = False
    writer = None
    with outputs.open():
        try:
            if output:
                meta = {
                    "tool": f"replay {__version__}",
                    "command": "filter",
                    "source": os.path.basename(path),
                    "rules": rules.describe(),
                }
                if getattr(src, "meta", None):
                    meta["source_meta"] = src.meta
                if to_kafka:
                    from replay.kafka.producer import KafkaWriter

                    writer = KafkaWriter(output, settings, meta)
                else:
                    writer = formats.open_writer(out.path, out.detach(), meta, level=level)
            with Interrupts() as stop:     # a signal stops between messages: counts = log
                if is_kafka_url(path):          # a topic: it ends its wait for records
                    src.stop = stop.asked
                try:
                    for m in stop.between(rules.apply(src)):
                        counts["requests" if m.kind == KIND_REQUEST else "responses"] += 1
                        if writer is not None:
                            writer.write(m)
                except KeyboardInterrupt:       # Ctrl-C or SIGTERM: keep what was written
                    interrupted = True
            st = dict(rules.stats)
            if writer is not None:
                writer.update_meta({"counts": {
                    "read": st["read"], "kept": st["kept"], "dropped": st["read"] - st["kept"],
                    "rewritten": st["rewritten"], "written": st["out"], **counts,
                    **({"middleware": st["middleware"]} if "middleware" in st else {})},
                    "interrupted": interrupted,
                    "warnings": list(getattr(src, "warnings", ()))})
                writer.close(fsync=False)
                writer = None
        finally:
            if writer is not None:
                if to_kafka:
                    writer.abandon()
                    for w in writer.warnings:
                        click.echo(f"replay: warning: {w}", err=True)
                writer.close(fsync=False)
    dt = time.perf_counter() - t0
    for w in getattr(src, "warnings", ()):
        click.echo(f"replay: warning: {w}", err=True)
    if not quiet:
        parts = [f"{path}: {st['read']:,} messages, kept {st['kept']:,}, dropped "
                 f"{st['read'] - st['kept']:,}"]
        if st["rewritten"]:
            parts.append(f"{st['rewritten']:,} rewritten")
        if rules.refused_rewrites:
            parts.append(f"{rules.refused_rewrites:,} rewrites refused (not a valid request-target)")
        mw = st.get("middleware")
        if mw:
            parts.append(f"middleware dropped {mw.get('dropped', 0):,} and changed "
                         f"{mw.get('changed', 0):,}")
        if st.get("limit_reached"):
            parts.append("--limit reached, the rest not read")
        if st.get("forced_decisions"):
            parts.append(f"{st['forced_decisions']:,} exchanges decided before all their "
                         "messages arrived")
        where = output if output else "(dry run, nothing written)"
        click.echo("; ".join(parts) + f" -> {where}: {st['out']:,} messages ({counts['requests']:,} "
                   f"requests, {counts['responses']:,} responses) in {dt:.2f} s"
                   + (" (interrupted)" if interrupted else ""), err=True)
    if interrupted:
        raise KeyboardInterrupt
