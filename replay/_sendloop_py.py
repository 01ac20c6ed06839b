"""The connections of a replay over plain http on one epoll: the pure twin of
``replay._sendloop`` (compiled), and the reference for what it does. Linux only (epoll):
``replay.core.SendLoop`` is None elsewhere, and the replay keeps asyncio's transports.

A ``SendLoop`` is one epoll set of non-blocking TCP sockets, itself watched by the event loop
(``loop.add_reader`` on the epoll's descriptor). When any of its sockets can be read or written,
the event loop makes one call (``ready``), which reads every socket that has bytes, hands them to
the connection's protocol (``data_received``, as an asyncio transport would), writes what was
waiting to be written, and then runs what the protocols asked to run after the reads
(``after_read``: at ``--speed max`` the core's ``PumpCore`` sends the next request there). So an
answer and the request it lets go cost no event-loop handle of their own, and no Python code of
asyncio's runs per read or write.

A ``LoopTransport`` is the asyncio transport of one such socket, with the parts of
``asyncio.Transport`` a replay connection uses: ``write`` (sent at once; what the socket does not
take waits for it to be writable, in order), ``close`` (after what waits is written),
``abort``, ``is_closing``, ``get_extra_info('sockname' | 'peername' | 'socket')``. Its rules
are asyncio's selector transport's:
- ``connection_lost`` is called once, on the event loop (``call_soon``), after the socket is
  closed (``exc`` is the error that closed it, or None); then the transport lets go of its
  protocol and socket;
- nothing is read after ``close()``; the peer's end of stream calls ``eof_received`` and
  nothing more is read; unless it returned true, the transport closes (what waits to be
  written goes first);
- a write after ``close`` or a failure is ignored; a write that fails closes the transport with
  its error;
- an exception raised by the protocol's ``data_received`` or ``eof_received`` goes to the event
  loop's exception handler and closes the transport with it; one raised by an ``after_read``
  callback goes to the handler;
- a read of 0 bytes is the end of stream; a read that fills the buffer reads again (at most
  ``READS`` times), one that does not is all there was, unless epoll said the peer's end came
  too (``EPOLLRDHUP``): then it reads on to that end, so the end is seen before ``after_read``.

``connect`` connects a socket through the same epoll (a future of the event loop says when);
TLS, timers and the rest of a replay connection's life stay with the event loop
(``replay.play.sender``). Each socket is removed from the epoll set when it closes.
"""

from __future__ import annotations

import errno
import os
import select
import socket

READ_SIZE = 256 * 1024        # bytes read at once from a socket
READS = 16                    # reads of one socket in one call, while each fills the buffer
EVENTS = 256                  # sockets looked at in one call
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_IN = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0


class SendLoop:
    """One epoll set of ``LoopTransport`` sockets, read and written when the event loop says
    its descriptor is ready. ``start()`` adds it to the loop, ``close()`` removes it (the
    transports still open are aborted)."""

    def __init__(self, loop):
        self.loop = loop
        self.ep = select.epoll()
        self.transports: dict = {}       # fd -> LoopTransport
        self.connecting: dict = {}       # fd -> (socket, future) of a connect under way
        self.later: list = []            # (transport, callback) to run after this call's reads
        self.started = False
        self.calls = 0                   # ready() calls (for tests and benchmarks)

    def fileno(self) -> int:
        return self.ep.fileno()

    def start(self) -> None:
        self.loop.add_reader(self.ep.fileno(), self.ready)
        self.started = True

    def close(self) -> None:
        if self.started:
            self.loop.remove_reader(self.ep.fileno())
            self.started = False
        self.later = []
        for t in list(self.transports.values()):
            t.abort()
        self.ep.close()

    def connect(self, sock: socket.socket, address):
        """Connect ``sock`` (non-blocking) to ``address``: a future of the event loop, done
        when it is connected (None) or could not be (the ``OSError``). ``forget(sock)`` before
        closing a socket whose connect was given up."""
        fut = self.loop.create_future()
        try:
            sock.connect(address)
        except BlockingIOError:
            self.connecting[sock.fileno()] = (sock, fut)
            self.ep.register(sock.fileno(), select.EPOLLOUT | _IN)
        except OSError as e:
            fut.set_exception(e)
        else:
            fut.set_result(None)
        return fut

    def forget(self, sock: socket.socket) -> None:
        """A connect given up (its future cancelled): the socket leaves the set."""
        fd = sock.fileno()
        if self.connecting.pop(fd, None) is not None:
            self._unwatch(fd)

    def transport(self, sock: socket.socket, protocol) -> "LoopTransport":
        """``sock`` (connected, non-blocking; by ``connect`` or not) as ``protocol``'s
        transport: ``connection_made`` is called now."""
        t = LoopTransport(self, sock, protocol)
        self.transports[t.fd] = t
        if self.connecting.pop(t.fd, None) is None:     # (else it waits for reads already)
            self.ep.register(t.fd, _IN)
        try:
            protocol.connection_made(t)
        except BaseException:
            t.closed = True              # the caller closes the socket
            self._forget(t)
            raise
        return t

    def ready(self) -> None:
        """The event loop's call: every socket that can be read or written, then what the reads
        asked to run after them."""
        self.calls += 1
        try:
            events = self.ep.poll(0, EVENTS)
        except OSError:
            return
        for fd, ev in events:
            t = self.transports.get(fd)
            if t is None:
                if ev & select.EPOLLOUT and fd in self.connecting:
                    self._connected(fd)
                continue
            if ev & select.EPOLLOUT and not t.closed:
                t._flush()
            if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) \
                    and t._reading():
                t._read(bool(ev & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)))
        later, self.later = self.later, []
        for t, cb in later:
            if not t.closed:
                try:
                    cb()
                except Exception as e:  # noqa: BLE001  (as the event loop does with a callback)
                    self.loop.call_exception_handler({
                        "message": "Exception in a callback after a read", "exception": e,
                        "transport": t})

    def _connected(self, fd: int) -> None:
        sock, fut = self.connecting[fd]
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.forget(sock)
            if not fut.done():
                fut.set_exception(OSError(err, os.strerror(err)))
            return
        self.ep.modify(fd, _IN)          # (what it reads before its transport waits for it)
        if not fut.done():
            fut.set_result(None)

    def _forget(self, t: "LoopTransport") -> None:
        if self.transports.get(t.fd) is t:
            del self.transports[t.fd]
            self._unwatch(t.fd)

    def _unwatch(self, fd: int) -> None:
        try:                             # (a copy of the descriptor elsewhere would keep it in)
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass


