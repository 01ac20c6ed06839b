"""``replay play``: send the recorded requests of a log or capture to a target, on schedule."""

from __future__ import annotations

import click

from replay.cli.kafkaopts import play_options
from replay.cli.ruleopts import rule_options, rules_from_kwargs
from replay.cli.types import DURATION, ERROR_BUDGET, PORT, RATE, SPEED


@click.command("play")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-t", "--target", metavar="URL",
              help="Where to send: http[s]://host[:port] ([v6addr] in brackets; host:port means http).")
@click.option("--sink", "use_sink", is_flag=True,
              help="Start the built-in sink (`replay sink`) on a free loopback port and target it.")
@click.option("-s", "--speed", type=SPEED, default="1", show_default=True, metavar="FACTOR|max",
              help="Time factor: 1 keeps the recorded timing, 10 is ten times faster, 0.5 half as "
                   "fast (from 0.000001; above 1000000 it is 1000000); max sends as fast as the "
                   "target answers.")
@click.option("--rate", type=RATE, metavar="N",
              help="Constant N requests/s in recorded order, ignoring the recorded gaps "
                   "(from 0.000001; above 1e9 it is 1e9).")
@click.option("--loop", is_flag=True, help="Start over at the end (until --duration, --limit or Ctrl-C).")
@click.option("--duration", type=DURATION,
              help="Stop sending after this long (30, 30s, 5m; from 1us to 366d).")
@click.option("-n", "--limit", type=click.IntRange(min=1), metavar="N", help="Send at most N requests.")
@click.option("-c", "--connections", type=click.IntRange(min=1), metavar="N",
              help="At most N replay connections open at once (default: 1000; with --speed max, "
                   "the recorded connections up to 64).")
@click.option("--no-keepalive", is_flag=True, help="Each request on a new connection, closed after its answer.")
@click.option("--keep-host", is_flag=True, help="Send the recorded Host header instead of the target's.")
@click.option("-k", "--insecure", is_flag=True, help="https: do not verify the target's certificate.")
@click.option("--timeout", type=DURATION, default="10", show_default=True,
              help="How long to wait for a connection, and for each answer (10, 500ms; from 1us "
                   "to 366d).")
@click.option("--max-errors", type=ERROR_BUDGET, metavar="N|P%",
              help="Exit with code 1 when more than N requests (or P% of those tried) fail "
                   "(refused, reset, timeout...). Default: only when every request fails.")
@click.option("--dry-run", is_flag=True, help="Print what would be sent and how long it would take; send nothing.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the requests as sent and the responses received to this .rlog, with "
                   "the recorded conn and index (join with the input on them).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the final report as JSON to this file.")
@click.option("--port", "ports", type=PORT, multiple=True,
              help="For a capture file: only these server ports (repeatable).")
@click.option("--realtime", is_flag=True,
              help="Linux: run at real-time priority (SCHED_FIFO; root or CAP_SYS_NICE), so that "
                   "other processes cannot delay a send by milliseconds. Timed replays only.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line and no summary.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, metavar="N",
              help="N processes, each replaying its share of the recorded connections (as "
                   "many as the others, with about as many requests) with its share of "
                   "--connections and --limit; one report of them all; a timed replay's "
                   "workers share one start. For a target faster than one process can drive, "
                   "on a machine with cores to spare. A .rlog log; not with --rate or -o.")
@click.option("--event-loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto",
              hidden=True, help="Event loop (auto: microsecond timers when timed, uvloop at max).")
@click.option("--spin-us", type=click.IntRange(0, 100_000), default=None, hidden=True,
              help="Microseconds of busy-wait before each deadline (after the sleep).")
