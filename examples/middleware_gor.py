#!/usr/bin/env python3
"""Middleware written with the PyPI package ``gor`` (pip install gor), as many GoReplay users do.

    --middleware "python3 examples/middleware_gor.py"

It tags every request with a header and passes responses through. ``gor`` decodes payloads as
UTF-8, so it suits text traffic only.
"""
import sys

from gor.middleware import AsyncioGor


def on_request(proxy, msg, **kwargs):
    msg.http = proxy.set_http_header(msg.http, "X-Gor", "1")
    return msg


def on_response(proxy, msg, **kwargs):
    proxy.stderr.write("response %s\n" % msg.id)
    return msg


if __name__ == "__main__":
    proxy = AsyncioGor()
    proxy.on("request", on_request)
    proxy.on("response", on_response)
    try:
        proxy.run()
    except KeyboardInterrupt:
        sys.exit(1)
