"""Snapshots of a release's serving state: its catalog, index and write registers as the
journal left them, and the journal position they cover.

A start-up loads the newest snapshot that verifies and replays only the journal after
its position (`visrec.online.loading.open_state`, then `sync_journal`), so it costs about
what loading the release costs, however many writes the journal holds;
`visrec.online.compaction` writes them. Under the release's `state/`:

    snapshots/<position>-<started ns>-<random>/
        index/          the index as `SimilarityIndex.save` writes it (its checksums also in
                        the manifest, checked while it loads)
        state.npz       the catalog's columns, the write registers, vectors of items whose
                        creation has not been seen yet
        snapshot.json   the manifest, written last

Written beside, then switched: the manifest is one atomic write (a local rename, one GCS
object), and a folder without one is no snapshot, so a compactor that dies part-way leaves
the previous snapshot in force. Nothing is ever overwritten, so two compactors at once
cannot undo each other: readers take the greatest position (folder names sort by it) and
fall back to the next one, and finally to the whole journal, when one does not verify.
"""

from __future__ import annotations

import hashlib
import io as _bytes_io
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from visrec.core import io
from visrec.core.checksums import verify_checksums
from visrec.core.clock import utc_now
from visrec.online.journal import Journal, JournalPosition, open_journal
from visrec.online.ranking import CodedColumn, ItemCatalog
from visrec.online.writes import RegisterColumns, WriteRegisters

if TYPE_CHECKING:
    from visrec.online.state import ServingState
    from visrec.stages.index.searcher import SimilarityIndex

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "snapshots"
MANIFEST = "snapshot.json"
STATE_FILE = "state.npz"
INDEX_DIR = "index"
FORMAT = "visrec-state-snapshot/1"


class SnapshotInvalid(ValueError):
    """A snapshot folder that cannot be used: not as it was written."""


class SnapshotIncomplete(SnapshotInvalid):
    """A snapshot folder without its manifest: a compaction still writing it, or one that died."""


@dataclass(frozen=True)
class SnapshotRef:
    """One snapshot folder, complete or not: its URI and what its name says."""

    uri: str
    name: str
    position: int
    started_ns: int


@dataclass
class Snapshot:
    """A snapshot read back: the state to start from, and the journal position it covers."""

    name: str
    position: JournalPosition
    index: SimilarityIndex
    catalog: ItemCatalog
    writes: WriteRegisters
    pending_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    skipped_entries: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


def _store(state_uri: str) -> str:
    return "gcs" if io.is_gcs(state_uri) else "file"


def list_snapshots(state_uri: str) -> list[SnapshotRef]:
    """Every snapshot folder of a state directory, complete or not, greatest position first."""
    refs = []
    for uri in io.list_dirs(io.join(state_uri, SNAPSHOTS_DIR)):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        parts = name.split("-")
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            continue  # not one of ours (a `.tmp` of an interrupted local write, a stray folder)
        refs.append(SnapshotRef(uri, name, int(parts[0]), int(parts[1])))
    return sorted(refs, key=lambda r: r.name, reverse=True)


def write_snapshot(state_uri: str, state: ServingState) -> str:
    """Write a snapshot of `state` (not being served: nothing may change it meanwhile) at its
    journal's position into `state_uri`; returns its name. The manifest goes last."""
    position = state.journal.position()
    name = f"{position.offset:020d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    uri = io.join(state_uri, SNAPSHOTS_DIR, name)
    index_manifest = state.index.save(io.join(uri, INDEX_DIR))
    registers = state.writes.columns()
    data = _encode(state, registers, position)
    io.write_bytes(io.join(uri, STATE_FILE), data)
    io.write_json(io.join(uri, MANIFEST), {
        "format": FORMAT,
        "name": name,
        "release": getattr(state.release, "version", None),
        "store": _store(state_uri),
        "position": position.offset,
        "created_at": utc_now(),
        "tail_entries": state.tail_entries,  # folded in since the snapshot this one started from
        "previous": state.snapshot,
        "items": len(state.catalog),
        "indexed": index_manifest["num_items"],
        "index_sha256": index_manifest["sha256"],  # checked beside the loading (`read_snapshot`)
        "registers": len(registers),
        "pending_vectors": len(state.pending_vectors),
        "skipped_entries": state.entries_skipped(),
        "state_sha256": hashlib.sha256(data).hexdigest(),
        "state_bytes": len(data),
    })
    log.info("snapshot %s of %s: %d items, %d indexed, journal position %d", name, state_uri, len(state.catalog),
             index_manifest["num_items"], position.offset)
    return name