@play_options
@rule_options(exclude=("limit",))
def command(path, target, use_sink, speed, rate, loop, duration, limit, connections, no_keepalive,
            keep_host, insecure, timeout, max_errors, dry_run, output, report_path, ports, realtime, quiet, workers,
            event_loop, spin_us, kafka, **rule_kwargs):
    """Replay the requests of PATH (a .rlog log, a pcap/pcapng capture, or kafka://BROKERS/TOPIC)
    against a target.

    Each recorded connection becomes one connection to the target, opened when it was recorded;
    its requests go out in recorded order at their recorded times divided by --speed, each
    after the previous answer unless the capture shows them pipelined.

    Filters, rewrites, --middleware and --plugin (the options of `replay filter`) run on the
    recorded messages as they are planned: for a capture before the schedule starts; for a .rlog
    log (streamed, in a process of its own) a second ahead of it, so a slow middleware can make
    requests late there.
    """
    import json
    import sys

    from replay.errors import ReplayError, UsageError
    from replay.outputs import LOG_MODE, Outputs
    from replay.play.scheduler import Schedule
    from replay.play.sender import Options, parse_target
    from replay.play.session import (MAX_CONNECTIONS, MAX_CONNECTIONS_AT_MAX, About, ExchangeLog,
                                     LoopOptions, PlaySession, TerminalStatus,
                                     default_connections)
    from replay.play.source import RecordedSource

    rule_until = rule_kwargs.get("rule_until")     # a topic's read also ends there
    rules = rules_from_kwargs(rule_kwargs)
    if rate is not None and speed is not None and speed != 1.0:
        raise UsageError("--speed and --rate: give one (--rate ignores the recorded gaps)")
    if rate is not None:
        speed = 1.0
    if use_sink and target:
        raise UsageError("--sink and --target: give one")
    if realtime and speed is None and rate is None:
        raise UsageError("--realtime is for timed replays: with --speed max it would only take CPU "
                         "from the target")
    if not (target or use_sink or dry_run):
        raise UsageError("no target: give --target http://host:port, or --sink to replay "
                         "against the built-in server")
    from replay.kafka import is_kafka_url

    from_kafka = is_kafka_url(path)
    if not from_kafka and any(v for k, v in kafka.items() if k != "follow"):
        raise UsageError("--group, --start-at, --t0, --from, --until and -X are for a kafka:// "
                         "input")
    if from_kafka and loop:
        raise UsageError("--loop: a kafka:// topic is not replayed in passes")
    outputs = Outputs({} if from_kafka else {"the input": path})
    out_log = outputs.atomic(output, "-o", mode=LOG_MODE) if output else None
    out_report = outputs.atomic(report_path, "--report") if report_path else None
    tgt = parse_target(target, insecure) if target else None
    sink_proc = None
    code = None
    try:
        if not dry_run:
            outputs.open()   # a bad or busy path fails here, before anything is sent
        if use_sink and not dry_run:
            from replay.sink import start_sink_process

            sink_proc, port = start_sink_process()
            tgt = parse_target(f"http://127.0.0.1:{port}")
        session_class = PlaySession
        if from_kafka:
            from replay.play.kafka import KafkaPlaySession as session_class

            plan, schedule = _kafka_plan(path, kafka, rule_until, rules, tgt,
                                         keep_host, speed, rate)
            source = None
        else:
            source = RecordedSource(path, ports=ports, rules=rules)
            plan = source.plan(tgt.host_header if tgt else None, keep_host)
        for w in source.warnings if source is not None else ():
            click.echo(f"replay: warning: {w}", err=True)
        if rules is not None and not quiet and not plan.streaming:
            click.echo(_rules_line(rules), err=True)
        if plan.requests == 0 and not from_kafka:
            raise ReplayError(f"{path}: no requests to replay"
                              + (" (the rules kept none)" if rules is not None else ""))
        if not from_kafka:
            schedule = Schedule(plan.t0, plan.span_ns, plan.requests, speed=speed, rate=rate)
        if connections is None:
            connections = (MAX_CONNECTIONS_AT_MAX if schedule.speed is None else MAX_CONNECTIONS) \
                if from_kafka else default_connections(plan, schedule)
        opts = Options(connections=connections, keepalive=not no_keepalive, timeout=timeout,
                       limit=limit or 0, duration=duration or 0.0, loop=loop)
        if realtime and not dry_run:
            _realtime()
        if dry_run and from_kafka:
            click.echo(f"{path}: a topic's requests are known only as it is read; "
                       f"dry run: nothing read, nothing sent")
            return 0
        if workers > 1:
            if from_kafka or not plan.streaming:
                raise UsageError("--workers: for a .rlog log (convert a capture first; a topic's "
                                 "replayers share it with --group)")
            if schedule.rate is not None:
                raise UsageError("--workers and --rate: give one (--rate orders the requests "
                                 "across every connection, which one process keeps)")
            if out_log is not None:
                raise UsageError("--workers and -o: give one (each worker would write its own "
                                 "log)")
        if dry_run:
            _dry_run(path, plan, schedule, tgt, opts, keep_host)
            return 0

        def session(o=opts):
            return session_class(
                plan, schedule, tgt, o,
                About(path, tgt.display + (" (built-in sink)" if use_sink else ""),
                      rules.describe() if rules is not None else None),
                output=ExchangeLog(out_log, rewrite=rules.rewrite if rules is not None else None,
                                   recorded=None if plan.streaming else source.recorded)
                if out_log else None,
                status=TerminalStatus() if sys.stderr.isatty() and not quiet and workers == 1
                else None,
                loop=LoopOptions(event_loop, spin_us))

        if workers > 1:
            from replay.play.workers import run_workers

            report = run_workers(workers, plan, opts, session, None if quiet else (
                lambda k: click.echo(f"replaying {path} with {k} workers against {tgt.display}"
                                     + (f" (the log has {k} connections)" if k < workers else ""),
                                     err=True)), timed=schedule.timed)
        else:
            report = session().run()
        said = set(source.warnings) if source is not None else set()
        for w in plan.warnings if from_kafka else getattr(plan, "read_warnings", ()):
            if w not in said:           # the reading process opened the log again
                click.echo(f"replay: warning: {w}", err=True)
        if rules is not None and not quiet and plan.streaming:
            click.echo(_rules_line(rules, plan.refused_rewrites), err=True)
        if plan.streaming and report.attempted == 0 and not report.interrupted and \
                not (duration or limit) and not (from_kafka and kafka["group"] is not None):
            # as a whole plan would have said before sending (the index counts before the rules);
            # a topic read in a group may have been replayed to its end already: not an error
            raise ReplayError(f"{path}: no requests to replay"
                              + (" (the rules kept none)" if rules is not None else ""))
        if out_report is not None:
            out_report.write_text(json.dumps(report.to_dict(histograms=True), indent=2) + "\n")
        if not quiet:
            click.echo(report.summary_text())
        outputs.commit()
        code = _exit_code(report, max_errors)
    finally:
        outputs.discard()
        if sink_proc is not None:
            from replay.sink import stop_sink_process

            summary = stop_sink_process(sink_proc)
            if summary and not quiet and code is not None:
                click.echo(f"sink: received {summary['requests']} requests on "
                           f"{summary['connections']} connections", err=True)
    sys.exit(code)


