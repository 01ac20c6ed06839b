"""When a difference is a regression: thresholds, the noise rule, the latency test, the CI gate.

Rules (each threshold settable from ``replay report``):
- *rates* (a status, an error kind, a field): the candidate's difference from the baseline is a
  regression when it happens more often than the baseline's difference from the noise run, by
  Diffy's rule: with ``raw`` and ``noise`` the counts of differing exchanges (the noise count
  scaled to the same number of comparisons), ``|raw - noise| / (raw + noise) > 20 %`` and
  ``|raw - noise| / count > 0.03 %``, and ``raw > noise``. Without a noise run ``noise`` is 0;
- *latency*, per endpoint, on the service time (from the actual send, so that an endpoint is not
  blamed for the requests that waited behind a slow one): at p50, p90 and p99, the candidate is
  slower than the baseline by more than ``latency_rel`` (20 %) and ``latency_abs_ms`` (1 ms),
  beyond what the noise run moved, with at least ``min_count`` (20) exchanges on each side, and
  significantly so: at or above the p-th percentile of both runs pooled lies a larger share of the
  candidate's samples than of the baseline's, by more than chance allows (a one-sided
  two-proportion test at z > 3, about 1 in 700, raised for the number of tests the report makes
  so that a report as a whole keeps that rate); judged only where at least 10 samples of each
  run are expected above the percentile (p90 needs 100 exchanges, p99 1000);
- the gate (``--fail-on``): ``regression`` (any), a kind (``status``, ``latency``, ``body``,
  ``header``, ``error``), or a limit: ``p99>+20%`` / ``p50>+5ms`` (an endpoint's service time,
  where both runs have the samples a verdict on that percentile needs), ``5xx>0.1%`` /
  ``errors>0`` (the candidate's share of all exchanges). Breached: exit 3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from statistics import NormalDist

from hdrh.histogram import HdrHistogram

from replay.errors import UsageError

PERCENTILES = (50, 90, 99)
MIN_TAIL = 10       # samples expected above a percentile for a verdict on it (p99: 1000 exchanges)
KINDS = ("status", "error", "latency", "body", "header")


@dataclass
class Thresholds:
    relative: float = 20.0          # percent, Diffy's relative threshold
    absolute: float = 0.03          # percent of the endpoint's exchanges
    latency_rel: float = 20.0       # percent
    latency_abs_ms: float = 1.0
    min_count: int = 20
    z: float = 3.0
    noise_share: float = 90.0       # percent: a field differing this often is a noise suspect


def rate_regressed(raw: float, noise: float, count: int, th: Thresholds) -> bool:
    """Diffy's rule on counts of differing exchanges."""
    if raw <= noise or count <= 0:
        return False
    rel = abs(raw - noise) / (raw + noise) * 100
    ab = abs(raw - noise) / count * 100
    return rel > th.relative and ab > th.absolute


def count_at_least(hist, value: int) -> int:
    """Samples of an HdrHistogram at or above ``value``."""
    n = 0
    for item in hist.get_recorded_iterator():
        if item.value_iterated_to >= value:
            n += item.count_at_value_iterated_to
    return n


def z_needed(th: Thresholds, tests: int) -> float:
    """The z a test must pass so that, over ``tests`` tests, a false alarm stays about as rare
    as ``th.z`` makes it for one (Bonferroni)."""
    if tests <= 1:
        return th.z
    nd = NormalDist()
    return max(th.z, nd.inv_cdf(1 - (1 - nd.cdf(th.z)) / tests))


def tail_z(base, cand, p: float) -> float:
    """Two-sample test of the tail above the p-th percentile of both runs pooled: how many
    standard errors more of the candidate's samples than of the baseline's lie above it."""
    pooled = HdrHistogram(base.lowest_trackable_value, base.highest_trackable_value,
                          base.significant_figures)
    pooled.add(base)
    pooled.add(cand)
    edge = pooled.get_lowest_equivalent_value(pooled.get_value_at_percentile(p))
    nb, nc = base.get_total_count(), cand.get_total_count()
    kb, kc = count_at_least(base, edge), count_at_least(cand, edge)
    share = (kb + kc) / (nb + nc)
    if share <= 0 or share >= 1:
        return 0.0
    return (kc / nc - kb / nb) / math.sqrt(share * (1 - share) * (1 / nb + 1 / nc))


