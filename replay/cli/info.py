"""``replay info``: what a log (or a capture) holds: counts, time span, connections, problems."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import click


def summarise(messages) -> dict:
    from replay.events import FLAG_NAMES, KIND_REQUEST

    req = resp = 0
    t_min = t_max = None
    conns = set()
    statuses: Counter = Counter()
    methods: Counter = Counter()
    flags: Counter = Counter()
    http_bytes = 0
    for m in messages:
        if m.kind == KIND_REQUEST:
            req += 1
            methods[m.method] += 1
        else:
            resp += 1
            statuses[m.status] += 1
        conns.add(m.conn)
        http_bytes += len(m.data)
        if t_min is None or m.ts_first < t_min:
            t_min = m.ts_first
        if t_max is None or m.ts_last > t_max:
            t_max = m.ts_last
        if m.flags:
            for bit, name in FLAG_NAMES:
                if m.flags & bit:
                    flags[name] += 1
    return {
        "requests": req,
        "responses": resp,
        "connections": len(conns),
        "http_bytes": http_bytes,
        "first": t_min / 1e9 if t_min is not None else None,
        "last": t_max / 1e9 if t_max is not None else None,
        "duration": (t_max - t_min) / 1e9 if t_min is not None else 0.0,
        "methods": dict(methods.most_common()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "flags": dict(flags.most_common()),
    }


def _when(t):
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def _renumbered(sources):
    """The messages of several inputs, connection ids kept apart (input k's in the k-th 2**48)."""
    for k, src in enumerate(sources):
        for m in src:
            m.conn = (k << 48) | (m.conn & ((1 << 48) - 1))
            yield m


@click.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def command(paths, as_json):
    """Summarise PATH, a .rlog log, a pcap/pcapng capture or kafka://BROKERS/TOPIC; several
    PATHs (the run logs of N replayers, the captures of N hosts) are summarised as one."""
    import json
    import os

    from replay.core import PROBLEM_COUNTERS
    from replay.kafka import is_kafka_url
    from replay.pipeline import CaptureReader, open_input
    from replay.spool import seekable

    if len(paths) > 1:
        return _merged(paths, as_json)
    path = paths[0]
    src = open_input(path)
    info = summarise(src)
    info["file"] = path
    info["file_bytes"] = 0 if is_kafka_url(path) else os.path.getsize(seekable(path))
    if is_kafka_url(path):
        info["format"] = "kafka"
        info["meta"] = dict(src.meta)
    elif isinstance(src, CaptureReader):
        info["format"] = "capture"
        info["capture"] = dict(src.stats)
        info["linktype"] = src.linktype
    elif hasattr(src, "blocks"):
        info["format"] = "rlog"
        info["meta"] = src.meta
        info["blocks"] = len(src.blocks)
    else:                   # a format of replay.formats (HAR, .gor): its meta says what it is
        info["meta"] = dict(getattr(src, "meta", None) or {})
        info["format"] = info["meta"].get("format", "other")
    warnings = list(src.warnings)
    if info.get("meta"):
        warnings = list(info["meta"].get("warnings", [])) + warnings
    info["warnings"] = warnings
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    out = []
    out.append(f"file:         {path} ({info['format']}, {info['file_bytes']:,} bytes)")
    meta = info.get("meta") or {}
    if meta.get("source"):
        out.append(f"source:       {meta['source']} ({meta.get('command', '?')}, {meta.get('tool', '?')})")
    out += _counts(info)
    stats = info.get("capture") or meta.get("stats") or {}
    if stats:
        out.append(f"packets:      {stats.get('packets', 0):,} ({stats.get('tcp_segments', 0):,} TCP "
                   f"segments, {stats.get('filtered', 0):,} filtered out)")
        keys = PROBLEM_COUNTERS + (
            "gap_bytes", "dropped_head_bytes", "retransmitted_segments", "out_of_order_segments",
            "resyncs", "skipped_bytes", "midstream_connections", "upgraded_connections",
            "expired_connections", "not_ip", "not_tcp", "malformed")
        probs = [f"{k.replace('_', ' ')} {stats[k]:,}" for k in keys if stats.get(k)]
        out.append("reassembly:   " + (", ".join(probs) if probs else "no gaps, no truncation, no drops"))
    drops = meta.get("drops")
    if drops:
        out.append("capture drops: " + ", ".join(f"{k} {v:,}" for k, v in drops.items()))
    live = meta.get("capture")
    if isinstance(live, dict):
        out.append(f"live capture: {meta.get('interface', '?')}, filter '{meta.get('filter', '')}', "
                   f"{live.get('packets', 0):,} packets in {live.get('seconds', 0):.1f} s, "
                   f"stopped: {live.get('stopped') or 'still running or killed'}"
                   + (f", part {meta['part']}" if meta.get("part", 1) > 1 else ""))
    for w in warnings:
        out.append(f"warning:      {w}")
    click.echo("\n".join(out))


def _counts(info) -> list:
    """The lines of ``info`` (``summarise``) that one file and several files print alike."""
    out = [f"messages:     {info['requests']:,} requests, {info['responses']:,} responses "
           f"({info['http_bytes']:,} HTTP bytes)",
           f"connections:  {info['connections']:,}",
           f"time span:    {_when(info['first'])} .. {_when(info['last'])} "
           f"({info['duration']:.3f} s)"]
    for key in ("methods", "statuses", "flags"):
        if info[key]:
            out.append(f"{key + ':':14s}" + ", ".join(f"{k} {v}" for k, v in info[key].items()))
    return out


def _merged(paths, as_json) -> None:
    import json
    import os

    from replay.kafka import is_kafka_url
    from replay.pipeline import open_input

    sources = [open_input(p) for p in paths]
    info = summarise(_renumbered(sources))
    info["files"] = list(paths)
    info["file_bytes"] = sum(0 if is_kafka_url(p) else os.path.getsize(p) for p in paths)
    info["warnings"] = [f"{p}: {w}" for p, s in zip(paths, sources) for w in s.warnings]
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    out = [f"files:        {len(paths)} ({', '.join(paths)}), {info['file_bytes']:,} bytes"]
    out += _counts(info)
    for w in info["warnings"]:
        out.append(f"warning:      {w}")
    click.echo("\n".join(out))
