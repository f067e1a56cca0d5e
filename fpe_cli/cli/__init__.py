"""The `fpe` command line: the only Typer layer. Commands live in sibling modules by concern.

Each command parses, calls the library, renders. No math, no file formats here.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import os
import signal
import sys

COMMAND_MODULES = ("expand_cmds", "train_cmds", "analyze_cmds")
EXIT_INTERRUPTED = 130


def _terminate(signum, frame) -> None:  # noqa: ARG001
    """SIGTERM (and SIGHUP: a closed terminal) unwinds like Ctrl-C, so atomic writes remove their
    temp files on the way out."""
    raise KeyboardInterrupt


def _install_signal_handlers() -> None:
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup
        signal.signal(signal.SIGHUP, _terminate)


class ClosedStream(io.TextIOBase):
    """Stands in for a standard stream the caller closed (`>&-`): nothing to print to is an error only
    when something is printed (`--json`, a table), never at start-up."""

    def __init__(self, name: str) -> None:
        self.stream_name = name

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, f"standard {self.stream_name} is closed; nowhere to print the result")


def _stand_in_for_closed_streams() -> None:
    if sys.stdout is None:
        sys.stdout = ClosedStream("output")
    if sys.stderr is None:  # diagnostics have nowhere to go: drop them, the exit code still tells
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _escape_unencodable_output() -> None:
    """A path or name the terminal's encoding cannot show (PYTHONIOENCODING=ascii, LANG=C on old
    Pythons) is printed escaped (\\xe8), as stderr already does, instead of failing the command."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            with contextlib.suppress(ValueError, OSError):  # a stream that cannot be reconfigured keeps its errors
                reconfigure(errors="backslashreplace")


def _register_commands() -> None:
    """Import the command modules (importing one registers its commands on `app`)."""
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is being written
            if exc.name != f"{__name__}.{name}":
                raise


_install_signal_handlers()  # before the imports: a signal during them is an interruption, not a traceback
_stand_in_for_closed_streams()
_escape_unencodable_output()
try:  # the imports (torch) take seconds: Ctrl-C during them is an interruption, not a traceback
    from typer.exceptions import TyperException

    from .common import app, report_interrupt

    _register_commands()
except KeyboardInterrupt:  # pragma: no cover - timing-dependent; tested through a subprocess
    print("Error: interrupted", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except TyperException as exc:  # usage errors: one line instead of Click's boxed panel
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if not message:  # `fpe` alone: Click has printed the help, which says it all
            sys.exit(getattr(exc, "exit_code", 2))
        print(f"Error: {message} (see 'fpe --help' or 'fpe COMMAND --help')", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:  # outside a command body; commands map it to the same exit code
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:  # from a command (reported there), or from Typer (a signal while it dispatched)
        report_interrupt()
    sys.exit(code if isinstance(code, int) else 0)
