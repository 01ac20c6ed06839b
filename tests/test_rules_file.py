"""Rules files: the same rules as the flags, and one clear line for what is wrong in them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from replay.errors import UsageError
from replay.log import LogReader
from replay.rules import rulesfile
from replay.rules.options import OPTIONS
from replay.rules.ruleset import Rules
from tests.conftest import ROOT

SAMPLE = ROOT / "captures" / "sample.pcap"


def replay(*args):
    p = subprocess.run([sys.executable, "-m", "replay.cli.main", *map(str, args)],
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert "Traceback" not in p.stderr, p.stderr
    return p


FLAGS = ["--method", "GET", "--method", "POST", "--path-exclude", r"\.png$", "--status", "2xx,304",
         "--since", "+0.01s", "--header-exclude", "Accept-Encoding: gzip",
         "--rewrite-path", "^/api/:/v2/", "--set-query", "shadow=1", "--remove-query", "ref",
         "--set-header", "X-Shadow: 1", "--remove-header", "User-Agent",
         "--rewrite-body", "alice:bob", "--redact", "--redact-field", "password", "--redact-key", "k"]

TOML = r"""
# the same scenario as FLAGS
method = ["GET", "POST"]
path_exclude = '\.png$'
status = "2xx,304"
since = "+0.01s"
header-exclude = ["Accept-Encoding: gzip"]
rewrite-path = "^/api/:/v2/"
set-query = ["shadow=1"]
remove_query = "ref"
set-header = ["X-Shadow: 1"]
remove-header = ["User-Agent"]
rewrite-body = ["alice:bob"]
redact = true
redact-field = ["password"]
redact-key = "k"
"""


def messages(path):
    return [(m.kind, m.conn, m.index, m.data) for m in LogReader(path)]


def test_rules_file_equals_flags(tmp_path):
    rules = tmp_path / "scenario.toml"
    rules.write_text(TOML)
    a, b = tmp_path / "a.rlog", tmp_path / "b.rlog"
    pa = replay("filter", SAMPLE, "-o", a, *FLAGS)
    pb = replay("filter", SAMPLE, "-o", b, "--rules", rules)
    assert pa.returncode == 0 and pb.returncode == 0, pa.stderr + pb.stderr
    assert messages(a) == messages(b) and len(messages(a)) > 10
    assert any(b"X-Shadow: 1" in d for _, _, _, d in messages(a))
    ra, rb = LogReader(a).meta["rules"], LogReader(b).meta["rules"]
    assert ra == rb and ra["redact-key"] == "(hidden)" and ra["method"] == ["GET", "POST"]


def test_flags_add_to_the_file(tmp_path):
    rules = tmp_path / "r.toml"
    rules.write_text('method = "POST"\nlimit = 5\nsample = "50%"\n')
    settings = rulesfile.merge(rulesfile.load(str(rules)),
                               rulesfile.settings_from_table({"method": "PUT", "limit": 2}, None))
    r = Rules(settings)
    assert r.filters.limit == 2
    methods = [f for f in r.filters.filters if f.key == "method"][0].methods
    assert methods == {"POST", "PUT"}
    out = tmp_path / "o.rlog"
    p = replay("filter", SAMPLE, "-o", out, "--rules", rules, "--method", "PUT", "--limit", "2")
    assert p.returncode == 0, p.stderr
    assert {m.method for m in LogReader(out)} <= {"POST", "PUT"}


@pytest.mark.parametrize("text, expect", [
    ("path_includ = '^/a'", "unknown key 'path_includ' (did you mean 'path-include'?)"),
    ("[filter]\nmethod = 'GET'", "unknown key 'filter'"),
    ("limit = '5'", "'limit' must be an integer, not str"),
    ("limit = [1, 2]", "'limit' takes one value, not a list"),
    ("redact = 'yes'", "'redact' must be true or false"),
    ("method = 3", "'method' must be a string or a list of strings, not an integer"),
    ("method = [", "not valid TOML"),
    ("path-include = '(['", "path-include = '([': invalid regex"),
    ("header = ['X-A 1']", "header = 'X-A 1': expected 'Name: regex'"),
    ("sample = '200%'", "sample = '200%': not a percentage"),
])
def test_bad_rules_files_are_one_line(tmp_path, text, expect):
    rules = tmp_path / "bad.toml"
    rules.write_text(text + "\n")
    p = replay("filter", SAMPLE, "--dry-run", "--rules", rules)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(rules) in lines[0] and expect in lines[0], p.stderr


def test_numbers_where_they_are_natural():
    r = Rules(rulesfile.settings_from_table({"status": [200, 404], "sample": 10, "status_exclude": 404},
                                            "f.toml"))
    status = [f for f in r.filters.filters if f.key == "status"][0]
    assert status.lut[200] and status.lut[404] and not status.lut[201]
    assert [f for f in r.filters.filters if f.key == "sample"][0].fraction == 0.1


def test_missing_rules_file(tmp_path):
    p = replay("filter", SAMPLE, "--dry-run", "--rules", tmp_path / "nope.toml")
    assert p.returncode == 2 and "nope.toml: no such rules file" in p.stderr


def test_every_option_is_a_flag_and_a_key():
    # one registry: each option appears in filter's --help and is accepted in a rules file
    helptext = replay("filter", "--help").stdout
    for opt in OPTIONS:
        assert f"--{opt.key}" in helptext
        value = True if opt.kind == "flag" else (3 if opt.kind == "int" else "x")
        rulesfile.settings_from_table({opt.key.replace("-", "_"): value}, "f.toml")
    with pytest.raises(UsageError):
        rulesfile.settings_from_table({"rules": "other.toml"}, "f.toml")
