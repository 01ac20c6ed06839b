"""A small JSON API in two releases, for the tests of `replay report`.

Release 2 carries known regressions; both releases carry the noise of real services:

- ``GET /api/items/{id}``: release 2 changes ``$.price`` for ids divisible by 7 and answers
  ``Cache-Control: no-store`` instead of ``max-age=60`` (a body field and a header);
- ``GET /api/users/{id}``: release 2 takes 30 ms longer (latency);
- ``POST /api/orders``: release 2 fails with 500 on one order in four (status);
- ``GET /api/search?q=``: the same in both, with noise: ``$.took_ms`` and ``$.trace`` change on
  every answer, the results come in any order;
- every answer: ``$.request_id`` / ``$.updated_at`` where present, and the headers ``Date``,
  ``X-Request-Id`` and ``X-Backend-Node`` change on every answer (noise);
- ``GET /health``: the same everywhere.

Run one by hand: ``python tests/report_app.py 2 8082``.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INJECTED = {
    ("GET /api/items/{id}", "body", "$.price"),
    ("GET /api/items/{id}", "header", "header:cache-control"),
    ("GET /api/users/{id}", "latency", None),
    ("POST /api/orders", "status", "201 -> 500"),
}


def make_server(release: int, port: int = 0) -> ThreadingHTTPServer:
    rnd = random.Random()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def _send(self, status, obj, extra=()):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Request-Id", str(uuid.uuid4()))
            self.send_header("X-Backend-Node", f"node-{rnd.randrange(1000)}")
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path, _, query = self.path.partition("?")
            parts = path.strip("/").split("/")
            now = datetime.now(timezone.utc).isoformat()
            if path == "/health":
                return self._send(200, {"ok": True})
            if parts[:2] == ["api", "items"] and len(parts) == 3:
                i = int(parts[2])
                price = 10 + i
                if release == 2 and i % 7 == 0:
                    price += 1
                cache = "no-store" if release == 2 else "max-age=60"
                return self._send(200, {"id": i, "name": f"item {i}", "price": price,
                                        "tags": ["a", "b"], "updated_at": now,
                                        "request_id": uuid.uuid4().hex},
                                  [("Cache-Control", cache)])
            if parts[:2] == ["api", "users"] and len(parts) == 3:
                time.sleep(0.002 + (0.030 if release == 2 else 0))
                return self._send(200, {"id": int(parts[2]), "name": "user", "plan": "pro"})
            if path == "/api/search":
                results = [{"id": k, "score": k / 10} for k in range(5)]
                rnd.shuffle(results)
                return self._send(200, {"q": query, "results": results,
                                        "took_ms": rnd.randrange(1, 50),
                                        "trace": "%016x" % rnd.getrandbits(64)})
            return self._send(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            order = json.loads(self.rfile.read(n) or b"{}")
            oid = int(order.get("id", 0))
            if release == 2 and oid % 4 == 0:
                return self._send(500, {"error": "internal"})
            return self._send(201, {"id": oid, "status": "created", "request_id": uuid.uuid4().hex})

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    return srv


class AppThread:
    """A release on a free loopback port, in a thread."""

    def __init__(self, release: int):
        self.server = make_server(release)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._t = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._t.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def traffic():
    """The recorded traffic: (connection, [(method, uri, body)]) on 8 keep-alive connections."""
    reqs = []
    for i in range(1, 57):
        reqs.append(("GET", f"/api/items/{i}", b""))
        reqs.append(("GET", f"/api/users/{100 + i}", b""))
        reqs.append(("POST", "/api/orders", json.dumps({"id": i, "sku": f"s{i}"}).encode()))
        reqs.append(("GET", f"/api/search?q=w{i % 5}", b""))
        if i % 8 == 0:
            reqs.append(("GET", "/health", b""))
    conns = [[] for _ in range(8)]
    for k, r in enumerate(reqs):
        conns[k % 8].append(r)
    return conns


if __name__ == "__main__":
    srv = make_server(int(sys.argv[1]), int(sys.argv[2]))
    print(f"release {sys.argv[1]} on 127.0.0.1:{srv.server_address[1]}", flush=True)
    srv.serve_forever()