def latency_regressed(base, cand, noise, th: Thresholds, tests: int = 1):
    """[(percentile, baseline µs, candidate µs, z)] where the candidate is significantly slower.
    ``tests``: how many such tests the report makes (endpoints x percentiles)."""
    nb, nc = base.get_total_count(), cand.get_total_count()
    if nb < th.min_count or nc < th.min_count:
        return []
    need = z_needed(th, tests)
    out = []
    for p in PERCENTILES:
        q = 1 - p / 100
        if min(nb, nc) * q < MIN_TAIL:
            continue        # too few samples above this percentile to tell anything of it
        b = base.get_value_at_percentile(p)
        c = cand.get_value_at_percentile(p)
        if b <= 0:
            continue
        allowed = th.latency_rel / 100
        if noise is not None and noise.get_total_count() >= th.min_count:
            allowed += max(0.0, noise.get_value_at_percentile(p) / b - 1)
        if not (c > b * (1 + allowed) and (c - b) / 1000 > th.latency_abs_ms):
            continue
        z = tail_z(base, cand, p)
        if z > need:
            out.append((p, b, c, round(z, 1)))
    return out


# -- the gate ----------------------------------------------------------------------------------

_LIMIT = re.compile(r"(?P<what>p50|p90|p99|5xx|4xx|errors)\s*>\s*(?P<plus>\+)?"
                    r"(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>%|ms|s)?", re.I)


@dataclass
class GateRule:
    text: str
    kind: str            # "regression", a KIND, or "limit"
    what: str = ""       # limit: p50|p90|p99|5xx|4xx|errors
    value: float = 0.0
    unit: str = ""       # "%" or "ms"


def parse_gate(text: str) -> GateRule:
    t = text.strip()
    low = t.lower()
    if low in ("regression", "regressions", "any"):
        return GateRule(t, "regression")
    if low in KINDS:
        return GateRule(t, low)
    m = _LIMIT.fullmatch(t)
    if m:
        what = m.group("what").lower()
        unit = (m.group("unit") or "").lower()
        value = float(m.group("num"))
        if what.startswith("p"):
            if unit not in ("%", "ms", "s") or not m.group("plus"):
                raise UsageError(f"--fail-on {text!r}: a latency limit is relative to the baseline: "
                                 f"{what}>+20% or {what}>+5ms")
            if unit == "s":
                value, unit = value * 1000, "ms"
            return GateRule(t, "limit", what, value, unit)
        if unit != "%" and not (unit == "" and value == 0):
            raise UsageError(f"--fail-on {text!r}: {what} is a share of the exchanges: "
                             f"{what}>0.1% (or {what}>0: any)")
        return GateRule(t, "limit", what, value, "%")
    raise UsageError(f"--fail-on {text!r}: expected regression, one of {', '.join(KINDS)}, or a "
                     "limit such as p99>+20%, p50>+5ms, 5xx>0.1%, errors>0")


def gate_breaches(rules, report: dict, min_count: int = Thresholds.min_count) -> list:
    """The rules the report breaches, each with why. A latency limit applies to the endpoints
    with enough exchanges on both sides for that percentile (as the latency verdict)."""
    out = []
    totals = report["totals"]
    n = max(1, totals["exchanges"])
    for r in rules:
        if r.kind == "regression":
            if report["regressions_total"]:
                out.append(f"{r.text}: {report['regressions_total']} regression(s)")
        elif r.kind in KINDS:
            hits = sum(1 for e in report["endpoints"] for g in e["regressions"] if g["kind"] == r.kind)
            if hits:
                out.append(f"{r.text}: {hits} {r.kind} regression(s)")
        elif r.what in ("5xx", "4xx", "errors"):
            got = totals["candidate"][r.what]
            share = got / n * 100
            if share > r.value:
                out.append(f"{r.text}: {got} of {totals['exchanges']} ({share:.3g} %)")
        else:
            # an endpoint's percentile is compared where both runs have the samples for it
            p = r.what
            q = 1 - int(p[1:]) / 100
            need = max(min_count, math.ceil(MIN_TAIL / q))
            for e in report["endpoints"]:
                lat = e["latency"]["service"]
                b, c = lat["baseline"].get(p), lat["candidate"].get(p)
                if b is None or c is None or min(lat["baseline"]["count"], lat["candidate"]["count"]) < need:
                    continue
                if r.unit == "%":
                    if b <= 0:
                        continue
                    over = (c - b) / b * 100
                else:
                    over = c - b
                if over > r.value:
                    out.append(f"{r.text}: {e['endpoint']} {p} {b:.3f} -> {c:.3f} ms")
    return out
