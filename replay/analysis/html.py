"""The report as one self-contained HTML page: ``render(report) -> str``.

Rules:
- the page fetches nothing: styles and the little script are inline, the charts are SVG drawn
  by ``replay.analysis.svg``; it opens from ``file://`` without a network;
- everything from the report reaches the page through Jinja2's autoescaping, or escaped here
  (``_text``) when built as markup (bodies, URIs, headers and endpoint names are captured
  traffic). A Content-Security-Policy allows only the page's own script (by its hash),
  so even a missed escape could not run injected code;
- the template reads a view built here (``_view``), never the report directly: keys missing
  from older reports get their defaults in one place, and new keys do no harm;
- what is rendered is bounded, and the page says what it left out: ``MAX_ENDPOINTS`` rows in
  the endpoint table, ``MAX_DETAILED`` regressions with their examples, ``MAX_BARS`` endpoints
  in the change chart (the largest changes);
- in an example, a JSON body is pretty-printed and the values at the regression's field (a
  generic path, ``$.items[*].price``: every element's) are wrapped in ``<mark>``; a header
  regression marks the header's line; other bodies are shown as they are, side by side.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

from markupsafe import Markup

from replay.analysis import svg
from replay.analysis.diff import _key, generic

MAX_ENDPOINTS = 200
MAX_DETAILED = 50
MAX_BARS = 30
MAX_MARKS = 500          # marked values per body: a field in every element of a long array
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_env = None


def _environment():
    global _env
    if _env is None:
        from jinja2 import Environment, PackageLoader, StrictUndefined

        _env = Environment(loader=PackageLoader("replay.analysis", "templates"), autoescape=True,
                           undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        _env.filters["ms"] = _ms
        _env.filters["pct"] = _pct
        _env.filters["num"] = lambda v: "-" if v is None else f"{v:,}"
    return _env


def render(report: dict) -> str:
    env = _environment()
    script = env.loader.get_source(env, "report.js")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return env.get_template("report.html.j2").render(
        v=_view(report), script=Markup(script), script_hash=f"sha256-{digest}")


# -- formatting ---------------------------------------------------------------------------------

def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 1000 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _pct(v) -> str:
    if v is None:
        return "-"
    return f"{'+' if v > 0 else ''}{v:.0f}%" if abs(v) >= 10 else f"{'+' if v > 0 else ''}{v:.1f}%"


def _change(b, c):
    if b is None or c is None or b <= 0:
        return None
    return (c - b) / b * 100


def _status_key(s):
    s = str(s)
    return (not s.isdigit(), s)


# -- the view -----------------------------------------------------------------------------------

def _view(r: dict) -> dict:
    runs = r.get("runs") or {}
    base_run = runs.get("baseline") or {}
    recorded = "target" not in base_run
    base_label = "recorded" if recorded else "baseline"
    eps = r.get("endpoints") or []
    totals = r.get("totals") or {}
    gate = r.get("gate") or {}
    n_regs = r.get("regressions_total")
    if n_regs is None:
        n_regs = sum(len(e.get("regressions") or []) for e in eps)

    rows = []
    for i, e in enumerate(eps[:MAX_ENDPOINTS]):
        svc = (e.get("latency") or {}).get("service") or {}
        b, c = svc.get("baseline") or {}, svc.get("candidate") or {}
        st = e.get("status") or {}
        regs = e.get("regressions") or []
        rows.append({
            "id": f"ep{i}", "name": e.get("endpoint", "?"), "count": e.get("count", 0),
            "status_changed": st.get("changed", 0), "status_rate": (st.get("rate") or 0) * 100,
            "transitions": [(m.get("baseline"), m.get("candidate"), m.get("count", 0))
                            for m in st.get("matrix") or [] if m.get("baseline") != m.get("candidate")][:4],
            "b50": b.get("p50"), "c50": c.get("p50"), "b99": b.get("p99"), "c99": c.get("p99"),
            "ch50": _change(b.get("p50"), c.get("p50")), "ch99": _change(b.get("p99"), c.get("p99")),
            "held": (e.get("latency") or {}).get("held_back") or 0,
            "regressions": len(regs), "kinds": _kinds(regs),
        })

    changed = [(row["name"], row["ch50"], row["ch99"]) for row in rows
               if row["ch50"] is not None or row["ch99"] is not None]
    changed.sort(key=lambda x: -max(abs(x[1] or 0), abs(x[2] or 0)))

    curves = {k: v for k, v in (r.get("percentiles") or {}).items()}
    timeline = r.get("timeline") or {}
    details, n_listed = _details(eps, base_label)
    matrix = _matrix(eps)
    with_detail = {g["id"] for g in details}
    for row in rows:
        row["detail"] = row["id"] in with_detail
    return {
        "title": f"replay report: {_target(runs.get('candidate'))}",
        "base_label": base_label,
        "runs": [_run(name, runs[name], name == "baseline" and recorded) for name in
                 ("candidate", "baseline", "noise") if name in runs],
        "regressions_total": n_regs,
        "endpoints_hit": sum(1 for e in eps if e.get("regressions")),
        "gate_rules": gate.get("rules") or [],
        "gate_breached": gate.get("breached") or [],
        "totals": {"exchanges": totals.get("exchanges", 0), "endpoints": totals.get("endpoints", len(eps)),
                   "without_baseline": totals.get("without_baseline", 0),
                   "grouped": totals.get("endpoints_grouped_as_other", 0),
                   "candidate": totals.get("candidate") or {}},
        "overall": _overall(curves, base_label),
        "rows": rows, "endpoints_total": len(eps), "endpoints_shown": len(rows),
        "chart_percentiles": svg.percentile_chart(curves),
        "chart_rps": svg.time_chart(timeline, "requests_per_s", "Requests per second", "req/s"),
        "chart_p99": svg.time_chart(timeline, "p99_ms", "p99 service time over time", "ms"),
        "chart_bars": svg.change_bars(
            changed[:MAX_BARS], f"Service time change per endpoint, candidate vs {base_label}"),
        "bars_total": len(changed), "bars_shown": min(len(changed), MAX_BARS),
        "matrix": matrix,
        "statuses": _statuses(r.get("statuses") or {}),
        "details": details, "detailed": sum(len(g["regressions"]) for g in details),
        "regressions_listed": n_listed,
        "suspected_noise": r.get("suspected_noise") or [],
        "warnings": r.get("warnings") or [],
        "thresholds": r.get("thresholds") or {},
        "seconds": r.get("seconds"),
    }


def _target(run) -> str:
    run = run or {}
    return run.get("target") or run.get("what") or run.get("path") or "?"


def _run(name, run: dict, recorded: bool) -> dict:
    return {"name": "recorded" if recorded else name, "target": _target(run),
            "path": run.get("path"), "speed": run.get("speed"), "source": run.get("source"),
            "sent": run.get("sent"), "answered": run.get("answered"),
            "colour": svg.colour("recorded" if recorded else name)}


def _overall(curves: dict, base_label: str) -> list:
    out = []
    for name in ("candidate", base_label, "noise"):
        pts = dict((p, v) for p, v in curves.get(name) or [])
        if pts:
            out.append({"name": name, "p50": pts.get(50), "p99": pts.get(99), "max": pts.get(100),
                        "colour": svg.colour(name)})
    return out


def _kinds(regs) -> list:
    out = []
    for k in ("error", "status", "latency", "body", "header"):
        rs = [x for x in regs if x.get("kind") == k]
        if not rs:
            continue
        if k in ("body", "header"):
            out.append(f"{len(rs)} {k} field{'s' if len(rs) > 1 else ''}")
        else:
            out.append(f"{k} " + ", ".join(str(x.get("field")) for x in rs[:4]) + (" …" if len(rs) > 4 else ""))
    return out


def _matrix(eps) -> dict:
    """All endpoints' status pairs, baseline rows by candidate columns, with heat colours."""
    cells: dict = {}
    for e in eps:
        for m in (e.get("status") or {}).get("matrix") or []:
            k = (str(m.get("baseline")), str(m.get("candidate")))
            cells[k] = cells.get(k, 0) + (m.get("count") or 0)
    total = sum(cells.values())
    rows = sorted({a for a, _ in cells}, key=_status_key)
    cols = sorted({b for _, b in cells}, key=_status_key)
    return {"cols": cols, "total": total,
            "rows": [{"status": a, "cells": [{"count": cells.get((a, b), 0), "same": a == b,
                                               "bg": svg.heat(cells.get((a, b), 0), total, a == b)}
                                              for b in cols]} for a in rows]}


