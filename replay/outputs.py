"""The files replay writes for its user: checked, locked, and replaced whole or not at all.

Every command that writes a file its user named goes through here (``convert -o``, ``filter -o``,
``play -o`` and ``--report``, ``capture -o``, ``sink --record``). Rules:

- an output is never one of the command's inputs nor another of its outputs. Paths are compared
  by the file they name (``os.path.samefile``, so symlinks and hard links count), and by their
  resolved path when the output does not exist yet. A clash is a ``UsageError`` raised before
  anything is opened;
- one writer per name: ``flock(LOCK_EX | LOCK_NB)`` on a sibling lock file ``.NAME.replay-lock``,
  not on NAME itself, because renaming into place swaps NAME's inode and a lock held on the old
  inode would no longer guard the name. A second writer fails at once with ``OutputBusyError``
  naming the holder's pid (written into the lock file). The holder removes the lock file on
  release; an acquirer re-checks, once locked, that the name still leads to the inode it locked
  (else it retries), so unlinking never lets two writers in. After a SIGKILL the lock file stays,
  unlocked, and the next writer takes it;
- ``AtomicFile`` (logs, reports): the bytes go to ``.NAME.PID-RANDOM.replay-tmp`` in NAME's
  directory (same file system: the rename is atomic) and ``commit`` renames it over NAME. A
  failed or interrupted run removes its temporary file, and NAME keeps its previous content. A
  writer that holds the lock removes the temporary files of writers of NAME that died (SIGKILL);
- ``LiveFile`` (a live capture, the sink's records): written in place, because there what was
  written before a kill must stay in the file; it takes the lock only;
- a name that exists and is not a regular file (``/dev/null``, a FIFO) is written directly, with
  neither lock nor temporary file; a directory is an error;
- a symlink is followed: the file it points at is replaced, the link stays;
- modes: a log is created 0600 (it holds cookies and tokens); any other file gets the mode of the
  file it replaces, or 0666 minus the umask, as ``open()`` would give;
- while an ``AtomicFile`` is open in the main thread and SIGTERM has its default action, SIGTERM
  raises ``Terminated`` (a ``KeyboardInterrupt``), so the temporary file is removed on the way
  out instead of being left behind by the kill;
- every failure is one ``OutputError`` naming the path as the user wrote it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import threading

from replay.errors import OutputBusyError, OutputError, Terminated, UsageError

LOG_MODE = 0o600            # a log holds cookies and tokens
LOCK_SUFFIX = ".replay-lock"
TMP_SUFFIX = ".replay-tmp"
_TMP_TAIL = re.compile(r"\d+-[0-9a-f]{8}" + re.escape(TMP_SUFFIX))


def reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


# -- which files ----------------------------------------------------------------------------------

def _same(a: str, b: str) -> bool:
    """True when paths ``a`` and ``b`` name one file (or would, once created)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(path: str, what: str, inputs: dict, outputs: dict | None = None) -> None:
    """``UsageError`` when output ``path`` (the user's ``what``, e.g. ``--report``) is one of
    ``inputs`` or ``outputs`` (label -> path; None values are skipped)."""
    for label, other in inputs.items():
        if other and _same(path, os.fspath(other)):
            same = "" if os.fspath(other) == path else f" {other} (the same file)"
            raise UsageError(f"{path}: {what} would overwrite {label}{same}; give another file")
    for label, other in (outputs or {}).items():
        if other and _same(path, os.fspath(other)):
            raise UsageError(f"{path}: {what} and {label} name the same file; give two files")


