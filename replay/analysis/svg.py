"""Charts of the HTML report as inline SVG, drawn in Python: the page needs no script and no
network to show them.

Rules:
- every chart is a function from plain data (lists of numbers, names) to one ``<svg>`` element
  returned as ``markupsafe.Markup``; every text that reaches the SVG (run and endpoint names
  come from captured traffic) goes through ``escape``;
- the coordinates are fixed by a ``viewBox``; the element scales to its container's width;
- ``None`` values are gaps: a line is broken there, a bar is not drawn; a chart with nothing
  to draw says so in its frame instead of drawing empty axes;
- each point carries a ``<title>`` so that hovering it shows its value, without JavaScript;
- percentile curves use the axis of HDR histogram plots: x = log10(1 / (1 - p/100)), so 90,
  99, 99.9 and 99.99 are evenly spaced; p100 (the maximum) is drawn at ``MAX_X``.
"""

from __future__ import annotations

import math

from markupsafe import Markup, escape

# one colour per run, the same in every chart and in the legend
RUN_COLOURS = {"candidate": "#d9480f", "baseline": "#1864ab", "recorded": "#1864ab", "noise": "#868e96"}
OTHER_COLOURS = ("#2b8a3e", "#862e9c", "#e67700", "#0b7285")
SLOWER, FASTER = "#e03131", "#2f9e44"
MAX_X = 5.0                     # p99.999: where the maximum is drawn on a percentile axis
PCT_TICKS = ((0, "0"), (1, "90"), (2, "99"), (3, "99.9"), (4, "99.99"), (MAX_X, "max"))
FONT = "font-family='system-ui,sans-serif' font-size='12'"


def colour(run: str, i: int = 0) -> str:
    return RUN_COLOURS.get(run, OTHER_COLOURS[i % len(OTHER_COLOURS)])


def percentile_x(p: float) -> float:
    """The position of percentile ``p`` on an HDR-style axis (0 -> 0, 90 -> 1, 99 -> 2, ...)."""
    if p >= 100:
        return MAX_X
    return min(MAX_X, math.log10(100 / (100 - p)))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About ``n`` round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 10))
    return ticks


def fmt(v: float) -> str:
    """A number for an axis or a tooltip: few digits, no exponent for ordinary values."""
    if v is None:
        return "-"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2g}"


class _Frame:
    """A plot area inside a viewBox, with the mapping from data to pixels."""

    def __init__(self, width, height, x0, x1, y0, y1, left=56, right=30, top=44, bottom=40):
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)

    def x(self, v):
        pw = self.w - self.left - self.right
        return round(self.left + (v - self.x0) / (self.x1 - self.x0) * pw, 2)

    def y(self, v):
        ph = self.h - self.top - self.bottom
        return round(self.top + ph - (v - self.y0) / (self.y1 - self.y0) * ph, 2)


def _open(width, height, title, cls="chart") -> list:
    return [f"<svg class='{cls}' xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
            f"role='img' aria-label='{escape(title)}' {FONT}>",
            f"<text class='title' x='8' y='16' font-weight='600'>{escape(title)}</text>"]


def _empty(width, height, title, why) -> Markup:
    out = _open(width, height, title, "chart empty")
    out.append(f"<rect x='1' y='24' width='{width - 2}' height='{height - 26}' fill='none' "
               f"stroke='#ced4da' stroke-dasharray='4 4'/>")
    out.append(f"<text x='{width / 2}' y='{height / 2 + 10}' text-anchor='middle' fill='#868e96'>"
               f"{escape(why)}</text></svg>")
    return Markup("".join(out))


