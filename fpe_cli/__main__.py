"""`python -m fpe_cli` runs the CLI."""

from .cli import main

main()
