"""Logs and captures read from a pipe (``cat x.rlog | replay play /dev/stdin``).

The readers need a file they can seek in and map (a log's index is at its end; a capture is read
twice by ``play --output``), so a pipe, a character device or a socket is first copied to a
temporary file, in chunks: bounded by the disk, not by memory. The copy lives until the process
exits. ``SPOOLED`` maps each copy to the name the user gave, so that messages name the latter.
"""

from __future__ import annotations

import atexit
import os
import stat

from replay.errors import InputError

CHUNK = 1 << 20
SPOOLED: dict = {}           # temporary path -> path as given
_BY_SOURCE: dict = {}        # path as given -> temporary path (a pipe can be read only once)


def seekable(path) -> str:
    """``path`` itself when it is a regular file (or missing: the reader says so), else the
    path of a temporary copy of everything it holds."""
    path = os.fspath(path)
    if path in _BY_SOURCE:
        return _BY_SOURCE[path]
    try:
        st = os.stat(path)
    except OSError:
        return path
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return path
    import tempfile     # (only for a pipe: every reading of a file asks first)

    fd, tmp = tempfile.mkstemp(prefix="replay-input-")
    SPOOLED[tmp] = path
    _BY_SOURCE[path] = tmp
    atexit.register(_remove, tmp)
    try:
        with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
    except OSError as e:
        raise InputError(f"{path}: cannot copy the input to a temporary file (a pipe is read "
                         f"into {tempfile.gettempdir()}): {e.strerror or e}") from None
    return tmp


def given_name(text: str) -> str:
    """``text`` with each temporary copy's path replaced by the name the user gave."""
    for tmp, path in SPOOLED.items():
        text = text.replace(tmp, path)
    return text


def _remove(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass
