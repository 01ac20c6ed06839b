"""Endpoints: requests grouped as ``METHOD /path/template``, a handful of groups, not every URL.

Rules:
- the query string and the fragment are not part of the endpoint; an absolute-form target
  (``http://host/path?q``) keeps its path; ``*`` and authority-form targets stay as they are;
- ``--endpoint 'REGEX=NAME'`` rules come first, in the order given: the first whose REGEX is
  found in the path names the group ``METHOD NAME``;
- otherwise each path segment that looks like an identifier becomes ``{id}``: digits (with
  separators, as in dates), UUIDs, hex strings of 16 characters or more with a digit, and tokens
  of 20 characters or more of the base64/url-safe alphabet mixing letters and digits. Words,
  however long, stay: ``/api/authentication-settings`` is its own endpoint;
- at most ``max_endpoints`` distinct endpoints are kept; requests that would make more are
  grouped as ``METHOD (other)`` and counted, so that memory stays bounded whatever the URLs.
"""

from __future__ import annotations

import re

from replay.errors import UsageError

OTHER = "(other)"

_NUMERIC = re.compile(r"[0-9][0-9.,:_\-]*")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{16,}")
_TOKEN = re.compile(r"[A-Za-z0-9_\-+=~.%]{20,}")
_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")


def looks_like_id(seg: str) -> bool:
    if not seg:
        return False
    if seg.isdigit():
        return True
    got = _WORDS.get(seg)
    if got is not None:
        return got
    got = _looks_like_id(seg)
    if len(_WORDS) < 20_000:
        _WORDS[seg] = got
    return got


_DIGITS = re.compile(r"(?<=/)[0-9]+(?=/|$)")
_WORDS: dict = {}     # segments seen, with their verdict (most repeat: api, users, v2...)


def _looks_like_id(seg: str) -> bool:
    if _NUMERIC.fullmatch(seg) or _UUID.fullmatch(seg):
        return True
    if _HEX.fullmatch(seg) and _DIGIT.search(seg):
        return True
    return bool(_TOKEN.fullmatch(seg) and _DIGIT.search(seg) and _LETTER.search(seg))


def path_of(uri: str | None) -> str:
    """The path of a request-target: no query, no fragment, no scheme and authority."""
    if not uri:
        return "/"
    if uri[0] != "/":
        i = uri.find("://")
        if i > 0:
            j = uri.find("/", i + 3)
            uri = uri[j:] if j >= 0 else "/"
        else:
            return uri          # "*" (OPTIONS) or host:port (CONNECT)
    for sep in ("?", "#"):
        k = uri.find(sep)
        if k >= 0:
            uri = uri[:k]
    return uri or "/"


def template(path: str) -> str:
    if path[:1] != "/":
        return path
    return "/".join("{id}" if looks_like_id(s) else s for s in path.split("/"))


def parse_rule(text: str) -> tuple:
    """``REGEX=NAME`` -> (compiled regex, name). The last ``=`` separates them."""
    regex, sep, name = text.rpartition("=")
    if not sep or not regex or not name.strip():
        raise UsageError(f"--endpoint {text!r}: expected REGEX=NAME (e.g. '^/api/users/[^/]+$=/api/users/{{user}}')")
    try:
        return re.compile(regex), name.strip()
    except re.error as e:
        raise UsageError(f"--endpoint {text!r}: bad regular expression: {e}") from None


class Endpoints:
    """``name(method, uri)``: the endpoint of a request. Cached per (method, path)."""

    def __init__(self, rules=(), max_endpoints: int = 500):
        self.rules = [parse_rule(r) if isinstance(r, str) else r for r in rules]
        self.max_endpoints = max_endpoints
        self.seen: set = set()
        self.others = 0
        self._cache: dict = {}

    def name(self, method: str | None, uri: str | None) -> str:
        method = method or "?"
        path = path_of(uri)
        # without rules only the template counts: the all-digit segments (ids whatever else the
        # path holds) are replaced first, so the paths of one endpoint share one cache entry
        key = (method, path if self.rules else _DIGITS.sub("{id}", path))
        got = self._cache.get(key)
        if got is not None:
            if got.endswith(OTHER):
                self.others += 1
            return got
        for rx, nm in self.rules:
            if rx.search(path):
                ep = f"{method} {nm}"
                break
        else:
            ep = f"{method} {template(path)}"
        if ep not in self.seen:
            if len(self.seen) >= self.max_endpoints:
                ep = f"{method} {OTHER}"
            self.seen.add(ep)
        if ep.endswith(OTHER):
            self.others += 1          # requests grouped as (other)
        if len(self._cache) > 20_000:
            self._cache.clear()
        self._cache[key] = ep
        return ep
