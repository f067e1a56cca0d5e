"""fpe: Fixed Parameter Expansion for trained MLP checkpoints (library + `fpe` CLI)."""

__version__ = "0.1.0"
FORMAT_VERSION = 1  # version of the on-disk layout fpe writes; bumped on incompatible change