def _statuses(statuses: dict) -> list:
    classes = sorted({c for v in statuses.values() for c in (v or {})}, key=_status_key)
    return {"classes": classes,
            "runs": [{"name": k, "counts": [(v or {}).get(c, 0) for c in classes]} for k, v in statuses.items()]}


# -- regression details -------------------------------------------------------------------------

def _details(eps, base_label) -> tuple:
    """The regressions to detail, grouped by endpoint (at most ``MAX_DETAILED``), and how many
    there are in all."""
    groups = []
    shown = listed = 0
    for i, e in enumerate(eps):
        regs = e.get("regressions") or []
        listed += len(regs)
        take = regs[:max(0, MAX_DETAILED - shown)]
        if not take:
            continue
        shown += len(take)
        items = []
        for reg in take:
            field = str(reg.get("field", ""))
            items.append({
                "kind": reg.get("kind", "?"), "field": field, "count": reg.get("count"),
                "rate": (reg["rate"] * 100) if reg.get("rate") is not None else None,
                "noise_count": reg.get("noise_count"),
                "baseline_ms": reg.get("baseline_ms"), "candidate_ms": reg.get("candidate_ms"),
                "change": reg.get("change"),
                "examples": [_example(x, field, base_label) for x in reg.get("examples") or []],
            })
        groups.append({"endpoint": e.get("endpoint", "?"), "id": f"ep{i}", "regressions": items,
                       "more": len(regs) - len(take)})
    return groups, listed


