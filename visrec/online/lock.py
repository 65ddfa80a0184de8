"""File locks between the processes of a machine: `ProcessLock`, which one of the worker processes
does a job that only one may do (following another release's journal into this one's), and
`exclusive_lock`, one writer at a time (journal appends, a model-cache build)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[int]:
    """A descriptor of `path` (created if missing) opened for appending, under its exclusive lock,
    which the block waits for."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


class ProcessLock:
    """A non-blocking exclusive file lock held until `release` (None path: always granted).

    The operating system drops it with the process, so a worker that dies hands the job on.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._handle: IO | None = None

    def try_acquire(self) -> bool:
        if self.path is None or self._handle is not None:
            return True
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
