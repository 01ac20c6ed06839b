"""What a replay did: counts, statuses against the recorded ones, latency and lateness.

Rules:
- every request the replay tried ends as exactly one of: answered (a complete final response,
  whatever its status), an error of one kind, or in flight when the run stopped;
- ``sent`` counts requests whose bytes were written to a connection; a request whose connection
  could not be opened is an error (``refused``, ``timeout``, ``connect``, ``tls``) but not sent;
- error kinds: ``refused`` (connection refused), ``reset`` (RST or broken pipe), ``timeout`` (no
  complete answer within ``--timeout``, or no connection), ``bad_response`` (bytes that are not
  HTTP), ``closed`` (the server closed before answering completely), ``connect`` (other connect
  errors), ``tls`` (handshake failed);
- latency is measured to the last byte of the response, from the actual send and from the
  intended send (the deadline), so a target that makes the replay fall behind cannot hide its
  slowness (coordinated omission); lateness is actual send - deadline, for every timed request;
- ``reconnects`` counts connections opened again because the target closed a kept-alive one
  (while it was idle, or as a request arrived, before any byte of its answer); ``retried`` the
  requests sent a second time on such a new connection (counted once in ``sent``): neither is
  an error;
- percentiles are nearest-rank over every sample (no sampling, no histogram buckets), except in
  a ``bounded`` report (``replay shadow``, which may run for days): there every distribution is
  a ``replay.hist.Hist`` of fixed size, within 1 % of the exact percentiles.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter, deque

from replay import core

ERROR_KINDS = ("refused", "reset", "timeout", "bad_response", "closed", "connect", "tls")
NS_PER_MS = 1_000_000


def percentiles(values, points=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles and max of ``values`` (ns) in ms; None values when empty."""
    keys = [f"p{p}" for p in points] + ["max"]
    if hasattr(values, "percentiles"):
        return values.percentiles(points)
    n = len(values)
    if not n:
        return {k: None for k in keys}
    import numpy as np

    a = np.sort(np.frombuffer(values, dtype=np.int64) if isinstance(values, array)
                else np.asarray(values, dtype=np.int64))
    out = {}
    for p in points:
        rank = max(1, math.ceil(p / 100 * n))
        out[f"p{p}"] = round(float(a[rank - 1]) / NS_PER_MS, 4)
    out["max"] = round(float(a[-1]) / NS_PER_MS, 4)
    return out


def _samples():
    return array("q")


