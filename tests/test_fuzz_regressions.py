"""Inputs the fuzz harnesses (fuzz/) showed to break an invariant, kept so they stay fixed.

The invariant is the one every harness holds: bytes from outside make replay raise a
``ReplayError`` (one line from the CLI), never another exception.
"""

from __future__ import annotations

import pytest

from replay.errors import LogFormatError, ReplayError, UsageError
from replay.log import format as fmt
from replay.log.reader import LogReader
from replay.rules import rulesfile

DEEP = 100_000  # deeper than Python's recursion limit


def _log_with_meta(meta: bytes) -> bytes:
    return fmt.pack_file_header() + b"".join(fmt.pack_block(fmt.BLOCK_META, 0, 0, 0, 0, meta, len(meta)))


def test_rlog_metadata_nested_too_deep_is_a_warning(tmp_path):
    """A metadata block whose JSON nests past the recursion limit raised RecursionError."""
    path = tmp_path / "deep.rlog"
    path.write_bytes(_log_with_meta(b"[" * DEEP))
    with LogReader(path) as r:
        assert r.meta == {}
        assert len(r) == 0
        assert any("metadata block" in w for w in r.warnings)


@pytest.mark.parametrize("text", ["a = " + "[" * DEEP, "a = " + "{b = " * DEEP],
                         ids=["arrays", "inline-tables"])
def test_rules_file_nested_too_deep_is_a_usage_error(tmp_path, text):
    """tomllib recurses once per nesting level: a deep file raised RecursionError."""
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match="deep.toml: not valid TOML"):
        rulesfile.load(str(path))


def test_errors_of_both_are_replay_errors():
    assert issubclass(LogFormatError, ReplayError) and issubclass(UsageError, ReplayError)


def test_rlog_section_declaring_a_huge_size_allocates_nothing_of_it():
    """A block whose zstd frame carries no content size and whose header declares a 4 GiB
    section: zstd was asked to allocate the declared size up front (MemoryError, found by the
    rlog harness). Memory now follows the bytes that really come out."""
    import tracemalloc

    import zstandard as zstd

    table = b"x" * 1000
    frame = zstd.ZstdCompressor(write_content_size=False).compress(table)
    assert zstd.frame_content_size(frame) == -1
    dctx = zstd.ZstdDecompressor()
    tracemalloc.start()
    try:
        got = fmt._inflate(dctx, frame, 0xFFFFFFF0, "A")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == table and peak < 16 << 20
    with pytest.raises(fmt.FormatError, match="length mismatch"):
        fmt._inflate(dctx, frame, 10, "A")


@pytest.mark.parametrize("size", [b"FFFFFFFFFFFFFFFFFFFF", b"DE0B6B3A7640001", b"DE0B6B3A7640000"],
                         ids=["beyond-64-bits", "just-above-1e18", "1e18"])
def test_chunk_size_beyond_any_length_is_a_bad_chunk(size):
    """A chunk size past 64 bits raised OverflowError in the compiled framer (fuzz_decode);
    beyond 10**18 bytes it is now a bad chunk in both cores, as a Content-Length of more than
    18 digits is invalid, and both frame the rest alike."""
    from replay import _fastparse_py as pure

    cores = [pure]
    try:
        from replay import _fastparse as compiled

        cores.append(compiled)
    except ImportError:
        pass
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc"
            + b"HTTP/1.1 204 No Content\r\n\r\n")
    got = []
    for core in cores:
        f = core.ResponseFramer(("127.0.0.1", 40000), ("127.0.0.1", 80))
        f.expect("GET")
        f.expect("GET")
        msgs = f.feed(wire, 1) + f.eof(2)
        got.append([(m.status, m.flags, m.data) for m in msgs])
    assert all(g == got[0] for g in got)
