"""`replay report --html`: the SVG helpers, the template, and the page in a real browser.

The browser tests run Debian's `chromium` headless on the rendered file: the page loads with no
console error, the charts are in the DOM after load, and the screenshot shows them drawn (the
candidate's colour is on the screen). They skip when chromium is not installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

from replay.analysis import html as H
from replay.analysis import svg

XSS_SCRIPT = "</script><script>console.error('XSS-SCRIPT')</script>"
XSS_IMG = "<img src=x onerror=\"console.error('XSS-IMG')\">"


def _ex(i, field=None, bval=None, cval=None, bbody=None, cbody=None, bstatus="200", cstatus="200"):
    head = "HTTP/1.1 {} OK\r\nContent-Type: application/json\r\nX-Version: {}\r\n\r\n"
    x = {"conn": i, "index": 2, "pass": 0, "method": "GET", "uri": f"/api/products?page={i}",
         "baseline_status": bstatus, "candidate_status": cstatus, "baseline_ms": 1.25, "candidate_ms": 3.5,
         "baseline": head.format(bstatus, 1) + (bbody or ""), "candidate": head.format(cstatus, 2) + (cbody or ""),
         "curl": f"curl -sS -i -X GET -H 'Accept: */*' http://staging:8080/api/products?page={i}"}
    if field:
        x["baseline_value"], x["candidate_value"] = bval, cval
    return x


def _lat(count, p50, p90, p99, mx):
    return {"count": count, "p50": p50, "p90": p90, "p99": p99, "max": mx}


NONE_LAT = _lat(0, None, None, None, None)


def _endpoint(name, count, b50, c50, regressions=(), matrix=None):
    b = _lat(count, b50, b50 * 2, b50 * 4, b50 * 5) if b50 is not None else NONE_LAT
    c = _lat(count, c50, c50 * 2, c50 * 5, c50 * 6)
    return {"endpoint": name, "count": count,
            "status": {"changed": sum(m["count"] for m in matrix or [] if m["baseline"] != m["candidate"]),
                       "rate": sum(m["count"] for m in matrix or [] if m["baseline"] != m["candidate"]) / count,
                       "noise_changed": 0, "noise_compared": 0,
                       "matrix": matrix or [{"baseline": "200", "candidate": "200", "count": count}]},
            "errors": {"candidate": {}, "noise": {}},
            "latency": {"service": {"baseline": b, "candidate": c, "noise": NONE_LAT},
                        "intended": {"baseline": b, "candidate": c, "noise": NONE_LAT}, "held_back": 0},
            "fields": [], "regressions": list(regressions)}


def sample_report() -> dict:
    """A report like `compare.report()` makes: a baseline run, no noise run, regressions of each
    kind, and None where a run has no data."""
    items_b = json.dumps({"page": 1, "items": [{"id": 1, "price": 10.5, "name": "a"},
                                               {"id": 2, "price": 20, "name": "b"}], "total": 2})
    items_c = json.dumps({"page": 1, "items": [{"id": 1, "price": 11.5, "name": "a"},
                                               {"id": 2, "price": 21, "name": "b"}], "total": 2})
    price = {"kind": "body", "field": "$.items[*].price", "count": 180, "rate": 0.9, "noise_count": 0,
             "examples": [_ex(i, "$.items[*].price", 10.5, 11.5, items_b, items_c) for i in range(3)]}
    header = {"kind": "header", "field": "header:x-version", "count": 200, "rate": 1.0, "noise_count": 0,
              "examples": [_ex(7, "header:x-version", "1", "2", items_b, items_b)]}
    status = {"kind": "status", "field": "200 -> 500", "count": 12, "rate": 0.06,
              "examples": [_ex(9, bbody="{}", cbody="<html>Internal Server Error</html>", cstatus="500")]}
    latency = {"kind": "latency", "field": "p99", "baseline_ms": 4.0, "candidate_ms": 17.5,
               "change": 337.5, "z": 9.1}
    eps = [
        _endpoint("GET /api/products", 200, 1.0, 1.4, [status, latency, price, header],
                  matrix=[{"baseline": "200", "candidate": "200", "count": 188},
                          {"baseline": "200", "candidate": "500", "count": 12}]),
        _endpoint("GET /api/users/{id}", 120, 2.0, 1.5),
        _endpoint("POST /api/orders", 40, None, 8.0,
                  matrix=[{"baseline": "none", "candidate": "201", "count": 40}]),
    ]
    timeline = {run: [{"t": float(t), "requests_per_s": 40.0 + 5 * (t % 3) + k,
                       "p99_ms": (None if (run, t) == ("baseline", 4) else 5.0 + t * (2 if run == "candidate" else 0.2))}
                      for t in range(10)] for k, run in enumerate(("candidate", "baseline"))}
    curve = [0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99, 100]
    return {
        "report": "replay report",
        "runs": {"candidate": {"path": "/tmp/cand.rlog", "target": "http://staging:8080", "speed": 1.0,
                               "source": "prod.pcap", "sent": 360, "answered": 360},
                 "baseline": {"path": "/tmp/base.rlog", "target": "http://prod:8080", "speed": 1.0,
                              "source": "prod.pcap", "sent": 360, "answered": 360}},
        "thresholds": {"relative": 20.0, "absolute": 0.03, "latency_rel": 20.0, "latency_abs_ms": 1.0,
                       "min_count": 20, "z": 3.0, "noise_share": 90.0},
        "totals": {"exchanges": 360, "without_baseline": 40, "unmatched": {"baseline": 0}, "endpoints": 3,
                   "endpoints_grouped_as_other": 0, "candidate": {"errors": 0, "5xx": 12, "4xx": 0}},
        "endpoints": eps,
        "regressions_total": 4,
        "suspected_noise": [{"endpoint": "GET /api/users/{id}", "field": "$.session", "share": 100.0}],
        "statuses": {"candidate": {"2xx": 348, "5xx": 12}, "baseline": {"2xx": 320}},
        "percentiles": {"candidate": [[p, 0.5 + p / 20 + (30 if p >= 99.9 else 0)] for p in curve],
                        "baseline": [[p, 0.4 + p / 40] for p in curve]},
        "timeline": timeline,
        "warnings": ["/tmp/cand.rlog: the log ends in a torn block"],
        "seconds": 0.5,
        "gate": {"rules": ["regression"], "breached": ["4 regressions"], "exit_code": 3},
    }


class _Tags(HTMLParser):
    """The tags of a page, and the text inside <script> elements."""

    def __init__(self):
        super().__init__()
        self.tags: list = []
        self.scripts: list = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


# -- SVG helpers ---------------------------------------------------------------------------------

def test_percentile_axis_is_hdr_like():
    assert svg.percentile_x(0) == 0
    assert svg.percentile_x(90) == pytest.approx(1)
    assert svg.percentile_x(99) == pytest.approx(2)
    assert svg.percentile_x(99.9) == pytest.approx(3)
    assert svg.percentile_x(99.99) == pytest.approx(4)
    assert svg.percentile_x(100) == svg.MAX_X


def test_nice_ticks_cover_the_range():
    for lo, hi in ((0, 7.3), (0, 0.004), (3, 1234), (0, 0), (556023.2, 556023.2)):
        t = svg.nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and len(t) <= 12
        assert t == sorted(set(t))


def test_percentile_chart_draws_each_run_with_tooltips():
    out = svg.percentile_chart({"candidate": [[50, 1.0], [99, 4.0], [100, 9.0]], "baseline": [[50, 0.5], [99, 2.0]],
                                "recorded": []})
    assert out.startswith("<svg") and out.endswith("</svg>")
    assert out.count("<polyline") == 2
    assert svg.RUN_COLOURS["candidate"] in out and svg.RUN_COLOURS["baseline"] in out
    assert "<title>candidate:  max: 9 ms</title>" in out
    for label in ("90", "99", "99.9", "99.99", "max"):
        assert f">{label}</text>" in out


def test_time_chart_breaks_lines_at_none():
    pts = [{"t": 0, "p99_ms": 1.0}, {"t": 1, "p99_ms": 2.0}, {"t": 2, "p99_ms": None},
           {"t": 3, "p99_ms": 2.0}, {"t": 4, "p99_ms": 3.0}]
    out = svg.time_chart({"candidate": pts}, "p99_ms", "p99", "ms")
    assert out.count("<polyline") == 2 and out.count("<circle") == 4


def test_charts_without_data_say_so():
    assert "no latency recorded" in svg.percentile_chart({"candidate": [], "recorded": []})
    assert "no latency recorded" in svg.percentile_chart({})
    assert "no data over time" in svg.time_chart({"candidate": [{"t": 0, "p99_ms": None}]}, "p99_ms", "p99", "ms")
    assert "no endpoint" in svg.change_bars([("GET /", None, None)])


def test_change_bars_grow_by_sign_and_are_clamped():
    out = svg.change_bars([("GET /slow", 50.0, 900.0), ("GET /fast", -30.0, None)])
    assert out.count(f"fill='{svg.SLOWER}'") == 2 and out.count(f"fill='{svg.FASTER}'") == 1
    assert "p99 +900%" in out                       # drawn to the edge, labelled with its value
    xs = [float(x) for x in re.findall(r"<rect x='([\d.]+)'", out)]
    widths = [float(w) for w in re.findall(r"width='([\d.]+)' height='10'", out)]
    assert max(x + w for x, w in zip(xs, widths)) <= 640


def test_svg_text_is_escaped():
    name = "GET /a<script>alert(1)</script>&b"
    for out in (svg.change_bars([(name, 10.0, 20.0)]),
                svg.percentile_chart({name: [[50, 1.0]]}),
                svg.time_chart({name: [{"t": 0, "x": 1}]}, "x", name, "u")):
        assert "<script>" not in out and "&lt;script&gt;" in out


def test_heat_colours():
    assert svg.heat(0, 10, False) == "#ffffff"
    assert svg.heat(5, 10, True).startswith("rgba(47,158,68")
    assert svg.heat(5, 10, False).startswith("rgba(224,49,49")
    assert float(svg.heat(10, 10, False).split(",")[-1][:-1]) > float(svg.heat(1, 10, False).split(",")[-1][:-1])


# -- bodies --------------------------------------------------------------------------------------

def test_json_body_marks_every_value_at_the_generic_path():
    text = 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n' + json.dumps(
        {"items": [{"price": 1, "name": "x"}, {"price": 2, "name": "y"}], "price": 3})
    head, body, marks, note = H.message(text, "$.items[*].price")
    assert marks == 2 and note is None
    assert "<mark>1</mark>" in body and "<mark>2</mark>" in body and "<mark>3</mark>" not in body
    assert '"name": "x"' in body                    # pretty-printed


def test_json_marks_odd_keys_containers_and_json_in_strings():
    text = "HTTP/1.1 200 OK\r\n\r\n" + json.dumps({"a b": {"c": []}, "payload": json.dumps({"id": 5})})
    _, body, marks, _ = H.message(text, '$["a b"].c')
    assert marks == 1 and "<mark>[]</mark>" in body
    _, body, marks, _ = H.message(text, "$.payload.id")
    assert marks == 1 and body.count("<mark>") == 1 and '{\\"id\\": 5}' in body.split("<mark>")[1]


def test_header_field_marks_its_line_and_plain_bodies_stay_plain():
    text = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Version: 2\r\n\r\nhello <b>world</b>\x00"
    head, body, marks, _ = H.message(text, "header:x-version")
    assert marks == 1 and "<mark>X-Version: 2</mark>" in head and "\r" not in head
    assert body == "hello &lt;b&gt;world&lt;/b&gt;\ufffd"


def test_cut_json_body_is_shown_as_it_is_with_a_note():
    text = 'HTTP/1.1 200 OK\r\n\r\n{"items": [1, 2, \n[... 100 more bytes]'
    _, body, marks, note = H.message(text, "$.items[*]")
    assert marks == 0 and "cut" in note and "[... 100 more bytes]" in body


def test_deep_json_does_not_break_the_page():
    text = "HTTP/1.1 200 OK\r\n\r\n" + "[" * 5000 + "]" * 5000
    _, body, _, note = H.message(text, "$")
    assert body and (note is None or "shown as it is" in note)


# -- the page ------------------------------------------------------------------------------------

def test_page_has_verdict_runs_charts_matrix_and_details():
    page = H.render(sample_report())
    p = _parse(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "4 regressions in 1 endpoint" in page and "Gate breached: 4 regressions" in page
    assert "http://staging:8080" in page and "http://prod:8080" in page
    assert sum(1 for t, _ in p.tags if t == "svg") == 4
    assert [a.get("id") for t, a in p.tags if t == "table"] == [None, "endpoints", "status-matrix", None]
    assert sum(1 for t, a in p.tags if t == "tr" and a.get("class") == "bad") == 1
    assert '<mark>10.5</mark>' in page and '<mark>11.5</mark>' in page
    assert "<mark>X-Version: 1</mark>" in page and "<mark>X-Version: 2</mark>" in page
    assert page.count("<button class=\"copy\"") == 5      # 3 + 1 + 1 examples with curl
    assert "+338%" in page                                 # the latency regression
    assert "$.session" in page and "torn block" in page
    # nothing is fetched: no external URL in any src/href, one inline script, allowed by hash
    for tag, attrs in p.tags:
        for k in ("src", "href"):
            v = attrs.get(k)
            assert v is None or v.startswith(("#", "data:")), (tag, attrs)
    assert [t for t, _ in p.tags].count("script") == 1
    csp = next(a["content"] for t, a in p.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "sha256-" in csp


def test_script_hash_matches_the_script():
    import base64
    import hashlib

    page = H.render(sample_report())
    p = _parse(page)
    digest = base64.b64encode(hashlib.sha256("".join(p.scripts).encode()).digest()).decode()
    assert f"'sha256-{digest}'" in page


def test_bodies_and_names_from_the_wire_are_inert():
    r = sample_report()
    reg = r["endpoints"][0]["regressions"][2]
    x = reg["examples"][0]
    x["candidate"] = "HTTP/1.1 200 OK\r\nX-Evil: " + XSS_IMG + "\r\n\r\n" + XSS_SCRIPT + XSS_IMG
    x["baseline"] = "HTTP/1.1 200 OK\r\n\r\n" + json.dumps({"items": [{"price": XSS_SCRIPT}]})
    x["uri"] = "/?" + XSS_SCRIPT
    x["curl"] = "curl '" + XSS_IMG + "'"
    x["candidate_value"] = XSS_IMG
    r["endpoints"][1]["endpoint"] = "GET /" + XSS_SCRIPT
    r["warnings"].append(XSS_IMG)
    r["runs"]["baseline"]["target"] = XSS_SCRIPT
    page = H.render(r)
    p = _parse(page)
    assert [t for t, _ in p.tags].count("script") == 1
    assert [t for t, _ in p.tags].count("img") == 0
    assert not any("onerror" in a for _, a in p.tags)
    assert "XSS" not in "".join(p.scripts)
    assert "&lt;/script&gt;&lt;script&gt;" in page and "&lt;img src=x onerror=" in page


def test_no_noise_run_none_values_and_the_recording_as_baseline():
    r = sample_report()
    r["runs"]["baseline"] = {"path": "/tmp/cand.rlog", "what": "the recording inside the candidate's log"}
    r["percentiles"] = {"candidate": r["percentiles"]["candidate"], "recorded": []}
    r["timeline"] = {"candidate": r["timeline"]["candidate"], "recorded": []}
    for e in r["endpoints"]:
        e["latency"]["service"]["baseline"] = NONE_LAT
        for reg in e["regressions"]:
            for x in reg.get("examples", []):
                x["baseline_ms"] = None
    del r["gate"], r["seconds"]
    r["new_key_from_a_later_version"] = {"x": 1}
    page = H.render(r)
    assert "recorded" in page and "the recording inside the candidate" in page
    assert "no endpoint has latency on both sides" in page
    assert "- → 1.40" in page
    assert "No gate" in page


def test_empty_report():
    page = H.render({"runs": {"candidate": {"path": "c.rlog", "target": "http://x"},
                              "baseline": {"path": "c.rlog", "what": "the recording"}},
                     "totals": {"exchanges": 0, "endpoints": 0}, "endpoints": [],
                     "regressions_total": 0, "percentiles": {"candidate": [], "recorded": []},
                     "timeline": {"candidate": [], "recorded": []}, "statuses": {}})
    assert "No regressions" in page and "No exchanges were compared" in page
    assert "no latency recorded" in page and "no data over time" in page
    assert H.render({})                             # a bare dict still renders


def test_large_reports_are_capped_and_say_so():
    r = sample_report()
    first = r["endpoints"][0]
    r["endpoints"] = [dict(copy.deepcopy(first), endpoint=f"GET /e{i}") for i in range(H.MAX_ENDPOINTS + 50)]
    r["regressions_total"] = 4 * len(r["endpoints"])
    page = H.render(r)
    p = _parse(page)
    rows = [a for t, a in p.tags if t == "tr" and a.get("id", "").startswith("row-")]
    assert len(rows) == H.MAX_ENDPOINTS
    assert f"The first {H.MAX_ENDPOINTS} of {H.MAX_ENDPOINTS + 50} endpoints are shown" in page
    assert f"The first {H.MAX_DETAILED} of {4 * (H.MAX_ENDPOINTS + 50)} regressions are detailed" in page
    assert len(re.findall(r"class=\"reg [a-z]+\"", page)) == H.MAX_DETAILED
    assert sum(1 for t, a in p.tags if t == "rect" and a.get("height") == "10") <= 2 * H.MAX_BARS
    assert len(page) < 3_000_000


def test_the_cli_writes_the_page(tmp_path, monkeypatch):
    """`report --html FILE` renders the analysis' dict, gate included, into FILE."""
    from click.testing import CliRunner

    from replay.analysis import compare
    from replay.cli import report as cli_report

    class FakeAnalysis:
        def __init__(self, *a, **kw):
            pass

        def run(self, workers=None):
            r = sample_report()
            del r["gate"]
            return r

    monkeypatch.setattr(compare, "Analysis", FakeAnalysis)
    cand = tmp_path / "cand.rlog"
    cand.write_bytes(b"")
    out = tmp_path / "report.html"
    got = CliRunner().invoke(cli_report.command, [str(cand), "--html", str(out), "-q", "--fail-on", "status"],
                             standalone_mode=False)
    assert got.exception is None and got.return_value == 3, got.output
    page = out.read_text(encoding="utf-8")
    assert "4 regressions in 1 endpoint" in page and "Gate breached" in page


