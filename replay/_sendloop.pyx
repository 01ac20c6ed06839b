# cython: language_level=3, boundscheck=True, wraparound=True, cdivision=True
"""The connections of a replay over plain http on one epoll, in C (Linux): the twin of
``replay._sendloop_py``, whose opening gives the rules. The same classes and steps; the epoll
wait, the reads and the writes are system calls made here, into one buffer, without a Python
object per event but the bytes read."""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

import os
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
        for t in list(self.transports.values()):
            t.abort()
        if self.ep >= 0:
            close(self.ep)
            self.ep = -1

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
        cdef int n, i, fd
        cdef uint32_t ev
        cdef LoopTransport t
        self.calls += 1
        if self.ep < 0:
            return
        n = epoll_wait(self.ep, self.events, C_EVENTS, 0)
        if n <= 0:
            return
        for i in range(n):
            fd = self.events[i].data.fd
            ev = self.events[i].events
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
