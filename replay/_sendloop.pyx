# cython: language_level=3, boundscheck=True, wraparound=True, cdivision=True
"""The connections of a replay over plain http on one epoll, in C (Linux): the twin of
``replay._sendloop_py``, whose opening gives the rules. The same classes and steps; the epoll
wait, the reads and the writes are system calls made here, into one buffer, without a Python
object per event but the bytes read."""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

import os
import time
from socket import SO_ERROR, SOL_SOCKET

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    enum:
        MSG_NOSIGNAL

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void* buf, size_t n)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    struct itimerspec:
        timespec it_interval
        timespec it_value
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec* ts)

cdef extern from "<sys/timerfd.h>" nogil:
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec* new_value, itimerspec* old_value)
    enum:
        TFD_NONBLOCK
        TFD_CLOEXEC
        TFD_TIMER_ABSTIME

cdef enum:
    C_READ_SIZE = 256 * 1024
    C_READS = 16
    C_EVENTS = 256

READ_SIZE = C_READ_SIZE
READS = C_READS
EVENTS = C_EVENTS

cdef uint32_t _IN = EPOLLIN | EPOLLRDHUP
cdef uint32_t _ENDING = EPOLLRDHUP | EPOLLHUP | EPOLLERR


cdef inline bint _again(int e) noexcept nogil:
    return e == EAGAIN or e == EINTR      # (EWOULDBLOCK is EAGAIN on Linux)


cdef object _error(int e):
    return OSError(e, os.strerror(e))


cdef class SendLoop:
    """The twin's ``SendLoop``."""

    cdef public object loop
    cdef public dict transports
    cdef public dict connecting
    cdef public list later
    cdef public bint started
    cdef public long long calls
    cdef DueSends timed         # a timed run's deadlines, on a timer of this epoll set
    cdef int ep
    cdef char* buf
    cdef epoll_event* events

    def __cinit__(self, loop):
        self.ep = -1
        self.buf = <char*>malloc(C_READ_SIZE)
        self.events = <epoll_event*>malloc(C_EVENTS * sizeof(epoll_event))
        if self.buf == NULL or self.events == NULL:
            raise MemoryError()
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            raise _error(errno)

    def __init__(self, loop):
        self.loop = loop
        self.transports = {}
        self.connecting = {}
        self.later = []
        self.started = False
        self.calls = 0

    def __dealloc__(self):
        if self.ep >= 0:
            close(self.ep)
        free(self.buf)
        free(self.events)

    def fileno(self):
        return self.ep

    def start(self):
        self.loop.add_reader(self.ep, self.ready)
        self.started = True

    def close(self):
        if self.started:
            self.loop.remove_reader(self.ep)
            self.started = False
        self.later = []
        if self.timed is not None:
            self.timed.close()
        for t in list(self.transports.values()):
            t.abort()
        if self.ep >= 0:
            close(self.ep)
            self.ep = -1

    def dues(self, now, long long spin_ns, on_error):
        """The twin's ``dues``: a ``DueSends`` whose timer is a timerfd in this epoll set."""
        if self.timed is None:
            self.timed = DueSends(self, now, spin_ns, on_error)
        return self.timed

    def connect(self, sock, address):
        fut = self.loop.create_future()
        try:
            sock.connect(address)
        except BlockingIOError:
            self.connecting[sock.fileno()] = (sock, fut)
            self._ctl(EPOLL_CTL_ADD, sock.fileno(), EPOLLOUT | _IN)
        except OSError as e:
            fut.set_exception(e)
        else:
            fut.set_result(None)
        return fut

    def forget(self, sock):
        fd = sock.fileno()
        if self.connecting.pop(fd, None) is not None:
            self._unwatch(fd)

    def transport(self, sock, protocol):
        cdef LoopTransport t = LoopTransport(self, sock, protocol)
        self.transports[t.fd] = t
        if self.connecting.pop(t.fd, None) is None:
            self._ctl(EPOLL_CTL_ADD, t.fd, _IN)
        try:
            protocol.connection_made(t)
        except BaseException:
            t.closed = True
            self._forget(t)
            raise
        return t

    cdef int _connected(self, int fd) except -1:
        sock, fut = self.connecting[fd]
        err = sock.getsockopt(SOL_SOCKET, SO_ERROR)
        if err:
            self.forget(sock)
            if not fut.done():
                fut.set_exception(_error(err))
            return 0
        self._ctl(EPOLL_CTL_MOD, fd, _IN)
        if not fut.done():
            fut.set_result(None)
        return 0

    cdef int _ctl(self, int op, int fd, uint32_t events) except -1:
        cdef epoll_event ev
        ev.events = events
        ev.data.u64 = 0
        ev.data.fd = fd
        if epoll_ctl(self.ep, op, fd, &ev) < 0:
            raise _error(errno)
        return 0

    def ready(self):
        cdef int n
        self.calls += 1
        if self.ep < 0:
            return
        n = epoll_wait(self.ep, self.events, C_EVENTS, 0)
        if n <= 0:
            return
        self._events(n)
        if self.timed is not None and self.timed.size:
            self.timed._run()

    cdef int _events(self, int n) except -1:
        cdef int i, fd
        cdef uint32_t ev
        cdef LoopTransport t
        for i in range(n):
            fd = self.events[i].data.fd
            ev = self.events[i].events
            if self.timed is not None and fd == self.timed.tfd:
                self.timed._expired()
                continue
            o = self.transports.get(fd)
            if o is None:
                if ev & EPOLLOUT and fd in self.connecting:
                    self._connected(fd)
                continue
            t = <LoopTransport>o
            if ev & EPOLLOUT and not t.closed:
                t._flush()
            if ev & (EPOLLIN | _ENDING) and t._reads():
                t._read(self.buf, (ev & _ENDING) != 0)
        if self.later:
            later = self.later
            self.later = []
            for pair in later:
                if not (<LoopTransport>(<tuple>pair)[0]).closed:
                    try:
                        (<tuple>pair)[1]()
                    except Exception as e:
                        self.loop.call_exception_handler({
                            "message": "Exception in a callback after a read", "exception": e,
                            "transport": (<tuple>pair)[0]})
        return 0

    cdef int _forget(self, LoopTransport t) except -1:
        if self.transports.get(t.fd) is t:
            del self.transports[t.fd]
            self._unwatch(t.fd)
        return 0

    cdef void _unwatch(self, int fd) noexcept:
        cdef epoll_event ev
        if self.ep >= 0:
            epoll_ctl(self.ep, EPOLL_CTL_DEL, fd, &ev)