def test_template_is_package_data():
    import importlib.resources as res

    files = res.files("replay.analysis") / "templates"
    assert (files / "report.html.j2").is_file() and (files / "report.js").is_file()


# -- in a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
# console messages (console.*, uncaught exceptions, CSP violations) as chromium logs them to stderr
CONSOLE = re.compile(r":(?:INFO|WARNING|ERROR):CONSOLE\(\d+\)\] (.*)|Uncaught .*|Refused to .*")


def _chromium(tmp_path, page: str, *args, timeout=25) -> subprocess.CompletedProcess:
    f = tmp_path / "report.html"
    f.write_text(page, encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", *args, f.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _console(stderr: str) -> list:
    return [m.group(0) for m in CONSOLE.finditer(stderr)]


@needs_chromium
def test_console_errors_are_seen(tmp_path):
    """The check below would notice a script error: a page with one is caught."""
    got = _chromium(tmp_path, "<!DOCTYPE html><p>x</p><script>noSuchFunction()</script>", "--dump-dom")
    assert any("noSuchFunction" in line for line in _console(got.stderr)), got.stderr[-2000:]


@needs_chromium
def test_page_loads_without_console_errors_and_charts_are_in_the_dom(tmp_path):
    r = sample_report()
    x = r["endpoints"][0]["regressions"][2]["examples"][0]
    x["candidate"] = "HTTP/1.1 200 OK\r\n\r\n" + XSS_SCRIPT + XSS_IMG
    x["uri"] = "/?" + XSS_IMG
    got = _chromium(tmp_path, H.render(r), "--dump-dom")
    assert got.returncode == 0, got.stderr[-2000:]
    assert _console(got.stderr) == [], _console(got.stderr)
    assert "XSS" not in got.stderr
    dom = _parse(got.stdout)
    tags = [t for t, _ in dom.tags]
    assert tags.count("svg") == 4 and tags.count("polyline") >= 4 and tags.count("circle") >= 20
    assert tags.count("img") == 0 and tags.count("script") == 1
    # the script ran: it shows the endpoint filter, which the page holds hidden without it
    assert not any(t == "input" and "hidden" in a for t, a in dom.tags if a.get("id") == "filter")


def _png_pixels(data: bytes):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


@needs_chromium
def test_screenshot_shows_the_charts(tmp_path):
    png = tmp_path / "shot.png"
    got = _chromium(tmp_path, H.render(sample_report()), f"--screenshot={png}")
    assert png.exists(), got.stderr[-2000:]
    assert _console(got.stderr) == [], _console(got.stderr)
    w, h, bpp, rows = _png_pixels(png.read_bytes())
    assert (w, h) == (1280, 2000)
    colours: dict = {}
    for row in rows[::2]:
        for i in range(0, len(row), bpp * 2):
            px = row[i:i + 3]
            colours[px] = colours.get(px, 0) + 1
    assert len(colours) > 50, "the page looks blank"
    white = colours.get(b"\xff\xff\xff", 0)
    assert white < 0.97 * sum(colours.values())

    def near(hexcolour, tol=40):
        want = bytes.fromhex(hexcolour[1:])
        return sum(n for px, n in colours.items() if all(abs(px[k] - want[k]) <= tol for k in range(3)))

    # the candidate's and the baseline's curves and the red/green change bars are on the screen
    assert near(svg.RUN_COLOURS["candidate"]) > 100
    assert near(svg.RUN_COLOURS["baseline"]) > 100
    assert near(svg.SLOWER) > 50 and near(svg.FASTER) > 20
