"""Python hooks: ``--plugin module:function`` or ``--plugin path/to/file.py:function``.

A hook is a plain function called once per message, in the order the messages come, in the
caller's thread::

    def hook(msg: replay.events.Message) -> Message | bytes | None

- a ``Message`` goes on (the same one, or a changed one: when its ``data`` differs from what
  came in, its parsed fields are recomputed with ``httpmsg.with_data``, so a hook may simply set
  ``msg.data``);
- ``bytes`` are the new message (start line, headers, body; the hook fixes Content-Length when it
  changes a body);
- ``None`` drops the message. Dropping a request does not drop its response: a hook that wants
  whole exchanges gone drops both (``msg.conn`` and ``msg.index`` pair them).

Several hooks run one after the other; a dropped message stops there.

Specs: the text before the last ``:`` is a file when it ends in ``.py`` or holds a path
separator, else a module imported the way ``python -m`` would (the current directory first on
``sys.path``); the text after it names the function, dotted for an attribute of an attribute
(``hooks:Redactor.apply``). A spec that cannot be loaded is a ``PluginSpecError`` (a usage error,
exit 2) naming the spec. A hook that raises, or returns anything else, stops the run with one
``PluginError`` line naming the hook, where it raised and the message (connection and index).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from replay.errors import PluginError, PluginSpecError
from replay.events import KIND_REQUEST, Message
from replay.httpmsg import with_data


class Plugin:
    """A loaded hook: its spec (for messages) and the function."""

    __slots__ = ("spec", "fn")

    def __init__(self, spec: str, fn):
        self.spec = spec
        self.fn = fn

    def __call__(self, msg):
        return self.fn(msg)

    def __repr__(self):
        return f"Plugin({self.spec!r})"


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or (os.sep != "/" and os.sep in target)


def _load_file(spec: str, path_text: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise PluginSpecError(f"plugin {spec!r}: no such file {path_text}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"replay_plugin_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, resolved)
    if mspec is None or mspec.loader is None:
        raise PluginSpecError(f"plugin {spec!r}: {path_text} cannot be imported as Python")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if not isinstance(e, Exception):
            raise
        raise PluginSpecError(f"plugin {spec!r}: importing {path_text} failed: {_one_line(e)}") from e
    return module


def _load_module(spec: str, name: str):
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise PluginSpecError(f"plugin {spec!r}: no module named {e.name!r} "
                                  f"(give a file as path/to/file.py:function)") from e
        raise PluginSpecError(f"plugin {spec!r}: importing {name} failed: {_one_line(e)}") from e
    except Exception as e:
        raise PluginSpecError(f"plugin {spec!r}: importing {name} failed: {_one_line(e)}") from e
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_plugin(spec) -> Plugin:
    """One hook from its spec (or a callable, wrapped as is)."""
    if callable(spec):
        return Plugin(getattr(spec, "__qualname__", repr(spec)), spec)
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not attr:
        raise PluginSpecError(f"plugin {spec!r}: expected module:function or path/to/file.py:function")
    module = _load_file(spec, target) if _is_file_spec(target) else _load_module(spec, target)
    obj = module
    parts = attr.split(".")
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginSpecError(f"plugin {spec!r}: {target} has no "
                                  f"{'function' if i == len(parts) - 1 else 'attribute'} "
                                  f"{'.'.join(parts[:i + 1])!r}") from None
    if not callable(obj):
        raise PluginSpecError(f"plugin {spec!r}: {attr} is {type(obj).__name__}, not a function")
    return Plugin(str(spec), obj)


def load_plugins(specs) -> list[Plugin]:
    """Load every spec, in order; the first that fails raises ``PluginSpecError``."""
    return [load_plugin(s) for s in specs]


def describe(msg) -> str:
    """A message as the error lines name it: kind, connection, index, and its start line's gist."""
    if msg.kind == KIND_REQUEST:
        gist = f" ({msg.method} {msg.uri})" if msg.method else ""
    else:
        gist = f" (status {msg.status})" if msg.status else ""
    return f"{msg.kind_name} conn {msg.conn} index {msg.index}{gist}"


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}"


def apply_plugins(messages, plugins, stats: dict | None = None):
    """Yield each message after every hook ran on it; what a hook drops is not yielded.

    ``stats``, when given, counts ``changed`` and ``dropped`` messages."""
    plugins = list(plugins)
    if not plugins:
        yield from messages
        return
    if stats is not None:
        stats.setdefault("changed", 0)
        stats.setdefault("dropped", 0)
    for msg in messages:
        original = msg.data
        out = msg
        for p in plugins:
            data = out.data
            try:
                r = p.fn(out)
            except Exception as e:
                raise PluginError(f"plugin {p.spec!r} raised {_one_line(e)}{_where(e)} on "
                                  f"{describe(msg)}") from e
            if r is None:
                out = None
                break
            if isinstance(r, Message):
                if r.data is not data and r.data != data:
                    r = with_data(r, bytes(r.data))
                out = r
            elif isinstance(r, (bytes, bytearray, memoryview)):
                r = bytes(r)
                if r != data:
                    out = with_data(out, r)
            else:
                raise PluginError(f"plugin {p.spec!r} returned {type(r).__name__} on {describe(msg)}; "
                                  f"expected a Message, bytes (the new message) or None (to drop it)")
        if out is None:
            if stats is not None:
                stats["dropped"] += 1
            continue
        if stats is not None and (out is not msg or out.data is not original) and out.data != original:
            stats["changed"] += 1
        yield out