START_AT_MAX_NS = 86_400 * 1_000_000_000       # --start-at at most this far ahead


def _kafka_plan(path, kafka, until, rules, tgt, keep_host, speed, rate):
    """The ``KafkaPlan`` and ``AgreedSchedule`` of a kafka:// input (``replay.play.kafka``)."""
    import time

    from replay.errors import UsageError
    from replay.kafka import parse_settings, parse_time, parse_url
    from replay.play.kafka import LIVE_MARGIN_NS, AgreedSchedule, KafkaPlan
    from replay.play.sender import START_DELAY_NS

    url = parse_url(path)
    settings = parse_settings(kafka["kafka_settings"])
    follow = kafka["follow"]
    plan = KafkaPlan(url, settings, group=kafka["group"],
                     start=parse_time(kafka["from_"], "--from"),
                     until=None if until is None or str(until).startswith("+")
                     else parse_time(until, "--until"), follow=follow,
                     host=tgt.host_header if tgt else None,
                     keep_host=keep_host or (rules is not None and rules.sets_host), rules=rules)
    plan.check()
    start_at = parse_time(kafka["start_at"], "--start-at")
    if start_at is not None and start_at > time.time_ns() + START_AT_MAX_NS:
        raise UsageError(f"--start-at {kafka['start_at']}: more than a day ahead (a replayer "
                         "would wait, silent, until then)")
    schedule = AgreedSchedule(0, 0, 0, speed=speed, rate=rate,
                              start_unix_ns=start_at,
                              t0_ns=parse_time(kafka["t0"], "--t0"),
                              margin_ns=LIVE_MARGIN_NS - START_DELAY_NS if follow else 0)
    return plan, schedule


