"""Errors a user can fix, shared by every command: printed as one line with a non-zero exit status."""

from __future__ import annotations

__all__ = ["CheckpointRejected", "DataError", "UsageError"]


class UsageError(Exception):
    """A user-fixable problem (missing file, bad argument): printed as one line, exit status 2."""


class DataError(RuntimeError):
    """The training data cannot give what the run needs (every shard unusable, a rank's loader ended early):
    a deterministic failure, which retrying would only repeat."""


class CheckpointRejected(UsageError):
    """A checkpoint file holds something restricted loading does not rebuild (a tampered or foreign file): it
    was refused before any of it was unpickled. One line: ``checkpoint <dir>: refused: <file> holds <what> ...``."""
