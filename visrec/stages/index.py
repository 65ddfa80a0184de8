"""Stage 4: a ScaNN similarity index over the item embeddings, tuned to a recall target.

The index is ScaNN's tree + asymmetric-hashing (AH) + exact re-ordering searcher
over the dot product of L2-normalised vectors (cosine similarity), built with
docids so serving can upsert and delete items without a rebuild. Below
`IndexConfig.brute_force_below` items it is an exact brute-force ScaNN searcher
instead: partitioning a few hundred vectors buys nothing and trains badly.

Search parameters are not guessed: `tune_search_params` measures recall@k against
exact brute-force search (numpy/BLAS) on sample queries and keeps the fastest
measured setting that meets the target; `build_index` then measures single-query
latency and batched throughput and applies the quality gate (recall and p99).

On disk an index is a directory: `scann/` (ScaNN's own serialization, written with
relative paths), `ids.json` (docid order), `vectors.npy` (the indexed, normalised
vectors in the same order, so serving can look up an item's own embedding whatever
the re-order dtype), `metrics.json`, and `manifest.json`, written last, holding the
sha256 of every other file. `SimilarityIndex.load` verifies them all and refuses a
corrupt or partial index.

Thread safety: `search`, `vector`, `save`, `len` and `in` take a shared (read) lock;
`upsert` and `delete` take the exclusive (write) lock, so serving threads may search
while another thread writes, and a search never sees a half-applied write.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from visrec.core import io
from visrec.data.embeddings import read_embeddings
from visrec.core.errors import GateFailed, UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
METRICS = "metrics.json"
IDS = "ids.json"
VECTORS = "vectors.npy"
SCANN_DIR = "scann"
REORDER_DTYPES = ("float32", "bfloat16", "int8")
TREE_AH = "tree_ah"
BRUTE_FORCE = "brute_force"
# Batches at least this large use ScaNN's multi-threaded batched search.
_PARALLEL_BATCH = 256
# Tuning stops after this many leaves_to_search steps that no longer allow a shallower re-order.
_TUNING_PATIENCE = 3


@dataclass
class IndexConfig:
    """How the index is built, tuned and gated.

    k: neighbours per query the recall target is measured at.
    recall_target: recall@k (vs exact search) the tuned search setting must reach.
    num_leaves: tree partitions; None = about sqrt(N), ScaNN's rule of thumb.
    reorder_dtype: precision of the re-ordering copy ScaNN keeps (float32 | bfloat16 | int8);
        smaller saves memory (4 / 2 / 1 bytes per dimension) at some recall.
    max_p99_ms: gate on single-query p99 latency (None: no latency gate). 25 ms leaves room
        for the HTTP, filtering and re-ranking work inside a ~100 ms serving budget.
    tuning_queries: sample queries for tuning; as many again, disjoint, validate the choice.
    training_sample_size: vectors sampled to train the partitions and AH codebooks.
    seed: sample-query selection.
    dims_per_block: AH block size (2 dims per 4-bit code: ScaNN's recommended lut16 setup).
    anisotropic_threshold: AH anisotropic quantisation threshold for dot product (ScaNN's 0.2).
    brute_force_below: indexes smaller than this are exact brute force (no partitions).
    """

    k: int = 10
    recall_target: float = 0.95
    num_leaves: int | None = None
    reorder_dtype: str = "float32"
    max_p99_ms: float | None = 25.0
    tuning_queries: int = 1000
    training_sample_size: int = 250_000
    seed: int = 0
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    brute_force_below: int = 2000

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError("recall_target must be in (0, 1]")
        if self.num_leaves is not None and self.num_leaves < 1:
            raise ValueError("num_leaves must be >= 1 (or None for about sqrt(N))")
        if self.reorder_dtype not in REORDER_DTYPES:
            raise ValueError(f"reorder_dtype must be one of {REORDER_DTYPES}, got {self.reorder_dtype!r}")
        if self.max_p99_ms is not None and self.max_p99_ms <= 0:
            raise ValueError("max_p99_ms must be > 0 (or None for no latency gate)")
        if self.tuning_queries < 1 or self.training_sample_size < 1 or self.dims_per_block < 1:
            raise ValueError("tuning_queries, training_sample_size and dims_per_block must be >= 1")


@dataclass
class SearchParams:
    """ScaNN query-time knobs: partitions scanned and AH candidates re-ordered exactly (tree only)."""

    leaves_to_search: int | None = None
    pre_reorder_num_neighbors: int | None = None


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Reading:
    def __init__(self, lock: _ReadWriteLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_read()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_read()


class _Writing(_Reading):
    def __enter__(self) -> None:
        self._lock.acquire_write()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_write()


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32), so dot product = cosine similarity.

    Raises `ValueError` for non-finite values or an all-zero row (no direction to index).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if len(vectors) and norms.min() == 0.0:
        raise ValueError("vectors contain an all-zero row")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def default_num_leaves(num_items: int) -> int:
    """About sqrt(N) partitions, each still holding a few dozen items."""
    return max(1, min(round(math.sqrt(num_items)), num_items // 20))


def library_versions() -> dict[str, str]:
    """Versions that determine how an index directory is read back."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("scann", "visrec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


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
        self._lock = _ReadWriteLock()

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def build(cls, ids: Sequence[str], vectors: np.ndarray, config: IndexConfig = IndexConfig()) -> SimilarityIndex:
        """Build the ScaNN searcher over `vectors` (one row per id); search params start untuned.

        Raises `UserError` for empty input, duplicate ids or unusable vectors.
        """
        from scann.scann_ops.py import scann_builder, scann_ops_pybind

        ids = [str(i) for i in ids]
        try:
            data = normalize(vectors)
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
        with _Writing(self._lock):
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
        with _Reading(self._lock):
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
        with _Reading(self._lock):
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
        return normalize(queries)

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
            len(queries) >= _PARALLEL_BATCH, 256)
        scores = np.asarray(scores, dtype=np.float32).reshape(len(queries), -1)[:, :k]
        return np.asarray(positions, dtype=np.int64).reshape(len(queries), -1)[:, :k], scores

    def vector(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector of `item_id`, or None if it is not indexed."""
        with _Reading(self._lock):
            row = self._searcher.docid_to_id.get(item_id)
            return None if row is None else self._vectors[row].copy()

    def __len__(self) -> int:
        return self._size

    def __contains__(self, item_id: object) -> bool:
        with _Reading(self._lock):
            return item_id in self._searcher.docid_to_id

    def ids(self) -> list[str]:
        """Indexed ids in docid order."""
        with _Reading(self._lock):
            return list(self._searcher.docids)

    def vectors(self) -> np.ndarray:
        """Indexed vectors in docid order (a view; do not modify)."""
        with _Reading(self._lock):
            return self._vectors[: self._size]

    def set_labels(self, ids: Sequence[str], labels: Sequence[int] | np.ndarray) -> None:
        """Attach the owner's integer label to each indexed id (for `search_labels`).

        Labels follow their items through upserts and deletes; a new item starts at -1.
        `KeyError` if an id is not indexed.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(labels)} labels")
        with _Writing(self._lock):
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
        data = normalize(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1) if len(ids) else
                         np.zeros((0, self.dims), np.float32))
        if data.shape[1] != self.dims:
            raise ValueError(f"vectors have {data.shape[1]} dims, the index {self.dims}")
        latest = {item_id: row for row, item_id in enumerate(ids)}
        if not latest:
            return
        ids, data = list(latest), data[list(latest.values())]
        with _Writing(self._lock):
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
        with _Writing(self._lock):
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
        with _Reading(self._lock):
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
                files = [IDS, VECTORS, *sorted(extra_files or {}),
                         *sorted(f"{SCANN_DIR}/{p.name}" for p in scann_dir.iterdir() if p.is_file())]
                manifest = {
                    "format": "visrec-index/1",
                    "num_items": self._size,
                    "dims": self.dims,
                    "k": int(self.params["k"]),
                    **{key: self.info.get(key) for key in ("recall_at_k", "build_seconds", "p50_ms", "p99_ms",
                                                           "qps_batched")},
                    "params": self.params,
                    "tuning": self.info.get("tuning"),
                    "library_versions": library_versions(),
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sha256": {name: io.sha256_file(local / name) for name in files},
                }
        io.write_json(io.join(out_dir, MANIFEST), manifest)
        log.info("saved index (%d items) to %s", manifest["num_items"], out_dir)
        return manifest

    @classmethod
    def load(cls, index_dir: str) -> SimilarityIndex:
        """Load an index directory (local or gs://), verifying every file's sha256 first.

        Raises `UserError` naming the problem when the manifest is missing (not an index,
        or an interrupted write) or a file is missing or corrupt.
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
            for name, digest in manifest.get("sha256", {}).items():
                path = local / name
                if not path.is_file():
                    raise UserError(f"{index_dir}: index file {name} is missing")
                if io.sha256_file(path) != digest:
                    raise UserError(f"{index_dir}: index file {name} is corrupt (sha256 mismatch)")
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


# ---- tuning -----------------------------------------------------------------------------


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int,
                exclude_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product (BLAS, in blocks to bound memory): (rows, scores), best first.

    `exclude_rows[q]` (a database row, or -1) is left out of query q's answer.
    """
    k = min(k, len(database))
    rows = np.empty((len(queries), k), dtype=np.int64)
    scores = np.empty((len(queries), k), dtype=np.float32)
    block = max(1, (1 << 25) // max(1, len(database)))  # ~128 MB of float32 scores per block
    for start in range(0, len(queries), block):
        sims = queries[start:start + block] @ database.T
        if exclude_rows is not None:
            excl = exclude_rows[start:start + block]
            has = excl >= 0
            sims[np.flatnonzero(has), excl[has]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
            np.tile(np.arange(sims.shape[1]), (len(sims), 1))
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        rows[start:start + block] = np.take_along_axis(top, order, axis=1)
        scores[start:start + block] = np.take_along_axis(top_scores, order, axis=1)
    return rows, scores


@dataclass
class QuerySample:
    """Sample queries (indexed items, searched for their neighbours other than themselves)."""

    ids: list[str]
    vectors: np.ndarray
    threshold: np.ndarray  # per query: the exact k-th best score among the other items
    k: int  # neighbours each query is scored on: min(k, N - 1)


def sample_queries(index: SimilarityIndex, count: int, k: int, seed: int, skip: int = 0) -> QuerySample:
    """`count` indexed items as queries (fixed seed; `skip` offsets into the same permutation,
    so a second call gives a disjoint sample) with their exact neighbour thresholds."""
    ids, data = index.ids(), index.vectors()
    order = np.random.default_rng(seed).permutation(len(ids))[skip:skip + count]
    k_eff = min(k, len(ids) - 1)
    vectors = data[order]
    if k_eff < 1:
        return QuerySample([ids[i] for i in order], vectors, np.zeros(len(order), np.float32), 0)
    _, scores = exact_top_k(data, vectors, k_eff, exclude_rows=order)
    return QuerySample([ids[i] for i in order], vectors, scores[:, -1].copy(), k_eff)


def measure_recall(index: SimilarityIndex, sample: QuerySample, params: SearchParams) -> float:
    """Recall@k of `params` on `sample`, tie-aware.

    A returned item counts when its true similarity (from the stored vectors, not
    ScaNN's possibly quantised score) reaches the exact k-th best, so equally good
    neighbours (duplicates) are not counted as misses.
    """
    if sample.k == 0 or not sample.ids:
        return 1.0
    found, _ = index.search(sample.vectors, sample.k + 1, params)
    hits = 0
    for query_id, vec, thr, got in zip(sample.ids, sample.vectors, sample.threshold, found):
        others = [i for i in got if i != query_id][: sample.k]
        if others:
            true = np.stack([index.vector(i) for i in others]) @ vec
            hits += int((true >= thr - 1e-5).sum())
    return hits / (sample.k * len(sample.ids))


def _time_per_query_us(index: SimilarityIndex, queries: np.ndarray, k: int, params: SearchParams,
                       repeats: int = 3) -> float:
    """Best-of-`repeats` single-threaded batched search time per query, in microseconds."""
    best = math.inf
    batch = queries[: _PARALLEL_BATCH - 1]  # stay on the single-threaded path: a per-query cost
    for _ in range(repeats):
        started = time.perf_counter()
        index.search(batch, k, params)
        best = min(best, time.perf_counter() - started)
    return best / len(batch) * 1e6


def _ladder(low: int, high: int, ratio: float = 1.4) -> list[int]:
    """Distinct integers from low to high (both included), roughly geometric."""
    out, value = [], float(low)
    while value < high:
        if not out or round(value) > out[-1]:
            out.append(round(value))
        value *= ratio
    return [*out, high] if not out or out[-1] != high else out


@dataclass
class TuningResult:
    """What tuning chose and the frontier it measured on the way."""

    params: SearchParams
    recall_at_k: float  # on the held-out validation sample
    met: bool
    frontier: list[dict[str, Any]] = field(default_factory=list)
    tuning_queries: int = 0
    validation_queries: int = 0
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"leaves_to_search": self.params.leaves_to_search,
                "pre_reorder_num_neighbors": self.params.pre_reorder_num_neighbors,
                "recall_at_k": self.recall_at_k, "met": self.met, "frontier": self.frontier,
                "tuning_queries": self.tuning_queries, "validation_queries": self.validation_queries,
                "seconds": round(self.seconds, 3)}


def tune_search_params(index: SimilarityIndex, config: IndexConfig) -> TuningResult:
    """The fastest measured search setting whose recall@k reaches `config.recall_target`.

    Queries are indexed items sampled with `config.seed` (what serving asks: an item's
    neighbours, the item itself excluded), scored against exact search over the final
    dataset. For each `leaves_to_search` on a geometric ladder it finds the smallest
    re-order depth meeting the target on the tuning sample (recall grows with both
    knobs); these points form the frontier, stopping once the smallest depth suffices or
    a few more leaves no longer lower the depth.
    Each such point's per-query time is measured and they are tried fastest first
    on a disjoint validation sample, so the reported recall is not the one the choice
    was fitted to. If none meets the target, the most accurate setting tried is returned
    with `met=False`.
    """
    started = time.monotonic()
    n = len(index)
    half = max(1, min(config.tuning_queries, n // 2)) if n > 1 else 1
    tuning = sample_queries(index, half, config.k, config.seed)
    validation = sample_queries(index, half, config.k, config.seed, skip=half) if n > 1 else tuning
    frontier: list[dict[str, Any]] = []
    candidates: list[tuple[SearchParams, float, dict[str, Any]]] = []  # settings meeting the target

    def point(params: SearchParams, recall: float, note: str) -> dict[str, Any]:
        entry = {"leaves_to_search": params.leaves_to_search,
                 "pre_reorder_num_neighbors": params.pre_reorder_num_neighbors,
                 "tuning_recall": round(recall, 5), "note": note}
        frontier.append(entry)
        return entry

    best_miss: tuple[SearchParams, float, dict[str, Any]] | None = None
    if index.params["algorithm"] == BRUTE_FORCE:
        params = SearchParams()
        recall = measure_recall(index, tuning, params)
        entry = point(params, recall, "exact search")
        if recall >= config.recall_target:
            candidates.append((params, recall, entry))
        else:
            best_miss = (params, recall, entry)
    else:
        leaves_total = int(index.params["num_leaves"])
        depth_ladder = _ladder(tuning.k + 1, max(tuning.k + 1, min(n, 100 * (tuning.k + 1))), 1.5)
        stale = 0
        for leaves in _ladder(1, leaves_total, 1.4):
            deepest = SearchParams(leaves, depth_ladder[-1])
            recall = measure_recall(index, tuning, deepest)
            if recall < config.recall_target:
                entry = point(deepest, recall, "below target even at the deepest re-order")
                if best_miss is None or recall > best_miss[1]:
                    best_miss = (deepest, recall, entry)
                continue
            lo, hi, hi_recall = 0, len(depth_ladder) - 1, recall  # smallest depth meeting the target
            while lo < hi:
                mid = (lo + hi) // 2
                mid_recall = measure_recall(index, tuning, SearchParams(leaves, depth_ladder[mid]))
                if mid_recall >= config.recall_target:
                    hi, hi_recall = mid, mid_recall
                else:
                    lo = mid + 1
            params = SearchParams(leaves, depth_ladder[hi])
            if candidates and params.pre_reorder_num_neighbors >= candidates[-1][0].pre_reorder_num_neighbors:
                # More leaves for the same depth only costs time; give up after a few.
                # Still a candidate: slower, but its higher recall may be what validation needs.
                candidates.append((params, hi_recall, point(params, hi_recall, "more leaves, no shallower depth")))
                stale += 1
                if stale >= _TUNING_PATIENCE:
                    break
                continue
            stale = 0
            candidates.append((params, hi_recall, point(params, hi_recall, "smallest depth meeting target")))
            if hi == 0:
                break
    for params, _, entry in candidates:
        entry["us_per_query"] = round(_time_per_query_us(index, tuning.vectors, tuning.k + 1, params), 2)
    chosen, chosen_recall, met = None, -1.0, False
    for params, _, entry in sorted(candidates, key=lambda c: c[2]["us_per_query"]):
        entry["validation_recall"] = round(measure_recall(index, validation, params), 5)
        if entry["validation_recall"] >= config.recall_target:
            chosen, chosen_recall, met = params, entry["validation_recall"], True
            entry["note"] += "; chosen: fastest also meeting target on validation"
            break
    if chosen is None:
        fallback = max(candidates, key=lambda c: c[1]) if candidates else best_miss
        chosen, chosen_recall = fallback[0], measure_recall(index, validation, fallback[0])
        fallback[2]["validation_recall"] = round(chosen_recall, 5)
    result = TuningResult(chosen, round(chosen_recall, 5), met, frontier, len(tuning.ids), len(validation.ids),
                          time.monotonic() - started)
    log.info("tuned in %.1fs: leaves_to_search=%s pre_reorder=%s recall@%d=%.4f (target %.3f, %s)",
             result.seconds, chosen.leaves_to_search, chosen.pre_reorder_num_neighbors, config.k,
             chosen_recall, config.recall_target, "met" if met else "NOT met")
    return result


def measure_latency(index: SimilarityIndex, queries: np.ndarray, k: int) -> dict[str, float]:
    """Single-query latency (one `search` call per query, as serving does) and batched QPS."""
    singles = queries[: min(len(queries), 1000)]
    times = np.empty(len(singles))
    index.search(singles[:1], k)  # warm-up
    for i, q in enumerate(singles):
        started = time.perf_counter()
        index.search(q[None, :], k)
        times[i] = time.perf_counter() - started
    batch = np.concatenate([queries] * max(1, math.ceil(2000 / max(1, len(queries)))))[:max(2000, len(queries))]
    started = time.perf_counter()
    index.search(batch, k)
    batched = time.perf_counter() - started
    return {"p50_ms": round(float(np.percentile(times, 50)) * 1e3, 4),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 4),
            "qps_single": round(len(singles) / float(times.sum()), 1),
            "qps_batched": round(len(batch) / batched, 1)}


# ---- the stage --------------------------------------------------------------------------


def build_index(embeddings_uri: str, out_dir: str, config: IndexConfig = IndexConfig()) -> dict[str, Any]:
    """Stage 4: read embeddings, build, tune, measure, gate, save; returns the metrics.

    The metrics (`passed`, recall, latency, the tuning frontier) are also written to
    `out_dir/metrics.json`. On a failed gate only that file is written (no index, so
    nothing downstream can pick up a failed build) and `GateFailed` is raised.
    """
    ids, vectors = read_embeddings(embeddings_uri)
    log.info("read %d embeddings of %d dims from %s", len(ids), vectors.shape[1], embeddings_uri)
    index = SimilarityIndex.build(ids, vectors, config)
    tuning = tune_search_params(index, config)
    index.set_search_params(tuning.params)
    queries = sample_queries(index, min(config.tuning_queries, len(index)), config.k, config.seed + 1).vectors
    latency = measure_latency(index, queries, config.k)
    failures = []
    if not tuning.met:
        failures.append(f"recall@{config.k} {tuning.recall_at_k:.4f} < target {config.recall_target} "
                        "at every search setting tried")
    if config.max_p99_ms is not None and latency["p99_ms"] > config.max_p99_ms:
        failures.append(f"p99 latency {latency['p99_ms']:.2f} ms > bound {config.max_p99_ms} ms")
    metrics = {"passed": not failures, "failures": failures, "num_items": len(index), "dims": index.dims,
               "k": config.k, "recall_target": config.recall_target, "recall_at_k": tuning.recall_at_k,
               "max_p99_ms": config.max_p99_ms, **latency, "build_seconds": index.info["build_seconds"],
               "params": index.params, "tuning": tuning.report(), "config": asdict(config)}
    index.info.update(recall_at_k=tuning.recall_at_k, tuning=tuning.report(),
                      **{key: latency[key] for key in ("p50_ms", "p99_ms", "qps_batched")})
    if failures:
        io.remove(io.join(out_dir, MANIFEST))
        io.write_json(io.join(out_dir, METRICS), metrics)
        raise GateFailed("index quality gate: " + "; ".join(failures))
    index.save(out_dir, extra_files={METRICS: metrics})
    log.info("index gate passed: recall@%d %.4f, p50 %.2f ms, p99 %.2f ms, %.0f QPS batched",
             config.k, tuning.recall_at_k, latency["p50_ms"], latency["p99_ms"], latency["qps_batched"])
    return metrics
