"""The framework-free state of the similar-items service: a loaded release and its mutations.

`RecommenderService` owns one `ServingState` (release, ANN index, item catalog,
image encoder + PCA for upserts) and swaps it for a new one on reload: the new
release is loaded completely (index, catalog, encoder, replayed journal) before a
single reference assignment makes it live, so in-flight requests finish on the old
state and a broken release never replaces a working one. At start-up the encoder
(torch, seconds to import) loads in the background after the index: the service
answers reads as soon as the index is in memory, and image upserts wait for it.

Writes (upsert, delete) go through the release's journal (`visrec.online.journal`: a local
file, or objects on GCS for a `gs://` release): the request handler embeds the image,
keeps it in the state directory, appends one entry (with the vector, so replay never
needs the image again) and then applies every entry it has not applied yet. A release
loaded from a registry also follows its predecessor's journal and carries the writes
made there after its catalog snapshot into its own (`visrec.online.handover`), on load and
with every tail. Start-up replay and the background tail
(which keeps several `--workers` processes, or replicas, in step) use that very same
`sync_journal`, so there is one write path; per item the newest write wins, so every
process converges on the same state whatever order it read the entries in.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from visrec.core import io
from visrec.core.errors import UserError
from visrec.online.handover import Handover, HandoverStatus, encoder_fingerprint
from visrec.data.images import MAX_PIXELS
from visrec.online.journal import Journal, new_entry_id, open_journal, store_image
from visrec.online.ranking import ON_SALE, ItemCatalog, RankedList, RankingConfig, label_index_with_catalog, recommend
from visrec.online.writes import METADATA_FIELDS, WriteRegisters

log = logging.getLogger(__name__)

ENCODER_WAIT_SECONDS = 120.0  # an image upsert right after start waits this long for torch to load
SUCCESSOR_CHECK_SECONDS = 10.0  # how often a served release looks for a release that replaced it


class UnknownItem(KeyError):
    """The item is not in the catalog (or has no embedding)."""


class BadItem(ValueError):
    """An upsert that cannot be applied (missing fields, undecodable image); a 422 for clients."""


class NoEncoder(RuntimeError):
    """The release's image encoder is absent or unavailable, so images cannot be embedded."""


@dataclass
class ServingConfig:
    """Everything the service needs besides the release URI.

    max_body_bytes: request bodies above this are refused (413); 10 MiB holds a
        base64 phone photo with room to spare.
    max_predict_neighbours: the most neighbours one `/predict` may ask for, summed over its
        instances (1,000 instances x k 10); more is refused (422).
    max_concurrent_predicts: `/predict` requests running at once per process; more are
        answered 429. Each runs off the event loop, so reads and health probes keep answering.
    max_image_pixels: an upserted image larger than this (width x height, from its header) is
        refused (422) before any pixel is decoded; smaller ones are decoded at no more than the
        encoder's input size needs (a JPEG at 1/2 to 1/8 scale), so an upload costs megabytes.
    header_timeout_seconds: a connection that has not sent a request's headers this long after
        it opened (or after the previous answer) is closed. keep_alive_seconds: an idle
        connection is closed this long after an answer. max_connections: concurrent
        connections per process; beyond, new requests are answered 503 (uvicorn).
    journal_poll_seconds: how often the journal is re-read for writes made by other
        worker processes; well under the one-second "recommendable" promise.
    image_root: local directory that `image_uri` values may point into; `gs://` URIs
        are always allowed, local paths only under this root (None: local paths refused).
    cache_dir: where a `gs://` release is downloaded (None: a temporary directory).
    reload_signal: a local file through which several worker processes follow each other's
        reloads (`visrec serve --workers N` sets it): the worker that took
        `POST /admin/reload` writes a new generation into it, the others see it while
        tailing the journal and reload too. None: a single process.
    """

    ranking: RankingConfig = field(default_factory=RankingConfig)
    max_body_bytes: int = 10 * 1024 * 1024
    max_predict_neighbours: int = 10_000
    max_concurrent_predicts: int = 4
    max_image_pixels: int = MAX_PIXELS
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: int = 5
    max_connections: int = 1000
    journal_poll_seconds: float = 0.5
    image_root: str | None = None
    cache_dir: str | None = None
    reload_signal: str | None = None


