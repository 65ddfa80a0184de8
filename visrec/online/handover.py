"""Carrying writes across a release change, so a new release starts with today's catalog.

A release's item catalog is a snapshot: the listings as the pipeline read them
(`catalog_snapshot_at` in `release.json`). The pipeline then runs for hours, and the
release in production keeps taking writes in its journal: listings sold, prices
changed, new listings. Without a hand-over the new release would serve the snapshot
for its whole life: a listing sold during the run shown as on sale, one created
during it missing.

So a release loaded from a registry follows the journal of its predecessor (the
release that was current before it, per `history.jsonl`) for as long as it serves,
and carries every write made there after its snapshot into its own journal, keeping
its id and write time:

- deletes and metadata changes are copied as they are;
- an upsert's vector is copied when both releases share the encoder and PCA (same
  checksums); otherwise it is re-embedded from the image its write kept
  (`visrec.online.journal.store_image`) with the new release's encoder, in the background,
  so the service answers while new listings become recommendable one by one.

Following, not copying once, covers the writes the old release still takes after the
new one has loaded: replicas not yet switched during a rollout, and the old release's
share of the traffic during a canary. A write already applied (or superseded by a
newer one for the same item) is never carried again, so restarts, other workers and
other replicas do not repeat the work (at worst two replicas racing append the same
entry twice, which "newest write wins" makes harmless). The same rule serves a
rollback: the release rolled back to receives the writes the rolled-back one took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from visrec.online.entry import UPSERT, JournalEntry
from visrec.online.journal import Journal, load_image, store_image

log = logging.getLogger(__name__)

# Files of a release that determine the vectors an image gets.
ENCODER_FILE_PREFIXES = ("model/", "pca/")
PROGRESS_LOG_SECONDS = 10.0
REEMBED_BATCH_SIZE = 32  # images per encoder call: batching is most of the speed on CPU and GPU


def encoder_fingerprint(manifest: dict) -> str:
    """A digest of the encoder kind and the checksums of the encoder and PCA files.

    Two releases with the same fingerprint give every image the same vector, so
    their journal vectors can be shared without re-embedding.
    """
    files = sorted((path, digest) for path, digest in manifest.get("files", {}).items()
                   if path.startswith(ENCODER_FILE_PREFIXES))
    return hashlib.sha256(json.dumps([manifest.get("encoder_kind"), files]).encode()).hexdigest()


@dataclass
class HandoverStatus:
    """What the hand-over has done so far (reported by `/healthz`).

    carried: entries copied as they were; to_embed: upserts queued for re-embedding with
    this release's encoder, of which `embedded` are done and `failed` could not be (no
    kept image, an image that no longer decodes); `by_other_process`: another worker of
    this machine follows the predecessor, this one applies what it writes. Carried and
    re-embedded entries are in this release's journal; the service's journal tail
    applies them within its period (0.5 s).
    """

    source: str
    since: float
    carried: int = 0
    to_embed: int = 0
    embedded: int = 0
    failed: int = 0
    by_other_process: bool = False

    @property
    def done(self) -> bool:
        return self.embedded + self.failed >= self.to_embed

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "done": self.done}


def plan_handover(entries: Iterable[JournalEntry], since: float, applied: Callable[[JournalEntry], bool],
                  same_encoder: bool) -> tuple[list[JournalEntry], list[JournalEntry]]:
    """(entries to copy as they are, upserts to re-embed) from the other release's journal.

    Only writes after `since` are carried (following a predecessor: this release's
    catalog snapshot, which already holds the earlier ones). `applied(entry)` says
    whether this release already has the write or a newer one for the item. An upsert whose vector
    cannot be reused and that kept no image is copied without its vector: its metadata
    still counts (a price, a status), it just cannot be recommended until written again.
    """
    copy: list[JournalEntry] = []
    embed: list[JournalEntry] = []
    for entry in sorted((e for e in entries if e.at > since), key=lambda e: e.at):
        if applied(entry):
            continue
        if entry.op == UPSERT and entry.vector is not None and not same_encoder:
            if entry.image_sha256:
                embed.append(entry)
                continue
            log.warning("hand-over: item %s was upserted without a kept image; carrying its metadata only",
                        entry.item_id)
            entry = dataclasses.replace(entry, vector=None)
        copy.append(entry)
    return copy, embed


class Handover:
    """Follows another release's journal (the predecessor's, or that of the successor that
    replaced this release) into this release's journal; see the module docstring.

    `poll` carries what was written since the last poll (the service calls it with every
    journal tail); upserts to re-embed go to a background thread, which waits for
    `embedder()` (the encoder may still be loading) and appends them in batches.
    """

    def __init__(self, status: HandoverStatus, source: Journal, target: Journal, source_state_uri: str,
                 target_state_uri: str, same_encoder: bool, applied: Callable[[JournalEntry], bool],
                 embedder: Callable[[], Callable[[list[bytes]], np.ndarray]]):
        self.status, self.source, self.target = status, source, target
        self.source_state_uri, self.target_state_uri = source_state_uri, target_state_uri
        self.same_encoder, self.applied, self.embedder = same_encoder, applied, embedder
        self._queue: queue.Queue[JournalEntry | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def poll(self) -> int:
        """Carry the other release's writes not seen before; returns how many were carried or queued."""
        copy, embed = plan_handover(self.source.read_new(), self.status.since, self.applied, self.same_encoder)
        self.target.append_many(copy)
        self.status.carried += len(copy)
        self.status.to_embed += len(embed)
        for entry in embed:
            self._queue.put(entry)
        if embed and self._worker is None:
            self._worker = threading.Thread(target=self._reembed_forever, name="visrec-handover", daemon=True)
            self._worker.start()
        if copy or embed:
            log.info("hand-over from %s: %d write(s) carried, %d upsert(s) to re-embed", self.status.source,
                     len(copy), len(embed))
        return len(copy) + len(embed)

    def close(self) -> None:
        """Stop the re-embedding thread (the release is no longer served)."""
        self._queue.put(None)

    def _reembed_forever(self) -> None:
        try:
            embed = self.embedder()
        except Exception as exc:  # noqa: BLE001 - the service keeps serving; the status says what is missing
            log.error("hand-over from %s: no encoder to re-embed with: %r", self.status.source, exc)
            embed = None
        started = last_log = time.monotonic()
        embedded_before = self.status.embedded
        while True:
            batch = [self._queue.get()]
            while len(batch) < REEMBED_BATCH_SIZE and not self._queue.empty():
                batch.append(self._queue.get())
            stop = None in batch
            batch = [e for e in batch if e is not None]
            if embed is None:
                self.status.failed += len(batch)
            elif batch:
                try:
                    reembed_batch(batch, embed, self.source_state_uri, self.target_state_uri, self.target,
                                  self.status)
                except Exception as exc:  # noqa: BLE001 - e.g. the journal store is unreachable: keep going
                    self.status.failed += len(batch)
                    log.error("hand-over from %s: a batch of %d could not be carried: %r", self.status.source,
                              len(batch), exc)
            now = time.monotonic()
            if batch and self.status.done:
                log.info("hand-over from %s: all caught up: %d carried, %d re-embedded, %d failed",
                         self.status.source, self.status.carried, self.status.embedded, self.status.failed)
            elif batch and now - last_log >= PROGRESS_LOG_SECONDS:
                last_log = now
                log.info("hand-over from %s: re-embedded %d/%d (%.1f/s)", self.status.source, self.status.embedded,
                         self.status.to_embed, (self.status.embedded - embedded_before) / (now - started))
            if stop:
                return


