"""The core's resource limits, defined once: both implementations, the readers and the CLI take
their defaults from here.

Every limit bounds what one hostile or broken peer can make the core hold or scan:
- ``MAX_HEAD``: bytes of a message head (start line and header fields) before the framer gives
  up on finding its end. The head's first ``MAX_HEAD`` bytes are kept as a message flagged
  incomplete and truncated, and framing moves on. 64 KiB is above the defaults of the servers
  captured in practice (nginx 32 KiB in all, Apache 8 KiB a line, Node 16 KiB, Envoy 60 KiB);
  Go's net/http accepts up to 1 MiB, so raise it for Go services with very large headers.
- ``MAX_MESSAGE``: bytes of one message (head and body); beyond it the message is kept cut.
- ``MAX_STREAM_BUFFER``: bytes one direction may hold beyond a hole before the hole is lost.
- ``MAX_TOTAL_BUFFER``: the same, for all directions together.
- ``IDLE_TIMEOUT``: seconds of capture time after which a silent connection is closed.
- ``ADDR_TEXT_KEEP``: texts of addresses the core remembers (a capture holds few addresses many
  times over); past it they are forgotten all at once.

The streamed replay's planner (``StreamPlanner``, rules in ``replay.play.stream``) holds a window
of recorded time, bounded in time and in count:
- ``REORDER_NS``: log time past a request's start before it is released;
- ``ANSWER_WAIT_NS``: ... and at most this long waiting for its final response;
- ``CONN_IDLE_NS``: recorded time after which a connection without requests is over;
- ``MAX_PENDING``: requests waiting in the window (beyond it the oldest leaves early);
- ``EXPIRE_EVERY_NS``: log time between two looks for connections idle ``CONN_IDLE_NS``;
- ``MAX_EARLY``: final responses read before their request, kept at most;
- ``MAX_LATE``: requests planned before their answer ended, whose status may still come.

The rows a convert or capture keeps for the log writer (``RowBuffer``):
- ``ROWS_HAND_OVER``: bytes of a block taken from the start of the compiled buffer from which
  the block takes the buffer's memory itself, rather than a copy (large bodies: a block is cut
  at the writer's 8 MiB); smaller blocks are copied out, so that the buffer is not allocated
  anew for each of them (API messages: 20 MiB more held at the peak of a convert).
- ``ROWS_DIRECT_FROM``: a message with a Content-Length body of this many bytes or more (head
  included, and not beyond ``MAX_MESSAGE``) is framed by the compiled core straight into memory
  of its own, which its row then takes as it is: its body is copied once from the capture, not
  into the framer's buffer and then into the rows' (large bodies: a third of convert's time).
  That memory is the whole message's length at once (it never moves as it fills) while the
  room such memory has, not yet filled, all framers together, stays within ``ROWS_DIRECT_SPARE``;
  beyond it, the memory grows with the bytes that come (64 KiB, or what came, at first, its
  size doubled as it fills): many heads that claim large bodies take no memory they do not fill.

The log writer's zstd level (``LOG_LEVEL``): ``--level`` of convert, capture, shadow and filter
(why level 1: ``replay/log/writer.py``).
"""

MAX_HEAD = 64 << 10
MAX_MESSAGE = 256 << 20
MAX_STREAM_BUFFER = 4 << 20
MAX_TOTAL_BUFFER = 256 << 20
IDLE_TIMEOUT = 120.0
ADDR_TEXT_KEEP = 65536
ROWS_HAND_OVER = 4 << 20
ROWS_DIRECT_FROM = 32 << 10
ROWS_DIRECT_SPARE = 64 << 20
LOG_LEVEL = 1

REORDER_NS = 1_000_000_000
ANSWER_WAIT_NS = 2_000_000_000
CONN_IDLE_NS = 120_000_000_000
MAX_PENDING = 100_000
EXPIRE_EVERY_NS = 100_000_000
MAX_EARLY = 10_000
MAX_LATE = 100_000

ENGINE_DEFAULTS = dict(max_stream_buffer=MAX_STREAM_BUFFER, max_total_buffer=MAX_TOTAL_BUFFER,
                       idle_timeout=IDLE_TIMEOUT, max_message=MAX_MESSAGE, max_head=MAX_HEAD)