class Report:
    def __init__(self, meta: dict | None = None, bounded: bool = False):
        self.meta = dict(meta or {})
        if bounded:
            from replay.hist import SharedHist as samples
        else:
            samples = _samples
        self.attempted = 0
        self.sent = 0
        self.answered = 0
        self.errors: Counter = Counter()
        self.errors_after_send = 0
        self.statuses: Counter = Counter()
        self.recorded_statuses: Counter = Counter()
        self.same = self.different = self.unrecorded = 0
        self.changes: Counter = Counter()
        self.lateness = samples()
        self.lateness_free = samples()     # requests not held back by a slow previous response
        self.recent_lateness: deque = deque(maxlen=5000)
        self.latency = samples()
        self.latency_intended = samples()
        self.connect = samples()
        self.held_by_response = 0
        self.opened = 0
        self.reconnects = 0
        self.retried = 0
        self.open_now = 0
        self.max_open = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.garbage_bytes = 0
        self.unsolicited = 0
        self.interrupted = False
        self.started_ns = 0            # monotonic
        self.ended_ns = 0
        self.first_send_ns = 0
        self.last_answer_ns = 0
        self.wall_offset_ns: int | None = None    # clock ns + this = Unix ns (set by the run)
        # what the core's PumpCore counts in the place of on_attempt, on_sent (with a timed
        # send's lateness) and on_answer, added in by fold(): before the report is read, at the
        # end of a run, and by the tally itself every 65,536 answers or timed sends
        self.tally = core.Tally(self)

    def fold(self) -> None:
        self.tally.fold(self)

    # -- events ------------------------------------------------------------------------------
    def on_attempt(self, recorded_status):
        self.attempted += 1
        if recorded_status is not None:
            self.recorded_statuses[recorded_status] += 1

    def on_connect(self, ns: int):
        self.opened += 1
        self.open_now += 1
        if self.open_now > self.max_open:
            self.max_open = self.open_now
        self.connect.append(ns)

    def on_reconnect(self, retried: int = 0, nbytes: int = 0):
        """A connection the target closed is replaced; ``retried`` requests go out again on it."""
        self.reconnects += 1
        self.retried += retried
        self.bytes_sent += nbytes

    def on_disconnect(self):
        self.open_now -= 1

    def on_sent(self, nbytes: int, lateness_ns: int | None, held: bool, now: int):
        self.sent += 1
        self.bytes_sent += nbytes
        if not self.first_send_ns:
            self.first_send_ns = now
        if lateness_ns is not None:
            self.lateness.append(lateness_ns)
            self.recent_lateness.append(lateness_ns)
            if not held:
                self.lateness_free.append(lateness_ns)
        if held:
            self.held_by_response += 1

    def on_answer(self, status: int, recorded_status, latency_ns: int, intended_ns: int, now: int):
        """A final answer; its bytes were counted as they arrived (``bytes_received``)."""
        self.answered += 1
        self.last_answer_ns = now
        self.statuses[status] += 1
        self.latency.append(latency_ns)
        self.latency_intended.append(intended_ns)
        if recorded_status is None:
            self.unrecorded += 1
        elif recorded_status == status:
            self.same += 1
        else:
            self.different += 1
            self.changes[f"{recorded_status} -> {status}"] += 1

    def status_came(self, recorded_status: int):
        """The recorded status of a request tried while it was unknown (a streamed plan whose
        recorded answer ended late), come while the request was on its way: ``on_answer``
        compares it, this counts it as ``on_attempt`` would have."""
        self.recorded_statuses[recorded_status] += 1

    def late_recorded(self, recorded_status: int, status: int):
        """The recorded status of a request answered before it was known (a streamed plan whose
        recorded answer ended late): counted now as ``on_answer`` would have."""
        self.recorded_statuses[recorded_status] += 1
        self.unrecorded -= 1
        if recorded_status == status:
            self.same += 1
        else:
            self.different += 1
            self.changes[f"{recorded_status} -> {status}"] += 1

    def on_error(self, kind: str, was_sent: bool):
        self.errors[kind] += 1
        if was_sent:
            self.errors_after_send += 1

    # -- views -------------------------------------------------------------------------------
    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def in_flight(self) -> int:
        return self.sent - self.answered - self.errors_after_send

    def elapsed_s(self, now: int) -> float:
        end = self.ended_ns or now
        return max(0.0, (end - self.started_ns) / 1e9) if self.started_ns else 0.0

    def progress_text(self, now: int) -> str:
        self.fold()
        p99 = "-"
        if self.recent_lateness:
            s = sorted(self.recent_lateness)
            p99 = f"{s[max(0, math.ceil(0.99 * len(s)) - 1)] / NS_PER_MS:.3f} ms"
        return (f"sent {self.sent}  ok {self.answered}  errors {self.error_total}  "
                f"in flight {self.in_flight}  lateness p99 {p99}  {self.elapsed_s(now):.1f} s")

    def to_dict(self, histograms: bool = False) -> dict:
        """The report as JSON-ready values; ``histograms``: with the latency, lateness and
        connect samples as encoded HdrHistograms (``HISTOGRAMS``), which ``merge_reports``
        adds up exactly (the --report file of each replayer of a group)."""
        self.fold()
        errors = {k: self.errors.get(k, 0) for k in ERROR_KINDS}
        errors.update({k: v for k, v in self.errors.items() if k not in errors})
        wall = ((self.last_answer_ns - self.first_send_ns) / 1e9
                if self.last_answer_ns > self.first_send_ns else 0.0)
        d = dict(self.meta)
        d.update({
            "attempted": self.attempted,
            "sent": self.sent,
            "answered": self.answered,
            "in_flight": self.in_flight,
            "errors": errors,
            "error_total": self.error_total,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "recorded_statuses": {str(k): v for k, v in sorted(self.recorded_statuses.items())},
            "status_comparison": {
                "same": self.same, "different": self.different, "not_recorded": self.unrecorded,
                "changes": dict(self.changes.most_common()),
            },
            "latency_ms": percentiles(self.latency),
            "latency_from_intended_ms": percentiles(self.latency_intended),
            "lateness_ms": percentiles(self.lateness),
            "lateness_samples": len(self.lateness),
            "held_by_response": self.held_by_response,
            "lateness_not_held_ms": percentiles(self.lateness_free),
            "connect_ms": percentiles(self.connect),
            "connections": {"opened": self.opened, "max_open": self.max_open,
                            "reconnects": self.reconnects},
            "retried": self.retried,
            "bytes": {"sent": self.bytes_sent, "received": self.bytes_received,
                      "not_http": self.garbage_bytes},
            "unsolicited_responses": self.unsolicited,
            "elapsed_s": round(self.elapsed_s(self.ended_ns), 6),
            "requests_per_s": round(self.answered / wall, 1) if wall > 0 else None,
            "interrupted": self.interrupted,
        })
        if wall > 0 and self.wall_offset_ns is not None:    # for merge_reports' requests/s
            d["answer_window_unix"] = [round((self.first_send_ns + self.wall_offset_ns) / 1e9, 6),
                                       round((self.last_answer_ns + self.wall_offset_ns) / 1e9, 6)]
        if histograms:
            d["histograms"] = {key: _hdr(getattr(self, attr)).encode().decode("ascii")
                               for key, attr in HISTOGRAMS.items()}
        return d

    def summary_text(self) -> str:
        return summary_text(self.to_dict())


