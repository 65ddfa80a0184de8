"""Errors a user can act on.

The CLI prints a `UserError` as one line (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad arguments, unreadable inputs or a missing required column."""


class GateFailed(Exception):
    """A quality gate (index recall/latency, evaluation) did not pass; exit status 3."""
