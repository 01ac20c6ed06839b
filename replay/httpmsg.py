"""Small helpers to read fields out of a framed message's head (already known to be HTTP/1.x)."""

from __future__ import annotations


def header_value(data: bytes, head_length: int, name: bytes) -> str | None:
    """The value of the first header ``name`` (lower-case bytes) in the message head, or None."""
    head = data[:head_length] if head_length else data[:65536]
    low = head.lower()
    key = b"\n" + name + b":"
    i = low.find(key)
    if i < 0:
        return None
    start = i + len(key)
    end = head.find(b"\n", start)
    if end < 0:
        end = len(head)
    return head[start:end].strip().decode("latin-1")


def format_addr(addr) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
