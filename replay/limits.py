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
"""

MAX_HEAD = 64 << 10
MAX_MESSAGE = 256 << 20
MAX_STREAM_BUFFER = 4 << 20
MAX_TOTAL_BUFFER = 256 << 20
IDLE_TIMEOUT = 120.0
ADDR_TEXT_KEEP = 65536

ENGINE_DEFAULTS = dict(max_stream_buffer=MAX_STREAM_BUFFER, max_total_buffer=MAX_TOTAL_BUFFER,
                       idle_timeout=IDLE_TIMEOUT, max_message=MAX_MESSAGE, max_head=MAX_HEAD)
