"""Signals that stop a command: one place for their wiring.

``StopSignals``, for a live session (``capture``, ``shadow``): SIGINT, SIGTERM and SIGHUP ask the
session to stop (``session.request_stop(name)``), so that it drains, closes its outputs and
prints its summary. A signal that arrives before the session exists (while the interface opens)
is kept and handed to it once attached: no traceback, no lost request to stop. ``restore()``
puts the previous handlers back.

``Interrupts``, for a command that reads a file to its end (``convert``, ``filter``): the first
SIGINT or SIGTERM stops it between two batches, so that its summary counts what it wrote.
"""

from __future__ import annotations

import signal


class StopSignals:
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.session = None
        self.early: list = []
        self._old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.session is not None:
            self.session.request_stop(name)
        else:
            self.early.append(name)

    def attach(self, session) -> None:
        self.session = session
        for name in self.early:
            session.request_stop(name)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupts:
    """SIGINT and SIGTERM during a command that reads a file to its end (``convert``,
    ``filter``): the first asks it to stop at the next point where what it counted is what it
    wrote (``between(items)`` raises ``KeyboardInterrupt`` there); a second one raises
    ``KeyboardInterrupt`` at once, wherever it lands. Outside the main thread it changes
    nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self) -> "Interrupts":
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
        except ValueError:
            pass                    # not the main thread: signals stay as they were
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            # (None: a handler installed from C, which cannot be put back from Python)
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._old = {}

    def _on_signal(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def between(self, items):
        """``items``, stopping with ``KeyboardInterrupt`` before the next one once a signal
        came (the caller has handled every item it was given)."""
        if self.requested is not None:
            raise KeyboardInterrupt
        for item in items:
            yield item
            if self.requested is not None:
                raise KeyboardInterrupt
        if self.requested is not None:     # a source that ends on its own when asked to stop
            raise KeyboardInterrupt

    def asked(self) -> bool:
        """Whether a signal asked to stop (for a source's own ``stop`` callable)."""
        return self.requested is not None
