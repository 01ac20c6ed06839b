"""The reassembler's limits as flags, shared by ``convert`` and ``capture``.

``reassembly_options()`` adds them to a command with the defaults of ``replay.limits``;
``engine_opts_from_kwargs(kwargs)`` takes their values back out as ``Engine`` keyword arguments.
Sizes take units (``64k``, ``4M``, ``1G``; a bare number is bytes), durations too (``90``, ``30s``,
``2m``).
"""

from __future__ import annotations

import math

import click

from replay import limits

# Beyond these a limit means nothing but an overflow: the core counts bytes and nanoseconds
# in signed 64 bits.
MAX_SIZE = 1 << 40
MAX_SECONDS = 365 * 86400.0


class SizeType(click.ParamType):
    name = "SIZE"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        from replay.cli.capture import parse_size
        from replay.errors import UsageError

        try:
            n = parse_size(value, 1, param.opts[0] if param else "size")
        except UsageError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)
        if n > MAX_SIZE:
            self.fail(f"{value!r} is more than 1T", param, ctx)
        if n < self.minimum:
            self.fail(f"{value!r} is less than {_shown(self.minimum)}", param, ctx)
        return n


class DurationType(click.ParamType):
    name = "SECONDS"
    UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            v = float(text[:len(text) - len(unit)]) * self.UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 90, 30s, 2m)", param, ctx)
        if not (math.isfinite(v) and 0 < v <= MAX_SECONDS):
            self.fail(f"{value!r} must be more than 0 and at most a year", param, ctx)
        return v


_OPTIONS = (
    ("--max-head", "max_head", SizeType(minimum=1 << 10), limits.MAX_HEAD,
     "Bytes of one message head (start line and headers) before it is kept cut, flagged "
     "incomplete and truncated, and framing moves on (servers refuse such heads too)."),
    ("--max-message", "max_message", SizeType(minimum=1 << 10), limits.MAX_MESSAGE,
     "Bytes of one message, head and body, before it is kept cut."),
    ("--max-stream-buffer", "max_stream_buffer", SizeType(), limits.MAX_STREAM_BUFFER,
     "Bytes one direction may hold beyond a hole before the hole is declared lost."),
    ("--max-total-buffer", "max_total_buffer", SizeType(), limits.MAX_TOTAL_BUFFER,
     "Bytes all directions together may hold beyond holes."),
    ("--idle-timeout", "idle_timeout", DurationType(), limits.IDLE_TIMEOUT,
     "Seconds after which a silent connection is closed (capture time)."),
)


def _shown(default) -> str:
    """A default as the user would type it: 65536 -> 64k, 120.0 -> 120s."""
    if isinstance(default, float):
        return f"{default:g}s"
    for unit, shift in (("G", 30), ("M", 20), ("k", 10)):
        if default % (1 << shift) == 0:
            return f"{default >> shift}{unit}"
    return str(default)


def reassembly_options():
    def deco(f):
        for decl, dest, typ, default, help_ in reversed(_OPTIONS):
            f = click.option(decl, dest, type=typ, default=_shown(default), show_default=True,
                             help=help_)(f)
        return f
    return deco


def engine_opts_from_kwargs(kwargs: dict) -> dict:
    """Pop the reassembly options out of ``kwargs``: the ``Engine`` keyword arguments."""
    return {dest: kwargs.pop(dest) for _, dest, _, _, _ in _OPTIONS}
