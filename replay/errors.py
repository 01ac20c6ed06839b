"""The one exception hierarchy of replay.

Every error a user can cause (bad input file, bad flag, bad log) is a ReplayError. The CLI turns
it into one line on stderr and a non-zero exit code; any other exception reaching the CLI is a bug.
"""


class ReplayError(Exception):
    """Base of every error replay reports to its user."""

    exit_code = 1


class InputError(ReplayError):
    """A capture or log file that cannot be read (missing, not a capture, unsupported)."""

    exit_code = 2


class LogFormatError(InputError):
    """A .rlog file whose header or blocks are not what the format says."""


class OutputError(ReplayError):
    """A file replay must write that cannot be written (unwritable path, disk full, I/O error)."""


class OutputBusyError(OutputError):
    """An output file another replay process is writing (it holds the file's lock)."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): try again once the other writer is done


class UsageError(ReplayError):
    """A wrong flag or flag value."""

    exit_code = 2


class CaptureError(ReplayError):
    """A live capture that cannot start or go on (no such interface, bad filter, libpcap error)."""

    exit_code = 2


class CapturePermissionError(CaptureError):
    """Opening an interface needs root or CAP_NET_RAW (and CAP_NET_ADMIN for a big buffer)."""

    exit_code = 77  # EX_NOPERM (sysexits.h)


class MiddlewareError(ReplayError):
    """A middleware process that cannot start, crashes, exits early or writes what is not its protocol."""


class PluginError(ReplayError):
    """A Python hook (``--plugin module:function``) that raised on a message or returned a wrong type."""


class PluginSpecError(UsageError):
    """A ``--plugin`` spec whose module, file or function cannot be found or is not callable."""


class Terminated(KeyboardInterrupt):
    """SIGTERM while a file is being written (``replay.outputs``): unwinds like Ctrl-C, so the
    half-written temporary file is removed on the way out."""