def _target(path: str) -> tuple[str, os.stat_result | None]:
    """The file ``path`` leads to (symlinks followed) and its stat (None: it does not exist).
    A missing directory or a directory at ``path`` is an ``OutputError``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {reason(e)}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return path, st      # /dev/stdout is a link to a pipe: no real path to resolve
    real = os.path.realpath(path)
    d = os.path.dirname(real)
    if st is None and not os.path.isdir(d):
        raise OutputError(f"{path}: cannot create: directory {os.path.dirname(os.path.abspath(path))} "
                          "does not exist")
    return real, st


# -- the lock -------------------------------------------------------------------------------------

class _Lock:
    def __init__(self, path: str | None, fd: int | None):
        self.path = path
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)       # while still holding it: see the module's rules
        except OSError:
            pass
        os.close(fd)


def lock_path(real: str) -> str:
    d, base = os.path.split(real)
    return os.path.join(d, "." + base + LOCK_SUFFIX)


def _lock(real: str, shown: str) -> _Lock:
    lp = lock_path(real)
    for _ in range(100):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError as denied:
            try:   # a lock file another user left: reading is enough to lock it
                fd = os.open(lp, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                raise OutputError(f"{shown}: cannot create: {reason(denied)}") from None
        except OSError as e:
            raise OutputError(f"{shown}: cannot create: {reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputBusyError(f"{shown}: is being written by another replay process"
                                  + (f" (pid {pid})" if pid else "")) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return _Lock(None, None)   # a file system without locks: write unguarded
            raise OutputError(f"{shown}: cannot lock: {reason(e)}") from None
        try:
            st = os.stat(lp)
            mine = os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if not same:             # its holder removed it between our open and our lock
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass                 # read-only lock file: the lock holds, the pid is not shown
        return _Lock(lp, fd)
    raise OutputError(f"{shown}: cannot lock: {lp} keeps being replaced")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def _remove_stale_temps(real: str) -> None:
    """Temporary files of earlier writers of ``real``: dead, since we hold the lock."""
    d, base = os.path.split(real)
    prefix = "." + base + "."
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and _TMP_TAIL.fullmatch(name[len(prefix):]):
            try:
                os.unlink(os.path.join(d, name))
            except OSError:
                pass


# -- SIGTERM while a temporary file is open -------------------------------------------------------

_guard = {"depth": 0, "installed": False}     # main thread only: no lock an interrupt could leave held


def _on_sigterm(signum, frame):
    raise Terminated()


def _guard_enter() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    _guard["depth"] += 1
    if _guard["depth"] > 1:
        return
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _guard["installed"] = True
    except (ValueError, OSError):
        pass


def _guard_exit() -> None:
    if threading.current_thread() is not threading.main_thread() or _guard["depth"] == 0:
        return
    _guard["depth"] -= 1
    if _guard["depth"] > 0 or not _guard["installed"]:
        return
    _guard["installed"] = False
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError):
        pass


# -- the files ------------------------------------------------------------------------------------

class _Committed:
    """Leaving a ``with`` block commits, or discards on an exception."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class _Output(_Committed):
    live = False

    def __init__(self, path, what: str = "output", mode: int | None = None):
        self.path = os.fspath(path)       # as the user wrote it: every message names it
        self.what = what
        self.mode = mode
        self.fd: int | None = None
        self.direct = False               # an existing non-regular file, written as it is
        self._lock: _Lock | None = None
        self._opened = False
        self._done = False

    def detach(self) -> int:
        """Hand the open descriptor over: the caller writes and closes it (``LogWriter(fd=)``)."""
        fd, self.fd = self.fd, None
        if fd is None:
            raise ValueError(f"{self.path}: not open")
        return fd

    def _mode_for(self, st) -> int:
        if self.mode is not None:
            return self.mode
        if st is not None:
            return stat.S_IMODE(st.st_mode)
        return 0o666               # the umask applies, as with open()

    def _close_fd(self, fsync: bool = False) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if fsync:
                os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EROFS):
                os.close(fd)
                raise OutputError(f"{self.path}: cannot sync: {reason(e)}") from None
        os.close(fd)

    def __enter__(self):
        if not self._opened:
            self.open()
        return self


