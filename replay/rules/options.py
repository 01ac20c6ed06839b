"""Every rule option, registered once: its name, its value, its help, and the class that owns it.

The command-line flags of ``filter``, ``play`` and ``capture`` (``replay/cli/ruleopts.py``) and the
keys of a rules file (``rulesfile.py``) are both made from ``OPTIONS``, so a rule means the same
thing wherever it is written. ``owner`` names the class in this package that turns the option's
values into a rule (``Class.from_settings``); ``ruleset.Rules`` builds them in the order listed,
which for rewrites is the order they run in.

Importing this module is cheap (no numpy): the CLI reads it to build ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass

FLAG, TEXT, INT = "flag", "text", "int"


@dataclass(frozen=True)
class Option:
    key: str                 # the flag without its dashes, and the rules-file key
    kind: str                # FLAG (true/false), TEXT or INT
    multiple: bool           # repeatable flag; a list in a rules file
    owner: str               # "module.Class" in replay.rules
    metavar: str | None
    help: str
    choices: tuple = ()


@dataclass(frozen=True)
class Setting:
    """One value of one option, and where the user wrote it (for error messages)."""

    key: str
    value: object
    origin: str | None = None    # None: a command-line flag; else the rules file's path

    def where(self) -> str:
        """How the user wrote it: ``--path-include '(['`` or ``rules.toml: path-include = '(['``."""
        if self.origin is None:
            if self.value is True:
                return f"--{self.key}"
            text = str(self.value)
            if any(c < " " or c == "\x7f" for c in text):
                return f"--{self.key} $'{repr(text)[1:-1]}'"    # one line, as bash would quote it
            import shlex

            return f"--{self.key} {shlex.quote(text)}"
        if isinstance(self.value, bool):
            return f"{self.origin}: {self.key} = {'true' if self.value else 'false'}"
        return f"{self.origin}: {self.key} = {self.value!r}"


OPTIONS = (
    # -- filters: which exchanges stay (a request and its responses stay or go together) ------
    Option("method", TEXT, True, "filters.MethodFilter", "METHOD",
           "Keep requests with this method (repeatable, or GET,POST; any of them)."),
    Option("path-include", TEXT, True, "filters.PathFilter", "REGEX",
           "Keep requests whose request-target (path and query) matches this regex (repeatable: any)."),
    Option("path-exclude", TEXT, True, "filters.PathFilter", "REGEX",
           "Drop requests whose request-target matches this regex (repeatable)."),
    Option("host", TEXT, True, "filters.HostFilter", "HOST",
           "Keep requests whose Host is HOST (case-insensitive; * wildcards; the port is ignored "
           "unless given; repeatable: any)."),
    Option("header", TEXT, True, "filters.HeaderFilter", "'NAME: REGEX'",
           "Keep requests with a header NAME whose value matches REGEX (repeatable: all)."),
    Option("header-exclude", TEXT, True, "filters.HeaderFilter", "'NAME: REGEX'",
           "Drop requests with a header NAME whose value matches REGEX (repeatable)."),
    Option("status", TEXT, True, "filters.StatusFilter", "CODES",
           "Keep exchanges whose recorded response status is one of CODES: 200, 5xx, 200-299, "
           "or a comma-separated list (repeatable). Exchanges without a response are dropped."),
    Option("status-exclude", TEXT, True, "filters.StatusFilter", "CODES",
           "Drop exchanges whose recorded response status is one of CODES."),
    Option("since", TEXT, False, "filters.TimeFilter", "TIME",
           "Keep exchanges whose request started at or after TIME: ISO 8601 "
           "(2024-05-01T12:00:00Z; local time without a zone), @UNIX_SECONDS, or +OFFSET from "
           "the first message (+10s, +1.5m, +250ms)."),
    Option("until", TEXT, False, "filters.TimeFilter", "TIME",
           "Keep exchanges whose request started before TIME (same forms as --since)."),
    Option("sample", TEXT, False, "filters.SampleFilter", "N%",
           "Keep N percent of the connections, chosen by a stable hash of the connection id, "
           "so sampled sessions stay whole."),
    Option("limit", INT, False, "filters.Limit", "N",
           "Keep the first N exchanges that pass the other filters, in the order they appear."),
    # -- rewrites, in the order they run; on requests (redaction: on responses too) ------------
    Option("rewrite-path", TEXT, True, "rewrites.RewritePath", "'REGEX:REPLACEMENT'",
           "Replace matches of REGEX in the path and query of the request-target ($1 or \\1 "
           "for groups; \\: for a colon inside REGEX)."),
    Option("remove-query", TEXT, True, "rewrites.QueryRewrite", "NAME",
           "Remove the query parameter NAME."),
    Option("set-query", TEXT, True, "rewrites.QueryRewrite", "NAME=VALUE",
           "Set the query parameter NAME to VALUE (added when missing)."),
    Option("remove-header", TEXT, True, "rewrites.RemoveHeader", "NAME", "Remove the header NAME."),
    Option("set-header", TEXT, True, "rewrites.SetHeader", "'NAME: VALUE'",
           "Set the header NAME to VALUE (added when missing). In play, a Host set here is sent "
           "instead of the target's."),
    Option("rewrite-body", TEXT, True, "rewrites.RewriteBody", "'REGEX:REPLACEMENT'",
           "Replace matches of REGEX in request bodies; Content-Length follows, a chunked body "
           "is re-chunked."),
    Option("redact", FLAG, False, "rewrites.Redact", None,
           "Replace secrets by stable placeholders (redacted-<hash>): Authorization, "
           "Proxy-Authorization, Cookie and Set-Cookie values, X-Api-Key, and what "
           "--redact-header and --redact-field name. Requests and responses."),
    Option("redact-header", TEXT, True, "rewrites.Redact", "NAME",
           "Also redact the header NAME (implies --redact)."),
    Option("redact-field", TEXT, True, "rewrites.Redact", "NAME",
           "Also redact the field NAME in JSON and form bodies and in query strings "
           "(case-insensitive; implies --redact)."),
    Option("redact-key", TEXT, False, "rewrites.Redact", "KEY",
           "Key of the placeholders' HMAC, so that two runs give the same placeholders "
           "(default: a random key per run)."),
    # -- outside code, after filters and rewrites ----------------------------------------------
    Option("middleware", TEXT, False, "ruleset.MiddlewareSpec", "COMMAND",
           "Pipe every message through this process, speaking GoReplay's middleware protocol."),
    Option("middleware-on-error", TEXT, False, "ruleset.MiddlewareSpec", "stop|skip",
           "When the middleware crashes or writes garbage: stop the run (default) or go on "
           "without it.", choices=("stop", "skip")),
    Option("plugin", TEXT, True, "ruleset.PluginSpec", "MODULE:FUNCTION",
           "Pass every message through this Python function (repeatable; in order)."),
)

BY_KEY = {o.key: o for o in OPTIONS}


def normal_key(key: str) -> str:
    """``path_include`` and ``path-include`` are the same key."""
    return key.replace("_", "-")
