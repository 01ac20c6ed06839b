"""Packets from a live interface through libpcap (pcapy-ng), in the batches ``PcapFile`` yields.

Rules:
- the handle is made with ``create``/``activate`` so that every knob is set before the kernel ring
  exists: snaplen (default 262144, so GRO/TSO super-frames of up to 64 KiB are never cut), kernel
  buffer (default 64 MiB), promiscuous mode, read timeout, immediate mode;
- the generated BPF filter is ``tcp port A or tcp port B``; on Ethernet it is repeated after
  ``vlan`` so that frames whose 802.1Q tag is still in the packet match too (``(...) or (vlan and
  (...))``). ``-f`` replaces it, as in tcpdump;
- one reader thread only moves packet batches from the kernel into a bounded queue: it never
  parses. It waits in ``select`` (the GIL released) and reads with ``next_batch`` on a
  non-blocking handle, because a blocking TPACKET_V3 read never returns on an idle interface (the
  kernel does not retire an empty block), so it could not be stopped. When the queue is full the
  reader waits for the consumer and the kernel ring absorbs the burst; packets the ring cannot
  hold are counted by the kernel (``ps_drop``), never dropped silently here;
- ``stop()`` lets the reader take what the kernel already holds (a partly filled TPACKET_V3 block
  is handed over after the read timeout) before it ends; ``abort()`` ends at once;
- libpcap's counters are read by the reader thread itself (a pcap handle is not shared between
  threads) and widened to 64 bits (libpcap's are 32-bit and wrap);
- a failure to open the interface raises ``CapturePermissionError`` (not root, no CAP_NET_RAW:
  the line says what to do) or ``CaptureError`` (no such interface, interface down, bad filter),
  one line each.
"""

from __future__ import annotations

import collections
import os
import select
import sys
import threading
import time

from replay.errors import CaptureError, CapturePermissionError, UsageError

DLT_EN10MB = 1
DEFAULT_SNAPLEN = 262144          # tcpdump's default (MAXIMUM_SNAPLEN): a 64 KiB GRO frame fits
DEFAULT_BUFFER = 64 << 20         # kernel ring; tcpdump's default is 2 MiB, far too small under load
DEFAULT_TIMEOUT_MS = 100          # TPACKET_V3 block retire timeout: latency of a quiet capture
DEFAULT_QUEUE = 256 << 20         # bytes of packet batches waiting for the core
MAX_BUFFER = (1 << 31) - 1        # pcap_set_buffer_size takes a C int

# pcap_activate() results (pcap/pcap.h)
PCAP_ERROR = -1
PCAP_ERROR_NO_SUCH_DEVICE = -5
PCAP_ERROR_RFMON_NOTSUP = -6
PCAP_ERROR_PERM_DENIED = -8
PCAP_ERROR_IFACE_NOT_UP = -9
PCAP_ERROR_PROMISC_PERM_DENIED = -11
PCAP_ERROR_NOT_ACTIVATED = -3
PCAP_WARNING_PROMISC_NOTSUP = 2
PCAP_WARNINGS = {1: "libpcap warning", 2: "promiscuous mode is not supported on this interface",
                 3: "the requested time stamp type is not supported"}


def port_filter(ports, linktype: int) -> str:
    """The BPF expression for ``--port``: server ports, tagged or not."""
    base = " or ".join(f"tcp port {int(p)}" for p in ports) or "tcp"
    if linktype == DLT_EN10MB:  # libpcap knows ``vlan`` only on Ethernet
        return f"({base}) or (vlan and ({base}))"
    return base


def capture_hint() -> str:
    exe = os.path.realpath(sys.executable)
    return (f"run it as root (sudo), or give the interpreter the capture capabilities once: "
            f"sudo setcap cap_net_raw,cap_net_admin+eip {exe}")


