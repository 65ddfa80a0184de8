"""Compaction: folding a release's serving journal into a snapshot of its state, so a start-up
replays only the journal after it (`visrec.online.snapshot`).

`compact_journal` is the one procedure, run by `visrec compact-journal` (a Cloud Scheduler
or cron job, or a pipeline step) and by the serving process itself (`Compactor`, in the
background once it has read `CompactionConfig.tail_entries` entries since the newest
snapshot): start from the newest snapshot (or the release), replay the journal after it
exactly as a serving start-up does, and write the result as a new snapshot. So a snapshot
and its tail give what a replay of the whole journal gives, by construction.

Nothing of the journal is deleted: a hand-over follower reads another release's journal
from a time (`visrec.online.follow`), and the journal stays the source of truth a snapshot
can always be rebuilt from. Several compactors are harmless: on one machine a file lock
lets one run at a time; replicas on GCS each may write a snapshot, readers take the one
that covers most, and the next compaction deletes the older ones.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visrec.core import io
from visrec.online.config import CompactionConfig
from visrec.online.loading import open_state
from visrec.online.lock import ProcessLock
from visrec.online.replay import sync_journal
from visrec.online.snapshot import prune_snapshots, write_snapshot

if TYPE_CHECKING:
    from visrec.online.state import ServingState
    from visrec.stages.release.release import Release

log = logging.getLogger(__name__)

COMPACT_LOCK = "compact.lock"
WRITTEN, NOT_NEEDED, BUSY = "written", "not_needed", "busy"


@dataclass(frozen=True)
class CompactionResult:
    """What one compaction did; `as_dict()` is what `visrec compact-journal` prints.

    status: `written` (a new snapshot), `not_needed` (the journal after the newest snapshot
    holds fewer than `min_tail` entries) or `busy` (another compaction of this local state is
    running). snapshot: the one written, or the one in force; position: the journal position
    it covers (`JournalPosition.offset`). tail_entries: entries after the snapshot it started
    from (folded in, when written).
    """

    status: str
    snapshot: str | None
    position: int
    tail_entries: int
    items: int
    indexed: int
    removed: tuple[str, ...]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compact_journal(release: Release, config: CompactionConfig | None = None) -> CompactionResult:
    """Write a snapshot of `release`'s serving state as its journal leaves it now, if the
    journal after the newest snapshot holds at least `config.min_tail` entries, then delete
    the snapshots no longer kept (`CompactionConfig.keep_snapshots`)."""
    config = config or CompactionConfig()
    started = time.monotonic()
    state_uri = release.state_uri
    lock = ProcessLock(None if io.is_gcs(state_uri) else Path(state_uri) / COMPACT_LOCK)
    if not lock.try_acquire():
        log.info("another compaction of %s is running", state_uri)
        return CompactionResult(BUSY, None, 0, 0, 0, 0, (), round(time.monotonic() - started, 3))
    try:
        state = open_state(release)
        try:
            sync_journal(state)
            status, name, removed = NOT_NEEDED, state.snapshot, ()
            if state.tail_entries >= config.min_tail:
                status, name = WRITTEN, write_snapshot(state_uri, state)
                state.journal.checkpoint()
                removed = tuple(prune_snapshots(state_uri, config.keep_snapshots, config.orphan_seconds))
            return CompactionResult(status, name, state.journal.position().offset, state.tail_entries,
                                    len(state.catalog), len(state.index), removed, round(time.monotonic() - started, 3))
        finally:
            state.close()
    finally:
        lock.release()


class Compactor:
    """A serving process's compactions: `maybe_start` (after each journal tail) starts
    `compact_journal` in a background thread once the served state has read its threshold of
    entries since the newest snapshot it knows of; at most one runs, at most one starts per
    `min_interval_seconds`, and after a failure the next waits `retry_seconds`. The threshold
    is `tail_entries` plus a random share of up to `jitter`, drawn once per process, so
    replicas seldom start together."""

    def __init__(self, config: CompactionConfig):
        self.config = config
        self.threshold = int(config.tail_entries * (1 + random.uniform(0, config.jitter)))
        self.last: CompactionResult | None = None
        self._thread: threading.Thread | None = None
        self._not_before = 0.0  # monotonic time

    def maybe_start(self, state: ServingState) -> bool:
        """Start a compaction of `state`'s release if it is due; True if one started."""
        now = time.monotonic()
        if (not self.config.tail_entries or state.tail_entries < self.threshold or now < self._not_before
                or (self._thread is not None and self._thread.is_alive())):
            return False
        self._not_before = now + self.config.min_interval_seconds
        self._thread = threading.Thread(target=self._run, args=(state,), name="visrec-compaction", daemon=True)
        self._thread.start()
        return True

    def _run(self, state: ServingState) -> None:
        read_before = state.tail_entries
        try:
            # Asking for a whole threshold: a replica that finds another one's fresh snapshot writes none.
            result = compact_journal(state.release, dataclasses.replace(self.config,
                                                                        min_tail=self.config.tail_entries))
        except Exception as exc:  # noqa: BLE001 - the service keeps serving; its start-up only replays more
            log.error("compaction of %s failed, next try in %.0fs: %r", state.release.state_uri,
                      self.config.retry_seconds, exc)
            self._not_before = max(self._not_before, time.monotonic() + self.config.retry_seconds)
            return
        self.last = result
        # What the newest snapshot covers is no longer this state's tail: what it read meanwhile
        # (and, if another one's snapshot was fresh, that snapshot's tail) is.
        left = result.tail_entries if result.status == NOT_NEEDED else 0
        state.tail_entries = max(0, state.tail_entries - read_before) + left
        log.info("compaction of %s: %s (snapshot %s, %d entries folded, %.1fs)", state.release.state_uri,
                 result.status, result.snapshot, result.tail_entries, result.seconds)
