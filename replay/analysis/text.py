"""The report on the terminal: one row per endpoint, regressions first, then examples with curl."""

from __future__ import annotations

import re
import sys

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(text) -> str:
    """Text from a capture, fit for a terminal: control characters (escape sequences that
    could retitle, clear or rewrite the terminal) shown as \\xNN."""
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()), str(text))


MAX_ROWS = 40
MAX_DETAIL = 10         # endpoints whose regressions are detailed
MAX_LINES = 8           # regressions listed per endpoint
CURL_CHARS = 400


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _lat(e) -> str:
    s = e["latency"]["service"]
    b, c = s["baseline"], s["candidate"]
    return f"{_ms(b['p50'])} → {_ms(c['p50'])}", f"{_ms(b['p99'])} → {_ms(c['p99'])}"


def _reg_text(r) -> str:
    k = r["kind"]
    if k in ("body", "header") and "baseline_value" in ((r.get("examples") or [{}])[0]):
        x = r["examples"][0]
        return (f"{_safe(r['field'])}: differs in {r['count']:,} ({r['rate'] * 100:.3g}%), e.g. "
                f"{_clip(repr(x['baseline_value']), 60)} → {_clip(repr(x['candidate_value']), 60)}")
    if k == "latency":
        return f"latency {r['field']} {r['baseline_ms']:.3g} → {r['candidate_ms']:.3g} ms (+{r['change']}%)"
    if k == "status":
        return f"status {r['field']} ×{r['count']}"
    if k == "error":
        return f"error {r['field']} ×{r['count']}"
    return f"{_safe(r['field'])}: differs in {r['count']:,} ({r['rate'] * 100:.3g}%)"


def render_text(report: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console(file=file or sys.stdout, highlight=False, soft_wrap=False,
                  width=None if (file or sys.stdout).isatty() else 160)
    runs = report["runs"]
    t = report["totals"]
    base = runs["baseline"].get("target") or "recorded"
    out.print(_safe(f"candidate {runs['candidate'].get('target', '?')} vs baseline {base}"
                    + (f", noise {runs['noise'].get('target')}" if "noise" in runs else "")
                    + f": {t['exchanges']:,} exchanges, {t['endpoints']} endpoints"
                    + (f", {t['without_baseline']:,} without a baseline" if t["without_baseline"] else "")),
              markup=False)
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("endpoint", overflow="fold")
    table.add_column("count", justify="right")
    table.add_column("status Δ", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("regressions", overflow="fold")
    eps = report["endpoints"]
    for e in eps[:MAX_ROWS]:
        p50, p99 = _lat(e)
        table.add_row(Text(_safe(e["endpoint"])), f"{e['count']:,}", f"{e['status']['changed']:,}",
                      p50, p99, Text(_safe(_kinds(e["regressions"]))),
                      style="red" if e["regressions"] else None)
    out.print(table)
    if len(eps) > MAX_ROWS:
        out.print(f"... {len(eps) - MAX_ROWS} more endpoints (--json or --html for all)")
    if report["suspected_noise"]:
        out.print("suspected noise (differs on nearly every exchange and looks random or changed "
                  "between repeated requests; not counted): "
                  + _safe(", ".join(f"{s['endpoint']} {s['field']}" for s in report["suspected_noise"][:10])),
                  markup=False)
    n = report["regressions_total"]
    hit = [e for e in eps if e["regressions"]]
    out.print(f"[bold]{n} regression{'s' if n != 1 else ''} in {len(hit)} endpoint"
              f"{'s' if len(hit) != 1 else ''}[/bold]" if n else "no regressions")
    for e in hit[:MAX_DETAIL]:
        out.print(Text("\n" + _safe(e["endpoint"]), style="bold"))
        regs = e["regressions"]
        for r in regs[:MAX_LINES]:
            out.print("  " + _reg_text(r), markup=False)
        if len(regs) > MAX_LINES:
            out.print(f"  ... and {len(regs) - MAX_LINES} more")
        x = next((x for r in regs for x in (r.get("examples") or [])[:1]), None)
        if x is not None:
            out.print(f"  e.g. conn {x['conn']} #{x['index']}: {_safe(x['method'])} {_clip(x['uri'], 120)}  "
                      f"{x['baseline_status']} → {x['candidate_status']}", markup=False)
            if x.get("curl"):
                out.print("    " + _clip(x["curl"], CURL_CHARS), markup=False, soft_wrap=True)
    if len(hit) > MAX_DETAIL:
        out.print(f"\n... {len(hit) - MAX_DETAIL} more endpoints with regressions (--json or --html for all)")


def _clip(text, n) -> str:
    text = _safe(text)
    return text if len(text) <= n else text[:n] + f"... ({len(text) - n} more characters)"


def _kinds(regs) -> str:
    if not regs:
        return "-"
    parts = []
    for k in ("error", "status", "latency", "body", "header"):
        rs = [r for r in regs if r["kind"] == k]
        if not rs:
            continue
        if k == "latency":
            parts.append("latency " + ",".join(r["field"] for r in rs))
        elif k in ("body", "header"):
            parts.append(f"{len(rs)} {k} field{'s' if len(rs) > 1 else ''}")
        else:
            parts.append(f"{k} " + ", ".join(r["field"] for r in rs))
    return "; ".join(parts)