@dataclass
class ServingState:
    """One loaded release with its mutable index and catalog; `lock` guards both."""

    version: str
    release: Any
    index: Any
    catalog: ItemCatalog
    encoder_future: Future
    pca: Any | None
    journal: Journal
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Per item: the newest write of each metadata field, of the vector, and of its existence.
    writes: WriteRegisters = field(default_factory=WriteRegisters)
    pending_vectors: dict[str, np.ndarray] = field(default_factory=dict)
    image_size: int | None = None  # the encoder's input side: what upserted images are decoded at
    # Set when CURRENT did not verify at start-up and an earlier release serves instead:
    # {"wanted": CURRENT's version, "reason": why it was refused}.
    degraded: dict | None = None
    # Journal entries that could not be applied (wrong vector size, missing fields): skipped, counted.
    skipped_entries: int = 0
    handover: Handover | None = None  # from the predecessor
    successor_handover: Handover | None = None  # from the release that replaced this one, once it has
    successor_checked_at: float = -np.inf
    # Several worker processes of one machine: one follows the predecessor (a gs:// state needs
    # no lock: every replica follows it, and a write already applied is never carried again).
    handover_lock: ProcessLock = field(default_factory=lambda: ProcessLock(None))

    def entries_skipped(self) -> int:
        """Journal entries skipped so far: unreadable lines and entries that could not be applied."""
        return self.journal.skipped + self.skipped_entries

    def close(self) -> None:
        """This state is no longer served: stop following other releases."""
        for handover in (self.handover, self.successor_handover):
            if handover is not None:
                handover.close()
        self.handover_lock.release()

    def encoder_status(self) -> str:
        """`loading`, `ready`, `none` (the release has no encoder) or `failed`."""
        if not self.encoder_future.done():
            return "loading"
        if self.encoder_future.exception() is not None:
            return "failed"
        return "none" if self.encoder_future.result() is None else "ready"

    def encoder(self, timeout: float | None = None) -> Any | None:
        """The image encoder (None if the release has none); waits while it is still loading."""
        return self.encoder_future.result(timeout)

    def usable_encoder(self, timeout: float | None = None) -> Any:
        """The image encoder, or `NoEncoder` if the release has none or it is unavailable
        (failed to load, or still loading after `timeout` seconds)."""
        try:
            encoder = self.encoder(timeout)
        except Exception as exc:  # noqa: BLE001 - still loading past the wait, or failed to load
            raise NoEncoder(f"the image encoder of release {self.version} is unavailable: {exc!r}") from None
        if encoder is None:
            raise NoEncoder(f"release {self.version} has no image encoder")
        return encoder


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
    from visrec.stages.index import SimilarityIndex
    from visrec.stages.release.registry import load_release

    started = time.monotonic()
    release = load_release(release_uri, config.cache_dir, version=version)
    index = SimilarityIndex.load(str(release.index_dir))
    catalog = read_catalog(str(release.items_path))
    label_index_with_catalog(index, catalog, index.ids())
    encoder_future: Future = Future()
    if release.model_dir.is_dir():
        kind = release.manifest.get("encoder_kind", "siglip")
        threading.Thread(target=_load_encoder, args=(str(release.model_dir), kind, encoder_future),
                         name="visrec-encoder", daemon=True).start()
    else:
        encoder_future.set_result(None)
    pca = None
    if release.pca_path is not None:
        from visrec.model.pca import PcaProjection

        pca = PcaProjection.load(str(release.pca_path))
    from visrec.model.encoders import encoder_input_size

    state = ServingState(version=release.version, release=release, index=index, catalog=catalog,
                         encoder_future=encoder_future, pca=pca, journal=open_journal(release.state_uri),
                         image_size=encoder_input_size(release.model_dir),
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
             state.version, len(index), len(catalog), replayed, time.monotonic() - started)
    return state


def start_handover(state: ServingState) -> Handover | None:
    """Follow the predecessor's journal from this release's catalog snapshot (`visrec.online.handover`);
    None if the release has no predecessor (or no recorded snapshot time)."""
    from visrec.stages.release.registry import predecessor

    since = state.release.catalog_snapshot_at
    previous = predecessor(state.release)
    if previous is None or since is None:
        return None
    return _follow(state, previous, since)


