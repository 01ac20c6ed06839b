"""A small HTTP/1.1 server that answers every request and records what arrived and when.

The built-in target of ``replay play`` (``replay sink``, ``replay play LOG --sink``): asyncio, one
process, keep-alive, pipelining (answers in request order), request bodies framed by
Content-Length or chunked encoding (RFC 9112 §6.3, §7.1), ``Expect: 100-continue`` answered with
an interim 100 when the body has not arrived yet. Every request is answered ``200`` with a short
body (``HEAD``: the same headers, no body); a head it cannot parse gets ``400`` and the connection
is closed.

Each request is recorded as one dict: ``ts`` (Unix time of the arrival of its first byte, s),
``conn`` (connection number in order of acceptance), ``client``, ``method``, ``uri``,
``version``, ``body`` (body bytes after removing chunk framing) and ``bytes`` (the whole request
as received). ``on_request(record, raw)`` sees each with its raw bytes (``keep_raw=True``);
``--record FILE.jsonl`` writes one JSON object per line, each written to the file (no buffer in
the process) before its answer is sent: the file holds every answered request even after a
SIGKILL, and memory stays bounded however long the sink runs. The file is locked against a second
writer (``replay.outputs``); a failed write stops the sink (``error``, ``failed``) and the request
it could not record is not answered.
"""

from __future__ import annotations

import asyncio
import json
import time

MAX_HEAD = 64 << 10
BODY = b"ok\n"

HEAD, BODY_CL, CHUNK_SIZE, CHUNK_DATA, TRAILERS = range(5)


class SinkProtocol(asyncio.Protocol):
    def __init__(self, sink: "Sink", conn: int):
        self.sink = sink
        self.conn = conn
        self.buf = bytearray()
        self.state = HEAD
        self.transport = None
        self.client = ""
        self.rec = None
        self.raw = None
        self.need = 0
        self.close_after = False
        self.head_only = False
        self.closing = False

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.client = f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
        self.sink.connections += 1

    def data_received(self, data):
        if self.closing:
            return
        ts = time.time_ns()
        self.sink.bytes += len(data)
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n and not self.closing:
            st = self.state
            if st == HEAD:
                if self.rec is None:
                    while pos < n and buf[pos] in (13, 10):     # RFC 9112 §2.2: empty lines before a request
                        pos += 1
                    if pos >= n:
                        break
                    self.rec = {"ts": ts / 1e9, "start": pos}
                end = buf.find(b"\r\n\r\n", pos)
                k = 4
                lf = buf.find(b"\n\n", pos)
                if lf >= 0 and (end < 0 or lf < end):
                    end, k = lf, 2
                if end < 0:
                    if n - pos > MAX_HEAD:
                        self._bad()
                    break
                head = bytes(buf[pos:end + k])
                pos = end + k
                if not self._head(head):
                    break
            elif st == BODY_CL:
                take = min(self.need, n - pos)
                self._body(buf, pos, take)
                self.rec["body"] += take
                self.need -= take
                pos += take
                if self.need == 0:
                    self._done()
            elif st == CHUNK_SIZE:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        self._bad()
                    break
                line = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
                self._body(buf, pos, eol + 1 - pos)
                pos = eol + 1
                try:
                    size = int(line, 16)
                except ValueError:
                    self._bad()
                    break
                if size == 0:
                    self.state = TRAILERS
                else:
                    self.rec["body"] += size
                    self.need = size
                    self.state = CHUNK_DATA
            elif st == CHUNK_DATA:
                # the chunk's data, then its CRLF
                if self.need > 0:
                    take = min(self.need, n - pos)
                    self._body(buf, pos, take)
                    self.need -= take
                    pos += take
                    continue
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    break
                self._body(buf, pos, eol + 1 - pos)
                pos = eol + 1
                self.state = CHUNK_SIZE
            elif st == TRAILERS:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    break
                line = bytes(buf[pos:eol]).strip()
                self._body(buf, pos, eol + 1 - pos)
                pos = eol + 1
                if not line:
                    self._done()
        del buf[:pos]

    def _body(self, buf, pos, size):
        self.rec["bytes"] += size
        if self.raw is not None:
            self.raw += buf[pos:pos + size]

    def _head(self, head: bytes) -> bool:
        rec = self.rec
        lines = head.split(b"\n")
        parts = lines[0].strip().split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._bad()
            return False
        method, uri, version = (p.decode("latin-1") for p in parts)
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers.setdefault(name.strip().lower(), value.strip())
        del rec["start"]
        rec.update(conn=self.conn, client=self.client, method=method, uri=uri, version=version,
                   body=0, bytes=len(head))
        if self.sink.keep_raw:
            self.raw = bytearray(head)
        conn_hdr = headers.get(b"connection", b"").lower()
        self.close_after = b"close" in conn_hdr or (version == "HTTP/1.0" and b"keep-alive" not in conn_hdr)
        self.head_only = method == "HEAD"
        te = headers.get(b"transfer-encoding", b"").lower()
        if te:
            if not te.endswith(b"chunked"):
                self._bad()
                return False
            self.state = CHUNK_SIZE
            self.need = 0
        elif b"content-length" in headers:
            try:
                self.need = int(headers[b"content-length"])
            except ValueError:
                self._bad()
                return False
            if self.need < 0:
                self._bad()
                return False
            self.state = BODY_CL if self.need else HEAD
        else:
            self.state = HEAD
        if self.state == HEAD:
            self._done()
        elif headers.get(b"expect", b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _done(self):
        rec, raw = self.rec, self.raw
        self.rec = self.raw = None
        self.state = HEAD
        if not self.sink.record(rec, bytes(raw) if raw is not None else None):
            self.closing = True
            self.transport.abort()
            return
        body = self.sink.body
        close = self.close_after
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), b"Connection: close\r\n" if close else b"", b"" if self.head_only else body))
        if close:
            self.closing = True
            self.transport.close()

    def _bad(self):
        self.sink.bad_requests += 1
        self.closing = True
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()


