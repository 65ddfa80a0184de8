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
- `GcsJournal`: one object per append under `gs://.../state/journal/<bucket>/`, named by
  the write time: one entry, or a segment of up to `SEGMENT_ENTRIES` entries (one per
  line) for a batch; `<bucket>` is the start of the write time's `BUCKET_SECONDS` period,
  so a reader lists only the periods it has not finished with, even on a store that
  ignores `startOffset` (the emulator). A release served from `gs://` (Vertex AI) keeps
  its writes across container restarts, and every replica behind an endpoint sees every
  replica's writes. Object listings are only eventually in write order (clocks differ
  between replicas, an upload can finish after a later one), so readers re-list a
  trailing window and return late entries too; `visrec.online.replay.sync_journal` lets
  the newest write of an item win, so replicas converge whatever order they saw. Objects
  of the layout before buckets (directly under `journal/`) are read as well.

A reader can start at a position (`open_journal(position=...)`, what a snapshot of the
state covers, `visrec.online.snapshot`) or at a time (`since`, a hand-over following
another release), instead of at the beginning.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from visrec.core import io
from visrec.online.entry import BadEntry, JournalEntry, new_entry_id
from visrec.online.lock import exclusive_lock

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
# (offset, time) pairs of the local journal: every byte before `offset` was appended before
# `time`, so a reader following from a time can skip them (`FileJournal.checkpoint`).
CHECKPOINTS_FILE = "journal.checkpoints.jsonl"
JOURNAL_PREFIX = "journal/"
IMAGES_PREFIX = "images/"
# How far back (seconds of write time) a GCS reader re-lists for entries that arrived late.
LATE_ENTRY_WINDOW_SECONDS = 60.0
# Most entries per object of a GCS batch append: few round trips, objects of a few MB at most.
SEGMENT_ENTRIES = 500
# Write-time period of one GCS journal folder: a poll lists the folder of its horizon and any
# newer one, i.e. at most about this much of the write history (ten times the late-entry window,
# so one poll seldom needs more than two folders).
BUCKET_SECONDS = 600
_BUCKET_NS = BUCKET_SECONDS * 10**9
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

    def position(self) -> JournalPosition:
        """Where a reader opened at it (`open_journal(position=...)`) goes on from: just after
        what this reader has returned."""

    def checkpoint(self) -> None:
        """Record that every entry before `position().offset` was appended by now, so a reader
        following from a later time (`open_journal(since=...)`) may skip them."""

    skipped: int
    stats: JournalStats


@dataclass(frozen=True)
class JournalPosition:
    """How far a reader has read one journal: every entry before `offset` (a local byte offset,
    or a GCS write time in ns), and the GCS objects named in `seen` (written at or after
    `offset`, in the late-entry window still listed; names relative to the journal prefix)."""

    offset: int = 0
    seen: tuple[str, ...] = ()


@dataclass
class JournalStats:
    """What a reader has cost so far: store requests, names listed, objects or bytes read."""

    list_requests: int = 0
    listed: int = 0  # GCS: objects the listings returned
    folders_listed: int = 0  # GCS: folder names the listings returned
    objects_read: int = 0  # GCS: objects downloaded
    bytes_read: int = 0


class JournalMismatch(ValueError):
    """A position that cannot be in this journal (beyond its end, not at a line start): the
    journal was replaced, or the position belongs to another."""


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


def open_journal(state_uri: str, since: float | None = None, position: JournalPosition | None = None) -> Journal:
    """The journal of a release's state directory: on GCS for `gs://`, else a local file.

    since: the reader may skip entries appended before this time (epoch seconds); on
    GCS it then lists only the newer objects instead of the whole journal, locally it
    starts at the newest checkpoint before it. position: start there (a `position()` of an
    earlier reader of this journal); `JournalMismatch` if it cannot be in this journal.
    """
    if io.is_gcs(state_uri):
        return GcsJournal(io.join(state_uri, JOURNAL_PREFIX), since=since, position=position)
    path = Path(state_uri)
    path.mkdir(parents=True, exist_ok=True)
    offset = position.offset if position is not None else 0
    if position is None and since is not None:
        offset = _checkpoint_before(path, since - LATE_ENTRY_WINDOW_SECONDS)
    return FileJournal(path / JOURNAL_FILE, offset=offset)