def follow_successor(state: ServingState) -> bool:
    """Start following the release that replaced this one, if there is one now; True if it started.

    A release still serving after CURRENT moved on (its share of a canary, or kept at 0%
    on the endpoint for a traffic-shift rollback) then gets the successor's writes too, so
    the two agree on what is sold and what is new. Checked at most every
    `SUCCESSOR_CHECK_SECONDS` (a few registry reads).
    """
    from visrec.stages.release.registry import catalog_snapshot_time, successor

    now = time.monotonic()
    if state.successor_handover is not None or now - state.successor_checked_at < SUCCESSOR_CHECK_SECONDS:
        return False
    state.successor_checked_at = now
    after = successor(state.release)
    if after is None:
        return False
    state.successor_handover = _follow(state, after, catalog_snapshot_time(after.manifest) or 0.0)
    log.info("release %s was replaced by %s; following its writes too", state.version, after.version)
    return True


def _follow(state: ServingState, other: Any, since: float) -> Handover:
    """A `Handover` carrying the writes of release `other` (a `ReleaseRef`) after `since` into `state`."""
    same_encoder = encoder_fingerprint(other.manifest) == encoder_fingerprint(state.release.manifest)
    return Handover(HandoverStatus(other.version, since), open_journal(other.state_uri, since=since),
                    state.journal, other.state_uri, state.release.state_uri, same_encoder,
                    applied=lambda entry: _applied(state, entry), embedder=lambda: _batch_embedder(state))


def poll_handover(state: ServingState) -> int:
    """Carry the new writes of the releases `state` follows into its journal (applied by the
    next `sync_journal`); returns how many. Of several worker processes on one machine only
    the one holding the hand-over's file lock does it."""
    handovers = [h for h in (state.handover, state.successor_handover) if h is not None]
    if not handovers:
        return 0
    held = state.handover_lock.try_acquire()
    for handover in handovers:
        handover.status.by_other_process = not held
    return sum(handover.poll() for handover in handovers) if held else 0


def _applied(state: ServingState, entry: dict) -> bool:
    """Whether `state` has this write, or newer ones for everything it says (newest write wins)."""
    with state.lock:
        return state.writes.has(entry)


def _batch_embedder(state: ServingState) -> Any:
    """Image bytes -> index vectors with `state`'s encoder and PCA (waits for the encoder)."""
    from visrec.data.images import decode_image

    encoder = state.usable_encoder()
    # Decoded as upserts decode them, so a carried listing gets the vector an upsert would give it.
    return lambda batch: embed_images(encoder, state.pca, [decode_image(data, target_size=state.image_size)
                                                           for data in batch])


