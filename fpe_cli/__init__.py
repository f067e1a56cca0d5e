"""fpe: Fixed Parameter Expansion for trained MLP checkpoints (library + `fpe` CLI)."""

__version__ = "0.1.0"
FORMAT_VERSION = 3  # newest on-disk layout fpe reads; bumped on incompatible change
BASE_FORMAT_VERSION = 1  # what fpe writes unless a feature needs newer: plans, untied dense checkpoints
TIED_FORMAT_VERSION = 2  # what a checkpoint with tied columns (fpe.tied:<key>) declares
ZMASK_FORMAT_VERSION = 3  # what a packed checkpoint with compressed masks (fpe.zmask:<key>) declares