def _example(x: dict, field: str, base_label: str) -> dict:
    panes = []
    for side in (base_label, "candidate"):
        key = "candidate" if side == "candidate" else "baseline"
        text = x.get(key)
        head, body, marked, note = message(text if isinstance(text, str) else "", field)
        panes.append({"label": side, "status": x.get(f"{key}_status"), "ms": x.get(f"{key}_ms"),
                      "value": x.get(f"{key}_value"), "has_value": f"{key}_value" in x,
                      "head": head, "body": body, "marked": marked, "note": note})
    return {"conn": x.get("conn"), "index": x.get("index"), "method": x.get("method"),
            "uri": x.get("uri"), "curl": x.get("curl"), "panes": panes}


def _text(s: str) -> str:
    """Escaped for element content (a <pre>): quotes need no escape there, which keeps JSON
    readable in the page's source and the page smaller."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clean(text: str) -> str:
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n"))


def message(text: str, field: str) -> tuple:
    """(head, body, marks, note) of an example's response as markup: the header line of a
    ``header:`` field marked, a JSON body pretty-printed with the values at ``field`` marked."""
    raw_head, sep, raw_body = text.partition("\r\n\r\n")
    if not sep:
        raw_head, raw_body = text, ""
    marks = 0
    lines = []
    hname = field[7:].lower() if field.startswith("header:") else None
    for line in _clean(raw_head).split("\n"):
        name = line.split(":", 1)[0].strip().lower() if ":" in line else None
        if hname is not None and name == hname:
            lines.append("<mark>" + _text(line) + "</mark>")
            marks += 1
        else:
            lines.append(_text(line))
    head = Markup("\n".join(lines))
    note = None
    value = None
    if raw_body[:1] in ("{", "[") or raw_body.lstrip()[:1] in ("{", "["):
        try:
            value = json.loads(raw_body)
        except (ValueError, RecursionError):
            value = None
            if field.startswith("$"):
                note = "the body is cut or is not valid JSON: shown as it is"
    if value is not None:
        try:
            parts: list = []
            n = _pretty(value, "$", field if field.startswith("$") else None, 0, parts)
            return head, Markup("".join(parts)), marks + n, note
        except RecursionError:
            note = "the body is nested too deeply to pretty-print: shown as it is"
    return head, Markup(_text(_clean(raw_body))), marks, note


def _pretty(v, path: str, field, depth: int, out: list, marks=None) -> int:
    """Append ``v`` pretty-printed as escaped markup to ``out``; return how many values were
    marked (those whose generic path is ``field``, and strings holding JSON that contain it)."""
    if marks is None:
        marks = [0]
    g = generic(path) if field else None
    hit = field is not None and (g == field or (isinstance(v, str) and field.startswith(g) and
                                                field[len(g):len(g) + 1] in (".", "[")))
    if hit and marks[0] < MAX_MARKS:
        inner: list = []
        _pretty(v, path, None, depth, inner)
        out.append("<mark>" + "".join(inner) + "</mark>")
        marks[0] += 1
        return marks[0]
    pad = "  " * (depth + 1)
    end = "  " * depth
    if isinstance(v, dict) and v:
        out.append("{\n")
        for i, (k, x) in enumerate(v.items()):
            out.append(pad + _text(_clean(json.dumps(str(k), ensure_ascii=False))) + ": ")
            _pretty(x, path + _key(str(k)), field, depth + 1, out, marks)
            out.append(",\n" if i < len(v) - 1 else "\n")
        out.append(end + "}")
    elif isinstance(v, list) and v:
        out.append("[\n")
        for i, x in enumerate(v):
            out.append(pad)
            _pretty(x, f"{path}[{i}]", field, depth + 1, out, marks)
            out.append(",\n" if i < len(v) - 1 else "\n")
        out.append(end + "]")
    else:
        out.append(_text(_clean(json.dumps(v, ensure_ascii=False))))
    return marks[0]
