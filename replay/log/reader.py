"""LogReader: a .rlog file as messages, columns and time ranges (docs/log-format.md).

Rules it keeps:

- a file that is not a log (missing, empty, bad magic, unsupported major version, damaged file
  header) raises ``InputError``/``LogFormatError`` with "<path>: ..."; anything wrong *after* the
  file header is a warning, never an exception: every complete, valid block is kept;
- a closed file ends with an index block, found through the trailer in its last 16 bytes; without
  one (a killed writer, a capture still running) or with a damaged one, the index is rebuilt by
  walking the blocks, scanning for the sync marker after a damaged one;
- blocks listed by the index are checked (both CRCs) when first read; a damaged one is dropped from
  ``blocks`` with a warning, so ``len()``, ``table()`` rows and ``message_at`` stay consistent
  with what iteration yields;
- ``table()`` decompresses only the table sections, never the payloads.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import zstandard as zstd

from replay.errors import InputError, LogFormatError
from replay.log import format as fmt
from replay.log import table as tbl
from replay.log.format import FormatError

FAULT_AROUND = 256 << 10   # unmapped on each side of a block read (the kernel maps 64 KiB)


class BlockInfo(NamedTuple):
    """One data block: where it is, the time span of its messages, how many, and its first row."""

    offset: int
    t_min: int
    t_max: int
    count: int
    first_row: int


def is_rlog(path) -> bool:
    """True when the file at ``path`` starts like a .rlog file (its magic)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == fmt.MAGIC[:4]
    except OSError:
        return False


