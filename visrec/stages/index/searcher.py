"""The similarity index: a ScaNN searcher over L2-normalised item vectors, its queries,
writes and files.

The index is ScaNN's tree + asymmetric-hashing (AH) + exact re-ordering searcher
over the dot product of L2-normalised vectors (cosine similarity), built with
docids so serving can upsert and delete items without a rebuild. Below
`IndexConfig.brute_force_below` items it is an exact brute-force ScaNN searcher
instead: partitioning a few hundred vectors buys nothing and trains badly.

On disk an index is a directory: `scann/` (ScaNN's own serialization, written with
relative paths), `ids.json` (docid order), `vectors.npy` (the indexed, normalised
vectors in the same order, so serving can look up an item's own embedding whatever
the re-order dtype), `metrics.json`, and `manifest.json`, written last, holding the
sha256 of every other file (`visrec.core.checksums`). `SimilarityIndex.load` verifies
them all and refuses a corrupt or partial index.

Thread safety: `search`, `vector`, `save`, `len` and `in` take a shared (read) lock;
`upsert` and `delete` take the exclusive (write) lock (`visrec.stages.index.lock`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from visrec.core import io
from visrec.core.checksums import ChecksumMismatch, checksum_files, verify_checksums
from visrec.core.errors import UserError
from visrec.core.versions import library_versions
from visrec.model.pca import l2_normalise
from visrec.stages.index.config import IndexConfig
from visrec.stages.index.lock import Reading, ReadWriteLock, Writing

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IDS = "ids.json"
VECTORS = "vectors.npy"
SCANN_DIR = "scann"
TREE_AH = "tree_ah"
BRUTE_FORCE = "brute_force"
# Batches at least this large use ScaNN's multi-threaded batched search.
PARALLEL_BATCH = 256
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



class SimilarityIndex:
    """Item ids -> nearest items by cosine similarity, backed by a ScaNN searcher with docids.

    Build with `SimilarityIndex.build`, tune with `tune_search_params`, persist with
    `save`/`load`. Vectors are L2-normalised on the way in (items and queries).
    """

    def __init__(self, searcher: Any, vectors: np.ndarray, params: dict[str, Any],
                 info: dict[str, Any] | None = None) -> None:
        # `searcher.docids` / `searcher.docid_to_id` are the id map; row i of
        # `_vectors` is the vector of `searcher.docids[i]` (ScaNN's own order).
        self._searcher = searcher
        self._vectors = vectors
        self._size = len(searcher.docids)
        # The owner's integer label per item (`set_labels`), aligned with `_vectors`; -1 = none.
        self._labels = np.full(len(vectors), -1, dtype=np.int64)
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

        ids = [str(i) for i in ids]
        try:
            data = _unit_rows(vectors)
        except ValueError as exc:
            raise UserError(f"cannot index these embeddings: {exc}") from None
        if len(ids) != len(data):
            raise UserError(f"{len(ids)} ids for {len(data)} vectors")
        if not ids:
            raise UserError("no embeddings to index")
        if len(set(ids)) != len(ids):
            raise UserError("duplicate item ids in the embeddings")
        n, dims = data.shape
        started = time.monotonic()
        builder = scann_ops_pybind.builder(data, config.k, "dot_product")
        if n < config.brute_force_below:
            params: dict[str, Any] = {"algorithm": BRUTE_FORCE, "reorder_dtype": "float32"}
            searcher = builder.score_brute_force().build(docids=list(ids))
        else:
            leaves = min(config.num_leaves or default_num_leaves(n), n)
            sample = min(config.training_sample_size, n)
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
                        .build(docids=list(ids)))
            params.update(leaves_to_search=default_leaves, pre_reorder_num_neighbors=default_reorder)
        params.update(k=config.k, dims=dims, distance="dot_product of L2-normalised vectors (cosine)")
        seconds = time.monotonic() - started
        log.info("built %s index over %d items in %.1fs", params["algorithm"], n, seconds)
        return cls(searcher, data.copy(), params, {"build_seconds": round(seconds, 3)})

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

        Scores are cosine similarities, best first. When fewer than k items can be
        returned (a tiny index), a row's id list is shorter and its scores are padded
        with NaN.
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
            docids = self._searcher.docids
            # ScaNN pads missing results (a tiny index) with position 0 and a NaN score.
            valid = ~np.isnan(scores)
            if valid.all():
                ids = [[docids[p] for p in row] for row in positions.tolist()]
            else:
                ids = [[docids[p] for p in row[ok].tolist()] for row, ok in zip(positions, valid)]
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
            return self._labels[positions], scores

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

        Calls the pybind searcher directly: ScaNN's Python wrapper maps every position to
        its docid in a nested list comprehension, which costs more than the search itself.
        The tuned re-order depth was chosen for `params["k"] + 1` results; a larger k scales
        it proportionally so deeper lists keep about the same recall.
        """
        reorder = params.pre_reorder_num_neighbors
        tuned_for = int(self.params["k"]) + 1  # tuning searches k neighbours plus the query item itself
        if reorder is not None:
            reorder = max(reorder if k <= tuned_for else math.ceil(reorder * k / tuned_for), k)
        leaves = params.leaves_to_search
        positions, scores = self._searcher.searcher.search_batched(
            queries, k, -1 if reorder is None else reorder, -1 if leaves is None else leaves,
            len(queries) >= PARALLEL_BATCH, 256)
        scores = np.asarray(scores, dtype=np.float32).reshape(len(queries), -1)[:, :k]
        return np.asarray(positions, dtype=np.int64).reshape(len(queries), -1)[:, :k], scores

    def vector(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector of `item_id`, or None if it is not indexed."""
        with Reading(self._lock):
            row = self._searcher.docid_to_id.get(item_id)
            return None if row is None else self._vectors[row].copy()

    def __len__(self) -> int:
        return self._size

    def __contains__(self, item_id: object) -> bool:
        with Reading(self._lock):
            return item_id in self._searcher.docid_to_id

    def ids(self) -> list[str]:
        """Indexed ids in docid order."""
        with Reading(self._lock):
            return list(self._searcher.docids)

    def vectors(self) -> np.ndarray:
        """Indexed vectors in docid order (a view; do not modify)."""
        with Reading(self._lock):
            return self._vectors[: self._size]

    def set_labels(self, ids: Sequence[str], labels: Sequence[int] | np.ndarray) -> None:
        """Attach the owner's integer label to each indexed id (for `search_labels`).

        Labels follow their items through upserts and deletes; a new item starts at -1.
        `KeyError` if an id is not indexed.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(labels)} labels")
        with Writing(self._lock):
            to_position = self._searcher.docid_to_id
            try:
                positions = np.fromiter((to_position[str(i)] for i in ids), dtype=np.int64, count=len(ids))
            except KeyError as exc:
                raise KeyError(f"not in the index: {exc.args[0]}") from None
            self._labels[positions] = labels

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
            rows = [self._searcher.docid_to_id.get(item_id) for item_id in ids]
            new = sum(r is None for r in rows)
            self._reserve(self._size + new)
            self._searcher.upsert(ids, data, batch_size=max(1, min(len(ids), 256)))
            for item_id, vec, row in zip(ids, data, rows):
                position = self._searcher.docid_to_id[item_id]
                self._vectors[position] = vec
                if row is None:
                    self._labels[position] = -1
            self._size = len(self._searcher.docids)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items; `KeyError` (and nothing removed) if any id is not indexed."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        if not ids:
            return
        with Writing(self._lock):
            missing = [i for i in ids if i not in self._searcher.docid_to_id]
            if missing:
                raise KeyError(f"not in the index: {missing[:5]}")
            # ScaNN fills each hole with the current last item, so only the last len(ids)
            # rows can move; remember them (vector and label) and copy each to wherever it ends up.
            tail_start = self._size - len(ids)
            tail = {self._searcher.docids[r]: (self._vectors[r].copy(), self._labels[r])
                    for r in range(tail_start, self._size)}
            self._searcher.delete(ids)
            for item_id, (vec, label) in tail.items():
                row = self._searcher.docid_to_id.get(item_id)
                if row is not None:
                    self._vectors[row] = vec
                    self._labels[row] = label
            self._size = len(self._searcher.docids)

    def _reserve(self, size: int) -> None:
        if size > len(self._vectors):
            grown = np.empty((max(size, int(len(self._vectors) * 1.5) + 16), self.dims), dtype=np.float32)
            grown[: self._size] = self._vectors[: self._size]
            labels = np.full(len(grown), -1, dtype=np.int64)
            labels[: self._size] = self._labels[: self._size]
            self._vectors, self._labels = grown, labels

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
            with io.output_dir(out_dir) as local:
                scann_dir = local / SCANN_DIR
                if scann_dir.exists():
                    shutil.rmtree(scann_dir)
                scann_dir.mkdir(parents=True)
                self._searcher.serialize(str(scann_dir), relative_path=True)
                # The docid pickle duplicates ids.json; never ship (or load) a pickle.
                (scann_dir / "scann_docids.pkl").unlink(missing_ok=True)
                io.write_json(str(local / IDS), list(self._searcher.docids))
                with open(local / VECTORS, "wb") as fh:
                    np.save(fh, self._vectors[: self._size], allow_pickle=False)
                for name, obj in (extra_files or {}).items():
                    io.write_json(str(local / name), obj)
                manifest = {
                    "format": "visrec-index/1",
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

    @classmethod
    def load(cls, index_dir: str, verified: bool = False) -> SimilarityIndex:
        """Load an index directory (local or gs://), verifying every file's sha256 first.

        Raises `UserError` naming the problem when the manifest is missing (not an index,
        or an interrupted write) or a file is missing or corrupt. `verified`: the caller has
        just checked these files against another manifest (a release's covers its index),
        so reading gigabytes a second time is skipped.
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
            try:
                if not verified:
                    verify_checksums(local, manifest.get("sha256", {}))
            except ChecksumMismatch as exc:
                raise UserError(f"{index_dir}: index file {exc}") from None
            for name in (IDS, VECTORS, f"{SCANN_DIR}/scann_assets.pbtxt"):
                if name not in manifest.get("sha256", {}):
                    raise UserError(f"{index_dir}: {MANIFEST} does not cover {name}")
            ids = json.loads((local / IDS).read_text())
            vectors = np.load(local / VECTORS, allow_pickle=False)
            loaded = scann_ops_pybind.load_searcher(str(local / SCANN_DIR), assets_backcompat_shim=False)
        searcher = scann_ops_pybind.ScannSearcher(loaded.searcher, docids=ids)
        if not (len(ids) == len(vectors) == searcher.size() == manifest["num_items"]):
            raise UserError(f"{index_dir}: inconsistent index: {len(ids)} ids, {len(vectors)} vectors, "
                            f"{searcher.size()} ScaNN datapoints, manifest says {manifest['num_items']}")
        info = {key: manifest.get(key) for key in ("recall_at_k", "build_seconds", "p50_ms", "p99_ms",
                                                   "qps_batched", "tuning")}
        log.info("loaded index %s: %d items x %d dims", index_dir, len(ids), manifest["dims"])
        return cls(searcher, np.ascontiguousarray(vectors, dtype=np.float32), manifest["params"], info)
