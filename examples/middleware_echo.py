#!/usr/bin/env python3
"""Echo middleware: hands every message back unchanged (GoReplay's middleware protocol).

    replay play capture.rlog --target http://staging:8080 --middleware "python3 examples/middleware_echo.py"

Each line on stdin is hex(META + "\\n" + PAYLOAD); META is "TYPE ID TIMESTAMP LATENCY" (TYPE 1
request, 2 recorded response, 3 replayed response). A line written back keeps the message; a
message not written back is dropped. Logs go to stderr: stdout carries only answers.
With -v it logs the meta line of every message.
"""
import binascii
import sys


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def main():
    verbose = "-v" in sys.argv[1:]
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        raw = binascii.unhexlify(line)
        meta, _, payload = raw.partition(b"\n")
        if verbose:
            log("%s, %d bytes" % (meta.decode(), len(payload)))
        sys.stdout.buffer.write(binascii.hexlify(meta + b"\n" + payload) + b"\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
