"""Wiring of the offline path: a capture file through the core, as a stream of messages.

``CaptureReader`` opens a pcap/pcapng file, feeds its packet batches to one ``Engine`` and yields
the finished ``Message`` objects in the order they completed. After iteration, ``stats`` holds the
core's counters and ``warnings`` what went wrong on the way (a cut file, for instance).
"""

from __future__ import annotations

from replay import core
from replay.errors import InputError
from replay.limits import ENGINE_DEFAULTS
from replay.sources.pcapfile import PcapFile

_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Ask glibc's malloc to keep freed large blocks for reuse instead of returning them to the
    kernel at once: the packet batches and message buffers of a capture are a few MiB each, and
    with the default (dynamic) mmap threshold every one of them costs fresh zeroed pages. On
    /tmp/bench.pcap this takes convert's core from 0.52 s to 0.37 s. And one heap for all the
    process's threads (``M_ARENA_MAX``), for ``convert``'s two writer threads. For every reading
    of a capture file (``CaptureReader``: ``convert``, and ``play``, ``filter``, ``ls`` of a
    capture), ``capture`` and ``shadow``. Elsewhere (musl, macOS) nothing happens."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
    mallopt(M_MMAP_THRESHOLD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)
    mallopt(M_TOP_PAD, 64 << 20)
    # one heap for every thread: the log writer's threads free what the others reuse (a heap
    # of their own each kept its blocks' buffers: a convert of large bodies 38 MiB larger at
    # its peak with a second writer thread, and the fresh pages cost time)
    mallopt(M_ARENA_MAX, 1)


def fewer_collections() -> None:
    """A young-generation collection every 100,000 new objects instead of every 700, for the
    commands that stream a capture's messages into a log (``convert``, ``capture``): the core
    allocates millions of objects that die young without cycles, and with the default threshold
    the collector walks, again and again, the long-lived state of the core's connections. On the
    API benchmark capture (200,000 messages) convert took 4-8 % less time. The older generations
    keep their default ratios (10, 10): the cycles of connections that closed after living a
    while (a connection and its streams) are still freed within minutes of a long capture, as
    raising those too gained nothing measurable. Not for ``play`` or ``shadow``, whose event
    loops make short-lived cycles that should go early."""
    import gc

    gc.set_threshold(100_000, 10, 10)


def allocator_for_scans() -> None:
    """The other way round, for ``replay report``: blocks of 1 MiB and more always come from
    mmap and go back to the kernel when freed. A report builds and frees indexes of tens of
    MiB; after the first is freed glibc's dynamic threshold would serve the next ones from the
    heap, where the holes they leave stay resident (1M exchanges: peak RSS 183 -> 157 MiB, 83
    -> 47 MiB held at the end). Elsewhere (musl, macOS) nothing happens."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, 1 << 20)


# Packets a batch: on the 470 MB benchmark capture, reading through libpcap and parsing took
# 0.40-0.44 s with 1024 against 0.54-0.84 s with 4096 (pcapy-ng's read alone: 0.16 s against
# 0.24 s); a batch's packets then stay in the caches while the core reads them.
BATCH_SIZE = 1024



class CaptureReader:
    def __init__(self, path: str, ports=(), batch_size: int = BATCH_SIZE, **engine_opts):
        from replay.spool import seekable

        tune_allocator()
        self.path = path
        # an engine that copies what it keeps of a packet (the compiled one) reads the packets
        # from the reading buffer
        self.source = PcapFile(seekable(path), batch_size=batch_size,
                               reuse=getattr(core.Engine, "copies_input", False))
        opts = dict(ENGINE_DEFAULTS)
        opts.update(engine_opts)
        if self.source.linktype not in core.SUPPORTED_LINKTYPES:
            raise InputError(f"{path}: unsupported link type {self.source.linktype} "
                             "(supported: Ethernet, Linux cooked v1/v2, BSD loopback/NULL, raw IP)")
        self._opts = dict(opts, ports=tuple(ports))
        self.engine = core.Engine(self.source.linktype, **self._opts)
        self.stats: dict = {}
        self.first_ts = None
        self.last_ts = None

    @property
    def linktype(self) -> int:
        return self.source.linktype

    @property
    def warnings(self) -> list[str]:
        return self.source.warnings

    def __iter__(self):
        for out in self.lists():
            yield from out

    def lists(self):
        """The messages as the core hands them over: one list per batch of packets."""
        for out in self._feed():
            if out:
                yield out

    def keep_rows(self) -> None:
        """Before reading: the core keeps finished messages as table rows in its ``RowBuffer``
        (``engine.rows``), for ``LogWriter.write_rows``, instead of making ``Message`` objects;
        then read with ``row_buffers``."""
        self.engine = core.Engine(self.linktype, **self._opts, rows=True)

    def row_buffers(self):
        """After ``keep_rows``: the core's ``RowBuffer`` after each batch of packets and once
        more at the end, holding what was finished (and not yet taken)."""
        rows = self.engine.rows
        for _ in self._feed():
            yield rows

    def _feed(self):
        engine = self.engine
        for buf, meta in self.source.batches():
            yield engine.feed_batch(buf, meta)
        yield engine.finish()
        self.stats = engine.stats()
        self.source.close()


def open_input(path: str, ports=(), **engine_opts):
    """A log (``.rlog``), a capture file, a file of ``replay.formats`` (``.gor``, HAR), or a
    ``kafka://BROKERS/TOPIC`` (read to its end), as an iterable of messages with ``warnings``.

    Which one is decided by the file's magic, not its name. A pipe (``/dev/stdin``) is read
    into a temporary file first (``replay.spool``).
    """
    import os

    from replay.kafka import is_kafka_url

    if is_kafka_url(path):       # a whole topic, bounded (docs/kafka.md)
        from replay.kafka.consumer import open_topic

        return open_topic(path, None, None, None)
    from replay.sources.pcapfile import is_capture
    from replay.spool import seekable

    path = seekable(path)      # a pipe is copied to a temporary file first

    if is_capture(path):
        return CaptureReader(path, ports=ports, **engine_opts)
    from replay.log import LogReader, is_rlog

    if is_rlog(path):
        return LogReader(path)
    from replay import formats

    name = formats.sniff(path)
    if name is not None:
        return formats.open_reader(path, name)
    if os.path.isfile(path) and os.path.getsize(path) >= 4:
        raise InputError(f"{path}: not a pcap, pcapng, .rlog, .gor or HAR file")
    return CaptureReader(path, ports=ports, **engine_opts)  # raises the clear InputError