# SCHED_FIFO priority for --realtime: above every normal process, below the kernel's own
# real-time threads (migration, watchdog at 99). The spin before each deadline is short (see
# scheduler.SPIN_NS) and the kernel keeps 5 % of each second for normal processes anyway
# (sched_rt_runtime_us), so nothing starves.
RT_PRIORITY = 10


def _realtime():
    import os

    from replay.errors import UsageError

    if not hasattr(os, "sched_setscheduler"):
        raise UsageError("--realtime: real-time scheduling is not available on this system")
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except PermissionError:
        raise UsageError("--realtime needs root or CAP_SYS_NICE") from None
    except OSError as e:
        raise UsageError(f"--realtime: {e.strerror or e}") from None


def _rules_line(rules, refused=None) -> str:
    st = rules.stats
    refused = rules.refused_rewrites if refused is None else refused
    line = (f"rules: kept {st['kept']:,} of {st['read']:,} recorded messages"
            + (f", rewrote {st['rewritten']:,}" if st["rewritten"] else "")
            + (f", refused {refused:,} rewrites (not a valid request-target)" if refused else ""))
    mw = st.get("middleware")
    if mw:
        line += f"; middleware dropped {mw.get('dropped', 0):,} and changed {mw.get('changed', 0):,}"
    if st["out"] != st["kept"]:
        line += f"; {st['out']:,} left to plan"
    return line


def _fmt_s(ns):
    return f"{ns / 1e9:.3f} s"


def _dry_run(path, plan, schedule, tgt, opts, keep_host):
    loop, duration, limit = opts.loop, opts.duration, opts.limit
    n = plan.requests
    if limit:
        n = min(n, limit) if not loop else limit
    pipelined = "pipelining counted as it is read" if plan.streaming else f"{plan.pipelined} pipelined"
    click.echo(f"{path}: {plan.requests} requests on {plan.connection_count} connections, "
               f"recorded over {_fmt_s(plan.span_ns)} ({pipelined}"
               + "".join(f", {v} skipped: {k.replace('_', ' ')}" for k, v in plan.skipped.items())
               + ")")
    if schedule.rate is not None:
        pace = f"at {schedule.rate:g} requests/s"
    elif schedule.speed is None:
        pace = "at full speed (as fast as the target answers)"
    else:
        pace = f"at speed {schedule.speed:g}"
    if schedule.timed:
        if loop:
            expect = (f"{_fmt_s(schedule.period)} per pass, looping"
                      + (f" for {duration:g} s" if duration else "")
                      + (f", until {limit} requests" if limit else "")
                      + ("" if duration or limit else " until Ctrl-C"))
        else:
            d = schedule.duration_ns()
            if limit and limit < plan.requests:
                if plan.streaming:       # the index has no order of requests: pro rata
                    d = int(d * (limit - 1) / max(1, plan.requests - 1))
                else:
                    times = sorted((r.t, r.seq) for c in plan.connections for r in c.requests)
                    t, seq = times[limit - 1]
                    d = schedule.offset(t, seq)
            if duration:
                d = min(d, int(duration * 1e9))
            expect = f"expected duration {_fmt_s(d)}"
    else:
        expect = "duration depends on the target" + (f" (at most {duration:g} s)" if duration else "")
    click.echo(f"would send {n}{' per pass' if loop and not limit else ''} requests {pace}, "
               f"{expect}; at most {opts.connections} connections open"
               + ("" if opts.keepalive else ", a new connection per request"))
    if tgt is not None:
        click.echo(f"target {tgt.display}"
                   + ("" if keep_host else f", Host: {tgt.host_header}"))
    click.echo("dry run: nothing sent")


def _exit_code(report, max_errors) -> int:
    """130 interrupted; 1 when more requests failed than ``--max-errors`` allows (by default:
    all of them), with one line saying so; else 0."""
    from replay.cli.types import over_budget

    if report.interrupted:
        return 130
    failed, tried = report.error_total, report.attempted
    if over_budget(max_errors, failed, tried):
        if max_errors is None:
            click.echo(f"replay play: all {tried} requests failed", err=True)
        else:
            limit = max_errors[1] if max_errors[0] == "count" else f"{max_errors[1]:g}%"
            click.echo(f"replay play: {failed} of {tried} requests failed, more than "
                       f"--max-errors {limit} allows", err=True)
        return 1
    return 0