def _checkpoint_before(state_dir: Path, at: float) -> int:
    """The largest offset of a checkpoint of the local journal taken at or before `at` that
    is still valid in it (0: none)."""
    try:
        lines = (state_dir / CHECKPOINTS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    best = 0
    for line in lines:
        try:
            mark = json.loads(line)
            offset, marked_at = int(mark["offset"]), float(mark["at"])
        except (ValueError, KeyError, TypeError):
            log.error("skipping unreadable journal checkpoint %r in %s", line[:200], state_dir / CHECKPOINTS_FILE)
            continue
        if marked_at <= at and offset > best:
            best = offset
    try:
        _check_offset(state_dir / JOURNAL_FILE, best)
    except JournalMismatch as exc:
        log.error("ignoring the journal checkpoints of %s: %s", state_dir, exc)
        return 0
    return best


def _check_offset(path: Path, offset: int) -> None:
    """`JournalMismatch` unless `offset` is 0 or just after a newline of the file at `path`."""
    if offset == 0:
        return
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            ok = offset <= size and os.pread(fh.fileno(), 1, offset - 1) == b"\n"
    except FileNotFoundError:
        ok = False
    if not ok:
        raise JournalMismatch(f"{path} has no line ending just before byte {offset}")


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

    Opening one on an existing file repairs a torn tail left by a crashed append. offset:
    where reading starts (the `position()` of an earlier reader; `JournalMismatch` if the
    file has no line ending just before it).
    """

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self.skipped = 0
        self.stats = JournalStats()
        if path.exists():
            with exclusive_lock(path) as fd:
                _drop_torn_tail(fd, path)
        _check_offset(path, offset)

    def append(self, entry: JournalEntry) -> None:
        self.append_many([entry])

    def append_many(self, entries: list[JournalEntry]) -> None:
        """Append `entries` durably, all or none: a failed write leaves the file as it was, then raises."""
        if not entries:
            return
        data = "".join(e.to_json() + "\n" for e in entries).encode("utf-8")
        with exclusive_lock(self.path) as fd:
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
        self.stats.bytes_read += end
        return _readable([(line, str(self.path)) for line in data[:end].splitlines() if line.strip()], self)

    def position(self) -> JournalPosition:
        return JournalPosition(self.offset)

    def checkpoint(self) -> None:
        # One small line per compaction; O_APPEND keeps concurrent writers' lines whole.
        line = json.dumps({"offset": self.offset, "at": time.time()}) + "\n"
        with open(self.path.parent / CHECKPOINTS_FILE, "a") as fh:
            fh.write(line)


def _bucket_start(ns: int) -> int:
    """The first write time (ns) of the GCS journal folder holding write time `ns`."""
    return ns - ns % _BUCKET_NS


class GcsJournal:
    """One object per append under a `gs://` prefix, named
    `<bucket start ns>/<write time ns>-<entry id>.json` (`.jsonl` for a segment of a batch's
    entries, one per line).

    The name carries the time of the append (not the entry's `at`, which is older for
    an entry carried over from the previous release): readers tail by name. since: skip
    objects written more than the late-entry window before it; position: go on from there
    (the objects written before it, and those it names, are not read). clock: the write
    time of an append, in ns (a benchmark writes a history with it).
    """

    def __init__(self, prefix_uri: str, since: float | None = None, position: JournalPosition | None = None,
                 clock: Callable[[], int] = time.time_ns):
        self.prefix_uri = prefix_uri.rstrip("/") + "/"
        self.bucket_name, self.prefix = io.split_gcs(self.prefix_uri)
        self.clock = clock
        self._seen: dict[str, int | None] = {}  # name -> write time, of the objects returned
        self.skipped = 0
        self.stats = JournalStats()
        self._horizon = 0  # write time (ns) before which objects are never listed again
        if since is not None:
            self._horizon = max(0, int((since - LATE_ENTRY_WINDOW_SECONDS) * 1e9))
        if position is not None:
            self._horizon = max(self._horizon, position.offset)
            self._seen = {self.prefix + name: self._write_ns(name) for name in position.seen}

    def append(self, entry: JournalEntry) -> None:
        self._upload(f"{entry.id or new_entry_id()}.json", entry.to_json())

    def append_many(self, entries: list[JournalEntry]) -> None:
        """Segments of up to `SEGMENT_ENTRIES` entries, one object each (each all or none), uploaded concurrently."""
        segments = ["".join(e.to_json() + "\n" for e in entries[start:start + SEGMENT_ENTRIES])
                    for start in range(0, len(entries), SEGMENT_ENTRIES)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda text: self._upload(f"{new_entry_id()}.jsonl", text), segments))

    def _upload(self, suffix: str, text: str) -> None:
        written = self.clock()
        blob = io.gcs_client().bucket(self.bucket_name).blob(
            f"{self.prefix}{_bucket_start(written):020d}/{written:020d}-{suffix}")
        # Create-only: a retried upload can never overwrite another writer's entries.
        blob.upload_from_string(text, content_type="application/json", if_generation_match=0)

    @staticmethod
    def _write_ns(name: str) -> int | None:
        stamp = name.rsplit("/", 1)[-1].split("-", 1)[0]
        return int(stamp) if stamp.isdigit() else None

    def _listed(self) -> list[tuple[str, int | None]]:
        """(name, write time) of every object at or after the horizon, in both layouts.

        One `/`-delimited listing of the journal gives the folders (and the objects of the
        layout before folders); then each folder not wholly before the horizon is listed.
        Filtered here too: not every GCS implementation honours start_offset.
        """
        client = io.gcs_client()
        start = f"{self.prefix}{_bucket_start(self._horizon):020d}"
        top = client.list_blobs(self.bucket_name, prefix=self.prefix, delimiter="/", start_offset=start)
        blobs = list(top)  # `prefixes` fills in as the pages are read
        folders = sorted(top.prefixes)
        self.stats.list_requests += 1
        self.stats.listed += len(blobs)
        self.stats.folders_listed += len(folders)
        for folder in folders:
            stamp = folder[len(self.prefix):-1]
            if not stamp.isdigit() or int(stamp) + _BUCKET_NS <= self._horizon:
                continue
            listed = list(client.list_blobs(self.bucket_name, prefix=folder,
                                            start_offset=f"{folder}{self._horizon:020d}"))
            self.stats.list_requests += 1
            self.stats.listed += len(listed)
            blobs += listed
        names = [(b.name, self._write_ns(b.name)) for b in blobs]
        return [(name, ns) for name, ns in names if ns is None or ns >= self._horizon]

    def read_new(self) -> list[JournalEntry]:
        bucket = io.gcs_client().bucket(self.bucket_name)
        listed = self._listed()
        # In write order (names of different folders do not sort by it); unnamed-by-time ones last.
        new = sorted(((n, ns) for n, ns in listed if n not in self._seen),
                     key=lambda item: (item[1] is None, item[1] or 0, item[0]))
        payloads: list[bytes] = []
        if new:
            # Many entries at start-up (a replay): fetch them concurrently, apply in write order.
            with ThreadPoolExecutor(max_workers=min(16, len(new))) as pool:
                payloads = list(pool.map(lambda item: bucket.blob(item[0]).download_as_bytes(), new))
            self.stats.objects_read += len(new)
            self.stats.bytes_read += sum(map(len, payloads))
            self._seen.update(new)
        written_ns = [ns for _, ns in listed if ns is not None]
        if written_ns:  # only once everything listed is read: a failed download is listed again
            self._horizon = max(self._horizon, max(written_ns) - int(LATE_ENTRY_WINDOW_SECONDS * 1e9))
            self._seen = {n: ns for n, ns in self._seen.items() if ns is None or ns >= self._horizon}
        return _readable([(entry, f"gs://{self.bucket_name}/{name}") for (name, _), data in zip(new, payloads)
                          for entry in _object_entries(name, data)], self)

    def position(self) -> JournalPosition:
        return JournalPosition(self._horizon, tuple(sorted(name[len(self.prefix):] for name in self._seen)))

    def checkpoint(self) -> None:
        """Nothing to record: object names carry their write time."""


def _object_entries(name: str, data: bytes) -> list[bytes]:
    """The stored entries of one journal object: a segment's lines, or a single entry's whole text."""
    return [line for line in data.splitlines() if line.strip()] if name.endswith(".jsonl") else [data]
