"""replay: packet-level HTTP traffic capture and replay."""

__version__ = "0.1.0"

# Variables of the environment set by the program itself (``replay.cli.main``), not by its user:
# a program it starts for the user (``--middleware``) gets the environment without them.
ENV_SET: list = []
