"""replay: packet-level HTTP traffic capture and replay."""

__version__ = "0.1.0"
