"""Durations, time factors, rates and sizes as users write them, and the bounds every command keeps.

One parser for every duration flag (``play --duration``/``--timeout``, ``capture --duration``/
``--rotate-interval``/``--flush-interval``, ``convert``/``capture --idle-timeout``) and for the
``+OFFSET`` of ``--since``/``--until``, so they all accept the same units.

Rules:
- a duration is a finite decimal number (``1.5``, ``.5``, ``2e3``) and an optional unit: ``ns``,
  ``us``, ``ms``, ``s``, ``m``, ``h``, ``d``; a bare number is in seconds; it is parsed exactly
  (``Decimal``) to whole nanoseconds;
- durations lie between ``MIN_SECONDS`` and ``MAX_SECONDS``: deadlines and timeouts are integer
  nanoseconds and asyncio timers, and past these bounds they overflow or mean nothing;
- ``--speed`` lies between ``MIN_SPEED`` and ``MAX_SPEED``, ``--rate`` between ``MIN_RATE`` and
  ``MAX_RATE``: a value above the top is the top (a gap of a second becomes a microsecond or
  less, as fast as ``max`` but in recorded order), below the bottom is refused (a recorded
  second would last weeks). NaN and infinities are refused (``--speed inf`` means ``max``).

One parser for every size (``capture``/``shadow -B``, ``--rotate-size``, ``--queue-size``/
``--queue-bytes``, the reassembler's ``--max-*``): a number and an optional unit ``k``, ``M``,
``G``, ``T`` (powers of 1024; ``B``/``iB`` may follow); a bare number is in the flag's own unit.

Every refusal is a ``UsageError`` naming the flag and the accepted range.
"""

from __future__ import annotations

import re

from replay.errors import UsageError

NS = 1_000_000_000
UNITS_NS = {"ns": 1, "us": 10 ** 3, "ms": 10 ** 6, "s": NS, "m": 60 * NS, "h": 3600 * NS,
            "d": 86400 * NS}

MIN_SECONDS = 1e-6                 # the replay's timers resolve microseconds
MAX_SECONDS = 366 * 86400          # a year: ns fit int64 150 times over; asyncio timers stay exact
MIN_SPEED = 1e-6                   # a recorded second lasts ~11.6 days
MAX_SPEED = 1e6                    # a recorded second lasts 1 µs
MIN_RATE = 1e-6                    # requests/s: one every ~11.6 days
MAX_RATE = 1e9                     # one per ns: deadlines cannot be closer

_DURATION = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(ns|us|µs|ms|s|m|h|d)?\s*",
                       re.I)
EXAMPLES = "30, 30s, 250ms, 5m, 2h"
RANGE = "from 1us to 366d"


def parse_duration_ns(text, what: str, *, minimum: float = MIN_SECONDS,
                      maximum: float = MAX_SECONDS) -> int:
    """Whole nanoseconds of a duration such as ``30``, ``250ms``, ``1.5m``, within the bounds."""
    from decimal import Decimal, DecimalException, InvalidOperation   # not needed for --help

    m = _DURATION.fullmatch(str(text))
    if not m:
        raise UsageError(f"{what}: not a duration: {str(text)!r} (examples: {EXAMPLES})")
    try:
        ns = Decimal(m.group(1)) * UNITS_NS[(m.group(2) or "s").lower().replace("µ", "u")]
    except InvalidOperation:
        raise UsageError(f"{what}: not a duration: {str(text)!r} (examples: {EXAMPLES})") from None
    except DecimalException:        # Overflow, Underflow: an exponent no duration has
        raise UsageError(f"{what}: {str(text).strip()} is out of range ({RANGE})") from None
    if not Decimal(str(minimum)) * NS <= ns <= Decimal(str(maximum)) * NS:
        raise UsageError(f"{what}: {str(text).strip()} is out of range ({RANGE})")
    return int(ns)


def parse_seconds(text, what: str, **bounds) -> float:
    """A duration (see ``parse_duration_ns``) in seconds."""
    return parse_duration_ns(text, what, **bounds) / NS


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, bare_unit: int, what: str) -> int:
    """``64M``, ``512k``, ``1GiB``...; a bare number is in ``bare_unit`` bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
    if not m:
        raise UsageError(f"{what}: not a size: {text!r} (examples: 64M, 512k, 2G)")
    num, unit = float(m.group(1)), m.group(2).lower()
    scale = _SIZE_UNITS[unit] if (unit or m.group(3)) else bare_unit
    value = int(num * scale)
    if value <= 0:
        raise UsageError(f"{what}: must be positive: {text!r}")
    return value


def _number(text, what: str, kind: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if v != v or v in (float("inf"), float("-inf")):
        raise UsageError(f"{what}: {str(text).strip()!r} is not {kind}")
    return v


def parse_speed(text, what: str = "--speed") -> float | None:
    """A time factor (``10``, ``0.5``, ``10x``) or ``max``/``inf`` (None)."""
    t = str(text).strip().lower()
    if t in ("max", "inf"):
        return None
    v = _number(t[:-1] if t.endswith("x") else t, what, "a number or 'max'")
    if v < MIN_SPEED:
        raise UsageError(f"{what}: {str(text).strip()} is out of range (from 0.000001 upwards, "
                         "or max; above 1000000 it is 1000000)")
    return min(v, MAX_SPEED)


def parse_rate(text, what: str = "--rate") -> float:
    """Requests per second."""
    v = _number(str(text).strip(), what, "a number of requests per second")
    if v < MIN_RATE:
        raise UsageError(f"{what}: {str(text).strip()} is out of range (from 0.000001 upwards; "
                         "above 1e9 it is 1e9)")
    return min(v, MAX_RATE)
