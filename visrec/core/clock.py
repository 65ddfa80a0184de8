"""Timestamps of the records visrec appends (history, audit, rejections)."""

from __future__ import annotations

import datetime as dt


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the microsecond: records written in order sort in order."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
