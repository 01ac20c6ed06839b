"""Formats other than pcap/pcapng and .rlog: what reads them and what writes them.

Readers are chosen by a file's content (``sniff``), never only by its name; writers by the output
path's extension. Each format lives in a module of its own, named here and imported only when
used:

- ``gor``: GoReplay's ``.gor`` files, plain or gzip (``.gor.gz``), in and out;
- ``har``: HAR 1.2 (browser devtools, mitmproxy, Charles), in and out;
- ``pcapout``: a log written back as a pcap or pcapng capture (out only: captures are read by
  ``replay.sources.pcapfile``).

A reader module has ``sniff(path) -> bool`` (a cheap look at the first bytes) and
``open_reader(path)`` returning an iterable of ``replay.events.Message`` in time order, with
``warnings`` (a list of text) and ``meta`` (a dict, what the source says of itself). Damage stops
the iteration with one ``InputError`` naming the record number or JSON path; what came before it
was yielded.

A writer module has ``open_writer(path, fd, meta, **options)`` returning an object with
``write(msg)``, ``update_meta(dict)`` and ``close(fsync=False)`` (the ``LogWriter`` protocol;
``update_meta`` may keep only what the format can hold). ``fd`` is the open descriptor of the
output (``replay.outputs.AtomicFile.detach()``), which the writer owns from then on.
"""

from __future__ import annotations

import importlib
import os

from replay.limits import LOG_LEVEL

# name -> module path; a module not (yet) present is skipped
READERS = {"gor": "replay.formats.gor", "har": "replay.formats.har"}
# extension (lower case, longest first) -> (format name, module path)
WRITERS = (
    (".gor.gz", ("gor", "replay.formats.gor")),
    (".gor", ("gor", "replay.formats.gor")),
    (".har", ("har", "replay.formats.har")),
    (".pcapng", ("pcapng", "replay.formats.pcapout")),
    (".pcap", ("pcap", "replay.formats.pcapout")),
)


def _module(path: str):
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name == path:
            return None
        raise


def sniff(path: str) -> str | None:
    """The name of the format of ``path`` among ``READERS``, or None."""
    for name, mod_path in READERS.items():
        mod = _module(mod_path)
        if mod is not None and mod.sniff(path):
            return name
    return None


def open_reader(path: str, name: str):
    return _module(READERS[name]).open_reader(path)


def output_format(path: str) -> str:
    """``rlog`` or the name of the format that ``path``'s extension asks for."""
    low = os.fspath(path).lower()
    for ext, (name, mod_path) in WRITERS:
        if low.endswith(ext) and _module(mod_path) is not None:
            return name
    return "rlog"


def open_writer(path: str, fd: int, meta: dict, level: int = LOG_LEVEL, workers: int = 1,
                direct: bool = False, **options):
    """A writer for ``path`` by its extension (``.rlog`` and anything unknown: a log, written
    by ``workers`` threads, past the page cache when ``direct``)."""
    low = os.fspath(path).lower()
    for ext, (name, mod_path) in WRITERS:
        if low.endswith(ext):
            mod = _module(mod_path)
            if mod is None:
                os.close(fd)
                from replay.errors import UsageError

                raise UsageError(f"{path}: this release cannot write {name} files")
            return mod.open_writer(path, fd, meta, format=name, **options)
    from replay.log import LogWriter

    return LogWriter(path, fd=fd, meta=meta, level=level, workers=workers, direct=direct)
