"""The reassembler's limits as flags, shared by ``convert`` and ``capture``.

``reassembly_options()`` adds them to a command with the defaults of ``replay.limits``;
``engine_opts_from_kwargs(kwargs)`` takes their values back out as ``Engine`` keyword arguments.
Sizes take units (``64k``, ``4M``, ``1G``; a bare number is bytes), durations too (``90``, ``30s``,
``2m``: ``replay.units``).
"""

from __future__ import annotations

import click

from replay import limits
from replay.cli.types import DURATION, _Parsed
from replay.errors import UsageError
from replay.units import parse_size

# Beyond this a limit means nothing but an overflow risk: the core counts bytes in 64 bits.
MAX_SIZE = 1 << 40


class SizeType(_Parsed):
    name = "SIZE"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def parse(self, value, flag):
        n = parse_size(value, 1, flag)
        if not self.minimum <= n <= MAX_SIZE:
            raise UsageError(f"{flag}: {value} is out of range (from {_shown(self.minimum)} to 1T)")
        return n


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
    ("--idle-timeout", "idle_timeout", DURATION, limits.IDLE_TIMEOUT,
     "Capture time after which a silent connection is closed (120, 2m; 1us to 366d)."),
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
