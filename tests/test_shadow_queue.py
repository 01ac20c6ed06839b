"""The shadow's sender without a capture (no root needed): order per connection, the bounded
queue per target, and drain with a target that never answers."""

from __future__ import annotations

import asyncio

from replay.play import clock as clk
from replay.play.plan import PlannedRequest
from replay.play.sender import parse_target
from replay.play.shadow import ShadowOptions, ShadowTarget


def request(conn: int, i: int) -> PlannedRequest:
    data = f"GET /c{conn}/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return PlannedRequest(conn, i, 0, data, "GET", f"/c{conn}/{i}", len(data))


async def serve(answer: bool, log: list):
    async def handle(reader, writer):
        peer = writer.get_extra_info("peername")[1]
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            log.append((peer, head.split(b" ")[1].decode()))
            if answer:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    async def safe(reader, writer):
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(safe, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run(answer: bool, queue: int, n: int, drain: float = 2.0):
    async def main():
        log: list = []
        server, port = await serve(answer, log)
        st = ShadowTarget(parse_target(f"http://127.0.0.1:{port}"),
                          ShadowOptions(queue_requests=queue, timeout=30), clk.LoopClock())
        st.player.start()
        for i in range(n):
            for conn in (1, 2):
                r = request(conn, i)
                if st.admit(len(r.data)):
                    st.player.submit(conn, r)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        await st.player.drain(drain)
        server.close()
        return st, log

    return asyncio.run(main())


def test_order_per_connection_and_every_request_answered():
    st, log = run(True, 1000, 20)
    assert st.report.answered == 40 and st.dropped() == {} and st.queued == 0
    by_peer: dict = {}
    for peer, uri in log:
        by_peer.setdefault(peer, []).append(uri)
    assert sorted(by_peer.values()) == [[f"/c{c}/{i}" for i in range(20)] for c in (1, 2)]


def test_hung_target_fills_its_queue_then_drops():
    st, log = run(False, 5, 20, drain=0.2)
    d = st.dropped()
    assert st.report.answered == 0
    assert st.peak == 5
    # 2 sent (one per connection, never answered), 3 waiting behind them, the rest refused entry
    assert st.report.sent == 2 and st.report.errors["interrupted"] == 2
    assert d == {"queue_full": 35, "drain": 3}
    assert st.queued == 0 and st.queued_bytes == 0


def test_https_target(tmp_path):
    from play_helpers import server_tls_context

    ctx = server_tls_context(tmp_path)

    async def main():
        log: list = []

        async def handle(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    log.append(head.split(b" ")[1].decode())
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        out = []
        for insecure in (True, False):
            st = ShadowTarget(parse_target(f"https://127.0.0.1:{port}", insecure=insecure),
                              ShadowOptions(timeout=10), clk.LoopClock())
            st.player.start()
            for i in range(3):
                r = request(1, i)
                assert st.admit(len(r.data))
                st.player.submit(1, r)
            await st.player.drain(5)
            out.append(st)
        server.close()
        return out, log

    (ok, refused), log = asyncio.run(main())
    assert ok.report.answered == 3 and log == ["/c1/0", "/c1/1", "/c1/2"]
    # self-signed: without --insecure no connection opens, nothing is sent
    assert refused.report.sent == 0 and refused.dropped() == {"tls": 3}
