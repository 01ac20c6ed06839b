#!/usr/bin/env python3
"""Middleware that drops every POST request and the responses that answer it.

    --middleware "python3 examples/middleware_drop_post.py"

A request and its responses share the ID (second field of the meta line): the IDs of dropped
requests are remembered so that their responses go too. Responses may come before their request
is seen (GoReplay gives no order guarantee); such a response is held until its request shows up.
"""
import binascii
import sys
from collections import OrderedDict

KEEP = 100000  # remembered IDs


def main():
    out = sys.stdout.buffer
    dropped = OrderedDict()     # id -> None
    seen = OrderedDict()        # id -> None: requests that went through
    held = {}                   # id -> [hex lines of responses whose request is not seen yet]
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        raw = binascii.unhexlify(line)
        meta, _, payload = raw.partition(b"\n")
        fields = meta.split(b" ")
        kind, mid = fields[0], fields[1]
        if kind == b"1":
            if payload.startswith(b"POST "):
                dropped[mid] = None
                held.pop(mid, None)
                if len(dropped) > KEEP:
                    dropped.popitem(last=False)
                continue
            seen[mid] = None
            if len(seen) > KEEP:
                seen.popitem(last=False)
            out.write(line + b"\n")
            for r in held.pop(mid, ()):
                out.write(r + b"\n")
        elif mid in dropped:
            continue
        elif mid in seen:
            out.write(line + b"\n")
        else:
            held.setdefault(mid, []).append(line)
        out.flush()
    # the end of input: responses whose request never came (not captured) go back as they are
    for lines in held.values():
        for r in lines:
            out.write(r + b"\n")
    out.flush()


if __name__ == "__main__":
    main()
