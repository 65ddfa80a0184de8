"""Loading a release into a `ServingState`: verified files, index, catalog, PCA, the replayed
journal and the writes of the releases it follows.

At start-up the encoder (torch, seconds to import) loads in the background after the
index: the service answers reads as soon as the index is in memory, and image upserts
wait for it (`ServingState.encoder()`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from visrec.core import io
from visrec.online.config import ServingConfig
from visrec.online.follow import poll_handover, start_handover
from visrec.online.journal import open_journal
from visrec.online.lock import ProcessLock
from visrec.online.ranking import ItemCatalog, label_index_with_catalog
from visrec.online.replay import sync_journal
from visrec.online.state import ServingState

if TYPE_CHECKING:
    from visrec.model.encode import PreprocessingEncoder

log = logging.getLogger(__name__)

# One encoder loads at a time per process: transformers' lazy imports are not thread-safe, and a
# reload while the first release's encoder still loads would otherwise fail with an ImportError.
_ENCODER_LOADING = threading.Lock()


def read_catalog(items_path: str) -> ItemCatalog:
    """The release's `items.parquet` (a local file: releases are loaded onto local disk) as an `ItemCatalog`."""
    import pyarrow.parquet as pq

    table = pq.read_table(items_path, columns=["item_id", "price", "category", "status"])
    return ItemCatalog.from_columns(
        table.column("item_id").to_pylist(),
        table.column("price").to_numpy(zero_copy_only=False).astype(np.float64),
        table.column("category").to_pylist(),
        table.column("status").to_pylist(),
    )


def load_state(release_uri: str, config: ServingConfig, version: str | None = None) -> ServingState:
    """Load a release (`version`: that release of the registry `release_uri` instead of its
    CURRENT): verified files, index, catalog, PCA, replayed journal; the encoder starts
    loading in the background (`ServingState.encoder()` waits for it)."""
    from visrec.model.encoders import encoder_input_size
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.stages.release.registry import load_release

    started = time.monotonic()
    release = load_release(release_uri, config.cache_dir, version=version)
    index = SimilarityIndex.load(str(release.index_dir), verified=True)  # load_release verified it
    catalog = read_catalog(str(release.items_path))
    label_index_with_catalog(index, catalog, index.ids())
    encoder_future: Future[PreprocessingEncoder | None] = Future()
    if release.model_dir.is_dir():
        threading.Thread(target=_load_encoder, args=(str(release.model_dir), release.encoder_kind, encoder_future),
                         name="visrec-encoder", daemon=True).start()
    else:
        encoder_future.set_result(None)
    pca = None
    if release.pca_path is not None:
        from visrec.model.pca import PcaProjection

        pca = PcaProjection.load(str(release.pca_path))
    state = ServingState(release=release, index=index, catalog=catalog, encoder_future=encoder_future, pca=pca,
                         journal=open_journal(release.state_uri), image_size=encoder_input_size(release.model_dir),
                         handover_lock=ProcessLock(None if io.is_gcs(release.state_uri)
                                                   else Path(release.state_uri) / "handover.lock"))
    replayed = sync_journal(state)
    try:
        state.handover = start_handover(state)
        if poll_handover(state):
            sync_journal(state)
    except BaseException:
        state.close()  # no lock or re-embedding thread may outlive a state that is never served
        raise
    log.info("loaded release %s: %d indexed items, %d catalog items, %d journal entries replayed, %.1fs",
             release.version, len(index), len(catalog), replayed, time.monotonic() - started)
    return state


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
