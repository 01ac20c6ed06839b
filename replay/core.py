"""The one place that picks the implementation of the core.

``replay._fastparse`` (compiled from Cython) is used when it was built; ``REPLAY_NO_EXTENSIONS=1``
forces the pure-Python twin ``replay._fastparse_py``. Both have the same API and produce the
same ``replay.events.Message`` objects and counters.

The replay's send loop (``SendLoop``: the sockets of a replay over plain http, kept out of the
sans-IO core) is picked by the same rule, ``replay._sendloop`` or its twin
``replay._sendloop_py``, where there is epoll (Linux); elsewhere ``SendLoop`` is None.
"""

from __future__ import annotations

import os
import select

NO_EXTENSIONS = os.environ.get("REPLAY_NO_EXTENSIONS", "") not in ("", "0")

if NO_EXTENSIONS:
    from replay import _fastparse_py as impl
    COMPILED = False
else:
    try:
        from replay import _fastparse as impl  # type: ignore[attr-defined]
        COMPILED = True
    except ImportError:
        from replay import _fastparse_py as impl
        COMPILED = False


def _sendloop():
    """The send loop's module, or None without epoll (the replay keeps asyncio's transports)."""
    if not hasattr(select, "epoll"):
        return None
    if COMPILED:
        try:
            from replay import _sendloop as module  # type: ignore[attr-defined]
            return module
        except ImportError:
            pass
    from replay import _sendloop_py as module
    return module


def __getattr__(name):
    # ``sendloop`` and ``SendLoop`` are imported when first asked for: the commands that do
    # not replay (convert, capture, ls) do not load it and the socket module it needs
    if name in ("sendloop", "SendLoop"):
        module = _sendloop()
        globals()["sendloop"] = module
        globals()["SendLoop"] = module.SendLoop if module is not None else None
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

Engine = impl.Engine
ResponseFramer = impl.ResponseFramer
json_diff = impl.json_diff
split_strings = impl.split_strings
gather_rows = impl.gather_rows
encode_block = impl.encode_block
restore_payload = impl.restore_payload
pcap_records = impl.pcap_records
make_messages = impl.make_messages
first_field = impl.first_field
Attempt = impl.Attempt
deadline = impl.deadline
feed_ready = impl.feed_ready
PumpCore = impl.PumpCore
Tally = impl.Tally
StreamPlanner = impl.StreamPlanner
pack_planned = impl.pack_planned
unpack_planned = impl.unpack_planned
connection_closes = impl.connection_closes
STAT_NAMES = impl.STAT_NAMES
SUPPORTED_LINKTYPES = impl.SUPPORTED_LINKTYPES
IMPLEMENTATION = "compiled" if COMPILED else "pure"

# The counters that say traffic was lost, cut or not understood: the summaries of convert and
# capture print those that are not zero, `info` prints them before the informative ones.
PROBLEM_COUNTERS = ("gaps", "truncated_packets", "ip_fragments", "incomplete_messages",
                    "unpaired_responses", "non_http_streams", "buffer_cap_hits", "oversize_heads",
                    "oversize_messages")
