"""Latency samples in fixed memory: an HdrHistogram (µs, 1 µs to 1 h, 2 significant digits).

``Hist`` is what ``replay report`` keeps per endpoint and run, and what a long ``replay shadow``
keeps per target instead of every sample: its size does not grow with the samples, its
percentiles are within 1 % of the exact ones.
"""

from __future__ import annotations

from array import array

import numpy as np
from hdrh.histogram import HdrHistogram

HIST_MAX_US = 3_600_000_000


class Hist:
    """An HdrHistogram (µs, 1 µs to 1 h, 2 significant digits) fed in batches: values wait in an
    array and go into the histogram's counts with numpy, index for index as ``record_value``
    would put them (``hdrh``'s own bucket arithmetic, vectorised)."""

    __slots__ = ("h", "buf")
    BATCH = 4096

    def __init__(self):
        self.h = HdrHistogram(1, HIST_MAX_US, 2)
        self.buf = array("q")

    def add(self, ns):
        if ns is not None:
            self.buf.append(ns)
            if len(self.buf) >= self.BATCH:
                self.flush()

    append = add

    def extend(self, ns) -> None:
        """Add every value of an int64 numpy array (ns) at once."""
        if len(ns):
            self.buf.frombytes(np.ascontiguousarray(ns, dtype=np.int64).tobytes())
            if len(self.buf) >= self.BATCH:
                self.flush()

    def __len__(self) -> int:
        return self.h.total_count + len(self.buf)

    def merge(self, other: "Hist") -> None:
        """Add another's counts (exact: the same buckets)."""
        self.flush().add(other.flush())

    def __reduce__(self):
        # pickled as the encoded histogram (the counts are a ctypes array)
        return (_hist_from, (self.flush().encode(),))

    def percentiles(self, points=(50, 90, 99)) -> dict:
        """As ``replay.play.report.percentiles``: ms, the max included; None values when empty."""
        return hdr_percentiles(self.flush(), points)

    def flush(self) -> HdrHistogram:
        if self.buf:
            h = self.h
            v = np.clip(np.frombuffer(self.buf, dtype=np.int64) // 1000, 1, HIST_MAX_US)
            self.buf = array("q")
            # smallest power of 2 containing the value, as hdrh's _get_bucket_index
            pow2 = np.floor(np.log2((v | h.sub_bucket_mask).astype(np.float64))).astype(np.int64) + 1
            bucket = pow2 - h.unit_magnitude - (h.sub_bucket_half_count_magnitude + 1)
            sub = v >> (bucket + h.unit_magnitude)
            idx = ((bucket + 1) << h.sub_bucket_half_count_magnitude) + (sub - h.sub_bucket_half_count)
            counts = np.ctypeslib.as_array(h.counts)
            counts += np.bincount(idx, minlength=h.counts_len)[:h.counts_len].astype(counts.dtype)
            h.total_count += len(v)
            h.min_value = min(h.min_value, int(v.min()))
            h.max_value = max(h.max_value, int(v.max()))
        return self.h


def _hist_from(encoded: bytes) -> Hist:
    h = Hist()
    h.h.add(HdrHistogram.decode(encoded))
    return h


def hdr_percentiles(h: HdrHistogram, points=(50, 90, 99)) -> dict:
    """Percentiles of a µs HdrHistogram in ms, the max included; None values when empty."""
    keys = [f"p{p}" for p in points] + ["max"]
    if not h.get_total_count():
        return {k: None for k in keys}
    out = {f"p{p}": round(h.get_value_at_percentile(p) / 1000, 4) for p in points}
    out["max"] = round(h.get_max_value() / 1000, 4)
    return out


class SharedHist(Hist):
    """A ``Hist`` one thread adds to while another reads it (``replay shadow``: the sender adds,
    the capture's thread writes summaries): every operation holds the same lock."""

    __slots__ = ("lock",)

    def __init__(self):
        import threading

        super().__init__()
        self.lock = threading.RLock()

    def add(self, ns):
        with self.lock:
            Hist.add(self, ns)

    append = add

    def extend(self, ns) -> None:
        with self.lock:
            Hist.extend(self, ns)

    def __len__(self) -> int:
        with self.lock:
            return Hist.__len__(self)

    def percentiles(self, points=(50, 90, 99)) -> dict:
        with self.lock:
            return Hist.percentiles(self, points)

    def flush(self) -> HdrHistogram:
        with self.lock:
            return Hist.flush(self)
