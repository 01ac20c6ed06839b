"""Rewrites: change the bytes of the messages that stay.

Rules they keep:

- each rewrite is a small class with ``apply(msg) -> msg``; it returns the very same object when it
  changes nothing, and otherwise ``httpmsg.with_data(msg, new_bytes)`` (method, target, head and
  body lengths and the chunked flag follow the bytes; conn, index, times and flags stay);
- they run in the order of ``options.OPTIONS``: --rewrite-path, --remove-query, --set-query,
  --remove-header, --set-header, --rewrite-body, then --redact last, so that nothing a rule adds
  escapes redaction;
- all but --redact change requests only; --redact changes responses too (Set-Cookie, JSON fields);
- header edits keep every other byte of the head (``httpmsg`` editing rules);
- a rewritten request-target holds only what RFC 9112 §3.2 allows (RFC 3986 path and query
  characters, ``%`` escapes included): the literal part of a --rewrite-path replacement is
  checked at start (a space or line break there is a usage error, not percent-encoded: the rule
  says what to send, and guessing an encoding would hide the mistake); on each message, a result
  with a character the rule brought in that is not allowed (CR and LF never are), from a group
  captured elsewhere or a regex that joins odd bytes, is refused: the request keeps its target
  and the refusal is counted (``refused``);
- a body that changes gets a true length: with Content-Length, its value moves by as many bytes
  as the body did (so a body cut by the capture keeps its recorded promise); a chunked body is
  decoded, changed, and sent again as one chunk followed by the original trailers; a chunked body
  cut before its last chunk is left alone. A body with Content-Encoding gzip or deflate is
  decoded for the body rules and encoded again with the same coding when they change it (so a
  secret inside gzip'd JSON is redacted too); other codings (br, zstd, stacked codings),
  bodies that do not decode and bodies that decode to more than ``MAX_DECODED`` (64 MiB) are
  left alone;
- redaction replaces a secret by ``redacted-`` and the first 12 hex digits of its HMAC-SHA256 under
  one key (``--redact-key``, else random per run), so equal secrets get equal placeholders and a
  session cookie set by a response matches the cookie the next requests send.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
import re
import zlib
from typing import Protocol, runtime_checkable
from urllib.parse import unquote_plus, unquote_to_bytes

from replay.errors import UsageError
from replay.events import KIND_REQUEST
from replay.httpmsg import (decode_chunked, encode_chunked, field_spans, header_value, is_chunked,
                            remove_header, set_header, split_head, with_data)
from replay.rules.filters import TOKEN, _compile, parse_header_rule


@runtime_checkable
class Rewrite(Protocol):
    key: str
    responses: bool          # also applied to responses

    def apply(self, msg): ...


# -- helpers ---------------------------------------------------------------------------------------


def split_rule(s, what: str = "REGEX:REPLACEMENT"):
    """(regex, replacement) of ``regex:replacement``: the first colon that is neither escaped
    (``\\:``, which the regex then reads as a colon) nor part of a group's syntax (``(?:``,
    ``(?i:``) separates them."""
    text = str(s.value)
    i = 0
    while True:
        i = text.find(":", i)
        if i < 0:
            raise UsageError(f"{s.where()}: expected '{what}'")
        if (i > 0 and text[i - 1] == "\\" and not _escaped_backslash(text, i - 1)) or \
                re.search(r"(?<!\\)\(\?[aiLmsux-]*$", text[:i]):
            i += 1
            continue
        return text[:i], text[i + 1:]


def _escaped_backslash(text: str, j: int) -> bool:
    """True when the backslash at ``j`` is itself escaped (an even run before the colon)."""
    n = 0
    while j >= 0 and text[j] == "\\":
        n += 1
        j -= 1
    return n % 2 == 0


_DOLLAR = re.compile(r"\$(?:(\d+)|\{(\w+)\}|(\$))")


def replacement(text: str) -> str:
    """GoReplay's ``$1`` / ``${name}`` (and ``$$`` for a dollar) in Python's ``re.sub`` syntax;
    ``\\1`` and ``\\g<name>`` work as they are."""
    def sub(m):
        if m.group(3):
            return "$"
        return "\\g<" + (m.group(1) or m.group(2)) + ">"
    return _DOLLAR.sub(sub, text)


def start_line(data: bytes):
    """(method, target, version, end of the line incl. its line ending) of a request, or None."""
    nl = data.find(b"\n")
    if nl < 0:
        return None
    line = data[:nl].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) < 3:
        return None
    return parts[0], b" ".join(parts[1:-1]), parts[-1], nl + 1


def set_target(data: bytes, target: bytes) -> bytes:
    """``data`` with its request-target replaced (method, version and line ending kept)."""
    method, _, version, end = start_line(data)
    eol = b"\r\n" if data[end - 2:end] == b"\r\n" else b"\n"
    return method + b" " + target + b" " + version + eol + data[end:]


def split_target(target: str):
    """(prefix, path and query) of a request-target: the prefix is ``scheme://authority`` of an
    absolute-form target, else empty; None for ``*`` and CONNECT's authority-form."""
    if target.startswith("/"):
        return "", target
    m = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*", target)
    if m:
        return target[:m.end()], target[m.end():]
    return None