class LogReader:
    def __init__(self, path, cache_blocks: int = 1):
        """``cache_blocks``: how many recently read blocks stay decompressed (random access)."""
        self.path = os.fspath(path)
        self.warnings: list[str] = []
        self.indexed = False          # True when the file's own index was used
        self._summaries: list[int] = []   # offsets of summary blocks (2.1; the last one counts)
        self.addresses: list = []     # global client/server ids of the last table()
        self.strings: list = [None]   # global method/uri ids of the last table() (0 = None)
        self._cache: OrderedDict = OrderedDict()   # offset -> (Table, payload or None), recent last
        self._cache_blocks = max(1, cache_blocks)
        self._table_blocks = None     # the blocks as the last table() numbered their rows
        self._dctx = zstd.ZstdDecompressor()
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise LogFormatError(f"{self.path}: empty file")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory") from None
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {(e.strerror or str(e)).lower()}") from None
        mm = self._mm
        try:
            major, minor, self._hlen = fmt.unpack_file_header(mm)
            self.version = (major, minor)
        except FormatError as e:
            mm.close()
            raise LogFormatError(f"{self.path}: {e}") from None
        found = self._read_index()
        if found is None:
            found = self._scan()
        data, metas = found
        self.blocks: list[BlockInfo] = []
        self._set_blocks([(off, t0, t1, n) for off, t0, t1, n in data])
        self.meta: dict = self._load_meta(metas)

    # -- public API ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(b.count for b in self.blocks)

    def __iter__(self):
        for b in list(self.blocks):
            msgs = self._messages(b)
            if msgs:
                yield from msgs

    def select(self, mask):
        """The messages for which ``mask(cols)`` is true, in written order: ``mask`` takes one
        block's table columns (``cols["flags"]``, ``cols["kind"]``... as numpy arrays) and returns
        a bool array. Blocks with no row selected are not decompressed."""
        for b in list(self.blocks):
            t = self._table(b)
            if t is None:
                continue
            rows = np.flatnonzero(mask(t.cols))
            if len(rows) == 0:
                continue
            msgs = self._messages(b, rows=rows if len(rows) < t.n else None)
            if msgs:
                yield from msgs

    def read_range(self, t0: int | None = None, t1: int | None = None):
        """Messages whose ``ts_first`` lies in [t0, t1) (ns; None: unbounded), in written order.

        Blocks whose time span misses the range are not read.
        """
        lo = -(1 << 63) if t0 is None else t0
        hi = 1 << 63 if t1 is None else t1
        for b in list(self.blocks):
            if b.t_max < lo or b.t_min >= hi:
                continue
            for m in self._messages(b) or ():
                if lo <= m.ts_first < hi:
                    yield m

    def time_span(self) -> tuple:
        """(t_min, t_max) in ns over every message timestamp, or (None, None) for an empty log."""
        if not self.blocks:
            return None, None
        return min(b.t_min for b in self.blocks), max(b.t_max for b in self.blocks)

    def table(self) -> np.ndarray:
        """The fixed columns of every message as a numpy structured array (``table.TABLE_DTYPE``).

        Timestamps are absolute; ``client``/``server`` index ``self.addresses``, ``method``/``uri``
        index ``self.strings`` (0 is None); ``block`` indexes ``self.blocks`` and ``data_offset``
        is the message's offset in its block's payload. Payloads are not decompressed.
        """
        # filled block by block: one block's own table is held at a time, not all of them
        addr_ids: dict = {}
        str_ids: dict = {None: 0}
        out = np.zeros(sum(b.count for b in self.blocks), dtype=tbl.TABLE_DTYPE)
        row = 0
        tables = []
        for b in list(self.blocks):
            t = self._table(b)
            if t is None:
                continue
            bi = len(tables)
            tables.append(b)
            c = t.cols
            part = out[row:row + t.n]
            row += t.n
            for name in ("kind", "flags", "conn", "index", "ts_first", "ts_last", "status",
                         "body_length", "head_length", "data_length"):
                part[name] = c[name]
            part["data_offset"] = t.data_offsets()
            amap = np.array([addr_ids.setdefault(a, len(addr_ids)) for a in t.addrs], dtype=np.uint32)
            smap = np.array([str_ids.setdefault(s, len(str_ids)) for s in t.strings], dtype=np.uint32)
            if t.n:
                part["client"] = amap[c["client"]]
                part["server"] = amap[c["server"]]
                part["method"] = smap[c["method"]]
                part["uri"] = smap[c["uri"]]
            part["block"] = bi
        self.addresses = list(addr_ids)
        self.strings = list(str_ids)
        self._table_blocks = tables
        return out if row == len(out) else out[:row].copy()

    def messages_at(self, rows):
        """(row, message) for each of ``rows`` (ascending row numbers of the last ``table()``),
        block by block: each block's payload is decompressed once. The rows of a block found
        damaged now are skipped (see ``warnings``); the others keep their numbers."""
        blocks = self._table_blocks if self._table_blocks is not None else list(self.blocks)
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows) or not blocks:
            return
        starts = np.cumsum([0] + [b.count for b in blocks])
        where = np.searchsorted(starts, rows, side="right") - 1
        if rows[0] < 0 or rows[-1] >= starts[-1]:
            raise IndexError(f"row out of range (the table holds {int(starts[-1])} rows)")
        edges = np.flatnonzero(np.diff(where)) + 1
        for a, z in zip([0, *edges.tolist()], [*edges.tolist(), len(rows)]):
            bi = int(where[a])
            part = rows[a:z]
            msgs = self._messages(blocks[bi], rows=part - starts[bi])
            if msgs:
                yield from zip(part.tolist(), msgs)

    def block_payload(self, block: int):
        """The payload (every message's bytes, concatenated) of block ``block`` as the last
        ``table()`` numbered them (its ``block`` column; ``data_offset`` and ``data_length`` find a
        message in it), decompressed, without decoding the block's table again; None when the
        block turns out damaged (a warning, and it leaves ``blocks``)."""
        blocks = self._table_blocks if self._table_blocks is not None else list(self.blocks)
        b = blocks[block]
        c = self._cache.get(b.offset)
        if c is not None and c[1] is not None:
            return c[1]
        got = self._read(b, want_payload=True, with_table=False)
        return None if got is None else got[1]

    def message_at(self, row: int):
        """The message in row ``row`` (0-based, written order; negative counts from the end)."""
        n = len(self)
        if row < 0:
            row += n
        if not 0 <= row < n:
            raise IndexError(f"row {row} out of range (the log holds {n} messages)")
        starts = [b.first_row for b in self.blocks]
        b = self.blocks[bisect.bisect_right(starts, row) - 1]
        msgs = self._messages(b, rows=[row - b.first_row])
        if msgs is None:  # the block turned out damaged and was dropped: rows moved
            raise IndexError(f"row {row}: its block is damaged (see warnings)")
        return msgs[0]

    def close(self) -> None:
        self._cache.clear()
        self._mm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- finding blocks --------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def _set_blocks(self, entries) -> None:
        blocks = []
        row = 0
        for off, t0, t1, n in entries:
            blocks.append(BlockInfo(off, t0, t1, n, row))
            row += n
        self.blocks = blocks

    def _read_index(self):
        """(data entries, meta offsets) from the file's index block, or None to scan instead."""
        mm = self._mm
        size = len(mm)
        tsize = fmt.INDEX_TRAILER.size
        if size < self._hlen + fmt.BLOCK_HEADER_LEN + tsize:
            return None
        off, magic = fmt.INDEX_TRAILER.unpack_from(mm, size - tsize)
        if magic != fmt.INDEX_MAGIC:
            return None
        try:
            if not self._hlen <= off <= size - fmt.BLOCK_HEADER_LEN - tsize:
                raise FormatError("trailer points outside the file")
            h = fmt.unpack_block_header(mm, off)
            if h.type != fmt.BLOCK_INDEX or off + h.total_len != size:
                raise FormatError("trailer does not point at the index block")
            fmt.check_body(h, mm, off)
            a, _ = fmt.sections(h, mm, off, self._dctx, want_b=False)
            entries = tbl.decode_index(a)
            offsets = entries["offset"].astype(np.int64)
            if len(entries) and (offsets.min() < self._hlen or offsets.max() >= off
                                 or np.any(np.diff(offsets) <= 0)):
                raise FormatError("entries point outside the file")
        except FormatError as e:
            self._warn(f"index block at offset {off} is damaged ({e}); index rebuilt by scanning")
            return None
        self.indexed = True
        data = [(int(e["offset"]), int(e["t_min"]), int(e["t_max"]), int(e["count"]))
                for e in entries if e["type"] == fmt.BLOCK_DATA]
        metas = [int(e["offset"]) for e in entries if e["type"] == fmt.BLOCK_META]
        self._summaries = [int(e["offset"]) for e in entries if e["type"] == fmt.BLOCK_SUMMARY]
        return data, metas

    def _scan(self):
        """Walk every block from the file header on; resynchronise on the sync marker."""
        mm = self._mm
        size = len(mm)
        pos = self._hlen
        data, metas = [], []
        while pos < size:
            try:
                h = fmt.unpack_block_header(mm, pos)
            except FormatError as e:
                reason = str(e)
                h = None
            if h is not None:
                end = pos + h.total_len
                if end > size:
                    self._warn(f"{size - pos} bytes at offset {pos} are a torn block, ignored")
                    break
                if h.type == fmt.BLOCK_INDEX:  # what it says is being rebuilt here
                    pos = end
                    continue
                try:
                    fmt.check_body(h, mm, pos)
                except FormatError as e:
                    reason = str(e)
                else:
                    if h.type == fmt.BLOCK_DATA:
                        data.append((pos, h.t_min, h.t_max, h.count))
                    elif h.type == fmt.BLOCK_META:
                        metas.append(pos)
                    elif h.type == fmt.BLOCK_SUMMARY:
                        self._summaries.append(pos)
                    pos = end  # other types (index, or newer minor versions): skipped
                    continue
                nxt = end if mm[end:end + len(fmt.SYNC)] == fmt.SYNC else mm.find(fmt.SYNC, pos + 1)
                if nxt < 0:
                    self._warn(f"corrupt block at offset {pos} ({reason}), skipped")
                    pos = end
                    continue
            elif reason == "cut short":
                self._warn(f"{size - pos} bytes at offset {pos} are a torn block, ignored")
                break
            else:
                nxt = mm.find(fmt.SYNC, pos + 1)
            if nxt < 0:
                self._warn(f"{size - pos} bytes at offset {pos} are a torn block, ignored")
                break
            self._warn(f"corrupt block at offset {pos} ({reason}), skipped; resynced at offset {nxt}")
            pos = nxt
        return data, metas

    def _section_a(self, off: int, btype: int, max_raw: int | None = None) -> bytes:
        """Section A of the block of type ``btype`` at ``off``, checked; FormatError if not,
        or if it says it is longer than ``max_raw`` (then it is not inflated)."""
        mm = self._mm
        h = fmt.unpack_block_header(mm, off)
        if h.type != btype:
            raise FormatError(f"not a {fmt.BLOCK_NAMES[btype]} block")
        if max_raw is not None and h.a_raw > max_raw:
            raise FormatError(f"section A of {h.a_raw} bytes, more than a summary holds")
        fmt.check_body(h, mm, off)
        a, _ = fmt.sections(h, mm, off, self._dctx, want_b=False)
        return a

    def _load_meta(self, offsets) -> dict:
        for off in reversed(offsets):
            try:
                meta = json.loads(self._section_a(off, fmt.BLOCK_META))
                if not isinstance(meta, dict):
                    raise FormatError("metadata is not a JSON object")
                return meta
            except (FormatError, ValueError) as e:
                self._warn(f"metadata block at offset {off} is damaged ({e}), ignored")
            except RecursionError:  # json recurses once per level of nesting
                self._warn(f"metadata block at offset {off} is damaged (JSON nested too deeply), ignored")
        return {}

    def summary(self):
        """What the log's summary block says of its recorded requests (2.1, written by a writer
        that closed): ``(requests, first, last, max_conn, conns, last_index)``, ``conns`` a
        sorted uint64 array and ``last_index`` the greatest request index of each; None when
        the log has none, or when it cannot be trusted: damaged (with a warning), the file
        itself damaged (blocks may be missing that it counts), or it does not agree with the
        index (more requests than the data blocks hold messages, times outside theirs).

        A data block is checked (its checksum) only when it is read: a summary whose block went
        bad later is trusted here, and the replay of that block's messages finds it, says so
        with a warning and goes on without them."""
        if not self._summaries or self.warnings or not self.indexed:
            return None
        off = self._summaries[-1]
        try:
            got = tbl.decode_summary(self._section_a(off, fmt.BLOCK_SUMMARY, fmt.SUMMARY_MAX_RAW))
            requests, first, last = got[:3]
            t_min, t_max = self.time_span()
            if requests > len(self) or requests and (first < t_min or last > t_max):
                raise FormatError("it does not agree with the index of the data blocks")
            return got
        except FormatError as e:
            self._warn(f"summary block at offset {off} is damaged ({e}); the log's blocks are "
                       "read for it instead")
            return None

    # -- reading blocks --------------------------------------------------------------------------

    def _load(self, b: BlockInfo, want_payload: bool):
        """(Table, payload or None) of data block ``b``; None (with a warning) when it is damaged."""
        cache = self._cache
        c = cache.get(b.offset)
        if c is not None and (c[1] is not None or not want_payload):
            cache.move_to_end(b.offset)
            return c
        got = self._read(b, want_payload, with_table=True)
        if got is not None:
            cache[b.offset] = got
            cache.move_to_end(b.offset)
            while len(cache) > self._cache_blocks:
                cache.popitem(last=False)
        return got

    def block(self, b: BlockInfo):
        """(Table, payload) of data block ``b`` (cached as the messages' reads are), its payload
        checked against the table; None (with a warning, the block leaving ``blocks``) when it
        is damaged. For readers that take columns and byte ranges, not Message objects."""
        got = self._load(b, want_payload=True)
        if got is None:
            return None
        table, payload = got
        lens = table.cols["data_length"]
        if (int(lens.sum()) if table.n else 0) != len(payload):
            self._warn(f"corrupt block at offset {b.offset} (payload length does not match the "
                       f"table), its {b.count} messages skipped")
            self._drop(b)
            return None
        return got

    def columns(self, b: BlockInfo, names=None):
        """The numeric columns of block ``b``'s table (``Table.cols``; its addresses and strings
        not decoded, several times faster; only ``names`` when given), not cached: for scans of
        a whole log's index. None (with a warning) when the block is damaged."""
        got = self._read(b, False, True, columns_only=True, names=names)
        return None if got is None else got[0]

    def _read(self, b: BlockInfo, want_payload: bool, with_table: bool, columns_only: bool = False,
              names=None):
        """(Table or None, payload or None) of data block ``b``, checked; None (with a warning,
        the block leaving ``blocks``) when it is damaged."""
        mm = self._mm
        try:
            h = fmt.unpack_block_header(mm, b.offset)
            if h.type != fmt.BLOCK_DATA or h.count != b.count:
                raise FormatError("not the data block the index lists")
            fmt.check_body(h, mm, b.offset, want_payload)
            a, payload = fmt.sections(h, mm, b.offset, self._dctx, want_b=want_payload)
            table = None
            major = self.version[0]
            if with_table or payload is not None and major > 1:   # 2.x: the table puts it together
                whole = payload is not None
                t = tbl.Table(a, h.count, h.t_min, columns_only and not whole,
                              None if whole else names, major)
                if whole:
                    payload = t.payload(payload)
                table = t if with_table else None
        except FormatError as e:
            self._warn(f"corrupt block at offset {b.offset} ({e}), its {b.count} messages skipped")
            self._drop(b)
            return None
        self._release(b.offset, h.total_len)
        return table, payload

    def _release(self, offset: int, length: int) -> None:
        """The block's bytes were copied out: unmap its pages from this process (they stay in
        the page cache), so reading a log of any size keeps the resident set flat. With the
        pages around them: a fault maps a window around the page it needs (the kernel's
        fault-around, 64 KiB by default), and a neighbour already read would stay mapped."""
        start = max(0, offset - FAULT_AROUND)
        start -= start % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start,
                             min(len(self._mm), offset + length + FAULT_AROUND) - start)
        except (AttributeError, ValueError, OSError):
            pass

    def release_pages(self) -> None:
        """Unmap every page of the file from this process (they stay in the page cache): after
        a scan, what the kernel mapped around the blocks read is not kept resident."""
        self._release(0, len(self._mm))

    def _drop(self, b: BlockInfo) -> None:
        self._set_blocks([(x.offset, x.t_min, x.t_max, x.count) for x in self.blocks
                          if x.offset != b.offset])
        self._cache.clear()

    def _table(self, b: BlockInfo):
        got = self._load(b, want_payload=False)
        return None if got is None else got[0]

    def _messages(self, b: BlockInfo, rows=None):
        got = self._load(b, want_payload=True)
        if got is None:
            return None
        table, payload = got
        try:
            return table.messages(payload, rows)
        except FormatError as e:
            self._warn(f"corrupt block at offset {b.offset} ({e}), its {b.count} messages skipped")
            self._drop(b)
            return None
