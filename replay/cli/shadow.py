"""``replay shadow``: live HTTP traffic copied to staging target(s) as each request completes."""

from __future__ import annotations

import socket
import sys

import click

from replay.cli.reassembly import engine_opts_from_kwargs, reassembly_options
from replay.cli.stopping import StopSignals
from replay.cli.types import DURATION
from replay.errors import UsageError


def is_local(addr: str, family: int) -> bool:
    """Is ``addr`` an address of this host (in this network namespace)?"""
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


def summary_lines(session, interface: str, reason: str) -> list[str]:
    cap = session.capture
    st = cap.source.stats()
    lines = [f"replay: shadow on {interface} stopped ({reason}) after {cap.elapsed():.1f} s: "
             f"{session.requests:,} requests captured; drops: kernel {st['kernel_drops']:,}, "
             f"interface {st['interface_drops']:,}"]
    for t in session.summary():
        lat = t["latency_ms"]
        p = ("-" if lat["p50"] is None else f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms")
        dropped = sum(t["dropped"].values())
        errors = sum(t["errors"].values())
        why = lambda d: (" (" + ", ".join(f"{k} {v:,}" for k, v in sorted(d.items())) + ")") if d else ""
        lines.append(f"  {t['target']}: sent {t['sent']:,}, answered {t['answered']:,}, "
                     f"dropped {dropped:,}{why(t['dropped'])}, errors {errors:,}{why(t['errors'])}; "
                     f"latency {p}; queue peak {t['queue_peak']:,}")
    return lines


@click.command("shadow")
@click.option("-i", "--interface", required=True, metavar="IFACE",
              help="Interface to capture on: a name (eth0), lo, or any.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, required=True,
              help="Production server port whose requests are shadowed (repeatable).")
@click.option("-t", "--target", "targets", multiple=True, required=True, metavar="URL",
              help="Staging target, http://host:port (repeatable: every request goes to each, "
                   "or with --split each connection to one).")
@click.option("--split", is_flag=True,
              help="Send each production connection to one target (a stable hash of the "
                   "connection), instead of mirroring to all.")
@click.option("--keep-host", is_flag=True, help="Send the captured Host header instead of the target's.")
@click.option("--duration", type=DURATION, help="Stop after this long (90, 30s, 15m, 2h).")
@click.option("--count", type=click.IntRange(1), help="Stop after this many requests captured.")
@click.option("--drain", type=DURATION, default="2", show_default=True,
              help="At a stop, time given to the requests queued and in flight.")
@click.option("--timeout", type=DURATION, default="5", show_default=True,
              help="Connect, and each answer of a target.")
@click.option("--idle", type=DURATION, default="5", show_default=True,
              help="Close a target connection after this long without a request on its "
                   "production connection.")
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
def command(interface, ports, targets, split, keep_host, duration, count, drain, timeout, idle,
            queue_requests, queue_bytes, snaplen, buffer_size, promisc, immediate, nice, quiet,
            **kwargs):
    """Copy live production requests to staging as each one completes.

    \b
      sudo replay shadow -i eth0 --port 80 --target http://staging:8080
      sudo replay shadow -i eth0 --port 80 --target http://v2:8080 --target http://v3:8080
      sudo replay shadow -i eth0 --port 80 -t http://a:8080 -t http://b:8080 --split

    Each request is sent as soon as its head and body are captured, on a connection of its own
    per production connection, in production order; production responses are not waited for.
    A slow or hung target never slows the capture: its requests beyond --queue are dropped and
    counted. Stop with Ctrl-C (or SIGTERM): the targets get --drain seconds, then a summary per
    target (sent, answered, dropped by reason, errors, latency p50/p99).
    """
    from replay import core
    from replay.capture import raise_priority
    from replay.cli.capture import parse_size
    from replay.errors import CaptureError
    from replay.pipeline import tune_allocator
    from replay.play.sender import parse_target
    from replay.play.shadow import ShadowOptions, ShadowSession
    from replay.sources.live import LiveCapture

    parsed = []
    for url in targets:
        t = parse_target(url)
        if t.scheme != "http":
            raise UsageError(f"--target {url}: shadow sends to http targets only, for now")
        check_loop(t, ports)
        parsed.append(t)
    if split and len(parsed) < 2:
        raise UsageError("--split needs two targets or more")
    opts = ShadowOptions(split=split, keep_host=keep_host, queue_requests=queue_requests,
                         queue_bytes=parse_size(queue_bytes, 1 << 20, "--queue-bytes"),
                         idle=idle, drain=drain, timeout=timeout)
    buf_bytes = parse_size(buffer_size, 1 << 10, "-B/--buffer-size")
    engine_opts = engine_opts_from_kwargs(kwargs)
    show_status = not quiet and sys.stderr.isatty()

    stop = StopSignals()
    try:
        tune_allocator()
        source = LiveCapture(interface, ports=ports, snaplen=snaplen, buffer_size=buf_bytes,
                             promisc=promisc, immediate=immediate)
        try:
            raise_priority(nice)
            engine = core.Engine(source.linktype, ports=tuple(ports), **engine_opts)
            session = ShadowSession(source, engine, parsed, opts, count=count,
                                    duration=duration or None)
        except BaseException:
            source.close()
            raise
        stop.attach(session)
        for w in source.warnings:
            click.echo(f"replay: warning: {w}", err=True)
        if not quiet:
            click.echo(f"replay: shadowing {interface} (filter '{source.filter}') -> "
                       + ", ".join(t.display for t in parsed)
                       + (" (split)" if split else ""), err=True)
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
        except CaptureError as e:
            error, reason = e, "capture error"
        finally:
            if live is not None:
                live.stop()
        if not quiet:
            for line in summary_lines(session, interface, reason):
                click.echo(line, err=True)
        if error is not None:
            raise error
    finally:
        stop.restore()