class Sink:
    """The server; ``await start()`` then ``port``; ``close()`` when done."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, record_path: str | None = None,
                 on_request=None, keep_raw: bool = False, body: bytes = BODY, ssl=None):
        self.host = host
        self.port = port
        self.record_path = record_path
        self.on_request = on_request
        self.keep_raw = keep_raw
        self.body = body
        self.ssl = ssl
        self.server = None
        self.requests = 0
        self.connections = 0
        self.bytes = 0
        self.bad_requests = 0
        self.recorded = 0
        self.error = None              # an OutputError once recording failed
        self.failed = asyncio.Event()  # set with it
        self._file = None
        self._conn_ids = 0

    async def start(self):
        """Listen (``OSError`` when the address is taken), then open ``record_path``
        (``OutputError`` naming it)."""
        from replay.outputs import LiveFile

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, self.host, self.port, ssl=self.ssl,
                                               reuse_address=True, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        if self.record_path:
            try:
                self._file = LiveFile(self.record_path, "--record").open()
            except BaseException:
                await self.close()
                raise
        return self

    def _protocol(self):
        conn = self._conn_ids
        self._conn_ids += 1
        return SinkProtocol(self, conn)

    def record(self, rec: dict, raw: bytes | None) -> bool:
        """Count and record one request; False when it could not be written to the file."""
        if self.error is not None:
            return False
        if self._file is not None:
            try:
                self._file.write((json.dumps(rec) + "\n").encode())
            except OSError as e:
                from replay.errors import OutputError
                from replay.outputs import reason

                n = self.recorded
                self.error = OutputError(
                    f"{self.record_path}: cannot write: {reason(e)} ({n} record"
                    f"{'s' if n != 1 else ''} written before it are kept)")
                self.failed.set()
                return False
            self.recorded += 1
        self.requests += 1
        if self.on_request is not None:
            self.on_request(rec, raw)
        return True

    def summary(self) -> dict:
        return {"requests": self.requests, "connections": self.connections,
                "bytes": self.bytes, "bad_requests": self.bad_requests}

    async def close(self):
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        if self._file is not None:
            self._file.close()
            self._file = None


def start_sink_process(host: str = "127.0.0.1", timeout: float = 10.0):
    """Run ``replay sink`` in a child process on a free port: (process, port).

    A process of its own, so that serving does not share the replayer's event loop or GIL.
    """
    import subprocess
    import sys

    from replay.errors import ReplayError

    proc = subprocess.Popen([sys.executable, "-m", "replay.cli.main", "sink", "--host", host,
                             "--port", "0", "--announce"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
    line = proc.stdout.readline() if ready else ""
    try:
        port = int(line.strip())
    except ValueError:
        stop_sink_process(proc)
        raise ReplayError("the built-in sink did not start") from None
    return proc, port


def stop_sink_process(proc, timeout: float = 5.0) -> dict | None:
    """Stop a sink started by ``start_sink_process``; its summary (requests, connections, bytes)."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in reversed((out or "").splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None
