"""Shared pieces of the Typer layer: the app, option aliases, error mapping, JSON/console output."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console

from .. import __version__
from ..errors import EXIT_BAD_INPUT, EXIT_RUNTIME, FPEError

app = typer.Typer(
    name="fpe",
    help=(
        "Fixed Parameter Expansion: widen a trained MLP's hidden layers at the same non-zero weight count.\n\n"
        "Example:  fpe expand model.safetensors --alpha 4 && fpe params model.fpe4.safetensors"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

class _Console(Console):
    """A reader that went away (`fpe params m | head -n1`) is an OSError like any other, reported by
    handle_errors as one `Error:` line; rich's own handling exits 1 silently."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "Broken pipe (the reader of the output went away)")

    def _check_buffer(self) -> None:  # rich's write-out of what was printed
        try:
            super()._check_buffer()
        except OSError as exc:  # a full device behind the stream (> /dev/full): name it, not as if a file failed
            raise_as_stream_error(exc, "standard error" if self.stderr else "standard output")


def raise_as_stream_error(exc: OSError, stream: str) -> None:
    if exc.errno == errno.EPIPE or exc.filename is not None:
        raise exc
    raise OSError(exc.errno, exc.strerror or str(exc), stream) from None


# Diagnostics, tables and progress go to stderr unless a command renders its result on stdout.
def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() else 160  # pipes and logs: do not squeeze tables into 80 columns
    return _Console(stderr=stderr, width=wide)


err_console = _console(stderr=True)
out_console = _console(stderr=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output file.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")]
ActivationOpt = Annotated[
    str | None,
    typer.Option("--activation", help="Activation between layers: relu, gelu, silu, tanh, ...; overrides the one the file "
                 "records (default: the recorded one, else relu)."),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Comma-separated weight tensor names, in order, when the chain cannot be found from names and shapes.",
    ),
]
ModelArg = Annotated[Path, typer.Argument(help="A safetensors checkpoint.", show_default=False, metavar="MODEL")]


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fpe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Fixed Parameter Expansion for trained MLP checkpoints."""


def parse_layers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise FPEError("--layers is empty", "give weight names separated by commas, e.g. --layers fc1.weight,fc2.weight")
    return names


_interrupt_reported = False


def report_interrupt() -> None:
    """`Error: interrupted`, once per process (a command reports it; `main` only when nothing did)."""
    global _interrupt_reported  # noqa: PLW0603 - one process, one interruption
    if not _interrupt_reported:
        _interrupt_reported = True
        print("Error: interrupted", file=sys.stderr)


def report_error(exc: FPEError) -> None:
    print(f"Error: {exc}", file=sys.stderr)
    if os.environ.get("FPE_DEBUG") == "1":
        traceback.print_exc()


BAD_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                   errno.ENAMETOOLONG, errno.EROFS}


def os_error_message(exc: OSError) -> tuple[int, str]:
    """(exit code, message) for an OSError: a path the user gave that cannot be used is bad input (2);
    anything else (disk full, I/O error) a runtime failure (1)."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    text = f"{where}{exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EXIT_BAD_INPUT, f"{text} (check the permissions of the file and its directory)"
    if exc.errno in BAD_PATH_ERRNOS:
        return EXIT_BAD_INPUT, f"{text} (check the path)"
    if exc.errno == errno.EPIPE:  # stdout's reader is gone: what is still buffered must not fail again at exit
        _drop_stdout()
    return EXIT_RUNTIME, text


def _drop_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind stdout (tests, closed stream)
        pass


# what torch's allocators raise (RuntimeError, not MemoryError) when an allocation fails
ALLOCATION_FAILURES = ("can't allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in ALLOCATION_FAILURES)


def report_out_of_memory() -> None:
    print("Error: out of memory (try a smaller model, batch size or data set)", file=sys.stderr)
    raise typer.Exit(EXIT_RUNTIME) from None


def handle_errors(func: Callable) -> Callable:
    """Map the tool's errors to one `Error:` line on stderr and the documented exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except FPEError as exc:
            report_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            report_interrupt()
            raise typer.Exit(130) from None
        except MemoryError:
            report_out_of_memory()
        except OSError as exc:  # a file that cannot be read or written: one line naming it, no traceback
            code, message = os_error_message(exc)
            print(f"Error: {message}", file=sys.stderr)
            if os.environ.get("FPE_DEBUG") == "1":
                traceback.print_exc()
            raise typer.Exit(code) from None
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, traceback on demand
            if is_out_of_memory(exc):
                report_out_of_memory()
            print(f"Error: internal error: {type(exc).__name__}: {exc} (rerun with FPE_DEBUG=1 for a traceback)",
                  file=sys.stderr)
            if os.environ.get("FPE_DEBUG") == "1":
                traceback.print_exc()
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


def json_safe(value: Any) -> Any:
    """Make a value JSON-clean: NaN/Inf become null, tuples lists, numpy/torch scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def emit_json(doc: Any) -> None:
    try:
        sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()
    except OSError as exc:  # a full device behind stdout: say so, not as if an output file had failed
        raise_as_stream_error(exc, "standard output")


def working(message: str, quiet: bool = False):
    """A spinner on stderr while long work runs, only on a terminal; nothing in pipes and logs."""
    import contextlib

    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext()
    return err_console.status(message)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(message, highlight=False)
