"""``replay play --workers N``: one replay in N processes, for a target faster than one process
can drive (``--speed max``).

Rules:
- each worker is a fork of the command once its options, target and plan's header are ready;
  it replays its share of the recorded connections (``stream.shard_assignment``: from the log's
  header, as many connections and about as many requests as the others), so a recorded
  connection's requests stay on one worker, in order, on its replay connections; it reads the
  whole log (in its own reading process) and plans only its share;
- ``--limit`` is split: worker i gets ``n // N``, plus one when ``i < n % N``; ``--connections``
  in proportion to each worker's share of the recorded connections (from the log's header), at
  least one each: a worker with fewer replay connections than recorded connections it keeps busy
  at once would end and reopen them all the time;
- Ctrl-C reaches every worker (one process group) and each stops as a lone replay does; the
  command waits for their reports and ignores the signal meanwhile;
- the report is ``report.merge_reports`` of the workers' reports (counts added, histograms added
  exactly), with the description of the first one (input, target, speed) and the plan's counts
  added up; a worker that fails stops the others and its error is the command's;
- the workers' status lines are off (``-q`` or not): the command says once that it started them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

from replay.errors import ReplayError

_KEEP_FROM_FIRST = ("input", "target", "speed", "rate", "loop", "keepalive", "rules", "tool",
                    "schedule", "started_unix")


def share(total: int, i: int, n: int) -> int:
    """Worker ``i``'s share of ``total`` (``total // n``, one more for the first ``total % n``)."""
    return total // n + (1 if i < total % n else 0)


def connections_share(cap: int, plan, i: int, n: int) -> int:
    """Worker ``i``'s share of ``cap`` replay connections: as many as it has recorded ones when
    ``cap`` holds them all, else in proportion to them; at least one."""
    from replay.play.stream import shard_assignment

    h = plan.header
    total = plan.connection_count
    mine = int((shard_assignment(h.conns, h.last_index, n) == i).sum()) if total else 0
    if cap >= total:
        return max(1, mine)
    return max(1, round(cap * mine / total))


class MergedReport:
    """What ``play``'s command reads of a ``Report``, for the report of several workers."""

    def __init__(self, d: dict):
        self.d = d
        self.attempted = d["attempted"]
        self.error_total = d["error_total"]
        self.interrupted = d["interrupted"]

    def to_dict(self, histograms: bool = False) -> dict:
        if histograms:
            return dict(self.d)
        return {k: v for k, v in self.d.items() if k != "histograms"}

    def summary_text(self) -> str:
        from replay.play.report import summary_text

        return summary_text(self.d)


def _worker(i: int, n: int, plan, opts, make_session, tx) -> None:
    """In the forked worker: replay share ``i`` of ``n``; send back the report or the error."""
    from dataclasses import replace

    from replay.play.stream import _die_with_parent

    _die_with_parent()
    try:
        plan.shard = (i, n)
        mine = replace(opts, connections=connections_share(opts.connections, plan, i, n),
                       limit=share(opts.limit, i, n) if opts.limit else 0)
        session = make_session(mine)
        if opts.limit and not mine.limit:
            report = session.report         # no share of --limit: nothing to send
        else:
            report = session.run()
        rules = plan.rules
        tx.send(("report", report.to_dict(histograms=True),
                 dict(rules.stats) if rules is not None else None,
                 plan.refused_rewrites))
    except ReplayError as e:
        tx.send(("error", e))
    except BaseException as e:  # noqa: BLE001  (a bug: said by the command, not lost)
        import traceback

        tx.send(("crash", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        tx.close()


def run_workers(n: int, plan, opts, make_session) -> MergedReport:
    """Run the replay in ``n`` forked workers (see the module's rules); their merged report."""
    from replay.play.report import merge_reports

    ctx = multiprocessing.get_context("fork")
    procs, pipes = [], []
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)    # the workers decide; we wait for them
    try:
        for i in range(n):
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(i, n, plan, opts, make_session, tx),
                            name=f"replay-worker-{i}")
            p.start()
            tx.close()
            procs.append(p)
            pipes.append(rx)
        got, failure = [], None
        for i, (p, rx) in enumerate(zip(procs, pipes)):
            try:
                msg = rx.recv()
            except EOFError:
                p.join()
                msg = ("error", ReplayError(f"worker {i} ended without a report (exit "
                                            f"{p.exitcode})"))
            if msg[0] != "report" and failure is None:
                failure = msg
                for q in procs:
                    if q.is_alive() and q is not p:
                        os.kill(q.pid, signal.SIGINT)
            got.append(msg)
        for p in procs:
            p.join()
    finally:
        signal.signal(signal.SIGINT, old)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        if failure[0] == "error":
            raise failure[1]
        raise RuntimeError(f"a replay worker failed: {failure[1]}\n{failure[2]}")
    reports = [m[1] for m in got]
    merged = merge_reports(reports, [f"worker {i}" for i in range(n)])
    d = {k: reports[0][k] for k in _KEEP_FROM_FIRST if k in reports[0]}
    d["workers"] = n
    d["connections_cap"] = sum(r.get("connections_cap", 0) for r in reports)
    plans = [r.get("plan") or {} for r in reports]
    d["plan"] = dict(plans[0])
    for key in ("pipelined", "reordered", "status_not_recorded"):
        if key in d["plan"]:
            d["plan"][key] = sum(p.get(key, 0) for p in plans)
    skipped: dict = {}
    for p in plans:
        for k, v in (p.get("skipped") or {}).items():
            skipped[k] = skipped.get(k, 0) + v
    d["plan"]["skipped"] = skipped
    d.update(merged)
    if plan.rules is not None:
        stats = [m[2] for m in got if m[2]]
        plan.rules.stats = _summed(stats) if stats else plan.rules.stats
    plan.refused_rewrites = sum(m[3] for m in got)
    return MergedReport(d)


def _summed(dicts: list) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = _summed([out.get(k, {}), v])
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out.setdefault(k, v)
    return out
