"""User-facing errors.

Anything the user can fix (a missing folder, a bad config key, an unreadable checkpoint)
raises :class:`IsereidError`. The command line prints its message on one line and exits
with status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations


class IsereidError(Exception):
    """An error caused by the user's input, reported as a one-line message."""


class InvalidArgument(IsereidError, ValueError):
    """A value a library function cannot use (bad shape, out of range, unknown choice).

    A :class:`ValueError` to Python callers; the command line shows it as one line."""


class MissingDependency(IsereidError, ImportError):
    """An optional package that the requested feature needs is not installed."""


class DatasetError(IsereidError):
    """A dataset folder is missing, empty, in the wrong layout or holds bad images."""


class ConfigError(InvalidArgument):
    """An unknown or ill-typed configuration key or value."""


class CheckpointError(IsereidError):
    """A file that is not a loadable checkpoint, or one for another architecture."""


class ClusteringError(IsereidError):
    """A clustering step that produced no usable pseudo-labels."""


class TrainingDiverged(IsereidError):
    """The loss became NaN or infinite."""


class OutputError(IsereidError):
    """An output path that cannot be written (a file where a folder is needed, no permission)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``str(exc)``, stripped; the exception's type name when the
    message is empty (``str(exc).splitlines()[0]`` raises IndexError there)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
