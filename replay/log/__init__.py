"""The .rlog log: compact, append-only, checksummed, time-indexed storage of HTTP messages.

``LogWriter`` writes one, ``LogReader`` reads one back (messages, columns, time ranges) and
survives a torn or damaged file; ``is_rlog`` tells a log from a capture by its magic. The format
is in ``format.py`` and described byte by byte in docs/log-format.md.
"""

from replay.log.format import TABLE_DTYPE
from replay.log.reader import BlockInfo, LogReader, is_rlog
from replay.log.writer import LogWriter

__all__ = ["BlockInfo", "LogReader", "LogWriter", "TABLE_DTYPE", "is_rlog"]
