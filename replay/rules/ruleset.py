"""Rules: the filters, rewrites, middleware and plugins of one run, composed in that order.

``Rules.from_settings`` builds them from ``options.Setting`` values (flags and rules files alike),
each option by the class ``options.OPTIONS`` names as its owner. ``Rules.apply(source)`` is what
``replay filter`` and ``replay play`` use: messages in, messages out, in input order:

1. filters (``filters.FilterSet``): over a ``LogReader``, by the index path (numpy masks over
   its table; only the kept rows are decompressed into messages); over anything else, streaming;
2. rewrites, each in turn (``rewrites``), on each message that stays; a message without a whole
   head is left alone;
3. the middleware process (``replay.rules.middleware.Middleware.map``);
4. Python plugins (``replay.rules.plugins.apply_plugins``).

``Rules.stream()`` is the push-based form the live capture uses (``push``, ``poll``, ``advance``,
``finish``): the same steps, with the middleware running in a thread of its own so the capture
loop never waits on it. ``stats`` counts what went in, what each step kept and changed.
"""

from __future__ import annotations

import importlib
import queue
import threading
import time

from replay.errors import UsageError
from replay.events import KIND_REQUEST
from replay.rules.options import BY_KEY, OPTIONS, Setting


class MiddlewareSpec:
    key = "middleware"

    def __init__(self, command: str, on_error: str):
        self.command = command
        self.on_error = on_error

    @classmethod
    def from_settings(cls, settings):
        cmd = settings.get("middleware", ())
        mode = settings.get("middleware-on-error", ())
        on_error = "stop"
        for s in mode:
            if str(s.value) not in ("stop", "skip"):
                raise UsageError(f"{s.where()}: must be 'stop' or 'skip'")
            on_error = str(s.value)
        if not cmd:
            if mode:
                raise UsageError(f"{mode[-1].where()}: without --middleware")
            return []
        s = cmd[-1]
        if not str(s.value).strip():
            raise UsageError(f"{s.where()}: empty command")
        return [cls(str(s.value), on_error)]

    def start(self):
        from replay.rules.middleware import Middleware

        return Middleware(self.command, on_error=self.on_error)


class PluginSpec:
    key = "plugin"

    def __init__(self, specs, plugins):
        self.specs = specs
        self.plugins = plugins

    @classmethod
    def from_settings(cls, settings):
        specs = [str(s.value) for s in settings.get("plugin", ())]
        if not specs:
            return []
        from replay.rules.plugins import load_plugins

        return [cls(specs, load_plugins(specs))]

    def apply(self, messages):
        from replay.rules.plugins import apply_plugins

        return apply_plugins(messages, self.plugins)


def _owner(path: str):
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"replay.rules.{module}"), cls)


class Rules:
    def __init__(self, settings=()):
        """Build every rule of ``settings`` (``options.Setting``); ``UsageError`` naming the rule
        for any that is wrong."""
        from replay.rules.filters import FilterSet, Limit

        self.settings = list(settings)
        by_key: dict = {}
        for s in self.settings:
            if s.key not in BY_KEY:
                raise UsageError(f"{s.where()}: unknown rule")
            by_key.setdefault(s.key, []).append(s)
        filters, rewrites, limit = [], [], None
        self.middleware = None
        self.plugins = None
        built = set()
        for opt in OPTIONS:
            if opt.owner in built:
                continue
            built.add(opt.owner)
            for rule in _owner(opt.owner).from_settings(by_key):
                if isinstance(rule, Limit):
                    limit = rule.n
                elif isinstance(rule, MiddlewareSpec):
                    self.middleware = rule
                elif isinstance(rule, PluginSpec):
                    self.plugins = rule
                elif hasattr(rule, "keep"):
                    filters.append(rule)
                else:
                    rewrites.append(rule)
        self.filters = FilterSet(filters, limit)
        self.rewrites = rewrites
        self.stats = {"read": 0, "kept": 0, "rewritten": 0, "out": 0}

    # -- what the rules are --------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return not (self.filters.active or self.rewrites or self.middleware or self.plugins)

    @property
    def sets_host(self) -> bool:
        """A --set-header Host rule: play then sends it instead of the target's Host."""
        return any(getattr(r, "sets_host", False) for r in self.rewrites)

    @property
    def refused_rewrites(self) -> int:
        """Rewrites not applied because their result was not valid (a request-target with a
        space or line break): the message went on as it was."""
        return sum(getattr(r, "refused", 0) for r in self.rewrites)

    def describe(self) -> dict:
        """The rules as a rules file would write them (for the metadata of what they produce);
        the redaction key is not shown."""
        out: dict = {}
        for s in self.settings:
            value = "(hidden)" if s.key == "redact-key" else s.value
            if BY_KEY[s.key].multiple:
                out.setdefault(s.key, []).append(value)
            else:
                out[s.key] = value
        return out

    # -- pull: filter and play -----------------------------------------------------------------

    def apply(self, source, index: bool = True, shard=None):
        """The messages of ``source`` that the rules keep, changed as they say, in input order.
        ``index=False`` forces the streaming path on a log (tests hold the two paths equal).
        ``shard`` (``play --workers``: a ``stream.Shard``): only the messages of its connections,
        taken before the filters, rewrites and middleware (which then count only those), with
        ``--since``/``--until +OFFSET`` still counted from the first message of ``source``."""
        from replay.log import LogReader

        st = self.stats
        # the index path reads the whole log's table; a bare --limit only needs its start
        if self.filters.filters and index and isinstance(source, LogReader):
            among = None if shard is None else shard.mask(source.table()["conn"])
            rows = self.filters.select_rows(source, among)
            st["read"] += len(source) if among is None else int(among.sum())
            st["kept"] += len(rows)
            msgs = (m for _, m in source.messages_at(rows))
        elif self.filters.active:
            msgs = self._streamed(source, shard)
        else:
            msgs = self._counted(source if shard is None else shard.keep(source))
        if self.rewrites:
            msgs = self._rewritten(msgs)
        mw = None
        try:
            if self.middleware is not None:
                mw = self.middleware.start()
                msgs = mw.map(msgs)
            if self.plugins is not None:
                msgs = self.plugins.apply(msgs)
            for m in msgs:
                st["out"] += 1
                yield m
        finally:
            if mw is not None:
                mw.close()
                st["middleware"] = dict(mw.stats)

    def _counted(self, source):
        st = self.stats
        for m in source:
            st["read"] += 1
            st["kept"] += 1
            yield m

    def _streamed(self, source, shard=None):
        st = self.stats
        fs = self.filters.stream()
        if shard is not None:
            source = shard.keep(source, first=fs.start_at)
        for m in source:
            st["read"] += 1
            out = fs.push(m)
            if out:
                st["kept"] += len(out)
                yield from out
            if fs.exhausted and not st["read"] & 255 and fs.settled:
                st["limit_reached"] = True   # the rest of the input cannot add anything
                break
        out = fs.finish()
        st["kept"] += len(out)
        yield from out
        st["forced_decisions"] = fs.forced

    def rewrite(self, m):
        """``m`` through the rewrites (the same object when none changes it)."""
        if not m.head_length:
            return m
        for r in self.rewrites:
            if r.responses or m.kind == KIND_REQUEST:
                m = r.apply(m)
        return m

    def _rewritten(self, msgs):
        st = self.stats
        rewrite = self.rewrite
        for m in msgs:
            new = rewrite(m)
            if new is not m:
                st["rewritten"] += 1
            yield new

    # -- push: capture -------------------------------------------------------------------------

    def stream(self, **bounds) -> "RuleStream":
        return RuleStream(self, **bounds)


