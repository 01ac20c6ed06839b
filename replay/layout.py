"""The byte layout of a log data block's table, shared by the two cores (which encode it, from
messages), ``replay.log.format`` (which says what each column holds) and ``replay.log.table``
(which decodes it). docs/log-format.md describes the same bytes in prose.

Rules it keeps:
- one definition: the pure core and the log modules derive their structs, dtypes and widths
  from the tuples here; the compiled core refuses to load when its C layout (the table's
  columns and widths) differs from them, and a test compares its row struct's size;
- ``ROW_FIELDS`` is what ``gather_rows`` hands over, one packed record a message, values as the
  message holds them (ids in place of addresses and strings);
- ``TABLE_COLUMNS`` is what a version 2 table stores, column by column, each in byte planes.
"""

from __future__ import annotations

# One packed little-endian record per message (``struct`` codes), in this order. client and
# server are ids into the block's address table (in order of first use), uri and method ids
# into its string table (0 = None; the uris first, in order of first use, then the methods
# that are no uri); ``extra`` is len(data) - head_length - body_length mod 2**64; ``elided`` is
# 1 where a request's target was left out of the payload.
ROW_FIELDS = (
    ("kind", "B"), ("flags", "I"), ("conn", "Q"), ("index", "q"), ("ts_first", "q"),
    ("ts_last", "q"), ("status", "H"), ("body_length", "Q"), ("head_length", "I"),
    ("extra", "Q"), ("client", "I"), ("server", "I"), ("method", "I"), ("uri", "I"),
    ("elided", "B"),
)
ROW_STRUCT = "<" + "".join(code for _, code in ROW_FIELDS)

# A version 2 table: a u64 time unit and a u32 count of connections (TABLE_PREFIX bytes), these
# columns in this order (unsigned, ``struct`` codes), each stored byte-plane by byte-plane, the
# connection table (u64 planes), then the address and string tables. What each column holds is
# in replay.log.format (COLUMNS) and docs/log-format.md.
TABLE_COLUMNS = (
    ("kind", "B"), ("flags", "I"), ("conn", "I"), ("index", "Q"), ("ts_first", "Q"),
    ("ts_last", "Q"), ("status", "H"), ("body_length", "Q"), ("head_length", "I"),
    ("extra", "Q"), ("client", "I"), ("server", "I"), ("method", "I"), ("uri", "I"),
    ("elided", "B"),
)
WIDTHS = {"B": 1, "H": 2, "I": 4, "Q": 8}
TABLE_PREFIX = 12
TABLE_ROW_BYTES = sum(WIDTHS[code] for _, code in TABLE_COLUMNS)


def unfit(column: str, value) -> ValueError:
    """The error both cores raise for a message field a log column cannot hold."""
    what = repr(value) if isinstance(value, int) else f"a {type(value).__name__}"
    return ValueError(f"a message field does not fit the .rlog column {column!r}: {what}")


def bad_address(addr) -> ValueError:
    return ValueError(f"address {addr!r} does not fit .rlog (ip <= 255 bytes, port u16)")
