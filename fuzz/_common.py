"""What the harnesses share: the two cores, the invariant, and seeds taken from real captures.

Every harness keeps one invariant: an input may make replay raise a ``ReplayError`` (the CLI's
one-line error), never anything else, and every call returns. Differential harnesses also hold
the compiled core to its pure twin: the same messages and the same counters.

Only the pure twin is instrumented (atheris instruments Python bytecode): it follows the same
rules as the compiled core branch for branch, so its coverage guides the fuzzer through both,
and the compiled core runs on every input beside it. Instrumenting the Cython extension itself
needs a clang with libFuzzer and a sanitizer-preloaded interpreter (atheris' "native extensions"
notes), for branches that exist only in C: its buffer handling, which the differential check
already reaches through the twin's coverage.
"""

from __future__ import annotations

import importlib
import os
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CORPUS_PCAPS = ROOT.parent / "shared" / "corpus" / "pcaps"
T0 = 1_700_000_000_000_000_000

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compiled_core():
    """The compiled core, or None when it is not built (the harness then checks the twin alone)."""
    if os.environ.get("REPLAY_NO_EXTENSIONS", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module("replay._fastparse")
    except ImportError:
        return None


def capture_paths(shared: bool = True) -> list[Path]:
    """The captures seeds come from: tests/data, the sample, and the shared corpus when present."""
    paths = sorted(DATA.glob("*.pcap*")) + [ROOT / "captures" / "sample.pcap"]
    if shared and CORPUS_PCAPS.is_dir():
        paths += sorted(CORPUS_PCAPS.glob("*.pcap*"))
    return [p for p in paths if p.is_file()]


def capture_packets(path: Path, limit: int = 20000):
    """(linktype, [(ts_ns, frame bytes)]) of a capture, at most ``limit`` packets."""
    from replay.sources.pcapfile import PcapFile

    src = PcapFile(str(path), batch_size=512)
    out = []
    for buf, meta in src.batches():
        for sec, usec, off, caplen in struct.iter_unpack("=IIII", meta):
            out.append((sec * 1_000_000_000 + usec * 1000, bytes(buf[off:off + caplen])))
            if len(out) >= limit:
                return src.linktype, out
    return src.linktype, out


def capture_messages(path: Path):
    """The HTTP messages the pure core frames from a capture (seeds for message-level harnesses)."""
    from replay import _fastparse_py as pure

    linktype, packets = capture_packets(path)
    if linktype not in pure.SUPPORTED_LINKTYPES:
        return []
    eng = pure.Engine(linktype)
    out = []
    for ts, fr in packets:
        out += eng.feed(ts, fr)
    out += eng.finish()
    return out


def batch(packets):
    """Packets in pcapy-ng ``next_batch`` layout (tests/flow.py's ``batch``)."""
    bufs, meta, off = [], [], 0
    for ts, frame in packets:
        sec, ns = divmod(ts, 1_000_000_000)
        meta.append(struct.pack("=IIII", sec & 0xFFFFFFFF, ns // 1000, off, len(frame)))
        bufs.append(frame)
        off += len(frame)
    return b"".join(bufs), b"".join(meta)


def differ(what: str, pure_result, compiled_result) -> AssertionError:
    """The error a differential harness raises: the first difference, readable."""
    lines = [f"compiled core differs from the pure twin in {what}"]
    if isinstance(pure_result, tuple) and isinstance(compiled_result, tuple):
        for i, (a, b) in enumerate(zip(pure_result, compiled_result)):
            if a != b:
                if isinstance(a, list) and isinstance(b, list):
                    if len(a) != len(b):
                        lines.append(f"  part {i}: {len(a)} items (pure) vs {len(b)} (compiled)")
                    for j, (x, y) in enumerate(zip(a, b)):
                        if x != y:
                            lines.append(f"  part {i}, item {j}:\n    pure:     {x!r:.2000}\n"
                                         f"    compiled: {y!r:.2000}")
                            break
                elif isinstance(a, dict) and isinstance(b, dict):
                    diff = {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
                    lines.append(f"  part {i} (pure, compiled): {diff}")
                else:
                    lines.append(f"  part {i}:\n    pure:     {a!r:.2000}\n    compiled: {b!r:.2000}")
    else:
        lines.append(f"  pure:     {pure_result!r:.2000}\n  compiled: {compiled_result!r:.2000}")
    return AssertionError("\n".join(lines))


def scratch_file(suffix: str):
    """(path, write) of a file the harness rewrites for every input, gone when the process ends:
    unlinked at once and reached through /proc/self/fd where there is one."""
    import tempfile

    d = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="replay-fuzz-", suffix=suffix, dir=d)
    if os.path.isdir("/proc/self/fd"):
        os.unlink(path)
        path = f"/proc/self/fd/{fd}"

    def write(data: bytes) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    return path, write


def main(test_one_input, instrumented=()):
    """Run a harness under libFuzzer (``sys.argv``: libFuzzer's flags and corpus directories)."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
