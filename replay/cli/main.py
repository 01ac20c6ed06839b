"""The ``replay`` command group.

Commands live in their own modules and are imported only when run, so ``replay --help`` stays
instant. Every ``ReplayError`` becomes one line on stderr and its exit code; a traceback is a bug.
"""

from __future__ import annotations

import gc
import os
import sys

# When this module starts the program (the ``replay`` script, ``python -m replay.cli.main``;
# not when other code imports it): hardly a collection while the command's modules load
# (click's and ours: some tens of thousands of objects, none garbage, walked again at each
# collection the default threshold makes); once loaded, they are frozen out of every later
# collection and the threshold is put back (``_loaded``). A convert's start-up ran 42 million
# instructions of collections, and its exit 20 million more over those objects.
_THRESHOLD = None
if __name__ == "__main__" or os.path.basename(sys.argv[0] or "") == "replay":
    _THRESHOLD = gc.get_threshold()
    gc.set_threshold(1_000_000, *_THRESHOLD[1:])
    # numpy's OpenBLAS starts a thread per core as numpy loads, each spinning for a while
    # (0.1 s of CPU at every start on 2 cores, beside the sender's), though nothing here does
    # linear algebra: one thread, unless the user asked otherwise
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        import replay

        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        replay.ENV_SET.append("OPENBLAS_NUM_THREADS")

import importlib  # noqa: E402
import signal  # noqa: E402

import click  # noqa: E402

from replay import __version__
from replay.errors import ReplayError

# name -> (module, one-line help)
COMMANDS = {
    "capture": ("replay.cli.capture", "Capture live HTTP traffic from an interface into a .rlog log."),
    "convert": ("replay.cli.convert", "Turn a pcap/pcapng capture into a .rlog log of HTTP messages."),
    "filter": ("replay.cli.filter", "Keep the exchanges a test needs, rewrite them, write a new log."),
    "ls": ("replay.cli.ls", "List the HTTP messages of a log or a capture."),
    "info": ("replay.cli.info", "Summarise a log or a capture: counts, time span, warnings."),
    "play": ("replay.cli.play", "Replay a log or a capture against a target, with the recorded timing."),
    "report": ("replay.cli.report", "Which endpoints of a replay got slower, fail or answer differently."),
    "shadow": ("replay.cli.shadow", "Copy live production requests to staging target(s) as they arrive."),
    "sink": ("replay.cli.sink", "A small HTTP server that answers every request and records it."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, _ = COMMANDS[name]
        try:
            return importlib.import_module(module).command
        finally:
            _loaded()

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replay")
def cli():
    """Capture, convert, list and replay HTTP traffic at the packet level."""


def _loaded() -> None:
    """The modules are loaded: what they made leaves the collector's work (``gc.freeze``), and
    the threshold is the usual one again (once: a command may set its own). Nothing when the
    module was imported by other code."""
    global _THRESHOLD
    if _THRESHOLD is not None:
        gc.freeze()
        gc.set_threshold(*_THRESHOLD)
        _THRESHOLD = None


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    # SIGTERM stops every command as Ctrl-C does: summary printed, outputs closed, exit code 130
    # (a command with its own handling, such as capture, installs its own)
    try:
        signal.signal(signal.SIGTERM, _terminated)
    except ValueError:
        pass                    # not the main thread (main() called by a test or an embedder)
    try:
        try:
            rv = cli.main(args=argv, prog_name="replay", standalone_mode=False)
        finally:
            _loaded()            # (no command ran: --help, --version, a usage error)
    except ReplayError as e:
        from replay.spool import given_name

        click.echo(f"replay: {given_name(str(e))}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("replay: interrupted", err=True)   # click turns Ctrl-C into Abort
        sys.exit(130)
    except click.UsageError as e:
        # one line, like every other error; the command's --help has the rest
        where = f" {e.ctx.command_path.split(' ', 1)[1]}" if e.ctx and " " in e.ctx.command_path else ""
        click.echo(f"replay{where}: {e.format_message()} (see 'replay{where} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # the reader of our output went away (``replay ls ... | head``): not an error
        try:
            sys.stdout = None
        finally:
            sys.exit(0)
    except KeyboardInterrupt:
        click.echo("replay: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
