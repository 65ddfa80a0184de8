"""Carrying writes across a release change, so a new release starts with today's catalog.

A release's item catalog is a snapshot: the listings as the pipeline read them
(`catalog_snapshot_at` in `release.json`). The pipeline then runs for hours, and the
release in production keeps taking writes in its journal: listings sold, prices
changed, new listings. Without a hand-over the new release would serve the snapshot
for its whole life: a listing sold during the run shown as on sale, one created
during it missing.

So when a release is loaded from a registry, the writes its predecessor (the release
that was current before it, per `history.jsonl`) took after the snapshot are carried
into its own journal, keeping their ids and write times:

- deletes and metadata changes are copied as they are;
- an upsert's vector is copied when both releases share the encoder and PCA (same
  checksums); otherwise it is re-embedded from the image its write kept
  (`visrec.journal.store_image`) with the new release's encoder, in the background,
  so the service answers while new listings become recommendable one by one.

Carried entries keep their `id`, so a restart, another worker or another replica
never carries one twice (at worst a racing replica appends a duplicate, which
"newest write wins" makes harmless). The same rule serves a rollback: the release
rolled back to receives the writes the rolled-back one took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from visrec.journal import Journal, entry_id, load_image, store_image

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
    """What one hand-over did (reported by `/healthz`).

    carried: entries copied as they were; to_embed: upserts whose images are being
    re-embedded with this release's encoder, of which `embedded` are done and `failed`
    could not be (no kept image, an image that no longer decodes); `by_other_process`:
    another worker of this machine holds the hand-over, this one applies what it writes.
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


def plan_handover(entries: Iterable[dict], since: float, already: set[str],
                  same_encoder: bool) -> tuple[list[dict], list[dict]]:
    """(entries to copy as they are, upserts to re-embed) from the predecessor's journal.

    Only writes after `since` (the new release's catalog snapshot) are carried; the
    snapshot already holds the earlier ones. Entries whose id is in `already` (the
    new release's journal) were carried before. An upsert whose vector cannot be
    reused and that kept no image is copied without its vector: its metadata still
    counts (a price, a status), it just cannot be recommended until written again.
    """
    copy: list[dict] = []
    embed: list[dict] = []
    for entry in sorted((e for e in entries if float(e.get("at", 0.0)) > since), key=lambda e: float(e["at"])):
        eid = entry_id(entry)
        if eid in already:
            continue
        entry = {**entry, "id": eid}
        if entry.get("op") == "upsert" and entry.get("vector") is not None and not same_encoder:
            if entry.get("image_sha256"):
                embed.append(entry)
                continue
            log.warning("hand-over: item %s was upserted without a kept image; carrying its metadata only",
                        entry.get("item_id"))
            entry["vector"] = None
        copy.append(entry)
    return copy, embed


def carry_writes(source: Journal, target: Journal, since: float, same_encoder: bool,
                 status: HandoverStatus) -> list[dict]:
    """Copy what can be copied from `source` to `target` now; returns the upserts to re-embed."""
    copy, embed = plan_handover(source.read_new(), since, target.entry_ids(), same_encoder)
    target.append_many(copy)
    status.carried, status.to_embed = len(copy), len(embed)
    log.info("hand-over from %s: %d write(s) carried, %d upsert(s) to re-embed", status.source, len(copy), len(embed))
    return embed


def reembed_writes(entries: list[dict], embed: Callable[[list[bytes]], np.ndarray], source_state_uri: str,
                   target_state_uri: str, target: Journal, status: HandoverStatus,
                   batch_size: int = REEMBED_BATCH_SIZE) -> None:
    """Re-embed the upserts' kept images in batches and append them, with their new vectors, to `target`.

    `embed` maps image bytes to vectors, one row each. One bad item (image gone, no
    longer decodable) is logged and counted, never the end of the rest: a batch that
    fails is retried one image at a time to find it. Each image is kept in the
    target's state too, for the hand-over after this one.
    """
    started = last_log = time.monotonic()
    for start in range(0, len(entries), batch_size):
        loaded: list[tuple[dict, bytes]] = []
        for entry in entries[start:start + batch_size]:
            try:
                loaded.append((entry, load_image(source_state_uri, entry["image_sha256"])))
            except (FileNotFoundError, OSError) as exc:
                _failed(status, entry, exc)
        done = _embed_batch(loaded, embed, status)
        for _, data, _ in done:
            store_image(target_state_uri, data)
        target.append_many([{**entry, "vector": np.asarray(vector, dtype=np.float32).tolist()}
                            for entry, _, vector in done])
        status.embedded += len(done)
        now = time.monotonic()
        if now - last_log >= PROGRESS_LOG_SECONDS:
            last_log = now
            log.info("hand-over from %s: re-embedded %d/%d (%.1f/s)", status.source, status.embedded,
                     status.to_embed, status.embedded / (now - started))
    log.info("hand-over from %s done: %d carried, %d re-embedded, %d failed in %.1fs", status.source,
             status.carried, status.embedded, status.failed, time.monotonic() - started)


def _embed_batch(loaded: list[tuple[dict, bytes]], embed: Callable[[list[bytes]], np.ndarray],
                 status: HandoverStatus) -> list[tuple[dict, bytes, np.ndarray]]:
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


def _failed(status: HandoverStatus, entry: dict, exc: BaseException) -> None:
    status.failed += 1
    log.error("hand-over: cannot re-embed item %s: %r", entry.get("item_id"), exc)