def _axes(f: _Frame, xticks, yticks, xlabel, ylabel) -> list:
    out = []
    for v, label in yticks:
        y = f.y(v)
        out.append(f"<line x1='{f.left}' x2='{f.w - f.right}' y1='{y}' y2='{y}' stroke='#e9ecef'/>")
        out.append(f"<text x='{f.left - 6}' y='{y + 4}' text-anchor='end' fill='#495057'>{escape(label)}</text>")
    for v, label in xticks:
        x = f.x(v)
        out.append(f"<line x1='{x}' x2='{x}' y1='{f.top}' y2='{f.h - f.bottom}' stroke='#f1f3f5'/>")
        out.append(f"<text x='{x}' y='{f.h - f.bottom + 16}' text-anchor='middle' fill='#495057'>"
                   f"{escape(label)}</text>")
    out.append(f"<line x1='{f.left}' x2='{f.w - f.right}' y1='{f.h - f.bottom}' y2='{f.h - f.bottom}' "
               f"stroke='#868e96'/>")
    out.append(f"<line x1='{f.left}' x2='{f.left}' y1='{f.top}' y2='{f.h - f.bottom}' stroke='#868e96'/>")
    if xlabel:
        out.append(f"<text x='{(f.left + f.w - f.right) / 2}' y='{f.h - 6}' text-anchor='middle' "
                   f"fill='#495057'>{escape(xlabel)}</text>")
    if ylabel:
        out.append(f"<text x='{f.left - 6}' y='{f.top - 12}' text-anchor='end' fill='#495057'>"
                   f"{escape(ylabel)}</text>")
    return out


def _legend(width, names) -> list:
    out = []
    x = width - 16
    for i, name in reversed(list(enumerate(names))):
        label = str(name)
        x -= 7 * len(label) + 26
        out.append(f"<g class='legend'><rect x='{x}' y='7' width='12' height='12' rx='2' "
                   f"fill='{colour(name, i)}'/><text x='{x + 16}' y='17'>{escape(label)}</text></g>")
    return out


def _polylines(f: _Frame, name, i, points, unit, xname) -> list:
    """A series as polylines broken at None, and a marker with a tooltip on every point."""
    c = colour(name, i)
    out = [f"<g class='series' data-run='{escape(name)}'>"]
    run: list = []
    segments = [run]
    for x, xl, y in points:
        if y is None:
            run = []
            segments.append(run)
            continue
        run.append((f.x(x), f.y(y), xl, y))
    for seg in segments:
        if len(seg) > 1:
            pts = " ".join(f"{px},{py}" for px, py, _, _ in seg)
            out.append(f"<polyline points='{pts}' fill='none' stroke='{c}' stroke-width='2' "
                       f"stroke-linejoin='round'/>")
    for seg in segments:
        for px, py, xl, y in seg:
            out.append(f"<circle cx='{px}' cy='{py}' r='3' fill='{c}'><title>{escape(name)}: "
                       f"{escape(xname)} {escape(xl)}: {escape(fmt(y))} {escape(unit)}</title></circle>")
    out.append("</g>")
    return out


def percentile_chart(curves: dict, title="Service time by percentile", width=640, height=320) -> Markup:
    """``curves``: {run: [[percentile, ms], ...]}, drawn on an HDR-style percentile axis."""
    series = {k: [(p, v) for p, v in (pts or []) if p is not None] for k, pts in (curves or {}).items()}
    values = [v for pts in series.values() for _, v in pts if v is not None]
    if not values:
        return _empty(width, height, title, "no latency recorded")
    yt = nice_ticks(0, max(values))
    f = _Frame(width, height, 0, MAX_X, 0, yt[-1])
    out = _open(width, height, title)
    out += _axes(f, PCT_TICKS, [(v, fmt(v)) for v in yt], "percentile", "ms")
    names = [k for k, pts in series.items() if pts]
    for i, name in enumerate(names):
        pts = [(percentile_x(p), ("max" if p >= 100 else f"p{fmt(p)}"), v) for p, v in series[name]]
        out += _polylines(f, name, i, pts, "ms", "")
    out += _legend(width, names)
    out.append("</svg>")
    return Markup("".join(out))


