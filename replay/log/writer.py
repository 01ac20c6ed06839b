"""LogWriter: messages in, a .rlog file out (docs/log-format.md).

Rules it keeps:

- the file is created with mode 0600 (messages carry cookies and tokens) and replaced if it exists;
  or the writer is handed an open descriptor (``fd=``, from ``replay.outputs``, which locks the
  name and renames a temporary file into place) and ``path`` only names it in messages;
- ``write`` only buffers; a block is cut when it holds ``block_records`` messages or
  ``block_bytes`` message bytes, its table is encoded in the caller's thread, then it is
  compressed by a background thread (``workers`` of them: ``convert`` asks for ``WORKERS``) and
  written in the order given (zstd releases the GIL, so parsing and compression overlap on two
  cores). At most ``max_pending`` blocks wait;
- ``write_rows`` takes the messages the core kept as rows (``Engine(rows=True)``) in the same
  blocks, and the workers encode them too (the compiled core's rows are encoded mostly without
  the GIL): no ``Message`` object is made for them at all. ``convert`` of a capture goes this way;
- ``flush`` writes the partial block and waits until everything queued is in the file (then
  fsyncs): what a live capture calls every second so a kill loses at most that second;
- metadata is a JSON object; ``update_meta`` merges into it and appends a new metadata block
  holding the whole object (readers take the last one);
- ``close`` writes the index block that ends a finished file. Without it (a killed writer) the
  reader rebuilds the index by scanning;
- a failed write (disk full, I/O error) raises ``OutputError`` naming the file, once; the file is
  cut back to the end of the last complete block, so everything written before stays readable.
  A block that could not be made (an exception in its encoding or compression) is raised to the
  caller, and no block after it is written.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import zstandard as zstd

from replay.errors import OutputError
from replay.limits import LOG_LEVEL
from replay.log import format as fmt


# The writer's default zstd level is 1 (``replay.limits.LOG_LEVEL``). A payload is compressed with
# its window over the whole payload (``PAYLOAD_WINDOW_LOG``): the bodies a server sends again and
# again (its images, scripts, the same JSON) lie further apart in a block than a level's own
# window reaches (level 1: 512 KiB, level 3: 2 MiB), and a window over the block finds them.
# Measured on the payload sections of bench_convert.py's two captures' logs (compressed size
# against their raw bytes, and the CPU of compressing them all, best of 3):
#   465 MB MTU-sized capture (441 MB): before (level 3, a level -3 probe first and its frame kept
#   when it did not shrink by 15 %) 0.898 in 201 ms; level 1 with the window over the payload
#   0.418 in 123 ms; level 3 so 0.413 in 362 ms (603 ms after the probe);
#   API capture (48 MB of small JSON messages): before 0.0217 in 56 ms; level 1 so 0.0215 in
#   27 ms; level 3 so 0.0217 in 32 ms.
# Level 1 stores both as small as level 3 does, or smaller, in less than half its time; on bytes
# that do not compress (random) it runs at 3.5-4 GB/s, as fast as the probe at level -3 did.
# The window is 2^PAYLOAD_WINDOW_LOG bytes at most up to level 19 (a block's bytes, ``block_bytes``;
# levels 20-22 keep their own, larger ones), so that a reader that decompresses a payload as a
# stream (one above 64 MiB: a large body alone in its block) holds a window of 8 MiB at most.
PAYLOAD_WINDOW_LOG = 23
# At levels of FAST_PROBE_FROM or more (lazier match finders, under 1 GB/s) a payload of
# FAST_PROBE_MIN bytes or more is compressed at FAST_LEVEL first (see _compress_payload).
FAST_PROBE_FROM = 3
FAST_PROBE_MIN = 64 << 10
# Tables are compressed about as small as level 8 would at least: on API traffic a table is a
# fifth of a block's raw bytes and half of its compressed size, and level 8 stores it 10 % smaller
# than level 3 (its request targets above all). Level 9 stores API tables no smaller, in 1.4 times
# the time.
TABLE_LEVEL = 8
# ... with level 8's match finder (lazy2) set for time: 8 candidates searched, not 16, for matches
# of 6 bytes at least, not 5; no target length (16); smaller hash and chain tables (2^17 and 2^16
# entries, not 2^20 and 2^19: a table is under 1 MiB). The same size on API tables of 8,192 rows
# (100,000 exchanges: 1,432,274 bytes against 1,432,670) in 0.70 of the time (86 against 123 ms);
# up to 2.4 % larger on tables of fewer rows, 1.8 % on the tables of large bodies (a 396 MB log:
# 194 KB against 191 KB), 0.2 % on the corpus's. On a convert of API traffic the table's
# compression was half the writer's CPU, which competes with the reading
# (benchmarks/bench_convert.py --api). Used for levels up to TABLE_LEVEL; above, the level's own.
TABLE_PARAMS = dict(window_log=21, chain_log=16, hash_log=17, search_log=3, min_match=6,
                    target_length=0, strategy=zstd.STRATEGY_LAZY2)
FAST_KEEP_RATIO = 0.85      # a fast frame this size or larger (of the raw bytes) is kept
FAST_LEVEL = -3             # the first try of a large payload (see _compress_payload)
# ``replay convert``'s writer threads: blocks encoded and compressed at once, each by its own
# thread (and its own zstd contexts), then written in the order they were given (``workers``;
# other writers keep one: a replay's output log shares its process with the sender, a live
# capture its CPU with the capture, neither measured with two). On a convert of small API
# messages the writer's one thread was the longer of the two (the table's compression above
# all): while the reading waits for it and at the end, when the last blocks queued are
# compressed, a second one uses the core the reading leaves idle (the tail after the last
# packet: 35-40 ms -> 14-25 ms).
WORKERS = 2
# ... but payloads of this many bytes or more are compressed one at a time: the work on large
# bodies is copies and a fast zstd level, bound by memory, and two at once made a convert of
# them slower (465 MB capture: 0.96-1.16 s against 0.80-0.87 s) and 38 MiB larger at its peak.
ALONE_FROM = 4 << 20
# ``direct``: the log goes to the disk past the page cache (O_DIRECT), from an aligned buffer of
# this size, in whole pages; what is left of a page waits for the next block (or is written
# through the page cache at a flush and at the close, so that the file always ends where its
# last block does). A convert of large bodies writes hundreds of MB: through the page cache that
# copy cost 0.14 s of CPU per 400 MB, 1.2-1.5 s on pages this VM had not touched yet, against
# 0.02 s direct; the whole convert took 0.57-0.72 s against 0.80-0.94 s (465 MB capture).
DIRECT_STAGE = 8 << 20
# ``replay convert`` writes directly from an input of this size (a smaller log stays in the page
# cache, where what reads it next finds it, and grows block by block as it is written)
DIRECT_FROM_INPUT = 256 << 20
DIRECT_OUT = 4 << 20        # staged bytes written out once a block leaves this many
PAGE = 4096                 # O_DIRECT's alignment of memory, length and file offset


def _payload_window(level: int, size: int) -> int:
    """The window (its log) of a payload of ``size`` bytes at ``level``: 0, the level's own,
    when that covers it or is no smaller than 2^PAYLOAD_WINDOW_LOG (levels 17 and up), else
    PAYLOAD_WINDOW_LOG. (zstd fits the window to the payload's size, which it knows: one context
    a thread and level serves every size, with frames byte for byte those of a window fitted
    here.)"""
    own = zstd.ZstdCompressionParameters.from_level(level).window_log
    if size <= 1 << own or own >= PAYLOAD_WINDOW_LOG:
        return 0
    return PAYLOAD_WINDOW_LOG


def _payload_compressor(level: int, window: int):
    """A compressor at ``level``, with the window 2^``window`` (0: the level's own; else larger,
    ``_payload_window``)."""
    if not window:
        return zstd.ZstdCompressor(level=level)
    p = zstd.ZstdCompressionParameters.from_level(level)
    return zstd.ZstdCompressor(compression_params=zstd.ZstdCompressionParameters(
        window_log=window, chain_log=p.chain_log, hash_log=p.hash_log,
        search_log=p.search_log, min_match=p.min_match, target_length=p.target_length,
        strategy=p.strategy))


def _table_compressor(level: int):
    """The compressor of a block's table at the writer's ``level``: ``TABLE_PARAMS`` up to
    ``TABLE_LEVEL``, the level itself above it."""
    if level > TABLE_LEVEL:
        return zstd.ZstdCompressor(level=level)
    return zstd.ZstdCompressor(compression_params=zstd.ZstdCompressionParameters(**TABLE_PARAMS))


class LogWriter:
    def __init__(self, path, meta: dict | None = None, block_records: int = 8192,
                 block_bytes: int = 8 << 20, level: int = LOG_LEVEL, threads: bool = True,
                 max_pending: int = 4, fd: int | None = None, workers: int = 1,
                 direct: bool = False):
        from replay import __version__

        if block_records < 1 or block_bytes < 1:
            raise ValueError("block_records and block_bytes must be positive")
        self.path = os.fspath(path)
        self.block_records = block_records
        self.block_bytes = block_bytes
        self.max_pending = max(1, max_pending)
        self.records_written = 0     # messages accepted (write, write_many; write_rows: taken)
        self._msgs: list = []
        self._msg_bytes = 0
        self._rows = None            # the core's RowBuffer given to write_rows
        self._pending: deque = deque()
        self._entries: list = []     # (offset, t_min, t_max, count, type) of written blocks
        self._records_on_disk = 0
        self._summary: fmt.Summary | None = fmt.Summary()    # None: given up (too many conns)
        self._offset = 0             # end of the last complete block (the writing job's)
        self._error: OutputError | None = None
        self._error_reported = False
        self._closed = False
        self.level = level
        self.table_level = None      # None: as ``_table_compressor`` says; else this level
        self._local = threading.local()     # each thread's zstd contexts (``_zstd``)
        self._alone = threading.Lock()      # held to compress a payload of ALONE_FROM bytes
        self._turn = None            # set once the last job submitted has written its block
        self._broken = False         # a job raised: no block after it is written
        self._meta = {
            "format": f"rlog {fmt.VERSION_MAJOR}.{fmt.VERSION_MINOR}",
            "tool": f"replay {__version__}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self._meta.update(meta or {})
        if fd is not None:
            self._fd = fd
        else:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                   0o600)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create: {_reason(e)}") from None
            try:
                if stat.S_ISREG(os.fstat(self._fd).st_mode):
                    os.fchmod(self._fd, 0o600)  # also when the file existed with another mode
            except OSError:
                pass
        self._stage = _Stage.open(self._fd) if direct else None
        self._executor = (ThreadPoolExecutor(max(1, workers), thread_name_prefix="rlog-writer")
                          if threads else None)
        try:
            self._write_parts([fmt.pack_file_header()], None)
            self._submit(self._job_meta, self._meta_bytes())
        except BaseException:
            self._release()
            raise

    # -- public API ----------------------------------------------------------------------------

    @property
    def bytes_written(self) -> int:
        """Bytes of complete blocks (and the file header) in the file so far."""
        return self._offset

    @property
    def meta(self) -> dict:
        return dict(self._meta)

    def write(self, msg) -> None:
        if self._closed:
            raise ValueError("write to a closed LogWriter")
        if self._error is not None:
            self._raise()
        if self._rows is not None and len(self._rows):
            self._cut()                 # the rows given before go first
        self._msgs.append(msg)
        self._msg_bytes += len(msg.data)
        self.records_written += 1
        if len(self._msgs) >= self.block_records or self._msg_bytes >= self.block_bytes:
            self._cut()

    def write_many(self, msgs: list) -> None:
        """``write`` of each of ``msgs`` in order (the same blocks), with less work a message."""
        if self._closed:
            raise ValueError("write to a closed LogWriter")
        if self._error is not None:
            self._raise()
        if self._rows is not None and len(self._rows):
            self._cut()
        i, n = 0, len(msgs)
        while i < n:
            take = msgs[i:i + self.block_records - len(self._msgs)]
            size = sum([len(m.data) for m in take])
            if self._msg_bytes + size >= self.block_bytes:     # the byte limit falls inside
                for m in take:
                    self.write(m)
            else:
                self._msgs += take
                self._msg_bytes += size
                self.records_written += len(take)
                if len(self._msgs) >= self.block_records:
                    self._cut()
            i += len(take)

    def write_rows(self, rows) -> None:
        """The messages the core holds in ``rows`` (its ``RowBuffer``), in the blocks ``write``
        would cut: each full block is taken now, to be encoded and written by the workers; rows
        short of a block stay in ``rows`` until the next call, ``flush`` or ``close``."""
        if self._closed:
            raise ValueError("write to a closed LogWriter")
        if self._error is not None:
            self._raise()
        if rows is not self._rows:
            self._cut()                 # what was given before goes first
            self._rows = rows
        elif self._msgs:
            self._cut()
        while True:
            count = rows.block_end(self.block_records, self.block_bytes)
            if not count:
                return
            self._take_rows(count)

    def flush(self, fsync: bool = True) -> None:
        """Write the partial block, wait for every queued block, then (by default) fsync."""
        if self._closed:
            raise ValueError("flush of a closed LogWriter")
        self._cut()
        self._drain()
        self._stage_tail()
        if fsync:
            self._fsync()

    @property
    def direct(self) -> bool:
        """Whether the log goes to the disk past the page cache (``direct=True`` and the file
        allows it)."""
        return self._stage is not None

    def update_meta(self, meta: dict) -> None:
        if self._closed:
            raise ValueError("update_meta of a closed LogWriter")
        self._meta.update(meta)
        self._submit(self._job_meta, self._meta_bytes())

    def close(self, fsync: bool = True) -> None:
        """Write what is left and the index. ``fsync=False`` leaves the flush to disk to the
        kernel (``replay convert``: its source is still there if the machine goes down)."""
        if self._closed:
            return
        try:
            if self._error is None:
                self._cut()
                self._submit(self._job_summary)
                self._submit(self._job_index)
                self._drain()
                self._stage_tail()
                if fsync:
                    self._fsync()
        finally:
            self._release()
        if self._error is not None and not self._error_reported:
            self._raise()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:  # keep what was written; the exception on its way out is the one to report
            self.close()
        except Exception:
            pass

    # -- inside ----------------------------------------------------------------------------------

    def _meta_bytes(self) -> bytes:
        return json.dumps(self._meta, ensure_ascii=False, default=str, sort_keys=True).encode()

    def _raise(self):
        self._error_reported = True
        raise self._error

    def _cut(self) -> None:
        # messages held came before any rows held: write() takes held rows first
        self._cut_messages()
        rows = self._rows
        if rows is not None and len(rows):
            while count := rows.block_end(self.block_records, self.block_bytes):
                self._take_rows(count)
            if len(rows):
                self._take_rows(len(rows))

    def _cut_messages(self) -> None:
        if not self._msgs:
            return
        msgs = self._msgs
        self._msgs = []
        self._msg_bytes = 0
        table, parts, t_min, t_max, summary = fmt.encode_table(msgs)
        self._submit(self._job_data, table, parts, len(msgs), t_min, t_max, summary)

    def _take_rows(self, count: int) -> None:
        self._submit(self._job_rows, self._rows.take(count))
        self.records_written += count

    def _submit(self, job, *args) -> None:
        if self._error is not None:
            self._raise()
        if self._executor is None:
            self._run(job, None, None, *args)
            return
        before, turn = self._turn, threading.Event()
        fut = self._executor.submit(self._run, job, before, turn, *args)
        self._turn = turn            # (only once submitted: a turn nobody sets would hang them all)
        pending = self._pending
        pending.append(fut)
        while pending and (len(pending) > self.max_pending or pending[0].done()):
            self._result(pending.popleft())

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            self._result(pending.popleft())

    def _result(self, fut) -> None:
        fut.result()
        if self._error is not None:
            self._raise()

    def _run(self, job, before, turn, *args) -> None:
        """``job(before, *args)`` on a worker: a job prepares its block (encodes, compresses),
        then waits for ``before`` (the previous job's turn: written, or given up) to write it.
        ``turn`` is set once this one is done and every one before it too, whatever happened; a
        job that raised breaks the chain: no later one writes."""
        failed = False
        try:
            if self._error is None and not self._broken:  # after a failure nothing is appended
                job(before, *args)
        except BaseException:
            failed = True
            raise
        finally:
            if before is not None:
                before.wait()         # (the blocks before this one are written first)
            if failed:
                self._broken = True
            if turn is not None:
                turn.set()

    def _my_turn(self, before) -> bool:
        """Wait until the jobs submitted before are done: True when this one may write."""
        if before is not None:
            before.wait()
        return self._error is None and not self._broken

    def _zstd(self, kind: str, size: int = 0):
        """This thread's zstd context: ``payload`` (for ``size`` bytes), ``table``, or ``fast``
        (``_compress_payload``'s probe). A context is used by one thread at a time, and made again
        when the levels change."""
        local = self._local
        level = self.level
        window = 0
        if kind != "table":
            window = _payload_window(FAST_LEVEL if kind == "fast" else level, size)
        key = (kind, level, self.table_level, window)
        ctx = local.__dict__.get(key, local)
        if ctx is local:
            if kind == "payload":
                ctx = _payload_compressor(level, window)
            elif kind == "table":
                ctx = (_table_compressor(level) if self.table_level is None
                       else zstd.ZstdCompressor(level=self.table_level))
            else:
                ctx = _payload_compressor(FAST_LEVEL, window)
            local.__dict__[key] = ctx
        return ctx

    def _job_data(self, before, table: bytes, datas: list, count: int, t_min: int, t_max: int,
                  summary=None) -> None:
        if sum(len(d) for d in datas) >= ALONE_FROM:
            with self._alone:
                parts = self._data_block(table, datas, count, t_min, t_max)
        else:
            parts = self._data_block(table, datas, count, t_min, t_max)
        self._write_data(before, parts, count, t_min, t_max, summary)

    def _job_rows(self, before, block) -> None:
        if block.nbytes >= ALONE_FROM:       # (its encoding copies the payload: inside too)
            with self._alone:
                table, payload, t_min, t_max, summary = block.encode()
                parts = self._data_block(table, [payload], len(block), t_min, t_max)
        else:
            table, payload, t_min, t_max, summary = block.encode()
            parts = self._data_block(table, [payload], len(block), t_min, t_max)
        self._write_data(before, parts, len(block), t_min, t_max, summary)

    def _data_block(self, table: bytes, datas: list, count: int, t_min: int, t_max: int) -> list:
        payload = b"".join(datas)
        a = self._zstd("table").compress(table)
        b = self._compress_payload(payload)
        return fmt.pack_block(fmt.BLOCK_DATA, fmt.BF_A_ZSTD | fmt.BF_B_ZSTD, count, t_min, t_max,
                              a, len(table), b, len(payload))

    def _write_data(self, before, parts: list, count: int, t_min: int, t_max: int,
                    summary) -> None:
        if not self._my_turn(before):
            return
        if self._summary is not None and summary is not None:
            try:
                if not self._summary.add(summary):
                    self._summary = None
            except Exception:  # noqa: BLE001  (the summary is optional: readers then scan)
                self._summary = None
        self._write_parts(parts, (t_min, t_max, count, fmt.BLOCK_DATA))

    def _compress_payload(self, payload: bytes) -> bytes:
        """Message bytes as a zstd frame, its window over all of them (``LOG_LEVEL``).

        At a level of ``FAST_PROBE_FROM`` or more, bodies that are already compressed (images,
        gzip, archives) would gain almost nothing from that level but cost it in full: level 3
        runs at ~0.8 GB/s on them, level -3 at ~4 GB/s, to within 2 % of the size. So there a
        large payload is compressed at ``FAST_LEVEL`` first; when that does not shrink it by 15 %,
        the fast frame is kept, otherwise the payload is compressed again at the level. (Storing
        such payloads raw was tried: it saved 0.1 s on a 450 MB capture and cost 8 % of the log's
        size.)"""
        n = len(payload)
        # (level 0 is zstd's default, level 3)
        if (self.level >= FAST_PROBE_FROM or self.level == 0) and n >= FAST_PROBE_MIN:
            quick = self._zstd("fast", n).compress(payload)
            if len(quick) > FAST_KEEP_RATIO * n:
                return quick
        return self._zstd("payload", n).compress(payload)

    def _job_meta(self, before, data: bytes) -> None:
        parts = fmt.pack_block(fmt.BLOCK_META, fmt.BF_A_ZSTD, 0, 0, 0,
                               self._zstd("payload").compress(data), len(data))
        if self._my_turn(before):
            self._write_parts(parts, (0, 0, 0, fmt.BLOCK_META))

    def _job_summary(self, before) -> None:
        if not self._my_turn(before):        # (every block's summary added)
            return
        if self._summary is None or not self._summary.holds():
            return
        data = fmt.encode_summary(self._summary)
        parts = fmt.pack_block(fmt.BLOCK_SUMMARY, fmt.BF_A_ZSTD, 0, 0, 0,
                               self._zstd("payload").compress(data), len(data))
        self._write_parts(parts, (0, 0, 0, fmt.BLOCK_SUMMARY))

    def _job_index(self, before) -> None:
        if not self._my_turn(before):
            return
        data = [e for e in self._entries if e[4] == fmt.BLOCK_DATA]
        t_min = min((e[1] for e in data), default=0)
        t_max = max((e[2] for e in data), default=0)
        a = fmt.encode_index(self._entries, self._offset)
        parts = fmt.pack_block(fmt.BLOCK_INDEX, 0, len(self._entries), t_min, t_max, a, len(a))
        self._write_parts(parts, None)

    def _write_parts(self, parts: list, entry) -> None:
        parts = [p for p in parts if p]
        size = sum(len(p) for p in parts)
        start = self._offset
        fd = self._fd
        stage = self._stage
        if stage is not None:
            try:
                for p in parts:
                    stage.put(p)
                if stage.n >= DIRECT_OUT:
                    stage.out()
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct_refused(start):
                    self._direct_failed(start, e)
                    return
                return self._write_parts(parts, entry)     # through the page cache from here
            self._offset = start + size
            if entry is not None:
                self._entries.append((start, *entry))
                if entry[3] == fmt.BLOCK_DATA:
                    self._records_on_disk += entry[2]
            return
        try:
            done = os.writev(fd, parts)
            if done < size:  # a short write: the rest one piece at a time
                rest = memoryview(b"".join(parts))
                while done < size:
                    done += os.write(fd, rest[done:])
        except OSError as e:
            try:
                os.ftruncate(fd, start)  # leave no torn block behind
                os.lseek(fd, start, os.SEEK_SET)
            except OSError:
                pass
            self._fail(e, "cannot write")
            return
        self._offset = start + size
        if entry is not None:
            self._entries.append((start, *entry))
            if entry[3] == fmt.BLOCK_DATA:
                self._records_on_disk += entry[2]

    def _stage_tail(self) -> None:
        """What is staged, into the file through the page cache (all jobs done): the file
        then ends where the last block does."""
        if self._stage is not None and self._error is None:
            try:
                self._stage.tail()
            except OSError as e:
                self._direct_failed(self._offset, e)
                self._raise()

    def _direct_refused(self, start: int) -> bool:
        """The file system took O_DIRECT but refuses its writes (EINVAL): the blocks before
        ``start`` still staged go in through the page cache, which writes the rest. False when
        that fails too."""
        stage = self._stage
        try:
            if stage.rescue(start) < start:
                return False
            os.lseek(self._fd, start, os.SEEK_SET)
        except OSError:
            return False
        self._stage = None
        stage.close()
        return True

    def _direct_failed(self, start: int, e: OSError) -> None:
        """A direct write failed: the complete blocks before ``start`` still staged go in
        through the page cache; if that fails too, the file keeps the blocks that are whole on
        the disk. Then the write fails as ``_write_parts`` does."""
        stage, self._stage = self._stage, None
        kept = stage.rescue(start)
        stage.close()
        if kept < start:            # the last blocks that are whole in the file
            ends = [(b, a[3] if a[4] == fmt.BLOCK_DATA else 0)
                    for a, b in zip(self._entries, [x[0] for x in self._entries[1:]] + [start])]
            kept = max([b for b, _ in ends if b <= kept]
                       or [fmt.FILE_HEADER_LEN if kept >= fmt.FILE_HEADER_LEN else 0])
            self._records_on_disk = sum(n for b, n in ends if b <= kept)
        try:
            os.ftruncate(self._fd, kept)
            os.lseek(self._fd, kept, os.SEEK_SET)
        except OSError:
            pass
        self._offset = kept
        self._fail(e, "cannot write")

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EROFS):  # fsync unsupported (pipes, some fs)
                self._fail(e, "cannot sync")
                self._raise()

    def _fail(self, e: OSError, what: str) -> None:
        if self._error is None:
            n = self._records_on_disk
            self._error = OutputError(
                f"{self.path}: {what}: {_reason(e)} "
                f"({n} message{'s' if n != 1 else ''} written before it are kept)")

    def _release(self) -> None:
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        stage, self._stage = self._stage, None
        if stage is not None:       # (also when closing failed: the complete blocks staged)
            try:
                if stage.rescue(self._offset) >= self._offset:
                    os.ftruncate(self._fd, self._offset)
            except OSError:
                pass
            stage.close()
        try:
            os.close(self._fd)
        except OSError:
            pass


class _Stage:
    """The aligned buffer of a direct writer: bytes from file offset ``disk`` on, ``n`` of
    them; whole pages go out with O_DIRECT."""

    def __init__(self, fd: int):
        import mmap

        self.fd = fd
        self.buf = mmap.mmap(-1, DIRECT_STAGE)
        self.view = memoryview(self.buf)
        self.n = 0
        self.disk = 0
        self.tailed = 0         # the file is whole up to here (``tail``)

    def close(self) -> None:
        try:
            self.view.release()
            self.buf.close()
        except BufferError:     # a slice still held (by an exception's frame): freed with it
            pass

    @classmethod
    def open(cls, fd: int):
        """A stage for ``fd``, or None where O_DIRECT cannot be had (not a regular file, a
        file system without it, not Linux)."""
        import fcntl

        flag = getattr(os, "O_DIRECT", 0)
        try:
            if not flag or not stat.S_ISREG(os.fstat(fd).st_mode) or os.lseek(fd, 0, os.SEEK_CUR):
                return None
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
        except OSError:
            return None
        return cls(fd)

    def put(self, data) -> None:
        data = memoryview(data).cast("B")
        i, size = 0, len(data)
        while i < size:
            k = min(size - i, DIRECT_STAGE - self.n)
            self.view[self.n:self.n + k] = data[i:i + k]
            self.n += k
            i += k
            if self.n == DIRECT_STAGE:
                self.out()

    def out(self) -> None:
        """The whole pages staged, to the disk; the rest of a page moves to the front."""
        whole = self.n - self.n % PAGE
        done = 0
        while done < whole:
            done += os.pwrite(self.fd, self.view[done:whole], self.disk + done)
        rest = self.n - whole
        self.view[:rest] = self.view[whole:self.n]
        self.disk += whole
        self.n = rest

    def _buffered(self, upto: int) -> None:
        """Staged bytes up to file offset ``upto``, through the page cache (O_DIRECT off for
        the write; on again after)."""
        import fcntl

        if upto <= self.disk:
            return
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        try:
            end, done = upto - self.disk, 0
            while done < end:
                done += os.pwrite(self.fd, self.view[done:end], self.disk + done)
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)

    def tail(self) -> None:
        """Everything staged, into the file (it stays staged: the page is written again,
        whole, with what follows)."""
        if self.n:
            self._buffered(self.disk + self.n)
        self.tailed = self.disk + self.n

    def rescue(self, upto: int) -> int:
        """After a failed write: the staged bytes before ``upto`` into the file, O_DIRECT off
        for good. Returns how far the file is whole."""
        import fcntl

        try:
            self._buffered(upto)
            whole = upto
        except OSError:
            whole = min(max(self.disk, self.tailed), upto)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        except OSError:
            pass
        return whole


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()
