"""``replay report``: which endpoints of a replay got slower, fail or answer differently."""

from __future__ import annotations

import click

# the keys of a rules file's [report] table: option name -> (kind, repeatable, (min, max))
REPORT_KEYS = {"endpoint": (str, True, None), "ignore": (str, True, None),
               "unordered-arrays": (bool, False, None), "fail-on": (str, True, None),
               "relative-threshold": (float, False, (0, 100)),
               "absolute-threshold": (float, False, (0, 100)),
               "latency-threshold": (float, False, (0, 10_000)),
               "latency-min-ms": (float, False, (0, 3_600_000)),
               "min-count": (int, False, (1, 1 << 40))}


@click.command("report")
@click.argument("candidate", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-b", "--baseline", type=click.Path(dir_okay=False),
              help="A run of the same log against the release in production (replay play -o). "
                   "Default: the recorded responses inside CANDIDATE.")
@click.option("--noise", type=click.Path(dir_okay=False),
              help="A second run against the baseline's release: what differs between the two "
                   "is noise, not regression.")
@click.option("--target", "target", metavar="URL",
              help="For a log of replay shadow with several targets: whose answers are the "
                   "candidate (as given to shadow: http://v2:8080).")
@click.option("--baseline-target", metavar="URL",
              help="The same for --baseline; the baseline may be the candidate's own shadow log "
                   "(two releases shadowed at once).")
@click.option("--noise-target", metavar="URL", help="The same for --noise.")
@click.option("--endpoint", "endpoint_rules", multiple=True, metavar="REGEX=NAME",
              help="Name the requests whose path matches REGEX (repeatable; first match wins). "
                   "Other paths are grouped with ids templated: /users/{id}.")
@click.option("--ignore", multiple=True, metavar="PATTERN",
              help="Do not compare: json:$.ts, json:$..updated_at, json:$.items[*].etag, "
                   "header:X-Trace, body (repeatable).")
@click.option("--unordered-arrays", is_flag=True, default=None,
              help="Compare JSON arrays without regard to the order of their elements.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write the report as one self-contained HTML file.")
@click.option("--fail-on", multiple=True, metavar="RULE",
              help="Exit 3 when breached: regression, status, error, latency, body, header, "
                   "p99>+20%, p50>+5ms, 5xx>0.1%, errors>0 (repeatable).")
@click.option("--relative-threshold", type=click.FloatRange(*REPORT_KEYS["relative-threshold"][2]), metavar="PCT",
              help="Noise rule: how much more often than in the noise run a field must differ "
                   "(|raw-noise|/(raw+noise), percent). [default: 20]")
@click.option("--absolute-threshold", type=click.FloatRange(*REPORT_KEYS["absolute-threshold"][2]), metavar="PCT",
              help="Noise rule: the least share of an endpoint's exchanges that must differ. "
                   "[default: 0.03]")
@click.option("--latency-threshold", type=click.FloatRange(*REPORT_KEYS["latency-threshold"][2]), metavar="PCT",
              help="How much slower (percent) p50/p90/p99 must get to count. [default: 20]")
@click.option("--latency-min-ms", type=click.FloatRange(*REPORT_KEYS["latency-min-ms"][2]), metavar="MS",
              help="...and by at least this many milliseconds. [default: 1]")
@click.option("--min-count", type=click.IntRange(*REPORT_KEYS["min-count"][2]), metavar="N",
              help="Exchanges an endpoint needs on each side for a latency verdict. [default: 20]")
@click.option("--rules", "rule_file", type=click.Path(dir_okay=False), metavar="FILE.toml",
              help="Read these options from the [report] table of a rules file.")
@click.option("-j", "--workers", type=click.IntRange(0, 64), default=0, show_default=True, metavar="N",
              help="Processes that share the pass (0: one per CPU, at most 4; one per 65,536 exchanges at most).")
