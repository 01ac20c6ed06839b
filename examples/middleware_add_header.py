#!/usr/bin/env python3
"""Middleware that adds a header to every request (GoReplay's middleware protocol).

    --middleware "python3 examples/middleware_add_header.py 'X-Shadow: 1'"

Only the head changes, so Content-Length stays right. Responses (types 2 and 3) go back as they
came: a middleware must echo every message it does not mean to drop.
"""
import binascii
import sys


def add_header(payload, header):
    """Insert ``header`` after the request line; an existing header of the same name is replaced."""
    end = payload.find(b"\n") + 1
    if end <= 0:
        return payload
    name = header.split(b":", 1)[0].strip().lower() + b":"
    head_end = payload.find(b"\r\n\r\n")
    head_end = len(payload) if head_end < 0 else head_end + 2
    lines = payload[end:head_end].split(b"\r\n")
    kept = [h for h in lines if h and not h.lower().startswith(name)]
    head = b"".join(h + b"\r\n" for h in [header] + kept)
    return payload[:end] + head + payload[head_end:]


def main():
    header = (sys.argv[1] if len(sys.argv) > 1 else "X-Shadow: 1").encode("latin-1")
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        raw = binascii.unhexlify(line)
        meta, _, payload = raw.partition(b"\n")
        if meta[:1] == b"1":
            payload = add_header(payload, header)
        sys.stdout.buffer.write(binascii.hexlify(meta + b"\n" + payload) + b"\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
