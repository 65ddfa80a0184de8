"""The service's impression and event logs: rows buffered in memory, written in batches by a
background thread, one JSON Lines object per batch and day partition.

    LOG_ROOT/impressions/dt=YYYY-MM-DD/<time ns>-<writer>.jsonl   one row per item shown
    LOG_ROOT/events/dt=YYYY-MM-DD/<time ns>-<writer>.jsonl        taps and purchases

`LOG_ROOT` is a local directory or a `gs://` prefix (Vertex AI: every replica writes its own
objects, never the same name). `visrec join-events` (`visrec.stages.join_events`) turns them into
the interactions partitions the pipeline's evaluation reads.

Logging never slows or fails a request: rows are serialised on the request's thread (microseconds:
`visrec.online.experiments.impression_lines` encodes the fields an answer's rows share once), so
the writer thread only joins and writes text and never holds the GIL long enough to stall a request;
`LogSink.add_encoded` appends to a bounded buffer and returns; a full buffer (the sink is slower
than the traffic, or the store is down) drops the rows and counts them, and a batch that cannot be
written is retried once at the next flush, then dropped and counted. The counters are in the
service's `/metrics`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from visrec.core import io

log = logging.getLogger(__name__)

IMPRESSIONS, EVENTS = "impressions", "events"
STREAMS = (IMPRESSIONS, EVENTS)


@dataclass(frozen=True)
class LogConfig:
    """Where and how the service logs what it showed and what users did.

    uri: the log root (local or `gs://`); None: nothing is logged.
    batch_rows: a batch is written once this many rows wait (or `flush_seconds` passed).
    flush_seconds: the longest a row waits in memory before it is written.
    max_buffered_rows: rows held per stream while the store is slow; beyond, new rows are dropped
        and counted (bounded memory: ~300 bytes a row).
    """

    uri: str | None = None
    batch_rows: int = 5000
    flush_seconds: float = 5.0
    max_buffered_rows: int = 200_000


def partition_of(ts: str) -> str:
    """The `dt=YYYY-MM-DD` partition of an ISO 8601 UTC timestamp."""
    return f"dt={ts[:10]}"


@dataclass(frozen=True)
class Encoded:
    """`rows` log rows of one day partition, already serialised as JSON Lines."""

    day: str
    text: str
    rows: int


# `json.dumps` with options builds an encoder per call: one, built once, is several times faster.
to_json = json.JSONEncoder(ensure_ascii=False).encode


def encode_rows(rows: list[dict[str, Any]]) -> list[Encoded]:
    """Rows (each with an ISO `ts`) as JSON Lines, one `Encoded` per day partition."""
    by_day: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_day[partition_of(row["ts"])].append(to_json(row) + "\n")
    return [Encoded(day, "".join(lines), len(lines)) for day, lines in by_day.items()]


class LogSink:
    """Batched, bounded, non-blocking writer of one stream's rows (`add`, `add_encoded`), flushed by a thread."""

    def __init__(self, root: str, stream: str, config: LogConfig):
        self.prefix = io.join(root, stream)
        self.config = config
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._queue: deque[Encoded] = deque()
        self._queued_rows = 0
        self._retry: list[Encoded] = []
        self._wake = threading.Condition()
        self._closed = False
        self.written_rows = self.dropped_rows = self.written_batches = self.failed_batches = 0
        self._thread = threading.Thread(target=self._run, name=f"visrec-log-{stream}", daemon=True)
        self._thread.start()

    def add(self, rows: list[dict[str, Any]]) -> bool:
        """Queue `rows` (dicts with an ISO `ts`); see `add_encoded`."""
        return self.add_encoded(encode_rows(rows))

    def add_encoded(self, chunks: list[Encoded]) -> bool:
        """Queue serialised rows; False (and counted in `dropped_rows`) if the buffer is full. Never
        blocks on I/O."""
        rows = sum(chunk.rows for chunk in chunks)
        with self._wake:
            if self._queued_rows + rows > self.config.max_buffered_rows:
                self.dropped_rows += rows
                return False
            self._queue.extend(chunks)
            self._queued_rows += rows
            if self._queued_rows >= self.config.batch_rows:
                self._wake.notify()
        return True

    def _take(self) -> tuple[list[Encoded], list[Encoded]]:
        """(chunks waiting for their retry, chunks queued), both handed over to the caller; under `_wake`."""
        retry, batch, self._retry = self._retry, list(self._queue), []
        self._queue.clear()
        self._queued_rows = 0
        return retry, batch

    def flush(self) -> None:
        """Write everything queued now (the caller waits): at shutdown, and in tests."""
        with self._wake:
            retry, batch = self._take()
        self._write(retry, last_try=True)
        self._write(batch, last_try=False)

    def close(self) -> None:
        """Stop the thread after a last flush."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._closed and self._queued_rows < self.config.batch_rows:
                    self._wake.wait(self.config.flush_seconds)
                if self._closed:
                    return
                retry, batch = self._take()
            self._write(retry, last_try=True)
            self._write(batch, last_try=False)

    def _write(self, batch: list[Encoded], last_try: bool) -> None:
        """One object per day partition of `batch`; a failed one is kept for one retry unless this
        was its `last_try`, then dropped and counted."""
        by_day: dict[str, list[Encoded]] = defaultdict(list)
        for chunk in batch:
            by_day[chunk.day].append(chunk)
        for day, chunks in by_day.items():
            uri = io.join(self.prefix, day, f"{time.time_ns():020d}-{self.writer}.jsonl")
            rows = sum(chunk.rows for chunk in chunks)
            try:
                io.write_text(uri, "".join(chunk.text for chunk in chunks))
            except Exception as exc:  # noqa: BLE001 - a log write never takes the service down
                self.failed_batches += 1
                if not last_try:
                    log.warning("cannot write %d log rows to %s (%s); retrying at the next flush", rows, uri, exc)
                    with self._wake:
                        self._retry.extend(chunks)
                else:
                    log.error("dropping %d log rows: %s unwritable twice (%s)", rows, uri, exc)
                    self.dropped_rows += rows
                continue
            self.written_rows += rows
            self.written_batches += 1


class ServiceLog:
    """The service's two log streams (impressions, events), or nothing when `LogConfig.uri` is None."""

    def __init__(self, config: LogConfig):
        self.config = config
        self.sinks = {stream: LogSink(config.uri, stream, config) for stream in STREAMS} if config.uri else {}

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def impressions(self, encoded: Encoded) -> None:
        """One answer's impression rows (`visrec.online.experiments.impression_lines`)."""
        if self.sinks and encoded.rows:
            self.sinks[IMPRESSIONS].add_encoded([encoded])

    def event(self, row: dict[str, Any]) -> None:
        if self.sinks:
            self.sinks[EVENTS].add([row])

    def counters(self) -> dict[str, dict[str, int]]:
        """Per stream: rows written, rows dropped, batches written, batch writes failed."""
        return {stream: {"written_rows": s.written_rows, "dropped_rows": s.dropped_rows,
                         "written_batches": s.written_batches, "failed_batches": s.failed_batches}
                for stream, s in self.sinks.items()}

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.close()
