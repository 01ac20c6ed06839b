"""TCP sequence-number arithmetic (RFC 1982 serial numbers, RFC 9293 §3.4).

Sequence numbers are 32-bit and wrap. Comparing them raw breaks at the wrap; every comparison in
replay goes through these helpers. The reassembler goes one step further: it keeps each stream's
positions as 64-bit absolute offsets ("abs"), chosen so that ``abs & MASK == seq``, and turns an
incoming 32-bit number into an abs offset relative to a known nearby offset with ``unwrap``. After
that, ordinary integer comparison is correct across any number of wraps.
"""

MASK = 0xFFFFFFFF
HALF = 0x80000000


def seq_diff(a: int, b: int) -> int:
    """Signed distance a - b in serial-number space, in [-2**31, 2**31)."""
    return ((a - b + HALF) & MASK) - HALF


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def unwrap(seq: int, near: int) -> int:
    """The absolute offset congruent to ``seq`` mod 2**32 that lies closest to absolute ``near``."""
    return near + seq_diff(seq, near & MASK)
