"""Signals that stop a live session (``capture``, ``shadow``): one place for their wiring.

SIGINT, SIGTERM and SIGHUP ask the session to stop (``session.request_stop(name)``), so that
it drains, closes its outputs and prints its summary. A signal that arrives before the session
exists (while the interface opens) is kept and handed to it once attached: no traceback, no
lost request to stop. ``restore()`` puts the previous handlers back.
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