@click.option("-q", "--quiet", is_flag=True, help="No table on the terminal (the gate still decides the exit code).")
def command(candidate, baseline, noise, target, baseline_target, noise_target, endpoint_rules, ignore, unordered_arrays, json_path,
            html_path, fail_on, relative_threshold, absolute_threshold, latency_threshold,
            latency_min_ms, min_count, rule_file, workers, quiet):
    """Compare CANDIDATE, a run written by `replay play -o` (or `replay shadow -o`), with what
    was recorded (in production) or with a baseline run, endpoint by endpoint. Several
    CANDIDATE logs of play (the replayers of one Kafka group, N hosts) are merged into one run.

    \b
      replay report candidate.rlog
      replay report candidate.rlog --baseline primary.rlog --noise secondary.rlog --html report.html
      replay report candidate.rlog --baseline primary.rlog --fail-on regression   # exit 3
      replay report run-host1.rlog run-host2.rlog                                  # merged
      replay report host1.json host2.json --json all.json    # --report files of play, merged
      replay report shadow.rlog --target http://v2:8080 --baseline shadow.rlog --baseline-target http://v1:8080

    Exit status: 0 when the gate holds (or no --fail-on), 3 when it is breached, 2 on bad input.
    Runs of more than about 250,000 exchanges are indexed in temporary files (in $TMPDIR, up to
    64 bytes an exchange), so that memory stays flat whatever their size.
    """
    import json
    import time

    from replay.analysis.verdict import Thresholds, parse_gate
    from replay.errors import UsageError

    for opt, value, log in (("--baseline-target", baseline_target, baseline),
                            ("--noise-target", noise_target, noise)):
        if value and not log:
            raise UsageError(f"{opt}: give {opt[:-7]} LOG too")
    from replay.outputs import LOG_MODE, Outputs

    candidates = list(candidate)
    reports = _play_reports(candidates)
    if reports is not None:
        return _merge_play_reports(candidates, reports, json_path, quiet,
                                   baseline or noise or target or html_path or fail_on)
    outputs = Outputs({k: v for k, v in (*((f"the candidate {c}", c) for c in candidates),
                                         ("--baseline", baseline), ("--noise", noise),
                                         ("--rules", rule_file)) if v})
    # 0600 as the logs: examples carry the captured bodies, cookies and authorization headers
    out_json = outputs.atomic(json_path, "--json", mode=LOG_MODE) if json_path else None
    out_html = outputs.atomic(html_path, "--html", mode=LOG_MODE) if html_path else None
    opts = _from_rules_file(rule_file) if rule_file else {}
    endpoint_rules = list(opts.get("endpoint", ())) + list(endpoint_rules)
    ignore = list(opts.get("ignore", ())) + list(ignore)
    fail_on = list(opts.get("fail-on", ())) + list(fail_on)
    if unordered_arrays is None:
        unordered_arrays = bool(opts.get("unordered-arrays", False))
    th = Thresholds()
    for name, attr, value in (("relative-threshold", "relative", relative_threshold),
                              ("absolute-threshold", "absolute", absolute_threshold),
                              ("latency-threshold", "latency_rel", latency_threshold),
                              ("latency-min-ms", "latency_abs_ms", latency_min_ms),
                              ("min-count", "min_count", min_count)):
        v = value if value is not None else opts.get(name)
        if v is not None:
            setattr(th, attr, v)
    gates = [parse_gate(g) for g in fail_on]
    t0 = time.perf_counter()
    with outputs.open():       # a bad or busy path fails here, before the logs are read
        targets = {"candidate": target, "baseline": baseline_target, "noise": noise_target}
        with _merged(candidates) as candidate:
            report, breaches = _analyse(candidate, baseline, noise, endpoint_rules, ignore,
                                        unordered_arrays, th, gates, t0, targets, workers or None)
        if len(candidates) > 1:
            report["merged_from"] = candidates
        if out_json is not None:
            out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
        if out_html is not None:
            from replay.analysis.html import render

            out_html.write_text(render(report))
    for w in report["warnings"]:
        click.echo(f"replay: warning: {w}", err=True)
    if not quiet:
        from replay.analysis.text import render_text

        render_text(report)
    for b in breaches:
        click.echo(f"replay report: gate breached: {b}", err=True)
    return 3 if breaches else 0


