"""The serving write journal: every upsert and delete, in a place that outlives the process.

A release's `state/` directory holds it. Writers append entries
(`visrec.online.entry.JournalEntry`: one JSON object each, with a unique `id`, the write
time `at` and the embedded vector, so replaying never needs the image again); readers ask
for the entries they have not seen yet, and skip, log and count the ones that do not
parse. The image
an upsert was embedded from is kept beside it, content-addressed under
`state/images/<sha256>`, for the one reader that does need it: the next release, which
re-embeds listings made after its catalog snapshot with its own encoder
(`visrec.online.handover`). Two stores:

- `FileJournal`: `state/journal.jsonl` on local disk. Appends take an exclusive file
  lock, so the worker processes of one `visrec serve` share it; readers keep a byte
  offset and take a shared lock, so they never see an append that may yet be undone.
- `GcsJournal`: one object per append under `gs://.../state/journal/`, named by the
  write time: one entry, or a segment of up to `SEGMENT_ENTRIES` entries (one per line)
  for a batch. A release served from `gs://` (Vertex AI) keeps its writes across
  container restarts, and every replica behind an endpoint sees every replica's writes.
  Object listings are only eventually in write order (clocks differ between replicas,
  an upload can finish after a later one), so readers re-list a trailing window and
  return late entries too; `visrec.online.replay.sync_journal` lets the newest write of an
  item win, so replicas converge whatever order they saw.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from visrec.core import io
from visrec.online.entry import BadEntry, JournalEntry, new_entry_id

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
JOURNAL_PREFIX = "journal/"
IMAGES_PREFIX = "images/"
# How far back (seconds of write time) a GCS reader re-lists for entries that arrived late.
LATE_ENTRY_WINDOW_SECONDS = 60.0
# Most entries per object of a GCS batch append: few round trips, objects of a few MB at most.
SEGMENT_ENTRIES = 500
# How much of a torn tail is read at a time while looking for the last complete line.
_TAIL_SCAN_BYTES = 1 << 16


class Journal(Protocol):
    def append(self, entry: JournalEntry) -> None:
        """Make `entry` durable; returns once any reader can see it."""

    def append_many(self, entries: list[JournalEntry]) -> None:
        """`append` for a batch (a hand-over), in far fewer round trips than one per entry."""

    def read_new(self) -> list[JournalEntry]:
        """Entries this reader has not returned before, oldest first (unreadable ones skipped,
        logged and counted in `skipped`)."""

    skipped: int


def store_image(state_uri: str, data: bytes) -> str:
    """Keep an upserted image's bytes in the state directory; returns their sha256 (its name)."""
    digest = hashlib.sha256(data).hexdigest()
    uri = io.join(state_uri, IMAGES_PREFIX + digest)
    if not io.is_gcs(uri) and Path(uri).exists():
        return digest
    io.write_bytes(uri, data)
    return digest


def load_image(state_uri: str, digest: str) -> bytes:
    """The bytes `store_image` kept under `digest`; `FileNotFoundError` if they are gone."""
    return io.read_bytes(io.join(state_uri, IMAGES_PREFIX + digest))


def open_journal(state_uri: str, since: float | None = None) -> Journal:
    """The journal of a release's state directory: on GCS for `gs://`, else a local file.

    since: the reader may skip entries appended before this time (epoch seconds); on
    GCS it then lists only the newer objects instead of the whole journal.
    """
    if io.is_gcs(state_uri):
        return GcsJournal(io.join(state_uri, JOURNAL_PREFIX), since=since)
    path = Path(state_uri)
    path.mkdir(parents=True, exist_ok=True)
    return FileJournal(path / JOURNAL_FILE)


def _readable(raw: list[tuple[bytes, str]], journal: "FileJournal | GcsJournal") -> list[JournalEntry]:
    """The entries of (bytes, where) pairs that parse; the others are logged and counted on `journal`."""
    parsed = [_parse(data, where) for data, where in raw]
    journal.skipped += sum(entry is None for entry in parsed)
    return [entry for entry in parsed if entry is not None]


def _parse(line: bytes, where: str) -> JournalEntry | None:
    try:
        return JournalEntry.from_json(line)
    except BadEntry as exc:
        log.error("skipping unreadable journal entry in %s: %s", where, exc)
        return None


