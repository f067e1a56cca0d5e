"""fpe: Fixed Parameter Expansion for trained MLP checkpoints (library + `fpe` CLI)."""

__version__ = "0.1.0"
FORMAT_VERSION = 2  # newest on-disk layout fpe reads; bumped on incompatible change
BASE_FORMAT_VERSION = 1  # what fpe writes unless a feature needs newer: plans and untied checkpoints
TIED_FORMAT_VERSION = 2  # what a checkpoint with tied columns (fpe.tied:<key>) declares