def interfaces() -> list[str]:
    """Names ``-i`` accepts here: the network interfaces, then ``any``."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        import pcapy

        try:
            names = [n for n in pcapy.findalldevs() if n != "any"]
        except pcapy.PcapError:
            names = []
    return names + ["any"] if sys.platform.startswith("linux") else names


def _name_thread(name: bytes) -> None:
    """Name the calling OS thread (seen in top -H, ps -L): Linux only, best effort."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class _Libpcap:
    """The libpcap that pcapy-ng itself loaded, for the two calls pcapy-ng does not expose:
    ``pcap_set_immediate_mode`` and ``pcap_geterr`` (the text after a failed activate).

    The ``pcap_t *`` is read from the pcapy object (it follows ``PyObject_HEAD`` in pcapy-ng's
    ``pcapobject``) and checked before use: before activation libpcap must answer
    ``PCAP_ERROR_NOT_ACTIVATED`` for it."""

    _lib = None
    _tried = False

    @classmethod
    def lib(cls):
        if cls._tried:
            return cls._lib
        cls._tried = True
        import ctypes

        import pcapy  # noqa: F401  (maps its libpcap into the process)

        path = None
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    name = line.rsplit(None, 1)[-1] if line.count(" ") >= 5 else ""
                    if "libpcap" in os.path.basename(name) and name.startswith("/"):
                        path = name
                        break
        except OSError:
            pass
        if path is None:
            return None
        try:
            lib = ctypes.CDLL(path)
            for fn, res, args in (("pcap_datalink", ctypes.c_int, [ctypes.c_void_p]),
                                  ("pcap_set_immediate_mode", ctypes.c_int,
                                   [ctypes.c_void_p, ctypes.c_int]),
                                  ("pcap_geterr", ctypes.c_char_p, [ctypes.c_void_p])):
                f = getattr(lib, fn)
                f.restype, f.argtypes = res, args
        except (OSError, AttributeError):
            return None
        cls._lib = lib
        return lib

    @classmethod
    def pointer(cls, handle):
        """The ``pcap_t *`` of a not yet activated pcapy handle, or None."""
        import ctypes

        lib = cls.lib()
        if lib is None or type(handle).__basicsize__ < object.__basicsize__ + 8:
            return None
        ptr = ctypes.c_void_p.from_address(id(handle) + object.__basicsize__).value
        if not ptr or ptr % 8:
            return None
        if lib.pcap_datalink(ptr) != PCAP_ERROR_NOT_ACTIVATED:
            return None
        return ptr