def reembed_batch(entries: list[JournalEntry], embed: Callable[[list[bytes]], np.ndarray], source_state_uri: str,
                  target_state_uri: str, target: Journal, status: HandoverStatus) -> None:
    """Re-embed one batch of upserts' kept images and append them, with their new vectors, to `target`.

    `embed` maps image bytes to vectors, one row each. One bad item (image gone, no
    longer decodable) is logged and counted, never the end of the rest: if the batch
    fails it is retried one image at a time to find it. Each image is kept in the
    target's state too, for the hand-over after this one.
    """
    loaded: list[tuple[JournalEntry, bytes]] = []
    for entry in entries:
        try:
            loaded.append((entry, load_image(source_state_uri, entry.image_sha256)))
        except (FileNotFoundError, OSError) as exc:
            _failed(status, entry, exc)
    done = _embed_batch(loaded, embed, status)
    for _, data, _ in done:
        store_image(target_state_uri, data)
    target.append_many([dataclasses.replace(entry, vector=tuple(np.asarray(vector, dtype=np.float32).tolist()))
                        for entry, _, vector in done])
    status.embedded += len(done)


def _embed_batch(loaded: list[tuple[JournalEntry, bytes]], embed: Callable[[list[bytes]], np.ndarray],
                 status: HandoverStatus) -> list[tuple[JournalEntry, bytes, np.ndarray]]:
    """(entry, image bytes, vector) of every item that embeds: the batch at once, or, if
    that fails, one image at a time to set the bad one apart."""
    if not loaded:
        return []
    try:
        return [(entry, data, vector) for (entry, data), vector in zip(loaded, embed([d for _, d in loaded]))]
    except Exception as exc:  # noqa: BLE001 - one item's failure must not stop the hand-over
        if len(loaded) == 1:
            _failed(status, loaded[0][0], exc)
            return []
    return [done for item in loaded for done in _embed_batch([item], embed, status)]


def _failed(status: HandoverStatus, entry: JournalEntry, exc: BaseException) -> None:
    status.failed += 1
    log.error("hand-over: cannot re-embed item %s: %r", entry.item_id, exc)
