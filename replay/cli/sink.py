"""``replay sink``: the built-in target, a small HTTP/1.1 server that answers every request."""

from __future__ import annotations

import click


@click.command("sink")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (::1 for IPv6 loopback).")
@click.option("--record", "record", type=click.Path(dir_okay=False),
              help="Write one JSON object per request to this file (ts, conn, client, method, uri, "
                   "version, body, bytes), each before its answer is sent.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="Serve HTTPS with this certificate (PEM); needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Private key (PEM).")
@click.option("--announce", is_flag=True, hidden=True,
              help="Print the port on stdout when listening and a JSON summary at exit (used by "
                   "`replay play --sink`).")
def command(port, host, record, tls_cert, tls_key, announce):
    """Answer every HTTP request with 200 and record what arrived and when, until Ctrl-C."""
    import asyncio
    import json
    import signal
    import sys

    from replay.errors import ReplayError, UsageError
    from replay.sink import Sink

    ctx = None
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_cert:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"--tls-cert/--tls-key: {e}") from None

    if record:
        from replay.outputs import check_distinct

        check_distinct(record, "--record", {"--tls-cert": tls_cert, "--tls-key": tls_key})

    async def serve():
        sink = Sink(host, port, record_path=record, ssl=ctx)
        try:
            await sink.start()
        except OSError as e:
            raise ReplayError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        scheme = "https" if ctx else "http"
        shown = f"[{host}]" if ":" in host else host
        if announce:
            print(sink.port, flush=True)
        else:
            click.echo(f"replay sink: listening on {scheme}://{shown}:{sink.port}"
                       f"{' recording to ' + record if record else ''} (Ctrl-C to stop)", err=True)
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(sink.failed.wait())
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        await sink.close()
        if sink.error is not None:
            raise sink.error
        return sink.summary()

    summary = asyncio.run(serve())
    if announce:
        print(json.dumps(summary), flush=True)
    else:
        click.echo(f"replay sink: {summary['requests']} requests on {summary['connections']} "
                   f"connections, {summary['bytes']} bytes"
                   + (f", {summary['bad_requests']} bad" if summary["bad_requests"] else ""),
                   err=True)
    sys.exit(0)
