"""The similarity index: a ScaNN searcher over L2-normalised item vectors, its queries,
writes and files.

The index is ScaNN's tree + asymmetric-hashing (AH) + re-ordering searcher over the dot
product of L2-normalised vectors (cosine similarity); serving can upsert and delete items
without a rebuild. Below `IndexConfig.brute_force_below` items it is an exact brute-force
ScaNN searcher instead: partitioning a few hundred vectors buys nothing and trains badly.

Memory per item is what decides how many items one replica serves (docs/index.md, "Memory
per item"), so nothing here is a Python object per item: the raw ScaNN searcher is driven
with integer positions (its Python wrapper would keep a list and a dict of id strings), ids
live in an `IdMap` (sorted fixed-width bytes), and the per-item bookkeeping is int32 numpy
columns keyed by the map's stable keys. The float32 vectors that answer `vector()` (the
serving query) are read from `vectors.npy` on demand (`VectorStore`), so the only copy of
the vectors in memory is ScaNN's re-ordering data, in `reorder_dtype`.

On disk an index is a directory (format `visrec-index/2`): `scann/` (ScaNN's own
serialization, written with relative paths), `ids.npy` (fixed-width UTF-8 ids in ScaNN's
datapoint order), `vectors.npy` (the indexed, normalised float32 vectors in the same
order), `metrics.json`, and `manifest.json`, written last, holding the sha256 of every
other file (`visrec.core.checksums`). `SimilarityIndex.load` verifies them all and refuses a
corrupt or partial index; it also reads format `visrec-index/1` (ids in `ids.json`).

Thread safety: `search`, `vector`, `save`, `len` and `in` take a shared (read) lock;
`upsert` and `delete` take the exclusive (write) lock (`visrec.stages.index.lock`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from visrec.core import io
from visrec.core.checksums import ChecksumMismatch, checksum_files, verify_checksums
from visrec.core.errors import UserError
from visrec.core.versions import library_versions
from visrec.model.pca import l2_normalise
from visrec.stages.index.config import IndexConfig
from visrec.stages.index.idmap import IdMap, IdSequence, encode_ids
from visrec.stages.index.lock import Reading, ReadWriteLock, Writing
from visrec.stages.index.store import VectorStore

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IDS = "ids.npy"
IDS_V1 = "ids.json"  # format visrec-index/1: a JSON list of ids
VECTORS = "vectors.npy"
SCANN_DIR = "scann"
FORMAT = "visrec-index/2"
FORMAT_V1 = "visrec-index/1"
TREE_AH = "tree_ah"
BRUTE_FORCE = "brute_force"
# Batches at least this large use ScaNN's multi-threaded batched search.
PARALLEL_BATCH = 256
# Rows of vectors.npy written per step when saving (bounds the temporary copy).
_SAVE_CHUNK = 1 << 18
# What determines how an index directory is read back (recorded in its manifest).
_LIBRARIES = ("numpy", "scann", "visrec")


@dataclass
class SearchParams:
    """ScaNN query-time knobs: partitions scanned and AH candidates re-ordered exactly (tree only)."""

    leaves_to_search: int | None = None
    pre_reorder_num_neighbors: int | None = None

def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous), so dot product = cosine similarity.

    Raises `ValueError` for non-finite values or an all-zero row (no direction to index).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    return np.ascontiguousarray(l2_normalise(vectors, np.float32, allow_zero=False))


def default_num_leaves(num_items: int) -> int:
    """About sqrt(N) partitions, each still holding a few dozen items."""
    return max(1, min(round(math.sqrt(num_items)), num_items // 20))


def training_sample(config: IndexConfig, num_items: int, leaves: int) -> int:
    """Vectors sampled to train the partitions and AH codebooks: `training_sample_size`, or more for
    many leaves (`training_points_per_leaf` each), at most all of them.

    A fixed 250k sample gave 3,162 leaves (10M items) 79 points each, and k-means placed them so
    poorly that a query had to scan 111 leaves to reach recall@10 0.95, where 250 points a leaf
    need 2 to 5 (docs/index.md, "How far one machine goes").
    """
    return min(num_items, max(config.training_sample_size, config.training_points_per_leaf * leaves))


class SimilarityIndex:
    """Item ids -> nearest items by cosine similarity, backed by a raw ScaNN searcher.

    Build with `SimilarityIndex.build`, tune with `tune_search_params`, persist with
    `save`/`load`. Vectors are L2-normalised on the way in (items and queries).

    ScaNN numbers its datapoints 0..size-1 ("positions") and fills a deleted position with
    its last datapoint, so positions move; the `IdMap` keys do not. Per position: its key;
    per key: its position (-1: not indexed), its vector's slot in the `VectorStore` and the
    owner's label (`set_labels`).
    """

    def __init__(self, searcher: Any, ids: tuple[IdMap, np.ndarray], vectors: VectorStore,
                 params: dict[str, Any], info: dict[str, Any] | None = None) -> None:
        # `ids`: `IdMap.from_ids` of the ids in ScaNN's position order (the map, and each key's
        # position); the base rows of `vectors` are in that order too.
        self._searcher = searcher
        self._ids, order = ids
        n = len(order)
        self._size = n
        self._key_of_pos = np.empty(n, dtype=np.int32)
        self._key_of_pos[order] = np.arange(n, dtype=np.int32)
        self._pos_of_key = order.astype(np.int32)
        self._slot_of_key = order.astype(np.int32)  # base row of `vectors` = position
        self._label_of_key = np.full(n, -1, dtype=np.int32)
        self._store = vectors
        self.params = dict(params)
        self.info = dict(info or {})
        self._lock = ReadWriteLock()

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> SimilarityIndex:
        """Build the ScaNN searcher over `vectors` (one row per id); search params start untuned.

        Raises `UserError` for empty input, duplicate ids or unusable vectors.
        """
        from scann.scann_ops.py import scann_builder, scann_ops_pybind

        try:
            data = _unit_rows(vectors)
            del vectors  # the caller's array may be the only other copy: let it go while ScaNN builds
            id_map = IdMap.from_ids(encode_ids(ids))  # refuses duplicates before the long part
        except ValueError as exc:
            raise UserError(f"cannot index these embeddings: {exc}") from None
        if len(id_map[1]) != len(data):
            raise UserError(f"{len(id_map[1])} ids for {len(data)} vectors")
        if not len(data):
            raise UserError("no embeddings to index")
        n, dims = data.shape
        started = time.monotonic()
        builder = scann_ops_pybind.builder(data, config.k, "dot_product")
        if n < config.brute_force_below:
            params: dict[str, Any] = {"algorithm": BRUTE_FORCE, "reorder_dtype": "float32"}
            searcher = builder.score_brute_force().build()
        else:
            leaves = min(config.num_leaves or default_num_leaves(n), n)
            sample = training_sample(config, n, leaves)
            reorder = {"float32": scann_builder.ReorderType.FLOAT32, "bfloat16": scann_builder.ReorderType.BFLOAT16,
                       "int8": scann_builder.ReorderType.INT8}[config.reorder_dtype]
            default_leaves = max(1, leaves // 20)
            default_reorder = 10 * config.k
            params = {"algorithm": TREE_AH, "num_leaves": leaves, "training_sample_size": sample,
                      "dims_per_block": config.dims_per_block, "hash_type": "lut16",
                      "anisotropic_quantization_threshold": config.anisotropic_threshold,
                      "reorder_dtype": config.reorder_dtype}
            log.info("building ScaNN tree-AH: %d x %d, %d leaves, %s re-ordering", n, dims, leaves,
                     config.reorder_dtype)
            searcher = (builder
                        .tree(num_leaves=leaves, num_leaves_to_search=default_leaves, training_sample_size=sample)
                        .score_ah(config.dims_per_block, training_sample_size=sample,
                                  anisotropic_quantization_threshold=config.anisotropic_threshold)
                        .reorder(default_reorder, quantize=reorder)
                        .build())
            params.update(leaves_to_search=default_leaves, pre_reorder_num_neighbors=default_reorder)
        params.update(k=config.k, dims=dims, distance="dot_product of L2-normalised vectors (cosine)")
        seconds = time.monotonic() - started
        log.info("built %s index over %d items in %.1fs", params["algorithm"], n, seconds)
        return cls(searcher.searcher, id_map, VectorStore.in_memory(data), params, {"build_seconds": round(seconds, 3)})

    # ---- queries ------------------------------------------------------------------------

    @property
    def dims(self) -> int:
        return int(self.params["dims"])

    @property
    def search_params(self) -> SearchParams:
        return SearchParams(self.params.get("leaves_to_search"), self.params.get("pre_reorder_num_neighbors"))

    def set_search_params(self, params: SearchParams) -> None:
        """Make `params` the default for `search` (and what `save` records)."""
        with Writing(self._lock):
            self.params.update(leaves_to_search=params.leaves_to_search,
                               pre_reorder_num_neighbors=params.pre_reorder_num_neighbors)

    def search(self, queries: np.ndarray, k: int,
               params: SearchParams | None = None) -> tuple[list[list[str]], np.ndarray]:
        """The k most similar items for each query row: (ids per query, scores (n, k)).

        Scores are ScaNN's re-ordering scores, best first: the cosine similarities with
        float32 re-ordering, within about 1e-3 of them with bfloat16 (a few 1e-3 with int8).
        When fewer than k items can be returned (a tiny index), a row's id list is shorter
        and its scores are padded with NaN.
        """
        queries = self._check_queries(queries)
        if k < 1:
            raise ValueError("k must be >= 1")
        if not len(queries):
            return [], np.zeros((0, k), dtype=np.float32)
        with Reading(self._lock):
            if self._size == 0:
                return [[] for _ in queries], np.full((len(queries), k), np.nan, dtype=np.float32)
            positions, scores = self._search_positions(queries, k, params or self.search_params)
            # ScaNN pads missing results (a tiny index) with position 0 and a NaN score.
            valid = ~np.isnan(scores)
            keys = self._key_of_pos[positions]
            if valid.all():
                ids = [self._ids.decode(row) for row in keys]
            else:
                ids = [self._ids.decode(row[ok]) for row, ok in zip(keys, valid)]
        if scores.shape[1] < k:
            scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])), constant_values=np.nan)
        return ids, scores

    def search_labels(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`search` for one query, answering with the owner's labels (`set_labels`) instead of ids.

        Returns (labels int64, scores float32), best first, at most k of each (fewer on a
        tiny index). The serving hot path uses it: a label is a row number in the caller's
        metadata arrays, so no id string is created or looked up per candidate.
        """
        queries = self._check_queries(query)
        if len(queries) != 1 or k < 1:
            raise ValueError("search_labels takes one query and k >= 1")
        with Reading(self._lock):
            if self._size == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
            positions, scores = self._search_positions(queries, k, self.search_params)
            positions, scores = positions[0], scores[0]
            valid = ~np.isnan(scores)
            if not valid.all():
                positions, scores = positions[valid], scores[valid]
            return self._label_of_key[self._key_of_pos[positions]].astype(np.int64), scores

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        """Queries as normalised float32 rows of the index's width."""
        queries = np.asarray(queries, dtype=np.float32)
        queries = queries[None, :] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.dims:
            raise ValueError(f"queries of shape {queries.shape}, the index has {self.dims} dims")
        return _unit_rows(queries)

    def _search_positions(self, queries: np.ndarray, k: int,
                          params: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN positions and scores, (n, <= k) each; the caller holds the read lock.

        The tuned re-order depth was chosen for `params["k"] + 1` results; a larger k scales
        it proportionally so deeper lists keep about the same recall.
        """
        reorder = params.pre_reorder_num_neighbors
        tuned_for = int(self.params["k"]) + 1  # tuning searches k neighbours plus the query item itself
        if reorder is not None:
            reorder = max(reorder if k <= tuned_for else math.ceil(reorder * k / tuned_for), k)
        leaves = params.leaves_to_search
        positions, scores = self._searcher.search_batched(
            queries, k, -1 if reorder is None else reorder, -1 if leaves is None else leaves,
            len(queries) >= PARALLEL_BATCH, 256)
        scores = np.asarray(scores, dtype=np.float32).reshape(len(queries), -1)[:, :k]
        return np.asarray(positions, dtype=np.int64).reshape(len(queries), -1)[:, :k], scores

    def _indexed_key(self, item_id: str) -> int:
        """The key of an indexed `item_id`, else -1; the caller holds a lock."""
        key = self._ids.key(item_id)
        return key if key >= 0 and self._pos_of_key[key] >= 0 else -1

    def vector(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised, float32) vector of `item_id`, or None if it is not indexed."""
        with Reading(self._lock):
            key = self._indexed_key(item_id)
            return None if key < 0 else self._store.get(int(self._slot_of_key[key]))

    def __len__(self) -> int:
        return self._size

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, str):
            return False
        with Reading(self._lock):
            return self._indexed_key(item_id) >= 0

    def ids(self) -> IdSequence:
        """Indexed ids in ScaNN's position order, as a sequence of str decoded on access."""
        with Reading(self._lock):
            return self._ids.sequence(self._key_of_pos[: self._size].copy())

    def vectors(self) -> np.ndarray:
        """Indexed vectors in position order (read-only: a view of the stored array, or a gathered
        copy once writes have moved items)."""
        with Reading(self._lock):
            slots = self._slot_of_key[self._key_of_pos[: self._size]]
            view = self._store.base_view(self._size)
            if view is not None and len(view) == self._size and (slots == np.arange(self._size)).all():
                return view
            return self._store.gather(slots)

    def set_labels(self, ids: Sequence[str], labels: Sequence[int] | np.ndarray) -> None:
        """Attach the owner's integer label to each indexed id (for `search_labels`).

        Labels follow their items through upserts and deletes; a new item starts at -1.
        `KeyError` if an id is not indexed. `ids` may be this index's own `ids()` (no look-up).
        """
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(labels)} labels")
        if len(labels) and (labels.min() < -1 or labels.max() > np.iinfo(np.int32).max):
            raise ValueError("labels must be in -1..2**31-1")
        with Writing(self._lock):
            keys = self._ids.keys(ids)
            unknown = np.flatnonzero((keys < 0) | (self._pos_of_key[np.maximum(keys, 0)] < 0))
            if len(unknown):
                raise KeyError(f"not in the index: {ids[int(unknown[0])]}")
            self._label_of_key[keys] = labels

    # ---- mutations ----------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add new items or replace the vectors of existing ones (the last duplicate wins)."""
        ids = [str(i) for i in ids]
        data = _unit_rows(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1) if len(ids) else
                         np.zeros((0, self.dims), np.float32))
        if data.shape[1] != self.dims:
            raise ValueError(f"vectors have {data.shape[1]} dims, the index {self.dims}")
        latest = {item_id: row for row, item_id in enumerate(ids)}
        if not latest:
            return
        ids, data = list(latest), data[list(latest.values())]
        with Writing(self._lock):
            keys = [self._indexed_key(item_id) for item_id in ids]
            existing = [int(self._pos_of_key[key]) if key >= 0 else None for key in keys]
            new = sum(p is None for p in existing)
            self._reserve_positions(self._size + new)
            # ScaNN first: if it refuses, nothing here has changed. New datapoints are appended.
            positions = self._searcher.upsert(existing, list(data), max(1, min(len(ids), 256)))
            self._reserve_keys(len(self._ids) + new)
            for item_id, vec, key, position in zip(ids, data, keys, positions):
                if key < 0:
                    key = self._ids.add(item_id)
                    self._label_of_key[key] = -1
                    self._slot_of_key[key] = -1
                self._key_of_pos[position] = key
                self._pos_of_key[key] = position
                self._slot_of_key[key] = self._store.put(int(self._slot_of_key[key]), vec)
            self._size = int(self._searcher.size())

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items; `KeyError` (and nothing removed) if any id is not indexed."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        if not ids:
            return
        with Writing(self._lock):
            keys = [self._indexed_key(i) for i in ids]
            missing = [i for i, key in zip(ids, keys) if key < 0]
            if missing:
                raise KeyError(f"not in the index: {missing[:5]}")
            # ScaNN deletes one position after the other, each time moving its last datapoint
            # into the hole: replay that on overlays first, so a refusal changes nothing here.
            key_at: dict[int, int] = {}
            position_of: dict[int, int] = {}
            size = self._size
            holes = []
            for key in keys:
                hole = position_of.get(key, int(self._pos_of_key[key]))
                last = size - 1
                moved = key_at.get(last, int(self._key_of_pos[last]))
                holes.append(hole)
                key_at[hole] = moved
                position_of[moved] = hole
                position_of[key] = -1
                size -= 1
            self._searcher.delete(holes)
            for position, key in key_at.items():
                if position < size:
                    self._key_of_pos[position] = key
            for key, position in position_of.items():
                self._pos_of_key[key] = position
            for key in keys:
                self._store.release(int(self._slot_of_key[key]))
                self._slot_of_key[key] = -1
                self._label_of_key[key] = -1
            self._size = int(self._searcher.size())

    def _reserve_positions(self, size: int) -> None:
        if size > len(self._key_of_pos):
            self._key_of_pos = _grown(self._key_of_pos, size, 0)

    def _reserve_keys(self, size: int) -> None:
        if size > len(self._pos_of_key):
            self._pos_of_key = _grown(self._pos_of_key, size, -1)
            self._slot_of_key = _grown(self._slot_of_key, size, -1)
            self._label_of_key = _grown(self._label_of_key, size, -1)

    def memory_bytes(self) -> dict[str, int]:
        """What this object holds besides ScaNN's searcher, by part (ScaNN's own memory is not
        visible from Python; `bench/memory.py` measures it)."""
        with Reading(self._lock):
            store = self._store.memory_bytes()
            return {"ids": self._ids.nbytes,
                    "positions_and_keys": int(self._key_of_pos.nbytes + self._pos_of_key.nbytes
                                              + self._slot_of_key.nbytes),
                    "labels": int(self._label_of_key.nbytes),
                    "vectors_in_memory": store["in_memory"], "vectors_on_disk": store["on_disk"]}

    # ---- persistence --------------------------------------------------------------------

    def save(self, out_dir: str, extra_files: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the index directory (local or gs://); returns the manifest.

        Any old manifest goes first and the new one is written last, so an interrupted
        save leaves a directory that `load` refuses rather than a mix of two indexes.
        `extra_files` (name -> JSON object) are written and checksummed alongside.
        """
        out_dir = str(out_dir)
        io.remove(io.join(out_dir, MANIFEST))
        with Reading(self._lock):
            keys = self._key_of_pos[: self._size]
            try:
                ids = self._ids.encode(keys)
            except ValueError as exc:
                raise UserError(f"cannot save this index: {exc}") from None
            with io.output_dir(out_dir) as local:
                scann_dir = local / SCANN_DIR
                if scann_dir.exists():
                    shutil.rmtree(scann_dir)
                scann_dir.mkdir(parents=True)
                self._searcher.serialize(str(scann_dir), True)  # relative paths
                (local / IDS_V1).unlink(missing_ok=True)  # a format-1 directory saved over
                _replace(local / IDS, lambda fh: np.save(fh, ids, allow_pickle=False))
                _replace(local / VECTORS, lambda fh: self._write_vectors(fh, keys))
                for name, obj in (extra_files or {}).items():
                    io.write_json(str(local / name), obj)
                manifest = {
                    "format": FORMAT,
                    "num_items": self._size,
                    "dims": self.dims,
                    "k": int(self.params["k"]),
                    **{key: self.info.get(key) for key in ("recall_at_k", "build_seconds", "p50_ms", "p99_ms",
                                                           "qps_batched")},
                    "params": self.params,
                    "tuning": self.info.get("tuning"),
                    "library_versions": library_versions(_LIBRARIES),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sha256": checksum_files(local, skip=lambda name: name == MANIFEST),
                }
        io.write_json(io.join(out_dir, MANIFEST), manifest)
        log.info("saved index (%d items) to %s", manifest["num_items"], out_dir)
        return manifest

    def _write_vectors(self, fh: Any, keys: np.ndarray) -> None:
        """vectors.npy in position order, a chunk at a time (no second full copy in memory)."""
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                  "fortran_order": False, "shape": (len(keys), self.dims)})
        for start in range(0, len(keys), _SAVE_CHUNK):
            fh.write(self._store.gather(self._slot_of_key[keys[start:start + _SAVE_CHUNK]]).tobytes())

    @classmethod
    def load(cls, index_dir: str, verified: bool = False) -> SimilarityIndex:
        """Load an index directory (local or gs://), verifying every file's sha256 first.

        Raises `UserError` naming the problem when the manifest is missing (not an index,
        or an interrupted write), its format is unknown, or a file is missing or corrupt.
        `verified`: the caller has just checked these files against another manifest (a
        release's covers its index), so reading gigabytes a second time is skipped.
        `vectors.npy` stays open and is read a vector at a time (`VectorStore`): a local
        directory must stay in place while the index is in use; a gs:// index's temporary
        download is unlinked at once and lives on, unnamed, while the index does.
        """
        from scann.scann_ops.py import scann_ops_pybind

        index_dir = str(index_dir)
        with io.local_dir(index_dir) as local:
            try:
                manifest = json.loads((local / MANIFEST).read_text())
            except FileNotFoundError:
                raise UserError(f"{index_dir}: no {MANIFEST}; not an index directory, or its write "
                                "was interrupted") from None
            except ValueError as exc:
                raise UserError(f"{index_dir}: unreadable {MANIFEST}: {exc}") from None
            form = manifest.get("format")
            if form not in (FORMAT, FORMAT_V1):
                raise UserError(f"{index_dir}: index format {form!r} is not one this visrec reads "
                                f"({FORMAT_V1}, {FORMAT}); rebuild it, or serve it with the visrec that wrote it")
            ids_name = IDS if form == FORMAT else IDS_V1
            try:
                if not verified:
                    verify_checksums(local, manifest.get("sha256", {}))
            except ChecksumMismatch as exc:
                raise UserError(f"{index_dir}: index file {exc}") from None
            for name in (ids_name, VECTORS, f"{SCANN_DIR}/scann_assets.pbtxt"):
                if name not in manifest.get("sha256", {}):
                    raise UserError(f"{index_dir}: {MANIFEST} does not cover {name}")
            try:
                ids = (np.load(local / IDS, allow_pickle=False) if form == FORMAT
                       else encode_ids(json.loads((local / IDS_V1).read_text())))
            except ValueError as exc:
                raise UserError(f"{index_dir}: unreadable {ids_name}: {exc}") from None
            try:
                vectors = VectorStore.from_file(local / VECTORS)
            except ValueError as exc:
                raise UserError(f"{index_dir}: {exc}") from None
            loaded = scann_ops_pybind.load_searcher(str(local / SCANN_DIR), assets_backcompat_shim=False)
        searcher = loaded.searcher
        if ids.ndim != 1 or ids.dtype.kind != "S":
            raise UserError(f"{index_dir}: {ids_name} holds {ids.dtype} {ids.shape}, not one id per item")
        if not (len(ids) == vectors.base_rows == searcher.size() == manifest["num_items"]) or \
                vectors.dims != manifest["dims"]:
            raise UserError(f"{index_dir}: inconsistent index: {len(ids)} ids, {vectors.base_rows} vectors of "
                            f"{vectors.dims} dims, {searcher.size()} ScaNN datapoints, manifest says "
                            f"{manifest['num_items']} x {manifest['dims']}")
        info = {key: manifest.get(key) for key in ("recall_at_k", "build_seconds", "p50_ms", "p99_ms",
                                                   "qps_batched", "tuning")}
        info["format"] = form
        try:
            id_map = IdMap.from_ids(ids)
        except ValueError as exc:
            raise UserError(f"{index_dir}: {ids_name}: {exc}") from None
        index = cls(searcher, id_map, vectors, manifest["params"], info)
        log.info("loaded index %s (%s): %d items x %d dims", index_dir, form, len(ids), manifest["dims"])
        return index


def _grown(array: np.ndarray, size: int, fill: int) -> np.ndarray:
    """`array` copied into a larger one (at least `size`, 1.5x + 16), the new tail set to `fill`."""
    out = np.full(max(size, int(len(array) * 1.5) + 16), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


def _replace(path: Path, write: Any) -> None:
    """Write `path` (`write(binary file)`) through a temporary file renamed over it: a live index
    may be reading the old file (`VectorStore`), which must not change under it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)