def _latin1(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def content_coding(data: bytes, head_length: int) -> str | None:
    """None (identity), "gzip", "deflate", or "other" for any coding we do not re-encode."""
    ce = header_value(data, head_length, b"content-encoding")
    if ce is None:
        return None
    codings = [c.strip().lower() for c in ce.split(",") if c.strip().lower() not in ("", "identity")]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip"):
        return "gzip"
    if len(codings) == 1 and codings[0] == "deflate":
        return "deflate"
    return "other"


# a coded body that decodes to more than this is left alone (a compression bomb would otherwise
# take the memory: 1 MiB of gzip can hold 1 GiB of zeros)
MAX_DECODED = 64 << 20


def _inflate(raw: bytes, wbits: int, members: bool = False) -> bytes | None:
    """``raw`` decoded (``members``: gzip members one after another, zero padding between them
    ignored, as ``gzip.decompress`` reads them); None when it does not decode or decodes to more
    than ``MAX_DECODED`` bytes."""
    if members and not raw:
        return b""                          # no member at all: gzip.decompress says b""
    out = []
    left = MAX_DECODED
    while True:
        d = zlib.decompressobj(wbits)
        try:
            part = d.decompress(raw, left + 1)
        except zlib.error:
            return None
        left -= len(part)
        if left < 0 or d.unconsumed_tail or not d.eof:
            return None                     # too big, or cut before its end
        out.append(part)
        raw = d.unused_data
        if members:
            raw = raw.lstrip(b"\0")
        if not raw:
            return b"".join(out)
        if not members:
            return None                     # bytes after the end of the stream


def _decode_body(coding: str, raw: bytes) -> bytes | None:
    if coding == "gzip":
        return _inflate(raw, 16 + zlib.MAX_WBITS, members=True)
    # RFC 9110 §8.4.1.2: a zlib stream; or what some servers send instead: raw deflate
    got = _inflate(raw, zlib.MAX_WBITS)
    return got if got is not None else _inflate(raw, -zlib.MAX_WBITS)


def _encode_body(coding: str, plain: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(plain, mtime=0)
    return zlib.compress(plain)


def _through_coding(coding: str | None, fn):
    """``fn`` applied to the decoded payload, its result encoded again; None: unchanged."""
    if coding is None:
        return fn

    def coded(raw):
        plain = _decode_body(coding, raw)
        if plain is None:
            return None
        new = fn(plain)
        if new is None or new == plain:
            return None
        return _encode_body(coding, new)

    return coded


def edit_body(msg, fn):
    """``msg`` with its body payload replaced by ``fn(payload)`` (None: unchanged), framing kept
    true (see the module rules). The same object when nothing changed."""
    data = msg.data
    head, body = split_head(data, msg.head_length)
    coding = content_coding(data, len(head))
    if coding == "other":
        return msg
    fn = _through_coding(coding, fn)
    if is_chunked(data, len(head)):
        payload, trailers, complete = decode_chunked(body)
        if not complete:
            return msg
        new = fn(payload)
        if new is None or new == payload:
            return msg
        return with_data(msg, head + encode_chunked(new, trailers))
    new = fn(body)
    if new is None or new == body:
        return msg
    cl = header_value(data, len(head), b"content-length")
    if cl is not None:
        try:
            value = int(cl) + len(new) - len(body)
        except ValueError:
            value = len(new)
        head = set_header(head, len(head), b"Content-Length", str(max(value, 0)).encode())
    elif msg.kind == KIND_REQUEST and new:
        head = set_header(head, len(head), b"Content-Length", str(len(new)).encode())
    return with_data(msg, head + new)


# RFC 9112 §3.2 origin-form: absolute-path ["?" query], made of RFC 3986 pchar, "/" and "?"
TARGET_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                         "-._~" "!$&'()*+,;=" ":@" "%" "/?")


def target_ok(new: str, old: str = "") -> bool:
    """True when ``new`` brings no character into a request-target that may not be there
    (characters ``old`` already had are the recording's business; CR and LF never pass)."""
    if "\r" in new or "\n" in new:
        return False
    extra = set(new) - TARGET_CHARS
    return not extra or extra <= set(old)


def edit_target(msg, fn, refused=None):
    """``msg`` with the path and query of its request-target replaced by ``fn(path_and_query)``
    (the prefix of an absolute-form target kept). The same object when nothing changed, for a
    response, for a target without a path (``*``, CONNECT's authority-form), and when the result
    is not a valid request-target (``target_ok``; then ``refused()`` is called)."""
    if msg.kind != KIND_REQUEST or msg.uri is None:
        return msg
    parts = split_target(msg.uri)
    if parts is None:
        return msg
    prefix, rest = parts
    new = fn(rest)
    if new == rest or start_line(msg.data) is None:
        return msg
    if not target_ok(new, rest):
        if refused is not None:
            refused()
        return msg
    return with_data(msg, set_target(msg.data, _latin1(prefix + new)))


# -- the rewrites ----------------------------------------------------------------------------------


class RewritePath:
    key = "rewrite-path"
    responses = False

    def __init__(self, rules):
        self.rules = rules          # (compiled regex, replacement)
        self.refused = 0            # results that were not a valid request-target

    @classmethod
    def from_settings(cls, settings):
        rules = []
        for s in settings.get("rewrite-path", ()):
            pat, repl = split_rule(s)
            rx = _compile(pat, s)
            repl = replacement(repl)
            _check_template(rx, repl, s)
            literal = re.sub("", re.sub(r"\\g<\w+>|\\\d+", "", repl), "", count=1)
            bad = sorted(set(literal) - TARGET_CHARS)
            if bad:
                raise UsageError(f"{s.where()}: the replacement holds {', '.join(map(repr, bad))}, "
                                 "not allowed in a request-target (RFC 9112 §3.2; percent-encode "
                                 "it, e.g. %20 for a space)")
            rules.append((rx, repl))
        return [cls(rules)] if rules else []

    def _sub(self, rest):
        for rx, repl in self.rules:
            rest = rx.sub(repl, rest)
        return rest

    def _refused(self):
        self.refused += 1

    def apply(self, msg):
        return edit_target(msg, self._sub, self._refused)


def _check_template(rx, repl, s):
    """Fail now, not on the first match, on a replacement naming a group the regex lacks or
    holding a bad escape (``\\q``)."""
    for ref in re.finditer(r"\\g<(\w+)>|\\(\d+)", repl):
        name = ref.group(1) or ref.group(2)
        if name.isdigit() and int(name) > rx.groups or not name.isdigit() and name not in rx.groupindex:
            raise UsageError(f"{s.where()}: bad replacement: the regex has no group {name}")
    check = getattr(re, "_compile_template", None)            # Python >= 3.12
    parser = getattr(re, "_parser", None)                     # Python 3.11
    try:
        if check is not None:
            check(rx, repl)
        elif parser is not None:
            parser.parse_template(repl, rx)
    except (re.error, IndexError) as e:
        raise UsageError(f"{s.where()}: bad replacement: {e}") from None


class QueryRewrite:
    """--remove-query NAME, then --set-query NAME=VALUE, on the query of the request-target.
    Names compare after percent-decoding; values are sent as written."""

    key = "query"
    responses = False

    def __init__(self, remove, set_):
        self.remove = set(remove)      # decoded names
        self.set = list(set_)          # (decoded name, raw "name=value")

    @classmethod
    def from_settings(cls, settings):
        remove = []
        for s in settings.get("remove-query", ()):
            name = str(s.value)
            if not name or any(c in name for c in "&?# \r\n"):
                raise UsageError(f"{s.where()}: not a query parameter name")
            remove.append(unquote_plus(name))
        set_ = []
        for s in settings.get("set-query", ()):
            text = str(s.value)
            name, sep, _ = text.partition("=")
            if not sep or not name or any(c in text for c in "&?# \r\n"):
                raise UsageError(f"{s.where()}: expected NAME=VALUE (no &, ?, # or spaces)")
            set_.append((unquote_plus(name), text))
        return [cls(remove, set_)] if remove or set_ else []

    def _edit(self, rest):
        path, q, query = rest.partition("?")
        params = query.split("&") if query else []
        if self.remove:
            params = [p for p in params if unquote_plus(p.partition("=")[0]) not in self.remove]
        for name, text in self.set:
            at = [i for i, p in enumerate(params) if unquote_plus(p.partition("=")[0]) == name]
            if at:
                params[at[0]] = text
                for i in reversed(at[1:]):
                    del params[i]
            else:
                params.append(text)
        return path + ("?" + "&".join(params) if params else "")

    def apply(self, msg):
        return edit_target(msg, self._edit)


class RemoveHeader:
    key = "remove-header"
    responses = False

    def __init__(self, names):
        self.names = names            # lower-case bytes

    @classmethod
    def from_settings(cls, settings):
        names = []
        for s in settings.get("remove-header", ()):
            name = str(s.value).strip()
            if not TOKEN.match(name):
                raise UsageError(f"{s.where()}: not a header name")
            names.append(name.lower().encode("latin-1"))
        return [cls(names)] if names else []

    def apply(self, msg):
        if msg.kind != KIND_REQUEST:
            return msg
        data = msg.data
        for name in self.names:
            data = remove_header(data, msg.head_length - (len(msg.data) - len(data)), name)
        return msg if data == msg.data else with_data(msg, data)


class SetHeader:
    key = "set-header"
    responses = False

    def __init__(self, headers):
        self.headers = headers        # (name bytes as written, value bytes)

    @classmethod
    def from_settings(cls, settings):
        headers = [parse_header_rule(s, regex=False) for s in settings.get("set-header", ())]
        return [cls(headers)] if headers else []

    @property
    def sets_host(self) -> bool:
        return any(n.lower() == b"host" for n, _ in self.headers)

    def apply(self, msg):
        if msg.kind != KIND_REQUEST:
            return msg
        data = msg.data
        for name, value in self.headers:
            data = set_header(data, msg.head_length + (len(data) - len(msg.data)), name, value)
        return msg if data == msg.data else with_data(msg, data)


class RewriteBody:
    key = "rewrite-body"
    responses = False

    def __init__(self, rules):
        self.rules = rules            # (compiled bytes regex, bytes replacement)

    @classmethod
    def from_settings(cls, settings):
        rules = []
        for s in settings.get("rewrite-body", ()):
            pat, repl = split_rule(s)
            rx = _compile(pat.encode("utf-8"), s)
            repl = replacement(repl)
            _check_template(rx, repl, s)
            rules.append((rx, repl.encode("utf-8")))
        return [cls(rules)] if rules else []

    def _sub(self, payload):
        for rx, repl in self.rules:
            payload = rx.sub(repl, payload)
        return payload

    def apply(self, msg):
        if msg.kind != KIND_REQUEST:
            return msg
        return edit_body(msg, self._sub)


# Headers whose values are secrets (RFC 9110 §11.6.2, §11.7.2; RFC 6265 §4.1-4.2; the common
# API-key header).
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")
_AUTH = re.compile(rb"^\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)(\s+)(.*?)\s*$", re.S)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_SCALAR = re.compile(rb"[^,}\]\s]+")
_WS = re.compile(rb"\s*")


class Redact:
    key = "redact"
    responses = True

    def __init__(self, headers=(), fields=(), key: bytes | None = None):
        self.headers = tuple(dict.fromkeys((*SECRET_HEADERS, *headers)))   # lower-case str
        self.fields = {f.lower() for f in fields}
        self.hmac_key = key if key is not None else os.urandom(32)
        self._needles = [b"\n" + h.encode() + b":" for h in self.headers]
        self._cache: dict = {}

    @classmethod
    def from_settings(cls, settings):
        on = any(bool(s.value) for s in settings.get("redact", ()))
        headers = []
        for s in settings.get("redact-header", ()):
            name = str(s.value).strip()
            if not TOKEN.match(name):
                raise UsageError(f"{s.where()}: not a header name")
            headers.append(name.lower())
        fields = []
        for s in settings.get("redact-field", ()):
            name = str(s.value).strip()
            if not name:
                raise UsageError(f"{s.where()}: empty field name")
            fields.append(name)
        key = None
        for s in settings.get("redact-key", ()):
            if not str(s.value):
                raise UsageError(f"{s.where()}: empty key")
            key = str(s.value).encode("utf-8")
        if not (on or headers or fields):
            return []
        return [cls(headers, fields, key)]

    def placeholder(self, secret: bytes) -> bytes:
        p = self._cache.get(secret)
        if p is None:
            p = b"redacted-" + hmac.new(self.hmac_key, secret, hashlib.sha256).hexdigest()[:12].encode()
            if len(self._cache) < 100_000:
                self._cache[secret] = p
        return p

    def apply(self, msg):
        data = msg.data
        head, body = split_head(data, msg.head_length)
        new_head = self._headers(head)
        if self.fields and msg.kind == KIND_REQUEST and msg.uri and "?" in msg.uri:
            parts = split_target(msg.uri)
            if parts is not None and start_line(new_head) is not None:
                prefix, rest = parts
                path, _, query = rest.partition("?")
                q = self._form(_latin1(query))
                if q is not None:
                    new_head = set_target(new_head, _latin1(prefix + path) + b"?" + q)
        out = msg if new_head == head else with_data(msg, new_head + body)
        if self.fields and body:
            out = edit_body(out, lambda p: self._body(out, p))
        return out

    # headers

    def _headers(self, head: bytes) -> bytes:
        low = head.lower()
        spans = []
        for name, needle in zip(self.headers, self._needles):
            if needle in low:
                spans += [(start, colon, stop, name) for start, colon, stop, _ in
                          field_spans(head, name.encode("latin-1"))]
        if not spans:
            return head
        spans.sort()
        out = []
        pos = 0
        for start, colon, stop, name in spans:
            value = b" ".join(v.strip() for v in head[colon + 1:stop].splitlines())
            out.append(head[pos:colon + 1])
            out.append(b" " + self._value(name, value.strip()))
            pos = stop
        out.append(head[pos:])
        return b"".join(out)

    def _value(self, name: str, value: bytes) -> bytes:
        if name in ("authorization", "proxy-authorization"):
            m = _AUTH.match(value)
            if m and m.group(3):
                return m.group(1) + b" " + self.placeholder(m.group(3))
            return self.placeholder(value)
        if name == "cookie":
            parts = []
            for c in value.split(b";"):
                k, eq, v = c.partition(b"=")
                parts.append(k + b"=" + self.placeholder(v.strip()) if eq else self.placeholder(c.strip()))
            return b";".join(p if i == 0 else b" " + p.lstrip() for i, p in enumerate(parts))
        if name == "set-cookie":
            first, semi, attrs = value.partition(b";")
            k, eq, v = first.partition(b"=")
            first = k + b"=" + self.placeholder(v.strip()) if eq else self.placeholder(first.strip())
            return first + semi + attrs
        return self.placeholder(value)

    # bodies and queries

    def _body(self, msg, payload: bytes):
        ct = (header_value(msg.data, msg.head_length, b"content-type") or "").lower()
        if "json" in ct or (not ct and payload.lstrip()[:1] in (b"{", b"[")):
            return self._json(payload)
        if "x-www-form-urlencoded" in ct:
            return self._form(payload)
        return None

    def _form(self, text: bytes):
        params = text.split(b"&")
        changed = False
        for i, p in enumerate(params):
            k, eq, v = p.partition(b"=")
            if eq and _unquote(k).decode("utf-8", "replace").lower() in self.fields:
                params[i] = k + b"=" + self.placeholder(_unquote(v))
                changed = True
        return b"&".join(params) if changed else None

    def _json(self, doc: bytes):
        """``doc`` with the values of the named keys replaced by placeholder strings, every other
        byte kept; works on a document cut short."""
        out = []
        pos = 0
        i = 0
        n = len(doc)
        while True:
            m = _JSON_STRING.search(doc, i)
            if m is None:
                break
            j = _WS.match(doc, m.end()).end()
            if j >= n or doc[j:j + 1] != b":":
                i = m.end()
                continue
            try:
                key = json.loads(m.group())
            except ValueError:
                i = m.end()
                continue
            vstart = _WS.match(doc, j + 1).end()
            if not isinstance(key, str) or key.lower() not in self.fields or vstart >= n:
                i = j + 1
                continue
            vend, secret = _json_value(doc, vstart)
            out.append(doc[pos:vstart])
            out.append(b'"' + self.placeholder(secret) + b'"')
            pos = i = vend
        if not out:
            return None
        out.append(doc[pos:])
        return b"".join(out)


def _unquote(b: bytes) -> bytes:
    return unquote_to_bytes(b.replace(b"+", b" "))


def _json_value(doc: bytes, i: int):
    """(end, secret bytes) of the JSON value starting at ``i``: a string's decoded text, else the
    value's bytes (objects and arrays whole)."""
    c = doc[i:i + 1]
    if c == b'"':
        m = _JSON_STRING.match(doc, i)
        if m is None:
            return len(doc), doc[i:]
        try:
            return m.end(), json.loads(m.group()).encode("utf-8")
        except ValueError:
            return m.end(), m.group()
    if c in (b"{", b"["):
        depth = 0
        j = i
        n = len(doc)
        while j < n:
            ch = doc[j:j + 1]
            if ch == b'"':
                m = _JSON_STRING.match(doc, j)
                if m is None:
                    return n, doc[i:]
                j = m.end()
                continue
            if ch in (b"{", b"["):
                depth += 1
            elif ch in (b"}", b"]"):
                depth -= 1
                if depth == 0:
                    return j + 1, doc[i:j + 1]
            j += 1
        return n, doc[i:]
    m = _JSON_SCALAR.match(doc, i)
    end = m.end() if m else i
    return end, doc[i:end]