class AtomicFile(_Output):
    """A file that appears at its path complete, at ``commit``, or not at all."""

    def __init__(self, path, what: str = "output", mode: int | None = None):
        super().__init__(path, what, mode)
        self.tmp: str | None = None
        self._real: str | None = None

    def open(self) -> "AtomicFile":
        real, st = _target(self.path)
        self._real = real
        self._opened = True
        if st is not None and not stat.S_ISREG(st.st_mode):
            self.direct = True
            try:
                self.fd = os.open(real, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None
            return self
        _guard_enter()     # before the temporary file exists, so that no SIGTERM leaves it
        try:
            self._lock = _lock(real, self.path)
            _remove_stale_temps(real)
            d, base = os.path.split(real)
            mode = self._mode_for(st)
            # named before it exists: an interrupt as open() returns must not leave it behind
            self.tmp = os.path.join(d, f".{base}.{os.getpid()}-{os.urandom(4).hex()}{TMP_SUFFIX}")
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                  mode)
            except OSError as e:
                self.tmp = None      # not ours (EEXIST) or not there
                raise OutputError(f"{self.path}: cannot create: {reason(e)}") from None
            if self.mode is not None or st is not None:
                try:
                    os.fchmod(self.fd, mode)   # exact, whatever the umask
                except OSError:
                    pass
        except BaseException:
            self.discard()
            raise
        return self

    def write_text(self, text: str) -> None:
        """The whole content at once (a report)."""
        data = text.encode("utf-8")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None

    def commit(self, fsync: bool = False) -> None:
        """Put the file at its path (replacing what was there) and release the lock."""
        if self._done:
            return
        if not self._opened:
            raise ValueError(f"{self.path}: commit before open")
        try:
            self._close_fd(fsync)
            if not self.direct:
                try:
                    os.replace(self.tmp, self._real)
                except OSError as e:
                    raise OutputError(f"{self.path}: cannot write: {reason(e)}") from None
                self.tmp = None
        except BaseException:
            self.discard()
            raise
        self._finish()

    def discard(self) -> None:
        """Remove the temporary file: the path keeps what it held before. Idempotent."""
        if self._done:
            return
        try:
            self._close_fd()
        except OutputError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None
        self._finish()

    def _finish(self) -> None:
        self._done = True
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._opened and not self.direct:
            _guard_exit()


class LiveFile(_Output):
    """A file written in place while the command runs (a capture, the sink's records): locked
    and, when opened, created or emptied."""

    live = True

    def open(self) -> "LiveFile":
        real, st = _target(self.path)
        self._opened = True
        if st is not None and not stat.S_ISREG(st.st_mode):
            self.direct = True
        else:
            self._lock = _lock(real, self.path)
        try:
            try:
                self.fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                  self._mode_for(None))
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create: {reason(e)}") from None
            if self.mode is not None and not self.direct:
                try:
                    os.fchmod(self.fd, self.mode)  # also when the file existed with another mode
                except OSError:
                    pass
        except BaseException:
            self.close()
            raise
        return self

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        """Close the file (if still held) and release the lock; what was written stays."""
        if self._done:
            return
        self._done = True
        try:
            self._close_fd()
        except OutputError:
            pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    commit = discard = close


class Outputs(_Committed):
    """The files one command writes, checked against its inputs and each other.

    ``atomic(...)`` and ``live(...)`` check and register a file; ``open()`` opens them all (a bad
    path or a busy one fails here, before the command does any work); leaving the ``with``
    block commits them in order, or discards every one on an exception.
    """

    def __init__(self, inputs: dict | None = None):
        self.inputs = {k: os.fspath(v) for k, v in (inputs or {}).items() if v}
        self.files: list[_Output] = []

    def _add(self, out: _Output) -> _Output:
        check_distinct(out.path, out.what, self.inputs, {f.what: f.path for f in self.files})
        self.files.append(out)
        return out

    def atomic(self, path, what: str = "output", mode: int | None = None) -> AtomicFile:
        return self._add(AtomicFile(path, what, mode))

    def live(self, path, what: str = "output", mode: int | None = None) -> LiveFile:
        return self._add(LiveFile(path, what, mode))

    def open(self) -> "Outputs":
        try:
            for f in self.files:
                f.open()
        except BaseException:
            self.discard()
            raise
        return self

    def commit(self) -> None:
        try:
            for f in self.files:
                if f._opened:
                    f.commit()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for f in self.files:
            if f._opened:
                f.discard()

    def __enter__(self):
        return self