cdef class LoopTransport:
    """The twin's ``LoopTransport``."""

    cdef public SendLoop owner
    cdef public object sock, protocol
    cdef public int fd
    cdef public bytearray pending
    cdef public bint closing, eof, closed
    cdef public uint32_t events
    cdef public dict extra

    def __init__(self, SendLoop owner, sock, protocol):
        self.owner = owner
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.pending = bytearray()
        self.closing = False
        self.eof = False
        self.closed = False
        self.events = _IN
        self.extra = {"socket": sock, "sockname": _name(sock.getsockname),
                      "peername": _name(sock.getpeername)}

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def is_closing(self):
        return self.closing or self.closed

    def write(self, data):
        cdef Py_buffer view
        cdef ssize_t n
        cdef Py_ssize_t size
        cdef int e = 0
        if self.closing or self.closed or not data:
            return
        if len(self.pending):
            self.pending += data
            return
        if type(data) is bytes:
            size = PyBytes_GET_SIZE(data)
            n = send(self.fd, PyBytes_AS_STRING(data), size, MSG_NOSIGNAL)
            e = errno
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            size = view.len
            n = send(self.fd, view.buf, size, MSG_NOSIGNAL)
            e = errno
            PyBuffer_Release(&view)
        if n < 0:
            if not _again(e):
                self._lost(_error(e))
                return
            n = 0
        if n < size:
            self.pending += memoryview(data)[n:]
            self._update()

    def close(self):
        if self.closing or self.closed:
            return
        self.closing = True
        if not len(self.pending):
            self._lost(None)
        else:
            self._update()

    def abort(self):
        if not self.closed:
            self._lost(None)

    def after_read(self, callback):
        self.owner.later.append((self, callback))

    cdef inline bint _reads(self):
        return not (self.closing or self.eof or self.closed)

    cdef int _update(self) except -1:
        cdef uint32_t ev = (_IN if self._reads() else 0) | (EPOLLOUT if len(self.pending) else 0)
        if ev != self.events:
            self.events = ev
            self.owner._ctl(EPOLL_CTL_MOD, self.fd, ev)
        return 0

    cdef int _read(self, char* buf, bint ending) except -1:
        cdef ssize_t n
        cdef int k, e
        for k in range(C_READS):
            n = recv(self.fd, buf, C_READ_SIZE, 0)
            if n < 0:
                e = errno
                if not _again(e):
                    self._lost(_error(e))
                return 0
            if n == 0:
                try:
                    keep = self.protocol.eof_received()
                except Exception as exc:
                    self._fatal(exc, "eof_received")
                    return 0
                if keep:
                    self.eof = True
                    self._update()
                else:
                    self.close()
                return 0
            try:
                self.protocol.data_received(PyBytes_FromStringAndSize(buf, n))
            except Exception as exc:
                self._fatal(exc, "data_received")
                return 0
            if not self._reads() or (n < C_READ_SIZE and not ending):
                return 0
        return 0

    cdef int _flush(self) except -1:
        cdef ssize_t n = send(self.fd, <char*>self.pending, len(self.pending), MSG_NOSIGNAL)
        cdef int e = errno
        if n < 0:
            if not _again(e):
                self._lost(_error(e))
            return 0
        del self.pending[:n]
        if not len(self.pending):
            if self.closing:
                self._lost(None)
            else:
                self._update()
        return 0

    cdef int _fatal(self, exc, str what) except -1:
        self.owner.loop.call_exception_handler({
            "message": f"Fatal error: protocol.{what}() call failed.", "exception": exc,
            "transport": self, "protocol": self.protocol})
        self._lost(exc)
        return 0

    cpdef _lost(self, exc):
        if self.closed:
            return
        self.closed = True
        del self.pending[:]
        self.owner._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        self.owner.loop.call_soon(self._call_lost, exc)

    def _call_lost(self, exc):
        try:
            self.protocol.connection_lost(exc)
        finally:
            self.protocol = None
            self.sock = None
            self.extra.pop("socket", None)