def read_snapshot(ref: SnapshotRef, state_uri: str) -> Snapshot:
    """The snapshot in folder `ref` of `state_uri`, every file checked; `SnapshotIncomplete`,
    `SnapshotInvalid` (or the error reading it raised) if it is incomplete or not as written."""
    from visrec.stages.index.searcher import SimilarityIndex

    try:
        manifest = io.read_json(io.join(ref.uri, MANIFEST))
    except FileNotFoundError:
        raise SnapshotIncomplete(f"{ref.uri} has no {MANIFEST} (a compaction still running, or one that "
                                 "died)") from None
    if manifest.get("format") != FORMAT or manifest.get("name") != ref.name:
        raise SnapshotInvalid(f"{ref.uri}: manifest of format {manifest.get('format')!r} for "
                              f"{manifest.get('name')!r}")
    if manifest.get("store") != _store(state_uri) or manifest.get("position") != ref.position:
        raise SnapshotInvalid(f"{ref.uri}: written for a {manifest.get('store')} journal at position "
                              f"{manifest.get('position')}")
    data = io.read_bytes(io.join(ref.uri, STATE_FILE))
    if hashlib.sha256(data).hexdigest() != manifest.get("state_sha256"):
        raise SnapshotInvalid(f"{ref.uri}: {STATE_FILE} does not match its sha256")
    with io.local_dir(io.join(ref.uri, INDEX_DIR)) as local, ThreadPoolExecutor(max_workers=1) as pool:
        # The index's files are checked against this manifest on another thread (hashing runs
        # without the GIL) while they load: a start-up from a snapshot waits for the slower of the two.
        checked = pool.submit(verify_checksums, local, manifest["index_sha256"])
        index = SimilarityIndex.load(str(local), verified=True)
        catalog, writes, pending, seen = _decode(data, index.dims)
        checked.result()
    if len(index) != manifest.get("indexed"):
        raise SnapshotInvalid(f"{ref.uri}: the index holds {len(index)} items, the manifest says "
                              f"{manifest.get('indexed')}")
    return Snapshot(ref.name, JournalPosition(ref.position, seen), index, catalog, writes, pending,
                    int(manifest.get("skipped_entries", 0)), manifest)


def open_newest(state_uri: str) -> tuple[Snapshot | None, Journal]:
    """The newest snapshot of `state_uri` that verifies, with its journal opened after it;
    (None, the journal from its beginning) if there is none.

    A snapshot that does not verify, or whose position is not in the journal, is skipped
    with a logged error (an incomplete one, quietly): an unreadable snapshot can cost a
    longer replay, never the state.
    """
    for ref in list_snapshots(state_uri):
        try:
            snapshot = read_snapshot(ref, state_uri)
            return snapshot, open_journal(state_uri, position=snapshot.position)
        except Exception as exc:  # noqa: BLE001 - whatever broke it, the previous one or the journal still serves
            if isinstance(exc, SnapshotIncomplete):
                log.info("skipping snapshot %s: %s", ref.name, exc)
            else:
                log.error("skipping snapshot %s of %s, it cannot be used: %r", ref.name, state_uri, exc)
    return None, open_journal(state_uri)


def prune_snapshots(state_uri: str, keep: int, orphan_seconds: float) -> list[str]:
    """Delete the complete snapshots after the newest `keep`, and the incomplete ones started
    more than `orphan_seconds` ago (compactions that died); returns the names deleted."""
    removed, complete = [], 0
    for ref in list_snapshots(state_uri):
        if io.exists(io.join(ref.uri, MANIFEST)):
            complete += 1
            if complete <= keep:
                continue
        elif time.time_ns() - ref.started_ns < orphan_seconds * 1e9:
            continue  # perhaps a compaction still writing it
        io.remove_tree(ref.uri)
        removed.append(ref.name)
    if removed:
        log.info("deleted %d old snapshot(s) of %s: %s", len(removed), state_uri, ", ".join(removed))
    return removed


# ---- the columns of state.npz ---------------------------------------------------------------


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=np.str_) if values else np.zeros(0, dtype="<U1")


def _encode(state: ServingState, registers: RegisterColumns, position: JournalPosition) -> bytes:
    """The catalog (present rows), the write registers, the pending vectors and the GCS objects
    of the journal's late-entry window already read, as arrays in one npz."""
    catalog = state.catalog
    rows = np.flatnonzero(catalog.present[:len(catalog.ids)])
    arrays: dict[str, np.ndarray] = {
        "catalog_items": catalog.ids.encode(rows),  # fixed-width UTF-8, no Python object per row
        "catalog_prices": catalog.prices[rows],
        "catalog_category_codes": catalog.category_codes[rows],
        "catalog_categories": _strings(catalog.categories),
        "catalog_status_codes": catalog.status_codes[rows],
        "catalog_statuses": _strings(catalog.statuses),
        **{f"register_{name}": array for name, array in registers.to_arrays().items()},
    }
    pending = list(state.pending_vectors.items())
    arrays["pending_items"] = _strings([item for item, _ in pending])
    arrays["pending_vectors"] = (np.stack([v for _, v in pending]).astype(np.float32) if pending
                                 else np.zeros((0, state.index.dims), dtype=np.float32))
    arrays["journal_seen"] = _strings(list(position.seen))
    buffer = _bytes_io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _decode(data: bytes, dims: int) -> tuple[ItemCatalog, WriteRegisters, dict[str, np.ndarray], tuple[str, ...]]:
    """`_encode`'s arrays back as a catalog, write registers (left as columns until an item is
    touched), pending vectors and journal objects read."""
    arrays = np.load(_bytes_io.BytesIO(data), allow_pickle=False)
    catalog = ItemCatalog.from_columns(
        arrays["catalog_items"], arrays["catalog_prices"],
        CodedColumn(arrays["catalog_category_codes"], arrays["catalog_categories"].tolist()),
        CodedColumn(arrays["catalog_status_codes"], arrays["catalog_statuses"].tolist()))
    writes = WriteRegisters(base=RegisterColumns.from_arrays(
        {name[len("register_"):]: arrays[name] for name in arrays.files if name.startswith("register_")}))
    vectors = arrays["pending_vectors"]
    if vectors.ndim != 2 or vectors.shape[1] != dims:
        raise SnapshotInvalid(f"pending vectors of shape {vectors.shape}, the index holds {dims} dims")
    pending = dict(zip(arrays["pending_items"].tolist(), vectors))
    return catalog, writes, pending, tuple(arrays["journal_seen"].tolist())