# the samples a --report file carries as histograms: its key -> Report attribute; the key of
# the percentiles made from each is KEY_ms
HISTOGRAMS = {"latency": "latency", "latency_from_intended": "latency_intended",
              "lateness": "lateness", "lateness_not_held": "lateness_free", "connect": "connect"}
# counts that add up across replayers (nested dicts add key by key)
_SUMMED = ("attempted", "sent", "answered", "in_flight", "errors", "error_total", "statuses",
           "recorded_statuses", "status_comparison", "lateness_samples", "held_by_response",
           "connections", "retried", "bytes", "unsolicited_responses")


def _hdr(samples):
    """The HdrHistogram of ``samples`` (a ``hist.Hist``, or an array of ns)."""
    from replay.hist import Hist

    if hasattr(samples, "flush"):
        return samples.flush()
    h = Hist()
    h.buf.extend(samples)
    return h.flush()


def _add(a, b):
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    return a + b


def merge_reports(reports: list, names: list) -> dict:
    """One report of several --report files (``Report.to_dict(histograms=True)``) of replayers
    that ran side by side: counts added, histograms added (exact), percentiles made from them,
    ``requests_per_s`` all answers over the window of them all (``_merged_rate``), ``elapsed_s``
    the longest. ValueError naming the file that is not
    such a report."""
    from hdrh.histogram import HdrHistogram

    from replay.hist import HIST_MAX_US, hdr_percentiles

    for r, name in zip(reports, names):
        if not isinstance(r, dict) or not isinstance(r.get("histograms"), dict) or \
                any(k not in r for k in _SUMMED):
            raise ValueError(f"{name}: not a --report file of replay play with histograms")
    out = {k: reports[0][k] for k in _SUMMED}
    for r in reports[1:]:
        for k in _SUMMED:
            out[k] = _add(out[k], r[k])
    out["connections"]["max_open"] = sum(r["connections"]["max_open"] for r in reports)
    hists = {}
    for key in HISTOGRAMS:
        h = HdrHistogram(1, HIST_MAX_US, 2)
        for r, name in zip(reports, names):
            enc = r["histograms"].get(key)
            if enc:
                try:
                    h.add(HdrHistogram.decode(enc))
                except Exception as e:  # noqa: BLE001  (hdrh raises several kinds on bad input)
                    raise ValueError(f"{name}: histogram {key!r} does not decode ({e})") from None
        hists[key] = h
        out[f"{key}_ms"] = hdr_percentiles(h)
    out.update({"elapsed_s": max(r.get("elapsed_s") or 0 for r in reports),
                "interrupted": any(r.get("interrupted") for r in reports),
                "merged_from": list(names),
                "histograms": {k: h.encode().decode("ascii") for k, h in hists.items()}})
    out.update(_merged_rate(reports, out["answered"]))
    return out


