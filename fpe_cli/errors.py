"""The tool's own exception types and the exit codes they map to (the CLI renders them)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 3


class FPEError(Exception):
    """A failure the user can act on: bad input, bad flag, bad file. Exit code 2 by default."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ChainNotFoundError(FPEError):
    """The file reads fine, but names and shapes do not determine one MLP chain (no 2-D weight, no order that
    chains, several that do): `--layers` can still name one."""


class OutputExistsError(FPEError):
    """An output is already there (before the work, or it appeared while fpe worked) and --force was not given."""


class VerificationError(FPEError):
    """An FPE invariant does not hold (budget, disjointness, mask). Exit code 3."""

    exit_code = EXIT_VERIFY_FAILED

    def __init__(self, violations: list[str], consequence: str | None = None):
        """`consequence`: what the violations mean for the command that found them (not counted as one)."""
        self.violations = list(violations)
        message = f"{len(violations)} invariant(s) violated: " + "; ".join(violations)
        super().__init__(message + (f"; {consequence}" if consequence else ""))

# What json.loads raises on text it cannot take: JSONDecodeError (a ValueError), an integer of more than
# 4300 digits (ValueError), nesting deeper than the interpreter's recursion limit (RecursionError).
JSON_ERRORS = (ValueError, RecursionError)