class LiveCapture:
    """An open live capture. ``start()`` the reader, then ``get()`` batches (or iterate
    ``batches()``), ``stop()`` when done, ``close()`` at the end."""

    def __init__(self, interface: str, ports=(), bpf: str | None = None,
                 snaplen: int = DEFAULT_SNAPLEN, buffer_size: int = DEFAULT_BUFFER,
                 promisc: bool = False, immediate: bool = False,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, batch_size: int = 4096,
                 queue_bytes: int = DEFAULT_QUEUE):
        import pcapy

        if snaplen <= 0:
            snaplen = DEFAULT_SNAPLEN  # -s 0: the largest, as in tcpdump
        if not 0 < buffer_size <= MAX_BUFFER:
            raise UsageError(f"buffer size must be between 1 byte and 2 GiB (got {buffer_size})")
        self.interface = interface
        self.ports = tuple(ports)
        self.snaplen = snaplen
        self.buffer_size = buffer_size
        self.promisc = promisc
        self.immediate = immediate
        self.timeout_ms = timeout_ms
        self.batch_size = batch_size
        self.queue_bytes = max(queue_bytes, 1 << 20)
        self.warnings: list[str] = []
        try:
            h = pcapy.create(interface)
        except pcapy.PcapError as e:
            raise CaptureError(f"{interface}: cannot open: {e}") from None
        h.set_snaplen(snaplen)
        h.set_promisc(1 if promisc else 0)
        h.set_timeout(timeout_ms)
        h.set_buffer_size(buffer_size)
        ptr = _Libpcap.pointer(h)
        if immediate:
            if hasattr(h, "set_immediate_mode"):
                h.set_immediate_mode(1)
            elif ptr is None or _Libpcap.lib().pcap_set_immediate_mode(ptr, 1) != 0:
                h.close()
                raise CaptureError("immediate mode is not available with this pcapy-ng/libpcap")
        rc = h.activate()
        if rc < 0:
            detail = ""
            if ptr is not None:
                detail = (_Libpcap.lib().pcap_geterr(ptr) or b"").decode(errors="replace").strip()
            h.close()
            raise self._activate_error(rc, detail) from None
        if rc > 0:
            self.warnings.append(f"{interface}: {PCAP_WARNINGS.get(rc, f'libpcap warning {rc}')}")
        self.linktype = h.datalink()
        from replay.core import SUPPORTED_LINKTYPES

        if self.linktype not in SUPPORTED_LINKTYPES:
            h.close()
            raise CaptureError(f"{interface}: unsupported link type {self.linktype} (supported: "
                               "Ethernet, Linux cooked, BSD loopback/NULL, raw IP)")
        self.filter = bpf if bpf else port_filter(self.ports, self.linktype)
        try:
            h.setfilter(self.filter)
        except pcapy.PcapError as e:
            h.close()
            raise CaptureError(f"bad capture filter {self.filter!r}: {e}") from None
        h.setnonblock(1)
        self._h = h
        self._fd = h.getfd()
        # the queue between the reader thread and the consumer
        self._cond = threading.Condition()
        self._q: collections.deque = collections.deque()
        self._qbytes = 0
        self._stop = threading.Event()
        self._abort = False
        self._finished = False
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        # counters (the reader writes, anyone reads)
        self.packets = 0
        self.bytes = 0
        self.batches_read = 0
        self.queue_peak = 0
        self.queue_waits = 0      # times the reader waited because the queue was full
        self.queue_wait_s = 0.0
        self._pcap = [0, 0, 0]    # ps_recv, ps_drop, ps_ifdrop, widened to 64 bits
        self._pcap_raw = (0, 0, 0)

    def _activate_error(self, rc: int, detail: str) -> CaptureError:
        iface = self.interface
        if rc in (PCAP_ERROR_PERM_DENIED, PCAP_ERROR_PROMISC_PERM_DENIED) or (
                rc == PCAP_ERROR and "not permitted" in detail.lower()):
            return CapturePermissionError(f"{iface}: permission denied: capturing packets needs "
                                          f"root or CAP_NET_RAW; {capture_hint()}")
        if rc == PCAP_ERROR_NO_SUCH_DEVICE or "no such device" in detail.lower():
            names = interfaces()
            known = f" (interfaces here: {', '.join(names)})" if names else ""
            return CaptureError(f"{iface}: no such network interface{known}")
        if rc == PCAP_ERROR_IFACE_NOT_UP:
            return CaptureError(f"{iface}: interface is down (ip link set {iface} up)")
        if rc == PCAP_ERROR_RFMON_NOTSUP:
            return CaptureError(f"{iface}: monitor mode is not supported")
        return CaptureError(f"{iface}: cannot capture: {detail or f'libpcap error {rc}'}")

    # -- reader thread --------------------------------------------------------------------------

    def start(self) -> "LiveCapture":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="replay-capture", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        import pcapy

        _name_thread(b"replay-reader")
        h, fd, n = self._h, self._fd, self.batch_size
        wait = self.timeout_ms / 1000.0
        next_stats = 0.0
        drain_until = None
        try:
            while True:
                if self._abort:
                    break
                if self._stop.is_set():
                    if drain_until is None:
                        # take what the kernel holds: a partly filled block comes after one timeout
                        drain_until = time.monotonic() + 3 * wait + 0.5
                    if time.monotonic() > drain_until:
                        break
                    ready = select.select([fd], [], [], 1.5 * wait)[0]
                    if not ready:
                        break
                else:
                    ready = select.select([fd], [], [], wait)[0]
                if ready:
                    while True:
                        buf, meta = h.next_batch(n)
                        if not meta:
                            break
                        self._put(buf, meta)
                        if len(meta) < 16 * n or self._abort:
                            break
                now = time.monotonic()
                if now >= next_stats:
                    self._read_stats()
                    next_stats = now + 0.25
        except pcapy.PcapError as e:
            self._error = CaptureError(f"{self.interface}: capture failed: {e}")
        except Exception as e:  # noqa: BLE001  (handed to the consumer, raised there)
            self._error = e
        finally:
            try:
                self._read_stats()
            except Exception:  # noqa: BLE001
                pass
            h.close()
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _put(self, buf, meta) -> None:
        size = len(buf) + len(meta)
        with self._cond:
            if self._qbytes + size > self.queue_bytes and self._q:
                self.queue_waits += 1
                t0 = time.monotonic()
                while self._qbytes + size > self.queue_bytes and self._q and not self._abort:
                    self._cond.wait(0.1)
                self.queue_wait_s += time.monotonic() - t0
            if self._abort:
                return
            self._q.append((buf, meta))
            self._qbytes += size
            if self._qbytes > self.queue_peak:
                self.queue_peak = self._qbytes
            self.packets += len(meta) // 16
            self.bytes += len(buf)
            self.batches_read += 1
            self._cond.notify_all()

    def _read_stats(self) -> None:
        raw = self._h.stats()
        for i in range(3):
            self._pcap[i] += (raw[i] - self._pcap_raw[i]) & 0xFFFFFFFF
        self._pcap_raw = tuple(raw)

    # -- consumer ---------------------------------------------------------------------------------

    def get(self, timeout: float | None = None):
        """The next ``(buf, meta)``; None when nothing came within ``timeout`` or the capture is
        over (then ``done`` is true). A failure of the reader is raised once its batches are out."""
        with self._cond:
            if not self._q and not self._finished:
                self._cond.wait(timeout)
            if self._q:
                buf, meta = self._q.popleft()
                self._qbytes -= len(buf) + len(meta)
                self._cond.notify_all()
                return buf, meta
            if self._finished and self._error is not None:
                err, self._error = self._error, None
                raise err
            return None

    @property
    def done(self) -> bool:
        with self._cond:
            return self._finished and not self._q

    def batches(self):
        """Yield ``(buf, meta)`` until the capture is stopped and drained."""
        while True:
            item = self.get(0.5)
            if item is not None:
                yield item
            elif self.done:
                return

    def stop(self) -> None:
        """Stop reading; what the kernel already holds is still delivered."""
        self._stop.set()

    def abort(self) -> None:
        """Stop at once; batches still queued are dropped."""
        with self._cond:
            self._abort = True
            self._q.clear()
            self._qbytes = 0
            self._cond.notify_all()
        self._stop.set()

    def close(self) -> None:
        self.abort()
        if self._thread is not None:
            self._thread.join(5)
        elif not self._finished:
            self._h.close()
            self._finished = True

    def stats(self) -> dict:
        recv, drop, ifdrop = self._pcap
        return {
            "packets": self.packets,           # handed to replay
            "bytes": self.bytes,
            "batches": self.batches_read,
            "pcap_received": recv,             # libpcap ps_recv (on lo each packet counts twice)
            "kernel_drops": drop,              # ps_drop: the kernel ring was full
            "interface_drops": ifdrop,         # ps_ifdrop: dropped by the interface or driver
            "queue_bytes": self._qbytes,
            "queue_peak": self.queue_peak,
            "queue_waits": self.queue_waits,
            "queue_wait_s": round(self.queue_wait_s, 3),
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_privileges(user: str) -> tuple[int, int]:
    """Become ``user`` (a name or a uid) for good, as tcpdump's ``-Z`` does: supplementary groups,
    group, then user. The open capture handle stays usable; every file opened afterwards is opened
    as ``user``. Returns (uid, gid)."""
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        try:
            pw = pwd.getpwuid(int(user))
        except (ValueError, KeyError):
            raise UsageError(f"-Z/--user: no user named {user!r}") from None
    if os.geteuid() == pw.pw_uid and os.getuid() == pw.pw_uid:
        return pw.pw_uid, pw.pw_gid
    if os.geteuid() != 0:
        raise CaptureError(f"-Z/--user {user}: changing user needs root")
    try:
        os.initgroups(pw.pw_name, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except OSError as e:
        raise CaptureError(f"-Z/--user {user}: cannot change user: {e.strerror}") from None
    try:
        os.setuid(0)
    except OSError:
        return pw.pw_uid, pw.pw_gid
    raise CaptureError(f"-Z/--user {user}: root privileges could not be dropped")