class ProcessLock:
    """A non-blocking exclusive file lock held until `release` (None path: always granted)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._handle: IO | None = None

    def try_acquire(self) -> bool:
        if self.path is None or self._handle is not None:
            return True
        handle = open(self.path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _load_encoder(model_dir: str, kind: str, future: Future) -> None:
    try:
        from visrec.model.encoders import load_image_encoder

        future.set_result(load_image_encoder(model_dir, kind=kind))
        log.info("image encoder loaded from %s", model_dir)
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the encoder
        log.error("cannot load the image encoder from %s: %s", model_dir, exc)
        future.set_exception(exc)


def sync_journal(state: ServingState) -> int:
    """Apply the journal entries `state` has not seen yet; returns how many changed something.

    Per item and field the newest write wins (`visrec.online.writes`): entries from several worker
    processes and replicas may arrive in any order, and every reader ends in the same state.
    An entry that cannot be applied (a vector of the wrong size, a missing field) is skipped,
    logged and counted (`skipped_entries`), never an outage. Index writes are batched (the
    newest vector per item wins), so replaying a long journal costs one index upsert and one
    delete rather than one per entry.
    """
    entries = state.journal.read_new()
    if not entries:
        return 0
    vectors: dict[str, np.ndarray] = {}
    touched: set[str] = set()
    applied = 0
    with state.lock:
        for entry in entries:
            try:
                vector = entry.get("vector")
                if vector is not None:
                    vector = np.asarray(vector, dtype=np.float32)
                    if vector.shape != (state.index.dims,):
                        raise ValueError(f"vector of shape {vector.shape}, the index holds {state.index.dims} dims")
                    entry = {**entry, "vector": vector}
                change = state.writes.apply(entry)
            except (ValueError, KeyError, TypeError) as exc:
                state.skipped_entries += 1
                log.error("skipping unusable journal entry %s of item %r: %s", entry.get("id"), entry.get("item_id"),
                          exc)
                continue
            if change is None:
                continue
            applied += 1
            touched.add(change.item_id)
            if change.vector is not None:
                vectors[change.item_id] = change.vector
        _materialise(state, touched, vectors)
    return applied


def _materialise(state: ServingState, items: set[str], vectors: dict[str, np.ndarray]) -> None:
    """Bring the catalog and the index of `state` in line with its write registers for `items`
    (the caller holds `state.lock`)."""
    gone, upserts, labelled = [], {}, []
    for item in items:
        if not state.writes.alive(item, default=item in state.catalog):
            state.catalog.delete(item)
            gone.append(item)
            continue
        metadata = state.writes.metadata(item, state.catalog.get(item))
        if metadata is None:
            # A partial update seen before the item's creation: applied when the creation arrives.
            if item in vectors:
                state.pending_vectors[item] = vectors[item]
            continue
        state.catalog.upsert(item, float(metadata["price"]), metadata["category"], metadata["status"])
        vector = vectors.get(item, state.pending_vectors.pop(item, None))
        if vector is not None:
            upserts[item] = vector
        labelled.append(item)
    gone = [i for i in gone if i in state.index]
    if gone:
        state.index.delete(gone)
    if upserts:
        state.index.upsert(list(upserts), np.stack(list(upserts.values())))
    # New index entries start unlabelled, and a new catalog row may belong to an already
    # indexed item: both need their catalog row as label.
    label_index_with_catalog(state.index, state.catalog, [i for i in labelled if i in state.index])


def embed_images(encoder: Any, pca: Any | None, images: list[Any]) -> np.ndarray:
    """PIL images -> the vectors the index holds (n, d): encoder features, L2-normalised, then PCA."""
    import torch

    from visrec.model.encoders import preprocess_images
    from visrec.model.pca import l2_normalise

    # The same steps as stage 3 (`visrec.stages.embed`), so upserted and batch vectors are comparable.
    with torch.inference_mode():
        features = l2_normalise(encoder(preprocess_images(encoder, images)).float().cpu().numpy())
    if pca is not None:
        features = pca.transform(features)
    return np.asarray(features, dtype=np.float32)


def embed_image(encoder: Any, pca: Any | None, image: Any) -> np.ndarray:
    """One PIL image -> the vector the index holds (`embed_images` of one)."""
    return embed_images(encoder, pca, [image])[0]


class RecommenderService:
    """The service: the current `ServingState` plus the operations the HTTP layer exposes."""

    def __init__(self, release_uri: str, config: ServingConfig | None = None):
        self.release_uri = release_uri
        self.config = config or ServingConfig()
        self._state: ServingState | None = None
        # Serialises writers and reloads: a write never lands in a state being replaced.
        self._write_lock = threading.Lock()
        # The reload generation (see `ServingConfig.reload_signal`) this process has acted on.
        self._reload_generation = self._announced_reload()[0]
        # A gs:// release is downloaded. Without a configured cache the service keeps its copies
        # in a directory of its own and deletes each once a reload has replaced it, so weekly
        # reloads do not fill the disk.
        self._own_cache: Path | None = None
        if self.config.cache_dir is None and io.is_gcs(release_uri):
            self._own_cache = Path(tempfile.mkdtemp(prefix="visrec-releases-"))
            self.config = dataclasses.replace(self.config, cache_dir=str(self._own_cache))

    @property
    def ready(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> ServingState:
        if self._state is None:
            raise RuntimeError("no release loaded yet")
        return self._state

    def start(self) -> None:
        """Load the release named at construction. If it is a registry whose CURRENT release does
        not verify (corrupt, incomplete), serve the newest earlier release that does, and say so
        (`ServingState.degraded`), rather than no release at all."""
        from visrec.stages.release.registry import ReleaseInvalid

        try:
            state = load_state(self.release_uri, self.config)
        except ReleaseInvalid as exc:
            state = self._fall_back(exc)
        with self._write_lock:
            self._state = state

    def _fall_back(self, refused: Exception) -> ServingState:
        from visrec.stages.release.registry import CURRENT, ReleaseInvalid, current_version, fallback_versions

        if not io.exists(io.join(self.release_uri, CURRENT)):
            raise refused
        wanted = current_version(self.release_uri)
        for version in fallback_versions(self.release_uri):
            try:
                state = load_state(self.release_uri, self.config, version=version)
            except ReleaseInvalid as exc:
                log.error("release %s does not verify either: %s", version, exc)
                continue
            state.degraded = {"wanted": wanted, "reason": str(refused)}
            log.critical("CURRENT release %s of %s does not verify (%s): serving %s instead until a reload "
                         "finds a release that does", wanted, self.release_uri, refused, version)
            return state
        raise refused

    def reload(self, announce: bool = True) -> str:
        """Load the release the URI names now (a registry's CURRENT), then swap; returns its version.

        Any error leaves the old state serving and propagates to the caller. With
        `announce`, other worker processes are told to follow (`follow_reloads`).
        """
        new = load_state(self.release_uri, self.config)
        try:
            new.encoder()  # a release whose encoder does not load is refused too
        except BaseException:
            new.close()
            raise
        with self._write_lock:
            # Writes the old release took while the new one was loading, carried and applied
            # before the swap: an acknowledged write is never served undone, not even briefly.
            poll_handover(new)
            sync_journal(new)
            old, self._state = self._state, new
        if old is not None:
            old.close()
        log.info("now serving release %s", new.version)
        # Requests still on the old state only use what is in memory: its files can go.
        if (old is not None and self._own_cache is not None and old.release.path.parent == self._own_cache
                and old.release.path != new.release.path):
            shutil.rmtree(old.release.path, ignore_errors=True)
        if announce and self.config.reload_signal:
            self._reload_generation = uuid.uuid4().hex
            io.write_json(self.config.reload_signal, {"generation": self._reload_generation,
                                                      "version": new.version, "pid": os.getpid()})
        return new.version

    def _announced_reload(self) -> tuple[str | None, str | None]:
        """(generation, version) last written to the reload signal, (None, None) if none."""
        path = self.config.reload_signal
        if not path:
            return None, None
        try:
            announced = json.loads(Path(path).read_text())
            return announced["generation"], announced["version"]
        except FileNotFoundError:
            return None, None
        except (ValueError, KeyError, TypeError) as exc:
            log.error("unreadable reload signal %s: %s", path, exc)
            return None, None

    def follow_reloads(self) -> str | None:
        """Reload if another worker announced a reload since the last look; returns the new version.

        A failure is logged and this worker keeps serving what it has (the worker that took
        the request already answered for the release).
        """
        generation, version = self._announced_reload()
        if generation is None or generation == self._reload_generation:
            return None
        self._reload_generation = generation
        if self._state is not None and self._state.version == version:
            return None
        try:
            return self.reload(announce=False)
        except Exception as exc:  # noqa: BLE001 - keep serving the old release
            log.error("cannot follow the reload to %s: %s", version, exc)
            return None

    def similar(self, item_id: str, k: int) -> tuple[str, RankedList]:
        """(release version, ranked list) for the item; `UnknownItem` if it has no embedding."""
        state = self.state
        with state.lock:
            try:
                return state.version, recommend(item_id, k, state.index, state.catalog, self.config.ranking)
            except KeyError:
                raise UnknownItem(item_id) from None

    def item(self, item_id: str) -> dict:
        """`{"item_id", "release", "price", "category", "status", "indexed"}` of a catalog item;
        `UnknownItem` if it is not there."""
        state = self.state
        with state.lock:
            row = state.catalog.get(item_id)
            if row is None:
                raise UnknownItem(item_id)
            return {"item_id": item_id, "release": state.version, **row, "indexed": item_id in state.index}

    def similar_many(self, queries: list[tuple[str, int]]) -> tuple[str, list[RankedList | UnknownItem]]:
        """(release version, one ranked list or `UnknownItem` per (item, k)), all from the same
        release: the state is read once, so a reload meanwhile cannot mix two releases in one
        answer. Queries with k outside 1..max_k get `UnknownItem` too (the caller checks k)."""
        state = self.state
        results: list[RankedList | UnknownItem] = []
        for item_id, k in queries:
            if not 1 <= k <= self.config.ranking.max_k:
                results.append(UnknownItem(item_id))
                continue
            with state.lock:  # per query, so writes interleave with a long request
                try:
                    results.append(recommend(item_id, k, state.index, state.catalog, self.config.ranking))
                except KeyError:
                    results.append(UnknownItem(item_id))
        return state.version, results

    def sync_journal(self) -> int:
        """Pick up journal lines written by other processes, and the predecessor's new writes."""
        state = self._state
        if state is None:
            return 0
        follow_successor(state)
        poll_handover(state)  # outside the write lock: it may list GCS, and only appends
        with self._write_lock:
            return sync_journal(self._state)

    def upsert(self, item_id: str, fields: dict) -> dict:
        """Create or update an item from request fields; embeds the image if one is given.

        `fields`: `title`, `category`, `price`, `status` and optionally `image` (base64)
        or `image_uri`. A new item needs an image and every metadata field; an existing
        one may change only some (e.g. just `status`).
        """
        data, image = self._read_image(fields)

        def embedded(state: ServingState) -> tuple[np.ndarray | None, str | None]:
            """(vector, kept image's sha256) for `state`'s release; (None, None) without an image."""
            if image is None:
                return None, None
            vector = embed_image(state.usable_encoder(ENCODER_WAIT_SECONDS), state.pca, image)
            return vector, store_image(state.release.state_uri, data)

        state = self.state
        vector, image_sha256 = embedded(state)
        with self._write_lock:
            if self.state is not state:  # a reload swapped releases meanwhile: use the new encoder
                state = self.state
                vector, image_sha256 = embedded(state)
            # Merge with the newest state of the item, other workers' and replicas' writes included.
            sync_journal(state)
            with state.lock:
                current = state.catalog.get(item_id)
                indexed = item_id in state.index
            if vector is None and not (current and indexed):
                raise BadItem("a new item needs an image (`image` base64 or `image_uri`)")
            sent = [name for name in METADATA_FIELDS if fields.get(name) is not None]
            if current is None:
                sent = list(METADATA_FIELDS)  # a new listing sets every field (status: on sale)
            merged = {"category": fields.get("category", current and current["category"]),
                      "price": fields.get("price", current and current["price"]),
                      "status": fields.get("status") or (current["status"] if current else ON_SALE)}
            if merged["category"] is None or merged["price"] is None:
                raise BadItem("a new item needs `category` and `price`")
            # `sent`: readers take only these fields from the entry (visrec.online.writes), so a
            # concurrent update of another field on another worker is never undone.
            entry = {"op": "upsert", "id": new_entry_id(), "item_id": item_id, "title": fields.get("title"),
                     **merged, "sent": sent, "vector": None if vector is None else vector.tolist(),
                     "image_sha256": image_sha256, "at": time.time()}
            state.journal.append(entry)
            sync_journal(state)
            with state.lock:
                status = (state.catalog.get(item_id) or merged)["status"]
        return {"item_id": item_id, "release": state.version, "status": status, "embedded": vector is not None}

    def delete(self, item_id: str) -> None:
        """Remove an item from catalog and index; `UnknownItem` if it is not there."""
        with self._write_lock:
            state = self.state
            sync_journal(state)  # it may have been created a moment ago by another worker
            with state.lock:
                known = item_id in state.catalog or item_id in state.index
            if not known:
                raise UnknownItem(item_id)
            state.journal.append({"op": "delete", "id": new_entry_id(), "item_id": item_id, "at": time.time()})
            sync_journal(state)

    def _read_image(self, fields: dict) -> tuple[bytes | None, Any | None]:
        """(bytes, PIL image) of the request's image, (None, None) if it carries none."""
        from visrec.data.images import ImageDecodeError, decode_image, load_image_bytes

        if fields.get("image") is not None:
            try:
                data = base64.b64decode(fields["image"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadItem(f"`image` is not valid base64: {exc}") from None
        elif fields.get("image_uri"):
            data = self._read_image_uri(fields["image_uri"], load_image_bytes)
        else:
            return None, None
        try:
            image = decode_image(data, max_pixels=self.config.max_image_pixels, target_size=self.state.image_size)
            return data, image
        except ImageDecodeError as exc:
            raise BadItem(f"image does not decode: {exc}") from None

    def _read_image_uri(self, uri: str, load_image_bytes: Any) -> bytes:
        root = self.config.image_root
        if not io.is_gcs(uri):
            if root is None:
                raise BadItem("local image_uri paths are disabled (no image root configured)")
            resolved = (Path(root) / uri).resolve()
            if not resolved.is_relative_to(Path(root).resolve()):
                raise BadItem("image_uri points outside the image root")
        try:
            return load_image_bytes(uri, root)
        except (FileNotFoundError, UserError, OSError) as exc:
            raise BadItem(f"cannot read image_uri {uri}: {exc}") from None
