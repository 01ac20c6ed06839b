"""``replay ls``: list the HTTP messages of a log, or of a capture file directly."""

from __future__ import annotations

import sys

import click

from replay.events import F_FAILED, KIND_REQUEST, flag_names
from replay.httpmsg import format_addr, header_value


def message_record(msg, host: str | None) -> dict:
    return {
        "kind": "request" if msg.kind == KIND_REQUEST else "response",
        "ts": msg.ts_first / 1e9,
        "ts_last": msg.ts_last / 1e9,
        "conn": msg.conn,
        "index": msg.index,
        "client": format_addr(msg.client),
        "server": format_addr(msg.server),
        "method": msg.method,
        "uri": msg.uri,
        "host": host,
        "status": msg.status if msg.kind != KIND_REQUEST else None,
        "length": msg.body_length,
        "bytes": len(msg.data),
        "flags": flag_names(msg.flags),
        **({"error": msg.data.decode("ascii", "replace")} if msg.flags & F_FAILED else {}),
    }


def with_hosts(messages):
    """Pair each message with the Host of its request (responses take their request's)."""
    hosts: dict = {}
    for msg in messages:
        if msg.kind == KIND_REQUEST:
            host = header_value(msg.data, msg.head_length, b"host")
            hosts[(msg.conn, msg.index)] = host
        else:
            host = hosts.pop((msg.conn, msg.index), None)
        yield msg, host


@click.command("ls")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "jsonl"]), default="table",
              show_default=True, help="table: one readable line per message; jsonl: one JSON object per line.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="For a capture file: only these server ports (repeatable). Default: every TCP port.")
@click.option("--requests-only", is_flag=True, help="Only requests.")
@click.option("-n", "--limit", type=int, default=0, help="Stop after this many messages.")
def command(path, fmt, ports, requests_only, limit):
    """List the HTTP messages of PATH, a .rlog log or a pcap/pcapng capture."""
    import json

    from replay.pipeline import open_input

    src = open_input(path, ports=ports)
    out = sys.stdout
    write = out.write
    n = 0
    t0 = None
    if fmt == "table":
        write(f"{'time':>12} {'conn':>5} {'#':>4} {'kind':<4} {'status':>6} {'method':<7} "
              f"{'length':>9}  {'host':<20} uri / flags\n")
    for msg, host in with_hosts(src):
        if requests_only and msg.kind != KIND_REQUEST:
            continue
        if fmt == "jsonl":
            write(json.dumps(message_record(msg, host), ensure_ascii=False) + "\n")
        else:
            if t0 is None:
                t0 = msg.ts_first
            rel = (msg.ts_first - t0) / 1e9
            is_req = msg.kind == KIND_REQUEST
            kind = "req" if is_req else "resp"
            status = "" if is_req else (msg.data.decode("ascii", "replace") if msg.flags & F_FAILED
                                        else str(msg.status))
            flags = ",".join(flag_names(msg.flags))
            write(f"{rel:12.6f} {msg.conn:>5} {msg.index:>4} {kind:<4} {status:>6} "
                  f"{(msg.method or '-'):<7} {msg.body_length:>9}  {(host or '-')[:20]:<20} "
                  f"{msg.uri or '-'}{'  [' + flags + ']' if flags else ''}\n")
        n += 1
        if limit and n >= limit:
            break
    out.flush()
    for w in src.warnings:
        click.echo(f"replay: warning: {w}", err=True)
