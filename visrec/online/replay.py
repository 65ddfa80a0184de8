"""Applying the journal to a serving state: the one write path.

Start-up replay, the background tail (which keeps several `--workers` processes, or
replicas, in step) and every write a request makes (appended, then applied from the
journal like anyone else's) use the same `sync_journal`. Per item and field the newest
write wins (`visrec.online.writes`), so every process converges on the same state whatever
order it read the entries in.
"""

from __future__ import annotations

import logging

import numpy as np

from visrec.online.ranking import label_index_with_catalog
from visrec.online.state import ServingState

log = logging.getLogger(__name__)


def sync_journal(state: ServingState) -> int:
    """Apply the journal entries `state` has not seen yet; returns how many changed something.

    Entries from several worker processes and replicas may arrive in any order, and every
    reader ends in the same state. An entry that cannot be applied (a vector of the wrong
    size) is skipped, logged and counted (`skipped_entries`), never an outage; one that does
    not parse was already skipped by the journal. Index writes are batched (the newest vector
    per item wins), so replaying a long journal costs one index upsert and one delete rather
    than one per entry.
    """
    entries = state.journal.read_new()
    if not entries:
        return 0
    state.tail_entries += len(entries)
    vectors: dict[str, np.ndarray] = {}
    touched: set[str] = set()
    applied = 0
    with state.lock:
        state.writes.load(entry.item_id for entry in entries)
        for entry in entries:
            if entry.vector is not None and len(entry.vector) != state.index.dims:
                state.skipped_entries += 1
                log.error("skipping unusable journal entry %s of item %r: vector of shape (%d,), the index holds %d "
                          "dims", entry.id, entry.item_id, len(entry.vector), state.index.dims)
                continue
            change = state.writes.apply(entry)
            if change is None:
                continue
            applied += 1
            touched.add(change.item_id)
            if change.vector is not None:
                vectors[change.item_id] = np.asarray(change.vector, dtype=np.float32)
        _materialise(state, touched, vectors)
    return applied


def _materialise(state: ServingState, items: set[str], vectors: dict[str, np.ndarray]) -> None:
    """Bring the catalog and the index of `state` in line with its write registers for `items`
    (the caller holds `state.lock`).

    Catalog rows are looked up once for all items (a replay touches every item the journal
    names), and only what changed is relabelled: a price or status change keeps its row and
    its index entry, so it costs no index work at all.
    """
    gone, upserts, labelled = [], {}, []
    catalog, writes = state.catalog, state.writes
    touched = list(items)
    rows = catalog.rows(touched)  # -1: never in the catalog
    present = (rows >= 0) & catalog.present[np.maximum(rows, 0)]
    for item, row, here in zip(touched, rows.tolist(), present.tolist()):
        if not writes.alive(item, default=here):
            if here:
                writes.keep_base(item, catalog.get(item))
                catalog.delete(item)
            gone.append(item)
            state.pending_vectors.pop(item, None)  # only a newer image upsert can re-list it
            continue
        # The current row matters only for the fields no entry has set yet.
        current = catalog.get(item) if here and not writes.complete(item) else None
        metadata = writes.metadata(item, current)
        if metadata is None:
            # A partial update seen before the item's creation: applied when the creation arrives.
            if item in vectors:
                state.pending_vectors[item] = vectors[item]
            continue
        catalog.upsert(item, float(metadata["price"]), metadata["category"], metadata["status"])
        vector = state.pending_vectors.pop(item, None)
        vector = vectors.get(item, vector)
        if vector is not None:
            upserts[item] = vector
        if vector is not None or row < 0:
            labelled.append(item)
    gone = [i for i in gone if i in state.index]
    if gone:
        state.index.delete(gone)
    if upserts:
        state.index.upsert(list(upserts), np.stack(list(upserts.values())))
    # New index entries start unlabelled, and a new catalog row may belong to an already
    # indexed item: both need their catalog row as label.
    label_index_with_catalog(state.index, catalog, [i for i in labelled if i in state.index])