def _play_reports(paths: list):
    """The --report files of ``replay play`` among ``paths`` (JSON, read), None when they are
    logs; a UsageError when the two are mixed."""
    import json

    from replay.errors import InputError, UsageError

    found = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                head = f.read(1)
                if head != b"{":
                    found.append(None)
                    continue
                f.seek(0)
                found.append(json.load(f))
        except OSError:
            found.append(None)          # the logs' reader says what is wrong with it
            continue
        except ValueError as e:
            raise InputError(f"{p}: not a log, and not JSON ({e})") from None
    if all(r is None for r in found):
        return None
    if any(r is None for r in found):
        raise UsageError("give logs of replay play -o, or --report files of replay play, not both")
    return found


def _merge_play_reports(paths, reports, json_path, quiet, other) -> int:
    """``replay report a.json b.json``: the --report files of replayers that ran side by side
    (a Kafka group), merged: counts added, latency and lateness histograms added exactly,
    requests/s all answers over the window from the first send of any to the last answer of any
    (runs made one after another count the time between them)."""
    import json

    from replay.errors import InputError, UsageError
    from replay.outputs import Outputs
    from replay.play.report import merge_reports, summary_text

    if other:
        raise UsageError("--report files are merged, not compared: --baseline, --noise, "
                         "--target, --html and --fail-on are for logs of replay play -o")
    try:
        merged = merge_reports(reports, paths)
    except ValueError as e:
        raise InputError(str(e)) from None
    outputs = Outputs({f"the report {p}": p for p in paths})
    out = outputs.atomic(json_path, "--json") if json_path else None
    with outputs.open():
        if out is not None:
            out.write_text(json.dumps(merged, indent=2) + "\n")
    if not quiet:
        click.echo(f"{len(paths)} reports merged")
        click.echo(summary_text(merged))
    return 0


class _merged:
    """One candidate path: itself; several: their merge (``analysis.runs.merge_runs``) in a
    temporary file, removed after the analysis."""

    def __init__(self, paths: list):
        self.paths = paths
        self.tmp = None

    def __enter__(self) -> str:
        if len(self.paths) == 1:
            return self.paths[0]
        import os
        import tempfile

        from replay.analysis.runs import merge_runs

        self.tmp = tempfile.TemporaryDirectory(prefix="replay-report-")
        name = "+".join(os.path.basename(p) for p in self.paths[:3])[:100]
        return merge_runs(self.paths, os.path.join(self.tmp.name, name))

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def _analyse(candidate, baseline, noise, endpoint_rules, ignore, unordered_arrays, th, gates, t0,
             targets=None, workers=None):
    import time

    from replay.analysis.compare import Analysis
    from replay.analysis.verdict import gate_breaches
    from replay.pipeline import allocator_for_scans

    allocator_for_scans()
    analysis = Analysis(candidate, baseline, noise, endpoint_rules=endpoint_rules, ignore=ignore,
                        unordered=unordered_arrays, thresholds=th, targets=targets)
    report = analysis.run(workers)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    breaches = gate_breaches(gates, report, th.min_count)
    report["gate"] = {"rules": [g.text for g in gates], "breached": breaches,
                      "exit_code": 3 if breaches else 0}
    return report, breaches


def _from_rules_file(path: str) -> dict:
    from replay.errors import UsageError
    from replay.rules.rulesfile import read_toml

    table = read_toml(path).get("report", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: 'report' must be a table ([report])")
    out = {}
    for key, value in table.items():
        k = key.replace("_", "-")
        if k not in REPORT_KEYS:
            raise UsageError(f"{path}: [report]: unknown key '{key}' (known: {', '.join(REPORT_KEYS)})")
        typ, many, bounds = REPORT_KEYS[k]
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not many:
            raise UsageError(f"{path}: [report]: '{key}' takes one value, not a list")
        for v in values:
            ok = isinstance(v, typ) and not (typ is not bool and isinstance(v, bool)) or \
                (typ is float and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise UsageError(f"{path}: [report]: '{key}' must be {typ.__name__}, not {v!r}")
            if bounds is not None and not bounds[0] <= v <= bounds[1]:
                raise UsageError(f"{path}: [report]: '{key}' = {v!r} is out of range "
                                 f"({bounds[0]} to {bounds[1]})")
        out[k] = values if many else value
    return out