cdef object _name(get):
    try:
        return get()
    except OSError:
        return None


cdef struct _Due:           # a request held for its deadline: (deadline, n) orders the heap
    int64_t d
    uint64_t n
    PyObject* conn
    PyObject* req


cdef inline bint _earlier(const _Due* a, const _Due* b) noexcept nogil:
    return a.d < b.d or (a.d == b.d and a.n < b.n)


cdef inline int64_t _mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1_000_000_000 + ts.tv_nsec


cdef class DueSends:
    """The twin's ``DueSends`` on a ``SendLoop`` (``SendLoop.dues``): the deadlines in a C heap,
    the timer a timerfd in the send loop's epoll set (armed ``spin_ns`` before the earliest
    deadline, on CLOCK_MONOTONIC, which is ``time.monotonic_ns``), and what is due sent from
    the send loop's ``ready``, after its reads, without an event-loop handle, a Python timer or
    a Python call per request but the connection's ``send_due``."""

    cdef SendLoop owner
    cdef object on_error
    cdef readonly int64_t spin_ns
    cdef readonly int64_t armed       # the deadline the timer is armed for (0: none)
    cdef readonly int tfd
    cdef _Due* heap
    cdef readonly Py_ssize_t size
    cdef Py_ssize_t cap
    cdef public uint64_t n            # entries made: their order among equal deadlines

    def __cinit__(self, SendLoop owner, now, long long spin_ns, on_error):
        self.tfd = -1
        self.heap = NULL

    def __init__(self, SendLoop owner, now, long long spin_ns, on_error):
        cdef epoll_event ev
        if now is not time.monotonic_ns:
            raise ValueError("a send loop's deadlines are on time.monotonic_ns")
        self.owner = owner
        self.on_error = on_error
        self.spin_ns = spin_ns
        self.armed = 0
        self.size = self.cap = 0
        self.n = 0
        self.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.tfd < 0:
            raise _error(errno)
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.fd = self.tfd
        if epoll_ctl(owner.ep, EPOLL_CTL_ADD, self.tfd, &ev) < 0:
            e = errno
            close(self.tfd)
            self.tfd = -1
            raise _error(e)

    def __dealloc__(self):
        self._clear()
        free(self.heap)
        if self.tfd >= 0:
            close(self.tfd)

    def __len__(self):
        return self.size

    def add(self, long long deadline, conn, req):
        """``conn`` (a ``PumpCore``, holding ``req`` in its ``due``) sends ``req`` at
        ``deadline``."""
        cdef _Due* grown
        cdef Py_ssize_t i, up
        cdef _Due item
        if self.tfd < 0:
            raise ValueError("closed")
        if self.size == self.cap:
            grown = <_Due*>realloc(self.heap, (self.cap * 2 + 64) * sizeof(_Due))
            if grown == NULL:
                raise MemoryError()
            self.heap = grown
            self.cap = self.cap * 2 + 64
        self.n += 1
        item.d = deadline
        item.n = self.n
        item.conn = <PyObject*>conn
        item.req = <PyObject*>req
        Py_INCREF(conn)
        Py_INCREF(req)
        i = self.size
        self.size += 1
        while i > 0:
            up = (i - 1) >> 1
            if not _earlier(&item, &self.heap[up]):
                break
            self.heap[i] = self.heap[up]
            i = up
        self.heap[i] = item
        if self.armed == 0 or deadline < self.armed:
            self._arm(deadline)

    cdef _Due _pop(self) noexcept:
        """The earliest entry (its references now the caller's)."""
        cdef _Due top = self.heap[0]
        cdef _Due last
        cdef Py_ssize_t i = 0, c
        self.size -= 1
        if self.size:
            last = self.heap[self.size]
            while True:
                c = 2 * i + 1
                if c >= self.size:
                    break
                if c + 1 < self.size and _earlier(&self.heap[c + 1], &self.heap[c]):
                    c += 1
                if not _earlier(&self.heap[c], &last):
                    break
                self.heap[i] = self.heap[c]
                i = c
            self.heap[i] = last
        return top

    cdef int _arm(self, int64_t deadline) except -1:
        """The timer at ``spin_ns`` before ``deadline`` (at once, if that is past)."""
        cdef itimerspec its
        cdef int64_t at = deadline - self.spin_ns
        if at <= 0:
            at = 1               # (an absolute time in the past fires at once; 0 would disarm)
        its.it_interval.tv_sec = its.it_interval.tv_nsec = 0
        its.it_value.tv_sec = at // 1_000_000_000
        its.it_value.tv_nsec = at % 1_000_000_000
        if timerfd_settime(self.tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0:
            raise _error(errno)
        self.armed = deadline
        return 0

    cdef int _disarm(self) except -1:
        cdef itimerspec its
        if self.armed and self.tfd >= 0:
            its.it_interval.tv_sec = its.it_interval.tv_nsec = 0
            its.it_value.tv_sec = its.it_value.tv_nsec = 0
            timerfd_settime(self.tfd, 0, &its, NULL)
        self.armed = 0
        return 0

    cdef int _expired(self) except -1:
        """The timer fired (the send loop saw its descriptor): read it; ``_run`` follows."""
        cdef uint64_t count
        read(self.tfd, &count, sizeof(count))
        self.armed = 0
        return 0

    cdef int _run(self) except -1:
        """The twin's ``_fire``, from the send loop's ``ready``: drop the entries whose
        connection no longer holds them; if the earliest is due within ``spin_ns``, wait it out
        on the clock and send every request then due; arm for the earliest left."""
        cdef _Due top
        cdef int64_t t, d
        while self.size:
            conn = <object>self.heap[0].conn
            if conn.due is <object>self.heap[0].req:
                break
            top = self._pop()        # its connection's task took it over: no spin for it
            Py_DECREF(<object>top.conn)
            Py_DECREF(<object>top.req)
        if not self.size:
            return self._disarm()
        d = self.heap[0].d
        t = _mono()
        if d - t <= self.spin_ns:
            while t < d:
                t = _mono()
            while self.size and self.heap[0].d <= t:
                top = self._pop()
                conn = <object>top.conn
                req = <object>top.req
                Py_DECREF(conn)       # (the two locals hold them now)
                Py_DECREF(req)
                try:
                    conn.send_due(req, top.d)
                except Exception as e:  # (a bug: the run stops, raises it at its end)
                    self.on_error(e)
        if self.size and (self.armed == 0 or self.heap[0].d < self.armed):
            self._arm(self.heap[0].d)
        return 0

    def wake_all(self):
        """Every request held back goes to its connection's task (which then decides)."""
        cdef _Due top
        got = []
        while self.size:
            top = self._pop()
            got.append((<object>top.conn, <object>top.req))
            Py_DECREF(<object>top.conn)
            Py_DECREF(<object>top.req)
        self._disarm()
        for conn, req in got:
            if conn.due is req:
                conn._wake(True)

    cdef void _clear(self) noexcept:
        cdef _Due top
        while self.size:
            top = self._pop()
            Py_DECREF(<object>top.conn)
            Py_DECREF(<object>top.req)

    def close(self):
        self._clear()
        self._disarm()
        if self.tfd >= 0:
            if self.owner is not None:
                self.owner._unwatch(self.tfd)
                if self.owner.timed is self:
                    self.owner.timed = None
            close(self.tfd)
            self.tfd = -1
