"""Harness: rules files (``replay.rules.rulesfile``) and the rules they make, on fuzzed messages.

Input: the TOML text, a NUL byte, then the bytes of one HTTP message. The text is loaded as a
rules file from disk; its settings become ``Rules`` (every filter and rewrite parses its value:
regexes, status ranges, times, sample rates, header rules); then the rules run on the message as
a request and as its response (filters, rewrites, redaction of form and JSON bodies). The
``plugin`` and ``middleware`` keys are left out: they import modules and start processes named
by the file, which is what they are for. Only ``ReplayError`` may escape; every call returns.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: this checkout's replay


import atheris

with atheris.instrument_imports(include=["replay"]):
    from replay.errors import ReplayError
    from replay.events import KIND_REQUEST, KIND_RESPONSE, Message
    from replay.httpmsg import head_end
    from replay.rules import filters, rewrites, rulesfile  # noqa: F401 (instrumented for Rules)
    from replay.rules.ruleset import Rules

from fuzz._common import scratch_file, T0, capture_messages, capture_paths, main

_PATH, _write = scratch_file(".toml")
SKIPPED = {"plugin", "middleware", "middleware-on-error"}
MAX_MESSAGE = 4096  # a fuzzed regex may backtrack for long: it is the user's own, on short text


def messages(data: bytes):
    hl = max(0, head_end(data))
    req = Message(KIND_REQUEST, 0, 0, T0, T0 + 10, ("10.0.0.1", 40000), ("10.0.0.2", 80), 0,
                  data, "GET", "/", 0, len(data) - hl, hl)
    resp = Message(KIND_RESPONSE, 0, 0, T0 + 1000, T0 + 2000, ("10.0.0.1", 40000), ("10.0.0.2", 80),
                   0, data, "GET", "/", 200, len(data) - hl, hl)
    return [req, resp]


def TestOneInput(data: bytes) -> None:
    toml, _, msg = data.partition(b"\0")
    _write(bytes(toml))
    try:
        settings = [s for s in rulesfile.load(_PATH) if s.key not in SKIPPED]
        rules = Rules(settings)
        rules.describe()
        for m in rules.apply(messages(msg[:MAX_MESSAGE])):
            pass
    except ReplayError:
        pass


TOMLS = (
    b"""method = ["GET", "POST"]\npath_exclude = '\\.png$'\nstatus = "2xx,304"\nsince = "+0.01s"\n"""
    b"""header-exclude = ["Accept-Encoding: gzip"]\nrewrite-path = "^/api/:/v2/"\n""",
    b"""set-query = ["shadow=1"]\nremove_query = "ref"\nset-header = ["X-Shadow: 1"]\n"""
    b"""remove-header = ["User-Agent"]\nrewrite-body = ["alice:bob"]\n""",
    b"""redact = true\nredact-field = ["password", "card"]\nredact-key = "k"\nredact-header = ["cookie"]\n""",
    b"""host = "*.example.com:8080"\nheader = ["Content-Type: ^application/(json|x-www-form-urlencoded)"]\n"""
    b"""status-exclude = [404, 500]\nsample = 50\nlimit = 3\nuntil = "@1700000001"\n""",
    b"""rewrite-path = ['^/(\\w+)/(\\d+):/$2/\\1', "a\\\\:b:c"]\nstatus = "200-299"\nsample = "10%"\n""",
)
BODIES = (
    b"POST /login?ref=x&a=1 HTTP/1.1\r\nHost: a.example.com:8080\r\nContent-Type: application/json\r\n"
    b"Content-Length: 44\r\n\r\n{\"user\": \"alice\", \"password\": \"s\\u00e9cret\"}",
    b"POST /api/form HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Cookie: a=b\r\n\r\ncard=4111&name=alice+b%20c",
)


def seeds():
    for i, t in enumerate(TOMLS):
        for b in BODIES:
            yield t + b"\0" + b
    n = 0
    for path in capture_paths(shared=False):
        for m in capture_messages(path)[:6]:
            yield TOMLS[n % len(TOMLS)] + b"\0" + m.data[:MAX_MESSAGE]
            n += 1


if __name__ == "__main__":
    main(TestOneInput)
