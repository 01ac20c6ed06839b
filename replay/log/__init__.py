"""The .rlog log: compact, append-only, checksummed, time-indexed storage of HTTP messages.

``LogWriter`` writes one, ``LogReader`` reads one back (messages, columns, time ranges) and
survives a torn or damaged file; ``is_rlog`` tells a log from a capture by its magic. The format
is in ``format.py`` (and ``table.py``, its decoding side) and described byte by byte in
docs/log-format.md.
"""

from replay.log.writer import LogWriter

__all__ = ["BlockInfo", "LogReader", "LogWriter", "TABLE_DTYPE", "is_rlog"]


def __getattr__(name: str):
    """The reading side on first use: it needs numpy, which a writer alone (``convert``,
    ``capture``) does without (~0.1 s of every start)."""
    if name in ("BlockInfo", "LogReader", "is_rlog"):
        from replay.log import reader

        return getattr(reader, name)
    if name == "TABLE_DTYPE":
        from replay.log.table import TABLE_DTYPE

        return TABLE_DTYPE
    raise AttributeError(f"module 'replay.log' has no attribute {name!r}")
