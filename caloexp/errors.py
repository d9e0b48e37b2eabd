"""User-facing errors: each carries one line that names the file or setting and the problem.

Entry points catch :class:`CaloexpError`, print its message as a single line and exit
non-zero (no traceback); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class CaloexpError(Exception):
    """Base class of errors that are the user's to fix (bad input, missing file, bad override)."""

    exit_code = 2


class InputError(CaloexpError):
    """A file is missing, corrupt, mis-shaped or holds non-physical values."""


class ConfigError(CaloexpError):
    """A configuration value or override is invalid."""


class DatasetMissing(CaloexpError):
    """A real dataset is not on disk and could not be downloaded."""

    exit_code = 3


class TrainingDiverged(CaloexpError):
    """A loss became NaN/inf: the run is stopped and marked FAILED."""

    exit_code = 4


class Interrupted(CaloexpError):
    """The user stopped the run (Ctrl-C); it is marked KILLED and can be resumed."""

    exit_code = 130