def time_chart(series: dict, key: str, title: str, unit: str, width=640, height=240) -> Markup:
    """``series``: {run: [{"t": seconds, key: value}, ...]}: one line per run over time."""
    pts = {k: [(p.get("t"), p.get(key)) for p in (v or []) if p.get("t") is not None]
           for k, v in (series or {}).items()}
    ts = [t for v in pts.values() for t, _ in v]
    ys = [y for v in pts.values() for _, y in v if y is not None]
    if not ys:
        return _empty(width, height, title, "no data over time")
    t0, t1 = min(ts), max(ts)
    xt = nice_ticks(t0, t1) if t1 > t0 else [t0, t0 + 1]
    yt = nice_ticks(0, max(ys))
    f = _Frame(width, height, xt[0], xt[-1], 0, yt[-1])
    out = _open(width, height, title)
    out += _axes(f, [(v, fmt(v)) for v in xt], [(v, fmt(v)) for v in yt], "seconds from start", unit)
    names = [k for k, v in pts.items() if any(y is not None for _, y in v)]
    for i, name in enumerate(names):
        out += _polylines(f, name, i, [(t, f"{fmt(t)} s", y) for t, y in pts[name]], unit, "at")
    out += _legend(width, names)
    out.append("</svg>")
    return Markup("".join(out))


def change_bars(rows: list, title="Service time change per endpoint, candidate vs baseline",
                width=640, limit_pct=200.0) -> Markup:
    """``rows``: [(endpoint, p50 change %, p99 change %)], a change None when a side has no data.

    Bars grow right (slower, red) or left (faster, green) from 0; changes beyond ``limit_pct``
    are drawn to the edge and labelled with their value."""
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return _empty(width, 120, title, "no endpoint has latency on both sides")
    label_w = 230
    row_h = 30
    height = 48 + row_h * len(rows) + 24
    span = max([abs(v) for _, a, b in rows for v in (a, b) if v is not None] + [10.0])
    span = min(limit_pct, nice_ticks(0, span)[-1])
    f = _Frame(width, height, -span, span, 0, 1, left=label_w, right=56, top=40, bottom=24)
    out = _open(width, height, title, "chart bars")
    mid = f.x(0)
    for v in (-span, -span / 2, span / 2, span):
        x = f.x(v)
        out.append(f"<line x1='{x}' x2='{x}' y1='{f.top - 4}' y2='{height - f.bottom}' stroke='#f1f3f5'/>")
        out.append(f"<text x='{x}' y='{f.top - 8}' text-anchor='middle' fill='#495057'>"
                   f"{'+' if v > 0 else ''}{fmt(v)}%</text>")
    out.append(f"<line x1='{mid}' x2='{mid}' y1='{f.top - 4}' y2='{height - f.bottom}' stroke='#868e96'/>")
    for i, (name, p50, p99) in enumerate(rows):
        y = f.top + i * row_h
        label = str(name)
        short = label if len(label) <= 34 else label[:33] + "…"
        out.append(f"<text x='{label_w - 8}' y='{y + 17}' text-anchor='end'>"
                   f"<title>{escape(label)}</title>{escape(short)}</text>")
        for j, (pname, v) in enumerate((("p50", p50), ("p99", p99))):
            if v is None:
                continue
            by = y + 3 + j * 12
            x = f.x(max(-span, min(span, v)))
            x0, x1 = min(mid, x), max(mid, x)
            fill = SLOWER if v > 0 else FASTER
            opacity = "0.55" if pname == "p50" else "1"
            out.append(f"<rect x='{x0}' y='{by}' width='{max(1.0, round(x1 - x0, 2))}' height='10' "
                       f"fill='{fill}' fill-opacity='{opacity}'><title>{escape(label)} {pname}: "
                       f"{'+' if v > 0 else ''}{escape(fmt(v))}%</title></rect>")
            tx, anchor = (x1 + 4, "start") if v >= 0 else (x0 - 4, "end")
            out.append(f"<text x='{tx}' y='{by + 9}' text-anchor='{anchor}' font-size='10' fill='#495057'>"
                       f"{pname} {'+' if v > 0 else ''}{escape(fmt(v))}%</text>")
    out.append("</svg>")
    return Markup("".join(out))


def heat(count: int, total: int, same: bool) -> str:
    """The background of a status-matrix cell: green on the diagonal (unchanged), red off it,
    stronger for a larger share of the exchanges; empty cells stay white."""
    if not count or not total:
        return "#ffffff"
    share = count / total
    a = 0.12 + 0.68 * math.sqrt(share)
    r, g, b = (47, 158, 68) if same else (224, 49, 49)
    return f"rgba({r},{g},{b},{a:.2f})"
