"""The project's own errors: bad input, never a bug.

Every error panning raises on purpose for something a user gave it (a setting, a file, a flag, a
run directory) derives from :class:`PanningError`. The ``panning`` command prints such an error as
one line and exits with code 2; any other exception is a bug and keeps its traceback (exit 1).

The concrete classes also derive from :class:`ValueError`, so code written against earlier
versions that catches ``ValueError`` keeps working.
"""
from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "DataError",
    "MaskError",
    "PanningError",
    "RunDirError",
    "UsageError",
]


class PanningError(Exception):
    """Base of every error panning raises for bad input (shown to users as one line)."""


class UsageError(PanningError, ValueError):
    """Bad command-line input: an unknown name, a value out of range, flags that do not combine."""


class ConfigError(PanningError, ValueError):
    """A configuration file or setting is malformed or out of range (also: a device that is absent)."""


class DataError(PanningError, ValueError):
    """A data set is missing, malformed, or too small for what was asked of it."""


class MaskError(PanningError, ValueError):
    """Masks do not fit the model, or a masks file is not one panning wrote."""


class RunDirError(PanningError, ValueError):
    """A run directory would be overwritten, or does not hold what was expected."""


class AgentError(PanningError, ValueError):
    """An agent file is missing, not a panning agent, or does not fit the installed code or the request."""