def _merged_rate(reports: list, answered: int) -> dict:
    """Requests/s of replayers side by side: all their answers over the window from the first
    send to the last answer of any (``answer_window_unix``, which comes with it); the sum of
    their rates for reports without it."""
    windows = [r["answer_window_unix"] for r in reports if r.get("answer_window_unix")]
    if windows and len(windows) == sum(1 for r in reports if r.get("requests_per_s") is not None):
        w = [min(w[0] for w in windows), max(w[1] for w in windows)]
        span = w[1] - w[0]
        return {"requests_per_s": round(answered / span, 1) if span > 0 else None,
                "answer_window_unix": w}
    rates = [r.get("requests_per_s") for r in reports if r.get("requests_per_s")]
    return {"requests_per_s": round(sum(rates), 1) if rates else None}


def summary_text(d: dict) -> str:
    """The lines ``play`` prints at the end, of a report dict (``Report.to_dict``)."""

    def ms(p):
        return "-" if p is None else f"{p:.3f}"

    lines = []
    head = (f"replayed {d['sent']} of {d['attempted']} requests in {d['elapsed_s']:.2f} s"
            f"{' (interrupted)' if d['interrupted'] else ''}: "
            f"{d['answered']} answered, {d['error_total']} errors, {d['in_flight']} in flight")
    lines.append(head)
    errs = {k: v for k, v in d["errors"].items() if v}
    if errs:
        lines.append("  errors: " + ", ".join(f"{k} {v}" for k, v in errs.items()))
    if d["statuses"]:
        sc = d["status_comparison"]
        lines.append("  statuses: " + ", ".join(f"{k} {v}" for k, v in d["statuses"].items())
                     + f"  (as recorded: {sc['same']}, different: {sc['different']}"
                     + (f", not recorded: {sc['not_recorded']}" if sc["not_recorded"] else "")
                     + ")")
        if sc["changes"]:
            top = list(sc["changes"].items())[:5]
            lines.append("  changed: " + ", ".join(f"{k} ({v})" for k, v in top))
    lat, lti, late = d["latency_ms"], d["latency_from_intended_ms"], d["lateness_ms"]
    if lat["max"] is not None:
        lines.append(f"  latency ms      p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  "
                     f"p99 {ms(lat['p99'])}  max {ms(lat['max'])}")
        lines.append(f"  from intended   p50 {ms(lti['p50'])}  p90 {ms(lti['p90'])}  "
                     f"p99 {ms(lti['p99'])}  max {ms(lti['max'])}")
    if late["max"] is not None:
        lines.append(f"  lateness ms     p50 {ms(late['p50'])}  p99 {ms(late['p99'])}  "
                     f"max {ms(late['max'])}")
        if d["held_by_response"]:
            free = d["lateness_not_held_ms"]
            lines.append(f"    {d['held_by_response']} requests waited for a previous response "
                         f"that came after their deadline; the others: p50 {ms(free['p50'])}  "
                         f"p99 {ms(free['p99'])}  max {ms(free['max'])}")
    if d["requests_per_s"]:
        lines.append(f"  {d['requests_per_s']:.0f} requests/s on {d['connections']['opened']} "
                     f"connections (at most {d['connections']['max_open']} open)")
    if d["connections"]["reconnects"]:
        lines.append(f"  {d['connections']['reconnects']} connections reopened after the "
                     f"target closed them" + (f", {d['retried']} requests sent again"
                                              if d["retried"] else ""))
    return "\n".join(lines)
