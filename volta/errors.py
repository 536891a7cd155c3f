"""Errors a user can fix, shared by every command: printed as one line with a non-zero exit status."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A user-fixable problem (missing file, bad argument): printed as one line, exit status 2."""