_END = object()


class RuleStream:
    """The rules for a push-based caller: ``push(msg)``, ``advance(now_ns)`` and ``poll()`` return
    the messages ready to be written, ``finish()`` the rest; ``close()`` stops the middleware.
    A middleware error surfaces from the next call (``on_error='stop'``)."""

    def __init__(self, rules: Rules, **bounds):
        self.rules = rules
        self.filter = rules.filters.stream(**bounds) if rules.filters.active else None
        self.stats = rules.stats
        self._in = self._out = self._thread = None
        self._error = None
        self._mw = None
        if rules.middleware is not None:
            self._in = queue.Queue(maxsize=10_000)
            self._out = queue.Queue()
            self._mw = rules.middleware.start()
            self._thread = threading.Thread(target=self._run, name="replay-middleware", daemon=True)
            self._thread.start()

    @property
    def exhausted(self) -> bool:
        return self.filter is not None and self.filter.exhausted

    def _feed(self):
        while True:
            m = self._in.get()
            if m is _END:
                return
            yield m

    def _run(self):
        try:
            msgs = self._mw.map(self._feed())
            if self.rules.plugins is not None:
                msgs = self.rules.plugins.apply(msgs)
            for m in msgs:
                self._out.put(m)
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            self._error = e
        finally:
            self._out.put(_END)

    def _after_filter(self, msgs) -> list:
        st = self.stats
        st["kept"] += len(msgs)
        if self.rules.rewrites:
            msgs = list(self.rules._rewritten(msgs))
        if self._thread is not None:
            for m in msgs:
                self._put(m)
            return self.poll()
        if self.rules.plugins is not None and msgs:
            msgs = list(self.rules.plugins.apply(msgs))
        st["out"] += len(msgs)
        return msgs

    def _put(self, m):
        while True:
            if self._error is not None:
                self._raise()
            try:
                self._in.put(m, timeout=0.1)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise()

    def _raise(self):
        e = self._error
        if e is None:
            from replay.errors import MiddlewareError

            e = MiddlewareError("middleware: stopped unexpectedly")
        raise e

    def push(self, m) -> list:
        self.stats["read"] += 1
        msgs = self.filter.push(m) if self.filter is not None else [m]
        return self._after_filter(msgs) if msgs or self._thread is not None else msgs

    def advance(self, now_ns: int) -> list:
        if self.filter is None:
            return self.poll()
        return self._after_filter(self.filter.advance(now_ns))

    def poll(self) -> list:
        if self._thread is None:
            return []
        out = []
        while True:
            try:
                m = self._out.get_nowait()
            except queue.Empty:
                break
            if m is _END:
                self._out.put(_END)
                break
            out.append(m)
        if self._error is not None:
            self._raise()
        self.stats["out"] += len(out)
        return out

    def finish(self, timeout: float = 30.0) -> list:
        msgs = self.filter.finish() if self.filter is not None else []
        out = self._after_filter(msgs)
        if self._thread is None:
            return out
        self._put(_END)
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self._out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if m is _END:
                break
            out.append(m)
            self.stats["out"] += 1
        self.close()
        if self._error is not None:
            self._raise()
        return out

    def close(self):
        if self._mw is not None:
            mw, self._mw = self._mw, None
            try:
                mw.close()
            finally:
                self.stats["middleware"] = dict(mw.stats)


def settings_from_values(values: dict, origin=None) -> list:
    """Settings from ``{key: value or [values]}`` (a rules file's table, or tests)."""
    out = []
    for key, v in values.items():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            out.append(Setting(key, item, origin))
    return out
