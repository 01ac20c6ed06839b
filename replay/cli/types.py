"""Click parameter types for durations, time factors, rates and ports (bounds: ``replay.units``).

A refused value is a one-line usage error naming the flag and the accepted range (exit code 2).
"""

from __future__ import annotations

import click

from replay import units
from replay.errors import UsageError


def _flag(param) -> str:
    return max(param.opts, key=len) if param is not None and param.opts else "value"


class _Parsed(click.ParamType):
    def parse(self, value, flag):
        raise NotImplementedError

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value                    # a default already converted, or None
        try:
            return self.parse(value, _flag(param))
        except UsageError as e:
            raise click.UsageError(str(e), ctx) from None


class Duration(_Parsed):
    """Seconds (float); ``30``, ``30s``, ``250ms``, ``5m``, ``2h``, ``1d``."""

    name = "DURATION"

    def parse(self, value, flag):
        return units.parse_seconds(value, flag)


class Speed(_Parsed):
    """A time factor, or None for ``max``."""

    name = "FACTOR|max"

    def parse(self, value, flag):
        return units.parse_speed(value, flag)


class Rate(_Parsed):
    name = "N"

    def parse(self, value, flag):
        return units.parse_rate(value, flag)


DURATION = Duration()
SPEED = Speed()
RATE = Rate()
PORT = click.IntRange(1, 65535)       # TCP ports; 0 is not a port one can connect to


class ErrorBudget(click.ParamType):
    """``N`` (failed requests) or ``P%`` (of those tried): how many may fail before exit code 1."""

    name = "N|P%"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        text = value.strip()
        try:
            if text.endswith("%"):
                p = float(text[:-1])
                if 0 <= p <= 100:
                    return ("percent", p)
            elif text.isdigit():
                return ("count", int(text))
        except ValueError:
            pass
        raise click.UsageError(f"{_flag(param)}: {value!r} is not a count (0 or more) or a "
                               "percentage (0% to 100%)", ctx)


ERROR_BUDGET = ErrorBudget()


def over_budget(budget, failed: int, tried: int) -> bool:
    """True when ``failed`` of ``tried`` requests is more than ``budget`` allows; no budget:
    only when every request failed."""
    if tried == 0:
        return False
    if budget is None:
        return failed >= tried
    kind, n = budget
    return failed > n if kind == "count" else failed * 100 > n * tried