class LoopTransport:
    """One socket of a ``SendLoop``, as the asyncio transport of its protocol."""

    def __init__(self, owner: SendLoop, sock: socket.socket, protocol):
        self.owner = owner
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.pending = bytearray()       # written, not yet taken by the socket
        self.closing = False             # close() asked: the rest of ``pending`` goes first
        self.eof = False                 # the peer's end was read (eof_received kept it open)
        self.closed = False              # the socket is closed; connection_lost is on its way
        self.events = _IN                # what the epoll set waits for on it
        self.extra = {"socket": sock, "sockname": _name(sock.getsockname),
                      "peername": _name(sock.getpeername)}

    # -- asyncio.Transport ---------------------------------------------------------------------
    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def is_closing(self) -> bool:
        return self.closing or self.closed

    def write(self, data) -> None:
        if self.closing or self.closed or not data:
            return
        if self.pending:
            self.pending += data
            return
        try:
            n = self.sock.send(data)
        except OSError as e:
            if e.errno in _AGAIN:
                n = 0
            else:
                self._lost(e)
                return
        if n < len(data):
            self.pending += memoryview(data)[n:]
            self._update()

    def close(self) -> None:
        if self.closing or self.closed:
            return
        self.closing = True              # nothing more is read
        if not self.pending:
            self._lost(None)
        else:
            self._update()

    def abort(self) -> None:
        if not self.closed:
            self._lost(None)

    def after_read(self, callback) -> None:
        """Run ``callback()`` at the end of the loop's current call, after every read of it (a
        protocol's ``call_soon`` for what an answer lets go), unless this transport closed."""
        self.owner.later.append((self, callback))

    # -- the loop's side -------------------------------------------------------------------------
    def _reading(self) -> bool:
        return not (self.closing or self.eof or self.closed)

    def _update(self) -> None:
        ev = (_IN if self._reading() else 0) | (select.EPOLLOUT if self.pending else 0)
        if ev != self.events:
            self.events = ev
            self.owner.ep.modify(self.fd, ev)

    def _read(self, ending: bool) -> None:
        sock = self.sock
        for _ in range(READS):
            try:
                data = sock.recv(READ_SIZE)
            except OSError as e:
                if e.errno in _AGAIN:
                    return
                self._lost(e)
                return
            if not data:
                try:
                    keep = self.protocol.eof_received()
                except Exception as e:  # noqa: BLE001  (asyncio's rule: the handler, then close)
                    self._fatal(e, "eof_received")
                    return
                if keep:
                    self.eof = True
                    self._update()
                else:
                    self.close()
                return
            try:
                self.protocol.data_received(data)
            except Exception as e:  # noqa: BLE001
                self._fatal(e, "data_received")
                return
            if not self._reading() or (len(data) < READ_SIZE and not ending):
                return

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.pending)
        except OSError as e:
            if e.errno in _AGAIN:
                return
            self._lost(e)
            return
        del self.pending[:n]
        if not self.pending:
            if self.closing:
                self._lost(None)
            else:
                self._update()

    def _fatal(self, exc, what: str) -> None:
        self.owner.loop.call_exception_handler({
            "message": f"Fatal error: protocol.{what}() call failed.", "exception": exc,
            "transport": self, "protocol": self.protocol})
        self._lost(exc)

    def _lost(self, exc) -> None:
        """Close the socket now; ``connection_lost(exc)`` soon, on the event loop."""
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.owner._forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        self.owner.loop.call_soon(self._call_lost, exc)

    def _call_lost(self, exc) -> None:
        try:
            self.protocol.connection_lost(exc)
        finally:
            self.protocol = None         # (the protocol holds its transport: no cycle left)
            self.sock = None
            self.extra.pop("socket", None)


def _name(get):
    try:
        return get()
    except OSError:                      # (a peer that reset at once: asyncio says None too)
        return None
