"""The `fpe` command line: the only Typer layer. Commands live in sibling modules by concern.

Each command parses, calls the library, renders. No math, no file formats here.
"""

from __future__ import annotations

import importlib
import signal
import sys

from typer.exceptions import TyperException

COMMAND_MODULES = ("expand_cmds", "train_cmds", "analyze_cmds")


def _register_commands() -> None:
    """Import the command modules (importing one registers its commands on `app`)."""
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - only while a module is being written
            if exc.name != f"{__name__}.{name}":
                raise


try:  # the imports (torch) take seconds: Ctrl-C during them is an interruption, not a traceback
    from .common import app

    _register_commands()
except KeyboardInterrupt:  # pragma: no cover - timing-dependent; tested through a subprocess
    print("Error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None


def _terminate(signum, frame) -> None:  # noqa: ARG001
    """SIGTERM (and SIGHUP: a closed terminal) unwinds like Ctrl-C, so atomic writes remove their
    temp files on the way out."""
    raise KeyboardInterrupt


def main() -> None:
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup
        signal.signal(signal.SIGHUP, _terminate)
    try:
        code = app(standalone_mode=False)
    except TyperException as exc:  # usage errors: one line instead of Click's boxed panel
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"Error: {message} (see 'fpe --help' or 'fpe COMMAND --help')", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:  # outside a command body (e.g. while importing); commands map it themselves
        print("Error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
