"""``replay convert``: a pcap/pcapng capture in, a .rlog log of HTTP messages out."""

from __future__ import annotations

import os
import time

import click

from replay.cli.reassembly import engine_opts_from_kwargs, reassembly_options
from replay.cli.types import PORT


@click.command("convert")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("-o", "-w", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="The .rlog file to write (created with mode 0600; an existing file is replaced "
                   "once the new one is complete).")
@click.option("--port", "ports", type=PORT, multiple=True,
              help="Only connections to or from these ports (repeatable). Default: every TCP port.")
@reassembly_options()
@click.option("--level", type=click.IntRange(-7, 22), default=3, show_default=True,
              help="zstd compression level of the log's blocks.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def command(capture, output, ports, level, quiet, **kwargs):
    """Reassemble the HTTP/1.x messages of CAPTURE and write them to a log."""
    from replay import __version__, core
    from replay.core import PROBLEM_COUNTERS
    from replay.log import LogWriter
    from replay.outputs import LOG_MODE, Outputs
    from replay.pipeline import CaptureReader

    outputs = Outputs({"the capture": capture})
    out = outputs.atomic(output, "-o", mode=LOG_MODE)
    t0 = time.perf_counter()
    reader = CaptureReader(capture, ports=ports, **engine_opts_from_kwargs(kwargs))
    meta = {
        "tool": f"replay {__version__}",
        "command": "convert",
        "source": os.path.basename(capture),
        "linktype": reader.linktype,
        "core": core.IMPLEMENTATION,
        "ports": list(ports),
    }
    requests = responses = 0
    interrupted = False
    with outputs.open():
        with LogWriter(out.path, fd=out.detach(), meta=meta, level=level) as writer:
            try:
                for msg in reader:
                    writer.write(msg)
                    if msg.kind == 0:
                        requests += 1
                    else:
                        responses += 1
            except KeyboardInterrupt:       # Ctrl-C or SIGTERM: keep what was converted
                interrupted = True
                reader.stats = reader.engine.stats()
            writer.update_meta({"stats": reader.stats, "interrupted": interrupted,
                                "warnings": list(reader.warnings),
                                "packets_read": reader.source.packets_read})
            writer.close(fsync=False)
    dt = time.perf_counter() - t0
    for w in reader.warnings:
        click.echo(f"replay: warning: {w}", err=True)
    if not quiet:
        st = reader.stats
        size = os.path.getsize(output)
        click.echo(
            f"{capture}: {st.get('packets', 0)} packets, {st.get('connections', 0)} connections -> "
            f"{output}: {requests} requests, {responses} responses, {size} bytes "
            f"in {dt:.2f} s" + (" (interrupted)" if interrupted else ""), err=True)
        problems = {k: st[k] for k in PROBLEM_COUNTERS if st.get(k)}
        if problems:
            click.echo("  " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in problems.items()),
                       err=True)
    if interrupted:
        raise KeyboardInterrupt
