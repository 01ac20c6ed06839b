"""What a replay will send: recorded requests grouped by recorded connection, ready to go out.

Sans-IO: built from ``Message`` objects (``replay.pipeline.open_input``), no sockets, no clock.

Rules:
- one ``ConnPlan`` per recorded connection (``conn``), its requests in recorded order (``index``);
  connections are ordered by the capture time of their first request;
- a request's recorded status is the status of the final (non-1xx) response with the same
  ``conn`` and ``index``; ``None`` when that response was not captured;
- a request is *pipelined* when the capture shows it sent before the previous response on its
  connection had ended (its ``ts_first`` < that response's ``ts_last``): the replay then sends it
  without waiting for that response; otherwise it waits, as the recorded client did;
- the bytes sent are the recorded bytes, except the ``Host`` header's value, set to the target
  unless ``keep_host``; a request whose body was cut by the capture (no chunked framing) gets a
  Content-Length equal to the bytes it carries, so Content-Length is always true; a cut chunked
  request cannot be made whole without inventing bytes and is skipped (counted);
- unpaired responses (``index`` -1) and responses in general are not sent, only compared;
- messages flagged ``replayed`` (the output log of ``play -o`` or ``shadow -o`` given as input)
  are left out: what was recorded is replayed, not what a target got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replay.events import CUT, F_CHUNKED, F_INTERIM, F_REPLAYED, KIND_REQUEST, PlannedRequest
from replay.httpmsg import body_length, set_content_length, set_host

__all__ = ["CUT", "PlannedRequest", "ConnPlan", "Plan", "build_plan"]


@dataclass(slots=True)
class ConnPlan:
    conn: int
    client: tuple
    server: tuple
    requests: list = field(default_factory=list)

    @property
    def t_first(self) -> int:
        return self.requests[0].t


@dataclass
class Plan:
    connections: list            # ConnPlan, by time of first request
    t0: int                      # recorded time of the first request, ns
    t_last: int                  # recorded time of the last request, ns
    requests: int
    pipelined: int
    skipped: dict                # reason -> count (requests not sent)
    conn_stride: int             # max recorded conn id + 1 (loop iteration k uses conn + k * stride)

    streaming = False

    @property
    def span_ns(self) -> int:
        return self.t_last - self.t0

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    def deadlines_sorted(self) -> list:
        """Recorded times of every request, sorted (for the scheduler's look-ahead)."""
        return sorted(r.t for c in self.connections for r in c.requests)


def build_plan(messages, host: str | None = None, keep_host: bool = False) -> Plan:
    """Group the requests of ``messages`` by connection; ``host`` is the Host value to send."""
    reqs: dict = {}
    finals: dict = {}
    conns: dict = {}
    skipped: dict = {}
    max_conn = -1
    for m in messages:
        if m.flags & F_REPLAYED:
            continue            # a run's output log: what its targets got is not replayed again
        max_conn = max(max_conn, m.conn)
        if m.kind == KIND_REQUEST:
            reqs[(m.conn, m.index)] = m
            if m.conn not in conns:
                conns[m.conn] = ConnPlan(m.conn, tuple(m.client), tuple(m.server))
        elif m.index >= 0 and not m.flags & F_INTERIM:
            finals[(m.conn, m.index)] = m
    by_conn: dict = {}
    for (conn, index), m in reqs.items():
        by_conn.setdefault(conn, []).append(m)
    planned = pipelined = 0
    for conn, msgs in by_conn.items():
        msgs.sort(key=lambda m: m.index)
        cp = conns[conn]
        prev = None
        for m in msgs:
            data = m.data
            if m.flags & CUT:
                if m.flags & F_CHUNKED:
                    skipped["cut_chunked_body"] = skipped.get("cut_chunked_body", 0) + 1
                    prev = m
                    continue
                data = set_content_length(data, m.head_length)
            if not keep_host and host is not None:
                data = set_host(data, _head_length(data, m.head_length, len(m.data)), host)
            resp = finals.get((conn, m.index))
            pipe = False
            if prev is not None:
                prev_resp = finals.get((conn, prev.index))
                pipe = prev_resp is not None and m.ts_first < prev_resp.ts_last
            hl = _head_length(data, m.head_length, len(m.data))
            blen, chunked = body_length(data, hl)
            cp.requests.append(PlannedRequest(
                conn, m.index, m.ts_first, data, m.method or "GET", m.uri or "", hl,
                resp.status if resp is not None else None, pipe,
                body_length=blen, flags=F_CHUNKED if chunked else 0))
            pipelined += pipe
            planned += 1
            prev = m
    connections = [c for c in conns.values() if c.requests]
    connections.sort(key=lambda c: (c.t_first, c.conn))
    order = sorted((r for c in connections for r in c.requests), key=lambda r: (r.t, r.conn, r.index))
    for i, r in enumerate(order):
        r.seq = i
    t0 = order[0].t if order else 0
    t_last = order[-1].t if order else 0
    return Plan(connections, t0, t_last, planned, pipelined, skipped, max_conn + 1)


def _head_length(new: bytes, old_head: int, old_len: int) -> int:
    # the head grew or shrank by the size difference; the body did not change
    return old_head + (len(new) - old_len) if old_head else 0