@contextmanager
def _write_locked(path: Path) -> Iterator[int]:
    """A descriptor of `path` (created if missing) opened for appending, under its exclusive lock."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _drop_torn_tail(fd: int, path: Path) -> int:
    """Cut an unterminated last line off the locked file `fd`; returns the file's size after.

    Such a fragment is an append that crashed or failed, so never acknowledged; left in
    place, the next append would be glued to it and skipped with it by every reader.
    Readers' offsets only ever point just after a newline, so none points into it.
    """
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep, end = 0, size
    while end > 0:
        start = max(0, end - _TAIL_SCAN_BYTES)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    log.warning("dropping %d bytes of an unterminated last line of %s (an append that never completed)",
                size - keep, path)
    os.ftruncate(fd, keep)
    return keep


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` until all of `data` is written: near a size limit a write can be short."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FileJournal:
    """A JSON Lines file shared by the processes of one machine.

    Opening one on an existing file repairs a torn tail left by a crashed append.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.skipped = 0
        if path.exists():
            with _write_locked(path) as fd:
                _drop_torn_tail(fd, path)

    def append(self, entry: JournalEntry) -> None:
        self.append_many([entry])

    def append_many(self, entries: list[JournalEntry]) -> None:
        """Append `entries` durably, all or none: a failed write leaves the file as it was, then raises."""
        if not entries:
            return
        data = "".join(e.to_json() + "\n" for e in entries).encode("utf-8")
        with _write_locked(self.path) as fd:
            size = _drop_torn_tail(fd, self.path)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                # The caller is told this append failed: no part of it may reach a reader or a replay.
                os.ftruncate(fd, size)
                raise

    def read_new(self) -> list[JournalEntry]:
        try:
            if self.path.stat().st_size <= self.offset:
                return []
            with open(self.path, "rb") as fh:
                # Shared: an append in progress may still be rolled back, so it is never read.
                fcntl.flock(fh, fcntl.LOCK_SH)
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a torn last line is left (the next append cuts it off)
        self.offset += end
        return _readable([(line, str(self.path)) for line in data[:end].splitlines() if line.strip()], self)


class GcsJournal:
    """One object per append under a `gs://` prefix, named `<write time ns>-<entry id>.json`
    (`.jsonl` for a segment of a batch's entries, one per line).

    The name carries the time of the append (not the entry's `at`, which is older for
    an entry carried over from the previous release): readers tail by name.
    """

    def __init__(self, prefix_uri: str, since: float | None = None):
        self.prefix_uri = prefix_uri.rstrip("/") + "/"
        self.bucket_name, self.prefix = io.split_gcs(self.prefix_uri)
        self._seen: set[str] = set()
        self.skipped = 0
        self._horizon = ""  # names before this are never listed again
        if since is not None:
            self._horizon = f"{self.prefix}{max(0, int((since - LATE_ENTRY_WINDOW_SECONDS) * 1e9)):020d}"

    def append(self, entry: JournalEntry) -> None:
        self._upload(f"{entry.id or new_entry_id()}.json", entry.to_json())

    def append_many(self, entries: list[JournalEntry]) -> None:
        """Segments of up to `SEGMENT_ENTRIES` entries, one object each (each all or none), uploaded concurrently."""
        segments = ["".join(e.to_json() + "\n" for e in entries[start:start + SEGMENT_ENTRIES])
                    for start in range(0, len(entries), SEGMENT_ENTRIES)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda text: self._upload(f"{new_entry_id()}.jsonl", text), segments))

    def _upload(self, suffix: str, text: str) -> None:
        blob = io.gcs_client().bucket(self.bucket_name).blob(f"{self.prefix}{time.time_ns():020d}-{suffix}")
        # Create-only: a retried upload can never overwrite another writer's entries.
        blob.upload_from_string(text, content_type="application/json", if_generation_match=0)

    def _write_ns(self, name: str) -> int | None:
        stamp = name[len(self.prefix):].split("-", 1)[0]
        return int(stamp) if stamp.isdigit() else None

    def read_new(self) -> list[JournalEntry]:
        bucket = io.gcs_client().bucket(self.bucket_name)
        # Filtered here too: not every GCS implementation honours start_offset.
        names = sorted(b.name for b in bucket.list_blobs(prefix=self.prefix, start_offset=self._horizon or None)
                       if b.name >= self._horizon)
        new = [n for n in names if n not in self._seen]
        if not new:
            return []
        # Many entries at start-up (a replay): fetch them concurrently, apply in name order.
        with ThreadPoolExecutor(max_workers=min(16, len(new))) as pool:
            payloads = list(pool.map(lambda n: bucket.blob(n).download_as_bytes(), new))
        self._seen.update(new)
        written_ns = [ns for ns in map(self._write_ns, names) if ns is not None]
        if written_ns:
            horizon_ns = max(0, max(written_ns) - int(LATE_ENTRY_WINDOW_SECONDS * 1e9))
            self._horizon = f"{self.prefix}{horizon_ns:020d}"
            self._seen = {n for n in self._seen if n >= self._horizon}
        return _readable([(entry, f"gs://{self.bucket_name}/{name}") for name, data in zip(new, payloads)
                          for entry in _object_entries(name, data)], self)


def _object_entries(name: str, data: bytes) -> list[bytes]:
    """The stored entries of one journal object: a segment's lines, or a single entry's whole text."""
    return [line for line in data.splitlines() if line.strip()] if name.endswith(".jsonl") else [data]

