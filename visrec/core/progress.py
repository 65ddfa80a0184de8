"""Progress lines for long loops: the count and its rate every few seconds, not a line per item."""

from __future__ import annotations

import logging
import time


class Progress:
    """Counts work done and logs the count and its rate at most every `every_s` seconds, and once
    more when `total` (if known) is reached.

    Each process counts on its own (a Beam worker's DoFn, a loop over a pool's results), so the
    rate is this process's.
    """

    def __init__(self, log: logging.Logger, what: str, total: int | None = None, every_s: float = 10.0) -> None:
        self.log, self.what, self.total, self.every_s = log, what, total, every_s
        self.count = 0
        self.started = self.last = time.monotonic()

    def add(self, n: int = 1) -> None:
        """Count `n` more done; log if it is time to."""
        self.count += n
        now = time.monotonic()
        if self.count == self.total or now - self.last >= self.every_s:
            self.last = now
            rate = self.count / max(now - self.started, 1e-9)
            if self.total is None:
                self.log.info("%s: %d (%.0f/s in this process)", self.what, self.count, rate)
            else:
                self.log.info("%s: %d/%d (%.0f/s)", self.what, self.count, self.total, rate)
