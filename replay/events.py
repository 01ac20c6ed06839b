"""What the core hands to the rest of replay: finished HTTP messages, defined once.

Both implementations of the core (`replay._fastparse`, compiled, and `replay._fastparse_py`, its
pure twin) create these same classes, so differential tests compare them with ``==``.

Rules:
- a request and the response that answers it share ``conn`` and ``index`` (position within the
  connection, counted from 0 in request order); a response whose request was not captured has
  ``index`` -1 and ``method``/``uri`` None;
- ``data`` holds the exact bytes of the message as they crossed the wire (start line, headers,
  body including any chunk framing and trailers); a message cut by a capture gap holds what was
  captured, the missing bytes are not invented, and ``flags`` says so;
- timestamps are capture times in integer nanoseconds since the Unix epoch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields

KIND_REQUEST = 0
KIND_RESPONSE = 1
KIND_NAMES = ("request", "response")

# Message flags (bit values are part of the .rlog format: docs/log-format.md).
F_INCOMPLETE = 1 << 0    # the message did not end where HTTP framing says it should (loss, cut, capture end)
F_TRUNCATED = 1 << 1     # cut by the snaplen, or past a size limit of the core (replay.limits)
F_GAP = 1 << 2           # bytes are missing inside the message (a hole in the TCP stream that never filled)
F_MIDSTREAM = 1 << 3     # the connection was already open when the capture began
F_INTERIM = 1 << 4       # a 1xx interim response (100 Continue, 103 Early Hints)
F_UPGRADE = 1 << 5       # Upgrade / CONNECT: HTTP framing stops after this message on its connection
F_CLOSE_DELIMITED = 1 << 6  # a response whose body ended with the connection (RFC 9112 §6.3 rule 8)
F_CHUNKED = 1 << 7       # Transfer-Encoding: chunked
F_UNPAIRED = 1 << 8      # a response whose request was not captured
F_RESYNC = 1 << 9        # the first message after the framer resynchronised (loss or mid-stream start)
F_RETRANSMIT = 1 << 10   # retransmitted or overlapping segments carried bytes of this message
F_REPLAYED = 1 << 11     # sent or received by `replay play` (its --output), not captured
F_FAILED = 1 << 12       # `replay play` got no complete answer: the data is the error's kind, not HTTP

# a message cut by the capture: its bytes are not all there
CUT = F_INCOMPLETE | F_GAP | F_TRUNCATED

FLAG_NAMES = (
    (F_INCOMPLETE, "incomplete"),
    (F_TRUNCATED, "truncated"),
    (F_GAP, "gap"),
    (F_MIDSTREAM, "midstream"),
    (F_INTERIM, "interim"),
    (F_UPGRADE, "upgrade"),
    (F_CLOSE_DELIMITED, "close-delimited"),
    (F_CHUNKED, "chunked"),
    (F_UNPAIRED, "unpaired"),
    (F_RESYNC, "resync"),
    (F_RETRANSMIT, "retransmit"),
    (F_REPLAYED, "replayed"),
    (F_FAILED, "failed"),
)


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES if flags & bit]


@dataclass(slots=True, eq=True)
class Message:
    """One HTTP/1.x request or response, framed from one direction of one TCP connection."""

    kind: int            # KIND_REQUEST or KIND_RESPONSE
    conn: int            # connection id, unique within one capture, in order of first packet
    index: int           # position within the connection (request i and response i pair)
    ts_first: int        # ns, capture time of the packet that carried the first byte
    ts_last: int         # ns, capture time of the packet that carried the last byte
    client: tuple        # (ip string, port) of the side that opened the connection
    server: tuple        # (ip string, port)
    flags: int
    data: bytes
    method: str | None = None   # requests; responses: the method of the request answered
    uri: str | None = None      # request-target exactly as sent (decoded latin-1)
    status: int = 0             # responses
    body_length: int = 0        # body bytes after transfer decoding of chunked framing (payload octets)
    head_length: int = 0        # bytes of start line + headers + empty line

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass(slots=True)
class PlannedRequest:
    """A recorded request as a replay sends it (``replay.play.plan``; the core's
    ``StreamPlanner`` makes them too)."""

    conn: int
    index: int
    t: int                       # recorded capture time of the first byte, ns
    data: bytes                  # the bytes to send (Host rewritten, Content-Length true)
    method: str
    uri: str
    head_length: int
    recorded_status: int | None = None
    pipelined: bool = False      # recorded as sent before the previous response ended
    seq: int = 0                 # position among all planned requests, in recorded time order
    body_length: int = 0         # payload octets of ``data`` (chunk framing removed)
    flags: int = 0               # F_CHUNKED when ``data`` is chunked

    def __reduce__(self):
        # what the streamed plan's reader cannot pack (``pack_planned``: requests that carry
        # their recorded messages, for -o) crosses its pipe pickled: a plain tuple pickles three
        # times faster than the __getstate__ of a slotted dataclass, and loads three times faster
        return (type(self), _FIELDS(self))


_FIELDS = operator.attrgetter(*(f.name for f in fields(PlannedRequest)))
