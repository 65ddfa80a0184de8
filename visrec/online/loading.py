"""Loading a release into a `ServingState`: verified files, index, catalog, PCA, the replayed
journal and the writes of the releases it follows.

The index and catalog come from the newest snapshot of the release's state
(`visrec.online.snapshot`) when there is one, else from the release itself (`open_state`);
then the journal after the snapshot is replayed. The service checks the checksums of what it
reads: the release's index and `items.parquet` only when no snapshot replaces them (the
snapshot has checksums of its own), its `embeddings/` (the next evaluation's, never read here)
not at all (a local release: a downloaded `gs://` copy is checked whole, see `open_release`);
`deploy` and `promote` verify every file. At start-up the encoder (torch, seconds
to import) loads in the background after the index: the service answers reads as soon as
the index is in memory and the journal replayed, and image upserts wait for the encoder
(`ServingState.encoder()`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visrec.core import io
from visrec.online.config import ServingConfig
from visrec.online.follow import poll_handover, start_handover
from visrec.online.lock import ProcessLock
from visrec.online.ranking import ItemCatalog, label_index_with_catalog
from visrec.online.replay import sync_journal
from visrec.online.snapshot import open_newest
from visrec.online.state import ServingState
from visrec.stages.release.release import ITEMS

if TYPE_CHECKING:
    from visrec.model.encode import PreprocessingEncoder
    from visrec.model.pca import PcaProjection
    from visrec.stages.release.release import Release

log = logging.getLogger(__name__)

# One encoder loads at a time per process: transformers' lazy imports are not thread-safe, and a
# reload while the first release's encoder still loads would otherwise fail with an ImportError.
_ENCODER_LOADING = threading.Lock()


def read_catalog(items_path: str) -> ItemCatalog:
    """The release's `items.parquet` (a local file: releases are loaded onto local disk) as an `ItemCatalog`.

    Columnar all the way, one column at a time: ids become fixed-width bytes straight from
    Arrow's buffers, categories and statuses are read as Parquet dictionaries (a code per row),
    so ten million rows never make a Python object, or a string, per row. A missing category or
    status reads as "" (no category shared; not on sale), a missing price as 0 (no price band of
    its own, outside everyone else's). `ValueError` for a null, NUL-containing or duplicate id.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from visrec.online.ranking import CodedColumn
    from visrec.stages.index.idmap import encode_arrow_ids

    parquet = pq.ParquetFile(items_path, read_dictionary=["category", "status"])

    def column(name: str) -> pa.ChunkedArray:
        return parquet.read(columns=[name]).column(0)

    def coded(name: str) -> CodedColumn:
        chunks = column(name).unify_dictionaries().chunks
        values = chunks[0].dictionary.to_pylist() if chunks else []
        missing = values.index("") if "" in values else len(values)
        if any(chunk.null_count for chunk in chunks) and missing == len(values):
            values.append("")
        codes = [pc.fill_null(chunk.indices, missing).to_numpy() for chunk in chunks]
        return CodedColumn(np.concatenate(codes).astype(np.int32) if codes else np.zeros(0, np.int32), values)

    catalog = ItemCatalog.from_columns(
        encode_arrow_ids(column("item_id")),
        pc.fill_null(column("price"), 0).to_numpy().astype(np.float64),
        coded("category"),
        coded("status"),
    )
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise
    return catalog


def read_only_without_snapshot(name: str) -> bool:
    """Whether a release file (relative path) is read only when its state has no snapshot."""
    return name == ITEMS or name.startswith("index/")


def not_read_by_the_service(name: str) -> bool:
    """The release files the service leaves for `Release.verify_deferred` or never reads."""
    return read_only_without_snapshot(name) or name.startswith("embeddings/")


def load_state(release_uri: str, config: ServingConfig, version: str | None = None) -> ServingState:
    """Load a release (`version`: that release of the registry `release_uri` instead of its
    CURRENT): verified files, PCA, its state (`open_state`: the newest snapshot or the release's
    index and catalog) and the journal after it, replayed, while the encoder loads in the
    background (`ServingState.encoder()` waits for it)."""
    from visrec.model.encoders import encoder_input_size
    from visrec.stages.release.registry import load_release

    started = time.monotonic()
    release = load_release(release_uri, config.cache_dir, version=version, defer=not_read_by_the_service)
    pca = None
    if release.pca_path is not None:
        from visrec.model.pca import PcaProjection

        pca = PcaProjection.load(str(release.pca_path))
    encoder_future: Future[PreprocessingEncoder | None] = Future()
    state = open_state(release, encoder_future, pca, image_size=encoder_input_size(release.model_dir),
                       handover_lock=ProcessLock(None if io.is_gcs(release.state_uri)
                                                 else Path(release.state_uri) / "handover.lock"))
    if release.model_dir.is_dir():
        threading.Thread(target=_load_encoder, args=(str(release.model_dir), release.encoder_kind, encoder_future),
                         name="visrec-encoder", daemon=True).start()
    else:
        encoder_future.set_result(None)
    sync_journal(state)
    try:
        state.handover = start_handover(state)
        if poll_handover(state):
            sync_journal(state)
    except BaseException:
        state.close()  # no lock or re-embedding thread may outlive a state that is never served
        raise
    log.info("loaded release %s: %d indexed items, %d catalog items, snapshot %s, %d journal entries replayed, "
             "%.1fs", release.version, len(state.index), len(state.catalog), state.snapshot or "none",
             state.tail_entries, time.monotonic() - started)
    return state


def open_state(release: Release, encoder_future: Future[PreprocessingEncoder | None] | None = None,
               pca: PcaProjection | None = None, **fields: Any) -> ServingState:
    """The release's state as of the newest snapshot that verifies (else the release's own index
    and catalog), with its journal opened just after it: `sync_journal` then applies the
    writes since. `fields`: further `ServingState` fields; without `encoder_future` the state
    has no encoder (a compaction needs none)."""
    from visrec.stages.index.searcher import SimilarityIndex

    snapshot, journal = open_newest(release.state_uri)
    if snapshot is None:
        release.verify_deferred(read_only_without_snapshot)
        index = SimilarityIndex.load(str(release.index_dir), verified=True)
        catalog = read_catalog(str(release.items_path))
    else:
        index, catalog = snapshot.index, snapshot.catalog
        fields.update(writes=snapshot.writes, pending_vectors=snapshot.pending_vectors,
                      skipped_entries=snapshot.skipped_entries, snapshot=snapshot.name)
    label_index_with_catalog(index, catalog, index.ids())
    if encoder_future is None:
        encoder_future = Future()
        encoder_future.set_result(None)
    return ServingState(release=release, index=index, catalog=catalog, encoder_future=encoder_future, pca=pca,
                        journal=journal, **fields)


def _load_encoder(model_dir: str, kind: str, future: Future[PreprocessingEncoder | None]) -> None:
    try:
        from visrec.model.encoders import load_image_encoder

        with _ENCODER_LOADING:
            encoder = load_image_encoder(model_dir, kind=kind)
        future.set_result(encoder)
        log.info("image encoder loaded from %s", model_dir)
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the encoder
        log.error("cannot load the image encoder from %s: %s", model_dir, exc)
        future.set_exception(exc)
